"""The agent's WebSocket connection to the orchestrator: handshake, liveness, reconnects, and an outbox
that keeps job messages across disconnects.

Handshake (`kici.engine.protocol`): `auth.request` → `auth.success` (or `auth.failure`/close 4010/4001:
`AuthRejected`, never retried), `agent.register` with the jobs still in flight → `register.ack`. Then
`agent.status`, a `heartbeat` every interval and a `job.heartbeat` per running job.

Delivery: every message goes through one FIFO outbox, sent by one writer task, so `job.ack` always
precedes the job's `running` status. Job messages that were sent are kept until a `delivery.sync` sent
after them is answered by `delivery.synced`: the orchestrator answers once everything before it is
durable (in its database and log store). A WebSocket pong would only say the frames were read, and an
orchestrator killed right after reading them would lose a job's result while the agent forgot the job —
which then looked, after the reconnect, like a job the agent had dropped. So a connection or an
orchestrator that dies with data in flight loses nothing: unconfirmed messages are sent again after the
next `register.ack` (log chunks keep their `seq`, which the orchestrator uses to store a chunk once), and
a finished job stays in `in_flight_jobs` until its terminal status is confirmed. While offline, job messages
are buffered in bounded rings (events and log lines; oldest dropped first; terminal job statuses are
never dropped); control messages and job heartbeats are not buffered. A job that lost messages gets one
gap-marker line in its setup log ahead of its replayed messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from kici.agent.log import log_event
from kici.engine import aio
from kici.engine import protocol as p

MAX_BUFFERED_EVENTS = 5000
MAX_BUFFERED_LOG_LINES = 10_000
HANDSHAKE_TIMEOUT_S = 15.0
FATAL_CLOSE_CODES = frozenset({p.CloseCode.AUTH_FAILED, p.CloseCode.UNAUTHORIZED})
SETUP_STEP = -1

Kind = Literal["control", "volatile", "event", "terminal", "log"]
"""`control`: agent-level, only sent while connected. `volatile`: job heartbeats, not buffered.
`event`: step/job status updates. `terminal`: the final job.status, never dropped. `log`: a log chunk."""


class AuthRejected(Exception):
    """The orchestrator refused the token or the registration; reconnecting would not help."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Item:
    kind: Kind
    message: p.Message | None = None
    job_id: str | None = None
    run_id: str | None = None
    step_index: int = SETUP_STEP
    lines: list[str] = field(default_factory=list)
    timestamp: float = 0.0
    seq: int | None = None
    """A log chunk's sequence number, given when it is first sent and kept when it is sent again."""
    dropped: bool = False
    """Dropped from the offline buffer; still in the queue until the next compaction, never sent."""


def backoff_delay_ms(attempt: int, max_delay_ms: int, rand: float | None = None) -> float:
    """`min(1000·1.5^n·(1+U[0,½]), max)`: the reconnect delay before attempt `n + 1`."""
    jitter = random.random() if rand is None else rand
    return float(min(1000 * 1.5 ** min(attempt, 60) * (1 + jitter / 2), max_delay_ms))


class AgentHooks(Protocol):
    """What the connection needs from the job side."""

    def registration(self) -> p.AgentRegister: ...

    def agent_status(self) -> p.AgentStatus: ...

    def running_jobs(self) -> list[tuple[str, str]]:
        """(run_id, job_id) of the jobs to send `job.heartbeat` for."""
        ...

    def on_registered(self, ack: p.RegisterAck, in_flight: list[p.InFlightJob]) -> set[str]:
        """After `register.ack`: abandon the in-flight jobs not reclaimed; returns the job ids abandoned."""
        ...

    def on_message(self, message: p.OrchestratorMessage) -> None: ...

    def on_delivered(self, job_id: str) -> None:
        """The job's terminal status has reached the orchestrator."""
        ...


class Connection:
    def __init__(
        self,
        urls: Sequence[str],
        token: str,
        hooks: AgentHooks,
        *,
        heartbeat_interval_s: float,
        job_heartbeat_interval_s: float,
        max_reconnect_delay_ms: int,
    ) -> None:
        if not urls:
            raise ValueError("at least one orchestrator URL is needed")
        self.urls = list(urls)
        """The orchestrators to try, in turn: one after another on each failure or disconnect."""
        self._current = 0
        self._token = token
        self.hooks = hooks
        self.heartbeat_interval_s = heartbeat_interval_s
        self.job_heartbeat_interval_s = job_heartbeat_interval_s
        self.max_reconnect_delay_ms = max_reconnect_delay_ms
        self.registered = False
        """True between `register.ack` and the end of that connection (drives `/ready`)."""
        self.reconnects = 0
        self.lines_dropped = 0
        self.events_dropped = 0
        self._items: deque[Item] = deque()
        # While offline, the buffered events and log chunks are also referenced from two rings in queue
        # order, so the oldest of a kind is found in O(1); a dropped item is flagged and left in
        # `_items` until the next compaction (so dropping never rescans the queue).
        self._ring_events: deque[Item] = deque()
        self._ring_logs: deque[Item] = deque()
        self._ring_lines = 0
        self._flagged = 0
        self._unconfirmed: list[Item] = []
        self._next_seq: dict[str, int] = {}
        self._dropped: dict[str, list[int]] = {}
        """job id → [events, log lines] dropped while offline (reset at each replay)."""
        self._offline_since: float | None = time.monotonic()
        self._wake = asyncio.Event()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._stopping = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._generation = 0
        self._pinging = False
        """A `delivery.sync` is out and not yet answered."""
        self._sync_id = 0
        self._syncs: dict[int, asyncio.Future[None]] = {}
        self._confirmers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """The orchestrator connected to (or tried next)."""
        return self.urls[self._current]

    # -- the outbox ---------------------------------------------------------------------------------

    def send_control(self, message: p.Message) -> None:
        """An agent-level message (ack, reject, status): sent if connected, else dropped (the state it
        describes is sent again after the next registration)."""
        if self.registered:
            self._put(Item("control", message))

    def send_job(self, job_id: str, run_id: str, message: p.Message, *, terminal: bool = False) -> None:
        kind: Kind = "terminal" if terminal else "event"
        if isinstance(message, p.JobHeartbeat):
            if not self.registered:
                return
            kind = "volatile"
        self._put(Item(kind, message, job_id=job_id, run_id=run_id))

    def send_log(self, job_id: str, run_id: str, step_index: int, lines: list[str]) -> None:
        self._put(Item("log", job_id=job_id, run_id=run_id, step_index=step_index, lines=list(lines),
                       timestamp=time.time()))

    def discard(self, job_id: str) -> None:
        """Forget everything still queued for a job (the orchestrator did not take it back)."""
        self._items = deque(i for i in self._items if i.job_id != job_id)
        self._unconfirmed = [i for i in self._unconfirmed if i.job_id != job_id]
        if not self.registered:
            self._rebuild_rings()
        self._next_seq.pop(job_id, None)
        self._dropped.pop(job_id, None)
        self._update_flushed()

    def _put(self, item: Item) -> None:
        self._items.append(item)
        self._flushed.clear()
        if not self.registered:
            self._track(item)
            self._enforce_bounds()
        self._wake.set()

    def _track(self, item: Item) -> None:
        if item.kind == "event":
            self._ring_events.append(item)
        elif item.kind == "log":
            self._ring_logs.append(item)
            self._ring_lines += len(item.lines)

    def _rebuild_rings(self) -> None:
        self._ring_events.clear()
        self._ring_logs.clear()
        self._ring_lines = 0
        for item in self._items:
            if not item.dropped:
                self._track(item)

    def _enforce_bounds(self) -> None:
        """Drop the oldest buffered events / log chunks beyond the bounds (offline only)."""
        while len(self._ring_events) > MAX_BUFFERED_EVENTS:
            item = self._ring_events.popleft()
            item.dropped = True
            self._count_drop(item, events=1)
        while self._ring_lines > MAX_BUFFERED_LOG_LINES and self._ring_logs:
            item = self._ring_logs.popleft()
            item.dropped = True
            self._ring_lines -= len(item.lines)
            self._count_drop(item, lines=len(item.lines))
        if self._flagged > MAX_BUFFERED_EVENTS + MAX_BUFFERED_LOG_LINES:
            self._compact()

    def _compact(self) -> None:
        self._items = deque(i for i in self._items if not i.dropped)
        self._flagged = 0

    def _count_drop(self, item: Item, *, events: int = 0, lines: int = 0) -> None:
        self._flagged += 1
        self.events_dropped += events
        self.lines_dropped += lines
        if item.job_id is not None:
            counts = self._dropped.setdefault(item.job_id, [0, 0])
            counts[0] += events
            counts[1] += lines

    def _update_flushed(self) -> None:
        if not self._items and not self._unconfirmed:
            self._flushed.set()

    def _build(self, item: Item) -> p.Message:
        if item.kind != "log":
            assert item.message is not None
            return item.message
        assert item.job_id is not None and item.run_id is not None
        if item.seq is None:
            item.seq = self._next_seq.get(item.job_id, 0)
            self._next_seq[item.job_id] = item.seq + 1
        return p.LogChunk(run_id=item.run_id, job_id=item.job_id, step_index=item.step_index, lines=item.lines,
                          timestamp=item.timestamp, seq=item.seq)

    def _went_offline(self) -> None:
        """The connection ended: sent-but-unconfirmed job messages go back to the front of the queue."""
        if self._offline_since is None:
            self._offline_since = time.monotonic()
        self.registered = False
        self._generation += 1
        self._pinging = False
        for waiter in self._syncs.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("the connection ended before delivery.synced"))
        self._syncs.clear()
        requeue = [i for i in self._unconfirmed if i.kind in ("event", "terminal", "log")]
        rest = [i for i in self._items if i.kind in ("event", "terminal", "log")]
        self._items = deque([*requeue, *rest])
        self._unconfirmed = []
        self._rebuild_rings()
        self._enforce_bounds()
        self._update_flushed()

    def _prepare_replay(self) -> None:
        """Right after `register.ack`: put one gap marker per job that lost messages ahead of its
        messages that were never sent (after those sent before, which keep their lower seq)."""
        offline_s = time.monotonic() - self._offline_since if self._offline_since is not None else 0.0
        self._offline_since = None
        self._compact()
        self._ring_events.clear()
        self._ring_logs.clear()
        self._ring_lines = 0
        for job_id, (events, lines) in list(self._dropped.items()):
            if not events and not lines:
                continue
            items = [i for i in self._items if i.job_id == job_id]
            if not items:
                continue
            replayed = len(items)
            marker = (
                f"--- orchestrator offline for {offline_s:.0f}s: replaying {replayed} buffered messages; "
                f"{events} status events and {lines} log lines were dropped ---"
            )
            run_id = items[0].run_id
            position = 0
            for index, item in enumerate(self._items):
                if item.job_id == job_id and item.seq is not None:
                    position = index + 1
            self._items.insert(position, Item("log", job_id=job_id, run_id=run_id, step_index=SETUP_STEP,
                                              lines=[marker], timestamp=time.time()))
        self._dropped.clear()

    # -- running --------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def wait_flushed(self, timeout: float) -> bool:
        """Wait until every queued job message has been sent and confirmed; False on timeout."""
        try:
            await aio.wait_for(self._flushed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self.stop()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close(1000, "agent stopping")

    async def run(self) -> None:
        """Connect and serve, reconnecting with back-off, until `stop()`. Raises `AuthRejected`."""
        attempt = 0
        while not self._stopping.is_set():
            try:
                async with connect(self.url, open_timeout=HANDSHAKE_TIMEOUT_S, max_size=64 * 1024 * 1024,
                                   proxy=None, close_timeout=2) as ws:
                    self._ws = ws
                    await self._handshake(ws)
                    attempt = 0
                    await self._serve(ws)
                # the connection closed cleanly (the iteration ended without an exception)
                if ws.close_code in FATAL_CLOSE_CODES:
                    raise AuthRejected(ws.close_reason or f"connection closed with code {ws.close_code}")
                if not self._stopping.is_set():
                    log_event("connection.closed", level="warning", code=ws.close_code,
                              reason=ws.close_reason or None)
            except AuthRejected:
                raise
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
                if code in FATAL_CLOSE_CODES:
                    raise AuthRejected(reason or f"connection closed with code {code}") from None
                log_event("connection.closed", level="warning", code=code, reason=reason or None)
            except (OSError, TimeoutError, InvalidHandshake, p.ProtocolError) as exc:
                log_event("connection.failed", level="warning", error=f"{type(exc).__name__}: {exc}")
            except InvalidURI as exc:
                raise AuthRejected(f"invalid orchestrator URL: {exc}") from None
            finally:
                self._ws = None
                self._went_offline()
            if self._stopping.is_set():
                break
            # the next orchestrator in turn (a dead one is left at once); the back-off grows per round
            # through the list, so a failover to a live sibling is not slowed by the dead one's failures
            self._current = (self._current + 1) % len(self.urls)
            delay = backoff_delay_ms(attempt // len(self.urls), self.max_reconnect_delay_ms) / 1000
            attempt += 1
            self.reconnects += 1
            log_event("connection.retry", delay_ms=round(delay * 1000), attempt=attempt, url=self.url)
            with contextlib.suppress(TimeoutError):
                await aio.wait_for(self._stopping.wait(), delay)

    async def _recv(self, ws: ClientConnection, timeout: float) -> p.OrchestratorMessage:
        frame = await aio.wait_for(ws.recv(), timeout)
        return p.parse_orchestrator_message(frame)

    async def _handshake(self, ws: ClientConnection) -> None:
        await ws.send(p.encode(p.AuthRequest(token=self._token)))
        reply = await self._recv(ws, HANDSHAKE_TIMEOUT_S)
        if isinstance(reply, p.AuthFailure):
            raise AuthRejected(reply.reason)
        if not isinstance(reply, p.AuthSuccess):
            raise p.ProtocolError(f"expected auth.success, got {reply.type}")
        register = self.hooks.registration()
        await ws.send(p.encode(register))
        reply = await self._recv(ws, HANDSHAKE_TIMEOUT_S)
        while isinstance(reply, p.ErrorMessage):
            log_event("orchestrator.error", level="warning", code=reply.code, message=reply.message)
            reply = await self._recv(ws, HANDSHAKE_TIMEOUT_S)
        if isinstance(reply, p.AuthFailure):
            raise AuthRejected(reply.reason)
        if not isinstance(reply, p.RegisterAck):
            raise p.ProtocolError(f"expected register.ack, got {reply.type}")
        abandoned = self.hooks.on_registered(reply, register.in_flight_jobs)
        for job_id in abandoned:
            self.discard(job_id)
        self._prepare_replay()
        self.registered = True
        self._items.appendleft(Item("control", self.hooks.agent_status()))
        self._flushed.clear()
        self._wake.set()
        log_event("connection.registered", agent_id=reply.agent_id, labels=reply.labels,
                  reclaimed_jobs=reply.reclaimed_jobs or None, abandoned_jobs=sorted(abandoned) or None)

    async def _serve(self, ws: ClientConnection) -> None:
        tasks = [
            asyncio.create_task(self._writer(ws)),
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._job_heartbeats()),
        ]

        def on_done(task: asyncio.Task[None]) -> None:
            # A sender that stops for any reason but the connection closing would silently stall the
            # job messages: drop the connection instead, so the reconnect starts over cleanly.
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None and not isinstance(exc, ConnectionClosed):
                log_event("connection.sender_failed", level="error", error=f"{type(exc).__name__}: {exc}")
                closing = asyncio.ensure_future(ws.close(1011, "agent internal error"))
                self._confirmers.add(closing)
                closing.add_done_callback(self._confirmers.discard)

        for task in tasks:
            task.add_done_callback(on_done)
        try:
            async for frame in ws:
                try:
                    message = p.parse_orchestrator_message(frame)
                except p.ProtocolError as exc:
                    log_event("orchestrator.invalid_message", level="warning", error=str(exc))
                    continue
                if isinstance(message, p.ErrorMessage):
                    log_event("orchestrator.error", level="warning", code=message.code, message=message.message)
                    continue
                if isinstance(message, p.DeliverySynced):
                    waiter = self._syncs.pop(message.id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                    continue
                # type and ids only: a dispatch carries secrets and the clone token
                log_event("orchestrator.message", level="debug", type=message.type,
                          job_id=getattr(message, "job_id", None), run_id=getattr(message, "run_id", None))
                self.hooks.on_message(message)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _writer(self, ws: ClientConnection) -> None:
        generation = self._generation
        while True:
            while self._items:
                item = self._items[0]
                if not item.dropped:
                    await ws.send(p.encode(self._build(item)))
                if self._items and self._items[0] is item:
                    self._items.popleft()
                if item.dropped:
                    continue
                if item.kind in ("event", "terminal", "log"):
                    self._unconfirmed.append(item)
            if self._unconfirmed and not self._pinging:
                self._pinging = True
                self._sync_id += 1
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._syncs[self._sync_id] = waiter
                await ws.send(p.encode(p.DeliverySync(id=self._sync_id)))
                task = asyncio.create_task(self._confirm(waiter, len(self._unconfirmed), generation))
                self._confirmers.add(task)
                task.add_done_callback(self._confirmers.discard)
            self._update_flushed()
            self._wake.clear()
            if self._items or (self._unconfirmed and not self._pinging):
                continue  # woken between the checks above and the clear
            await self._wake.wait()

    async def _confirm(self, waiter: Awaitable[None], count: int, generation: int) -> None:
        try:
            await waiter
        except Exception:  # the connection went away: `_went_offline` requeues the unconfirmed messages
            return
        if generation != self._generation:
            return
        confirmed, self._unconfirmed = self._unconfirmed[:count], self._unconfirmed[count:]
        self._pinging = False
        for item in confirmed:
            if item.kind == "terminal" and item.job_id is not None:
                self._next_seq.pop(item.job_id, None)
                log_event("job.delivered", job_id=item.job_id, run_id=item.run_id)
                self.hooks.on_delivered(item.job_id)
        self._update_flushed()
        self._wake.set()

    async def _heartbeats(self) -> None:
        while True:
            self._put(Item("control", p.Heartbeat(timestamp=time.time())))
            await asyncio.sleep(self.heartbeat_interval_s)

    async def _job_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.job_heartbeat_interval_s)
            for run_id, job_id in self.hooks.running_jobs():
                self.send_job(job_id, run_id, p.JobHeartbeat(run_id=run_id, job_id=job_id, timestamp=time.time()))


def new_message_id() -> str:
    return str(uuid.uuid4())
