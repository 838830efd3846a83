"""One agent WebSocket connection: handshake (auth, registration), then liveness until it ends.

Sequence (`kici.engine.protocol` has the messages and close codes):
1. `auth.request` within `auth_s` (else 4002). Not JSON / another type → `error{INVALID_MESSAGE}` + 4003;
   `protocolVersion < 1` → 4005; unknown or revoked token → `auth.failure` + 4010; else `auth.success`.
2. `agent.register` within `register_s` (else 4002; anything else → 4003). Labels: the user labels must be
   valid and within the token's labels; self-reported `kici:os:*`, `kici:arch:*`, `kici:host:*` and
   `kici:python:*` are allowed (facts about the agent, outside the token's label scope); anything else →
   `auth.failure` + 4010. An agent id is bound to the agent token that first registered it: another
   token registering it (connected or not) → `auth.failure` + 4010 and a `denied` audit row; under the
   same token the new connection replaces the old one (closed with 1001). The `agents` row is
   upserted as connected (group-committed with other registrations: `kici.orchestrator.agents.writes`);
   reply `register.ack`.
   Before the ack, the registry's listener reclaims the agent's in-flight jobs (named in
   `register.ack.reclaimed_jobs`); after it, the listener may dispatch.
3. Afterwards (the token is looked up again every `token_recheck_s`; revoked → `auth.failure` + 4010):
   `heartbeat` (DB `last_seen_at` within `last_seen_write_s`, one statement for every agent that sent one
   meanwhile: `kici.orchestrator.agents.writes`), `agent.status` (kept in
   memory, the listener told), everything else goes to the registry's listener. Silence (no valid frame) for
   `heartbeat_timeout_s` → 4004; an invalid frame → `error` + 4003.
4. On disconnect: row `connected=false`, and the agent's jobs go `recovering` for twice the maximum
   reconnect delay (`store.queue.release_agent_jobs`) — unless the row names another node as the holder
   by then (the agent reconnected to a sibling orchestrator first): that connection owns the jobs
   (group-committed with other disconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket

from kici.engine import protocol as p
from kici.engine.labels import MAX_LABEL_LENGTH, RESERVED_PREFIX, validate_user_labels
from kici.orchestrator.agents.registry import AgentConnection, AgentRegistry
from kici.orchestrator.agents.writes import Disconnect
from kici.orchestrator.config import Settings
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AuditOutcome
from kici.orchestrator.logs import log_event
from kici.orchestrator.store import agents as agent_store
from kici.orchestrator.store import audit as audit_store
from kici.orchestrator.store.tokens import AgentToken

SELF_REPORTED_PREFIXES = tuple(f"{RESERVED_PREFIX}{kind}:" for kind in ("os", "arch", "host", "python"))
INVALID_MESSAGE = "INVALID_MESSAGE"
UNSUPPORTED_PROTOCOL = "UNSUPPORTED_PROTOCOL_VERSION"


@dataclass(frozen=True)
class AgentTimeouts:
    """Handshake and liveness limits in seconds (tests shorten them)."""

    auth_s: float = p.AUTH_TIMEOUT_S
    register_s: float = p.REGISTER_TIMEOUT_S
    heartbeat_unhealthy_s: float = p.HEARTBEAT_UNHEALTHY_S
    heartbeat_timeout_s: float = p.HEARTBEAT_TIMEOUT_S
    last_seen_write_s: float = 60.0
    """Minimum interval between two `last_seen_at` writes caused by heartbeats."""
    token_recheck_s: float = 30.0
    """How often a connected agent's token is looked up again: a revocation made by another orchestrator
    process closes the connection within this time (the process that revoked closes it at once)."""
    token_cache_s: float = 5.0
    """How long this process reuses an agent token row it read (`AgentTokenCache`): a token revoked by
    another orchestrator process is refused to new connections here within this time."""

    @property
    def token_recheck_max_age_s(self) -> float:
        """How old the token row a re-check uses may be; re-checks run this much more often than
        `token_recheck_s`, so a revocation still ends the connection within `token_recheck_s`."""
        return min(self.token_cache_s, self.token_recheck_s / 2)


class _Closed(Exception):
    """The session is over: either the peer went away (`code` is theirs) or we closed it."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class _Rejected(Exception):
    """The agent's registration labels are not allowed (answered with auth.failure + 4010)."""


def check_labels(labels: list[str], token: AgentToken) -> list[str]:
    """The labels to register: the user labels (validated, within the token's scope) followed by the
    self-reported `kici:os|arch|host|python:*` labels. `_Rejected` names the first offending label."""
    user: list[str] = []
    reported: list[str] = []
    for raw in labels:
        label = raw.strip()
        if label.lower().startswith(RESERVED_PREFIX):
            if (
                not label.startswith(SELF_REPORTED_PREFIXES)
                or label.endswith(":")
                or len(label) > MAX_LABEL_LENGTH
                or any(ch.isspace() or ch == "," for ch in label)
            ):
                raise _Rejected(f"label {label[:60]!r} is reserved; agents may only report kici:os|arch|host|python:*")
            if label not in reported:
                reported.append(label)
        else:
            user.append(raw)
    try:
        user = validate_user_labels(user)
    except ValueError as exc:
        raise _Rejected(str(exc)) from None
    allowed = set(token.labels)
    outside = [label for label in user if label not in allowed]
    if outside:
        raise _Rejected(f"label {outside[0][:60]!r} is not allowed by this agent token")
    return user + reported


class AgentSession:
    def __init__(
        self,
        websocket: WebSocket,
        *,
        database: Database,
        settings: Settings,
        registry: AgentRegistry,
        timeouts: AgentTimeouts,
        node_id: str | None = None,
    ) -> None:
        self.ws = websocket
        self.node_id = node_id
        """The cluster node this process is: written on the agent's row as the connection's holder."""
        self.database = database
        self.settings = settings
        self.registry = registry
        self.timeouts = timeouts
        self.connection_id = str(uuid.uuid4())
        self.token: AgentToken | None = None
        self.agent: AgentConnection | None = None

    # -- framing -------------------------------------------------------------------------------------

    async def _receive(self, timeout: float) -> str | bytes:
        """The next data frame; TimeoutError after `timeout`; `_Closed` when the peer went away."""
        async with asyncio.timeout(timeout):  # unlike `wait_for`, no task per frame
            message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise _Closed(int(message.get("code") or 1005), str(message.get("reason") or ""))
        text = message.get("text")
        if text is not None:
            return str(text)
        data = message.get("bytes")
        return bytes(data) if data is not None else b""

    async def _send(self, message: p.Message) -> None:
        if self.agent is not None:
            await self.agent.send(message)
        else:
            await self.ws.send_text(p.encode(message))

    async def _close(self, code: int, reason: str, *, reply: p.Message | None = None) -> _Closed:
        """Optionally send `reply`, close with `code`, and return the `_Closed` to raise."""
        with contextlib.suppress(Exception):  # the peer may already be gone
            if reply is not None:
                await self._send(reply)
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, reason=p.close_reason(reason))
        return _Closed(code, reason)

    async def _invalid(self, detail: str) -> _Closed:
        return await self._close(
            p.CloseCode.INVALID_MESSAGE, detail, reply=p.ErrorMessage(code=INVALID_MESSAGE, message=detail)
        )

    async def _parse(self, frame: str | bytes) -> p.AgentMessage:
        try:
            return p.parse_agent_message(frame)
        except p.ProtocolError as exc:
            raise await self._invalid(str(exc)) from None

    def _log(self, event: str, *, level: str = "info", agent_id: str | None = None, **fields: Any) -> None:
        log_event(
            event,
            level=level,
            connection_id=self.connection_id,
            agent_id=agent_id or (self.agent.agent_id if self.agent else None),
            token_id=self.token.id if self.token else None,
            **fields,
        )

    # -- lifecycle -----------------------------------------------------------------------------------

    async def run(self) -> None:
        await self.ws.accept()
        client = self.ws.client
        self._log("agent.connected", client=f"{client.host}:{client.port}" if client else None)
        code: int | None = None
        reason = ""
        try:
            await self._authenticate()
            await self._register()
            await self._serve()
        except _Closed as closed:
            code, reason = closed.code, closed.reason
        except Exception as exc:  # a bug or the database: the agent reconnects, the jobs wait for it
            self._log("agent.session_error", level="error", error=f"{type(exc).__name__}: {exc}")
            code, reason = p.CloseCode.INTERNAL_ERROR, "internal error"
            await self._close(code, reason)
        finally:
            await self._disconnected(code, reason)

    async def _authenticate(self) -> None:
        try:
            frame = await self._receive(self.timeouts.auth_s)
        except TimeoutError:
            self._log("agent.auth_failed", reason="auth timeout", close_code=int(p.CloseCode.HANDSHAKE_TIMEOUT))
            raise await self._close(p.CloseCode.HANDSHAKE_TIMEOUT, "no auth.request in time") from None
        message = await self._parse(frame)
        if not isinstance(message, p.AuthRequest):
            raise await self._invalid(f"expected auth.request, got {message.type}")
        if message.protocol_version < 1:
            detail = (
                f"unsupported protocol version {message.protocol_version} "
                f"(this orchestrator speaks {p.PROTOCOL_VERSION})"
            )
            self._log("agent.auth_failed", reason=detail, close_code=int(p.CloseCode.PROTOCOL_ERROR))
            raise await self._close(
                p.CloseCode.PROTOCOL_ERROR, detail, reply=p.ErrorMessage(code=UNSUPPORTED_PROTOCOL, message=detail)
            )
        token = await self.registry.tokens.verify(self.database, message.token, max_age=self.timeouts.token_cache_s)
        if token is None:
            reason = "invalid or revoked agent token"  # expired ones too: same answer as revoked
            self._log("agent.auth_failed", reason=reason, close_code=int(p.CloseCode.AUTH_FAILED))
            raise await self._close(p.CloseCode.AUTH_FAILED, reason, reply=p.AuthFailure(reason=reason))
        self.token = token
        await self._send(p.AuthSuccess(connection_id=self.connection_id))
        self._log("agent.authenticated")

    async def _register(self) -> None:
        assert self.token is not None
        token = self.token
        try:
            frame = await self._receive(self.timeouts.register_s)
        except TimeoutError:
            self._log("agent.register_failed", reason="register timeout", close_code=int(p.CloseCode.HANDSHAKE_TIMEOUT))
            raise await self._close(p.CloseCode.HANDSHAKE_TIMEOUT, "no agent.register in time") from None
        message = await self._parse(frame)
        if not isinstance(message, p.AgentRegister):
            raise await self._invalid(f"expected agent.register, got {message.type}")
        try:
            labels = check_labels(message.labels, token)
        except _Rejected as exc:
            self._log(
                "agent.register_failed", agent_id=message.agent_id, reason=str(exc),
                close_code=int(p.CloseCode.AUTH_FAILED),
            )
            raise await self._close(p.CloseCode.AUTH_FAILED, str(exc), reply=p.AuthFailure(reason=str(exc))) from None
        step_uid = message.step_uid if message.step_uid is not None else message.running_as_uid
        if step_uid == 0 and not token.allow_root_steps:
            detail = (
                "this agent would run job steps as root and its token does not allow root steps; set "
                "KICI_AGENT_STEP_USER to an unprivileged user, or create the token with --allow-root-steps"
            )
            raise await self._refuse(message.agent_id, detail)
        agent = AgentConnection(
            agent_id=message.agent_id,
            connection_id=self.connection_id,
            token_id=token.id,
            org_id=token.org_id,
            labels=tuple(labels),
            max_concurrency=message.max_concurrency,
            version=message.version,
            hostname=message.hostname,
            platform=message.platform,
            arch=message.arch,
            in_flight_jobs=tuple((j.run_id, j.job_id) for j in message.in_flight_jobs),
            websocket=self.ws,
        )
        async with self.registry.lock(agent.agent_id):
            current = self.registry.get(agent.agent_id)
            # an agent id belongs to the token that first registered it, connected or not: another
            # token could otherwise reclaim the agent's jobs and report them finished
            refused = current is not None and current.token_id != token.id
            if not refused:
                registered = await self.registry.writes.register(agent_store.Registration(
                    agent_id=agent.agent_id, org_id=token.org_id, agent_token_id=token.id, labels=labels,
                    max_concurrency=agent.max_concurrency, version=agent.version, hostname=agent.hostname,
                    now=agent.connected_at, node_id=self.node_id,
                ))
                refused, agent.holds_jobs = registered.refused, registered.holds_jobs
            if refused:
                raise await self._refuse_binding(agent.agent_id)
            replaced = self.registry.claim(agent)
            self.agent = agent
        if replaced is not None:
            self._log("agent.replaced", replaced_connection_id=replaced.connection_id)
            await replaced.close(p.CloseCode.GOING_AWAY, "replaced by a newer connection of this agent")
        listener = self.registry.listener
        reclaimed = await listener.registered(agent) if listener is not None else []
        await self._send(p.RegisterAck(agent_id=agent.agent_id, labels=list(labels), reclaimed_jobs=reclaimed))
        self._log(
            "agent.registered", labels=list(labels), max_concurrency=agent.max_concurrency,
            version=agent.version, hostname=agent.hostname, in_flight_jobs=len(agent.in_flight_jobs),
            reclaimed_jobs=len(reclaimed) or None,
        )
        if listener is not None:
            await listener.ready(agent)

    async def _refuse_binding(self, agent_id: str) -> _Closed:
        """Another token registered this agent id first."""
        detail = f"agent id {agent_id!r} is bound to another agent token; use a new agent id with this token"
        return await self._refuse(agent_id, detail)

    async def _refuse(self, agent_id: str, detail: str) -> _Closed:
        """A registration the token does not allow: `auth.failure` + 4010 and a `denied` audit row."""
        assert self.token is not None
        self._log("agent.register_failed", agent_id=agent_id, reason=detail, close_code=int(p.CloseCode.AUTH_FAILED),
                  level="warning")
        client = self.ws.client
        async with self.database.transaction() as conn:
            await audit_store.record(
                conn, action="agent.register", outcome=AuditOutcome.DENIED, org_id=self.token.org_id,
                reason=detail, token_id=self.token.id, path="/ws",
                client=f"{client.host}:{client.port}" if client else None,
            )
        return await self._close(p.CloseCode.AUTH_FAILED, detail, reply=p.AuthFailure(reason=detail))

    async def _serve(self) -> None:
        agent = self.agent
        assert agent is not None
        unhealthy_logged = False
        recheck_every = self.timeouts.token_recheck_s - self.timeouts.token_recheck_max_age_s
        next_token_check = time.monotonic() + recheck_every
        while True:
            if time.monotonic() >= next_token_check:
                await self._recheck_token()
                next_token_check = time.monotonic() + recheck_every
            silent = time.monotonic() - agent.last_seen_monotonic
            if silent >= self.timeouts.heartbeat_timeout_s:
                self._log("agent.heartbeat_timeout", silent_s=round(silent, 1),
                          close_code=int(p.CloseCode.HEARTBEAT_TIMEOUT), level="warning")
                raise await self._close(p.CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
            if not unhealthy_logged and silent >= self.timeouts.heartbeat_unhealthy_s:
                unhealthy_logged = True
                self._log("agent.unhealthy", silent_s=round(silent, 1), level="warning")
            wait = self.timeouts.heartbeat_timeout_s - silent
            if not unhealthy_logged:
                wait = min(wait, self.timeouts.heartbeat_unhealthy_s - silent)
            wait = min(wait, next_token_check - time.monotonic())
            try:
                frame = await self._receive(max(wait, 0.0))
            except TimeoutError:
                continue
            message = await self._parse(frame)
            if isinstance(message, p.AuthRequest | p.AgentRegister):
                raise await self._invalid(f"unexpected {message.type} after registration")
            agent.seen()
            unhealthy_logged = False
            if isinstance(message, p.Heartbeat):
                self._heartbeat(agent)
            elif isinstance(message, p.DeliverySync):
                await self._sync(agent, message)
            elif isinstance(message, p.AgentStatus):
                was_draining = agent.status is not None and agent.status.draining
                agent.status = message
                if message.draining != was_draining:
                    # in the database, so every orchestrator's agents list shows it (registration clears it)
                    async with self.database.transaction() as conn:
                        await agent_store.set_agent_draining(conn, agent.agent_id, message.draining)
                    self._log("agent.draining" if message.draining else "agent.draining_ended",
                              agent_id=agent.agent_id, active_jobs=message.active_jobs)
                if self.registry.listener is not None:
                    await self.registry.listener.status(agent)
            elif self.registry.listener is not None:
                await self.registry.listener.message(agent, message)
            else:
                self._log("agent.message_unhandled", level="debug", message_type=message.type)

    async def _sync(self, agent: AgentConnection, message: p.DeliverySync) -> None:
        # The messages before this one were handled in order by this loop (their database writes
        # awaited); what is left is making appended log chunks durable. Unanswered, the agent keeps
        # everything and sends it again after reconnecting: so on failure, close rather than confirm.
        if self.registry.listener is not None:
            try:
                await self.registry.listener.sync(agent)
            except OSError as exc:
                self._log("agent.sync_failed", level="error", error=str(exc))
                raise await self._close(p.CloseCode.INTERNAL_ERROR, "could not store the agent's messages") from None
        await self._send(p.DeliverySynced(id=message.id))

    async def _recheck_token(self) -> None:
        assert self.token is not None
        state = await self.registry.tokens.state(
            self.database, self.token.id, max_age=self.timeouts.token_recheck_max_age_s
        )
        if state != "active":
            self.registry.tokens.forget(self.token.id)
            reason = "agent token expired" if state == "expired" else "agent token revoked"
            self._log("agent.token_expired" if state == "expired" else "agent.token_revoked",
                      close_code=int(p.CloseCode.AUTH_FAILED), level="warning")
            raise await self._close(p.CloseCode.AUTH_FAILED, reason, reply=p.AuthFailure(reason=reason))

    def _heartbeat(self, agent: AgentConnection) -> None:
        self.registry.writes.seen(agent.agent_id, agent.last_seen_at, interval_s=self.timeouts.last_seen_write_s)

    async def _disconnected(self, code: int | None, reason: str) -> None:
        agent = self.agent
        if agent is None:
            self._log("agent.disconnected", close_code=code, reason=reason or None)
            return
        released: list[str] = []
        async with self.registry.lock(agent.agent_id):
            if not self.registry.release(agent):
                self._log("agent.disconnected", close_code=code, reason=reason or None, replaced=True)
                return
            self.registry.writes.forget_seen(agent.agent_id)
            window = dt.timedelta(milliseconds=2 * self.settings.agent_max_reconnect_delay_ms)
            deadline = dt.datetime.now(dt.UTC) + window
            try:
                released = await self.registry.writes.disconnect(
                    Disconnect(agent.agent_id, last_seen_at=agent.last_seen_at, recovery_deadline=deadline,
                               node_id=self.node_id)
                )
            except Exception as exc:
                self._log("agent.disconnect_failed", level="error", error=f"{type(exc).__name__}: {exc}")
        self._log(
            "agent.disconnected", close_code=code, reason=reason or None,
            recovering_jobs=len(released) or None,
        )
        if self.registry.listener is not None:
            try:
                await self.registry.listener.disconnected(agent, released)
            except Exception as exc:
                self._log("agent.disconnect_hook_failed", level="error", error=f"{type(exc).__name__}: {exc}")
