"""The cross-node bus: small messages from one orchestrator node to every node (itself included).

API:
- `await bus.publish(topic, payload, durable=True, local=True)` — `payload` is a JSON object.
  Subscribers of this process get it at once (unless `local=False`); the other nodes' through
  PostgreSQL `NOTIFY` (a dedicated, reconnecting `LISTEN` connection per node). A durable message is
  also written to `cluster_events`, which every node reads every `KICI_CLUSTER_POLL_MS`: a NOTIFY lost
  while a node's listening connection was down is delivered by that poll, exactly once per node. A
  non-durable message (a wake-up backed by its own periodic poll) is NOTIFY only, and not sent at all
  while this node knows no live peer.
- `bus.subscribe(topic, handler)` — `handler(topic, payload)` (sync or async) for every message of
  `topic`; a topic ending in `*` is a prefix (`job-log:*`). Returns a function that unsubscribes.
  Handlers run in the node's event loop, one message at a time per node; keep them short.

Topics in use: `agent.cancel` (a cancel for the agent's connection, wherever it is), `agent.close`,
`agent-token.revoked` (close the token's agents everywhere),
`dispatch.forget` (jobs that ended without their agent's report: free their slots), `dispatch.wake`
(work was queued), `reports.wake` (the outbox has something for the leader), `source.changed` (drop
cached copies of a source: `services.source_changed`), `job-log` (`{"job_ids": [...]}`: these jobs' logs
grew, wake their followers; non-durable and coalesced, `kici.orchestrator.storage.log_wakeups`).

On SQLite (one node) NOTIFY does not exist: messages reach this process's subscribers, and durable ones
are also written to and polled from the table, so a second process on the same file still gets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kici.engine import aio
from kici.orchestrator.db.database import Database
from kici.orchestrator.logs import log_event
from kici.orchestrator.store import cluster as cluster_store

CHANNEL = "kici_cluster"
NOTIFY_MAX_BYTES = 7900
"""PostgreSQL refuses NOTIFY payloads of 8000 bytes or more; a larger message goes by id only."""
GAP_KEEP_S = 30.0
"""How long an id skipped by the poll (a transaction that took it had not committed yet) is looked for."""
MAX_GAP = 200
SEEN_KEEP_S = 120.0
RECONNECT_MAX_S = 5.0
LISTEN_CHECK_S = 5.0

Handler = Callable[[str, dict[str, Any]], Awaitable[None] | None]


class ClusterBus:
    def __init__(self, database: Database, *, origin: str, poll_ms: int) -> None:
        self.database = database
        self.origin = origin
        """Unique per process (node id + incarnation): a node ignores its own messages coming back."""
        self.poll_s = poll_ms / 1000
        self._handlers: list[tuple[str, Handler]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._last_id = 0
        self._gaps: dict[int, float] = {}
        self._seen: dict[int, float] = {}
        self._poll_now = asyncio.Event()
        self._inbox: asyncio.Queue[tuple[int | None, str, dict[str, Any]]] = asyncio.Queue()
        self.listening = False
        """Whether the LISTEN connection is up (PostgreSQL)."""
        self.peers = 0
        """Other live nodes at this node's last heartbeat: with none, non-durable messages stay local."""

    # -- API ---------------------------------------------------------------------------------------

    def subscribe(self, topic: str, handler: Handler) -> Callable[[], None]:
        entry = (topic, handler)
        self._handlers.append(entry)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._handlers.remove(entry)

        return unsubscribe

    async def publish(
        self, topic: str, payload: dict[str, Any], *, durable: bool = True, local: bool = True
    ) -> None:
        """Deliver to this process's subscribers (unless `local=False`: the caller handled its own node),
        then to the other nodes (see the module docstring)."""
        if local:
            await self._deliver(topic, payload)
        event_id: int | None = None
        if durable:
            async with self.database.transaction() as conn:
                event_id = await cluster_store.insert_event(conn, topic=topic, payload=payload, origin=self.origin)
                self._seen[event_id] = time.monotonic()
                if self.database.is_postgresql:
                    await self._notify(conn, event_id, topic, payload)
        elif self.database.is_postgresql and self.peers > 0:
            async with self.database.transaction() as conn:
                await self._notify(conn, None, topic, payload)

    async def _notify(self, conn: Any, event_id: int | None, topic: str, payload: dict[str, Any]) -> None:
        from sqlalchemy import text

        message = json.dumps({"o": self.origin, "i": event_id, "t": topic, "p": payload}, separators=(",", ":"))
        if len(message.encode()) > NOTIFY_MAX_BYTES:
            if event_id is None:
                log_event("cluster.bus_message_too_large", level="warning", topic=topic, bytes=len(message))
                return
            message = json.dumps({"o": self.origin, "i": event_id})
        await conn.execute(text("SELECT pg_notify(:channel, :message)"), {"channel": CHANNEL, "message": message})

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin receiving (the tables exist: called once the database is prepared)."""
        async with self.database.read() as conn:
            self._last_id = await cluster_store.last_event_id(conn)
        self._tasks = [asyncio.create_task(self._dispatch_loop(), name="kici-bus-dispatch"),
                       asyncio.create_task(self._poll_loop(), name="kici-bus-poll")]
        if self.database.is_postgresql:
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="kici-bus-listen"))

    async def stop(self) -> None:
        await aio.cancel_and_wait(*self._tasks)
        self._tasks = []

    # -- receiving ---------------------------------------------------------------------------------

    async def _deliver(self, topic: str, payload: dict[str, Any]) -> None:
        for pattern, handler in list(self._handlers):
            if pattern == topic or (pattern.endswith("*") and topic.startswith(pattern[:-1])):
                try:
                    result = handler(topic, payload)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    log_event("cluster.bus_handler_failed", level="error", topic=topic,
                              error=f"{type(exc).__name__}: {exc}")

    def _on_notify(self, _conn: object, _pid: int, _channel: str, raw: str) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("o") == self.origin:
            return
        event_id = message.get("i")
        if "t" not in message:  # too large for NOTIFY: read it from the table
            self._poll_now.set()
            return
        self._inbox.put_nowait((event_id if isinstance(event_id, int) else None, str(message["t"]),
                                dict(message.get("p") or {})))

    async def _dispatch_loop(self) -> None:
        while True:
            event_id, topic, payload = await self._inbox.get()
            if event_id is not None:
                if event_id in self._seen:
                    continue
                self._seen[event_id] = time.monotonic()
            await self._deliver(topic, payload)

    async def _poll_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await aio.wait_for(self._poll_now.wait(), self.poll_s)
            self._poll_now.clear()
            try:
                await self.poll()
            except Exception as exc:
                log_event("cluster.bus_poll_failed", level="warning", error=f"{type(exc).__name__}: {exc}")

    async def poll(self) -> int:
        """Read durable messages not delivered yet; how many were delivered."""
        now = time.monotonic()
        self._gaps = {i: t for i, t in self._gaps.items() if now - t < GAP_KEEP_S}
        self._seen = {i: t for i, t in self._seen.items() if now - t < SEEN_KEEP_S}
        async with self.database.read() as conn:
            events = await cluster_store.events_after(conn, self._last_id, missing=sorted(self._gaps))
        delivered = 0
        for event in events:
            self._gaps.pop(event.id, None)
            if event.id > self._last_id:
                # ids in between belong to transactions still open (or rolled back); a jump wider than
                # MAX_GAP is a sequence that moved on while the table was empty, not open transactions
                if event.id - self._last_id <= MAX_GAP:
                    for skipped in range(self._last_id + 1, event.id):
                        self._gaps.setdefault(skipped, now)
                self._last_id = event.id
            if event.id in self._seen or event.origin == self.origin:
                continue
            self._seen[event.id] = now
            await self._deliver(event.topic, event.payload)
            delivered += 1
        return delivered

    async def _listen_loop(self) -> None:
        delay = 0.2
        while True:
            conn: Any = None
            try:
                conn = await self.database.connect_listener()
                await conn.add_listener(CHANNEL, self._on_notify)
                self.listening = True
                delay = 0.2
                self._poll_now.set()  # anything sent while no connection listened
                log_event("cluster.bus_listening", level="debug", channel=CHANNEL)
                while True:
                    await asyncio.sleep(LISTEN_CHECK_S)
                    await aio.wait_for(conn.execute("SELECT 1"), LISTEN_CHECK_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log_event("cluster.bus_listen_failed", level="warning", error=f"{type(exc).__name__}: {exc}",
                          retry_in_s=delay)
            finally:
                self.listening = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await aio.wait_for(conn.close(), 2)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)


def prune_horizon(now: dt.datetime) -> dt.datetime:
    """Durable messages older than this are deleted (by the leader): every live node has polled them."""
    return now - dt.timedelta(minutes=10)
