"""Leader duties under a lease with a fencing term.

The leader lease is one row (`leader_lease`: holder, term, expires_at). A node becomes leader with a
conditional UPDATE that only succeeds once the lease ran out, raising the term by one; it renews every
third of the lease. A leader duty (sweeps, schedules, retention, the reporting outbox) runs only while
this node believes it leads, and every transaction in which such a duty writes first calls
`Leadership.fence(conn)`: the lease row is read under the held term, checked against the database's
clock and locked `FOR SHARE` until the transaction ends. A leader paused longer than its lease (SIGSTOP,
a long GC, a VM migration) finds a new term when it resumes: its late write is refused (`FencedOut`,
logged as `cluster.leader_write_refused`), its transaction rolls back and it steps down. A takeover
cannot slip in between the check and the commit: it updates the locked row, so it waits for the commit.
A leader stopped inside such a transaction is ended by PostgreSQL after the lease
(`idle_in_transaction_session_timeout`), which rolls it back and lets the takeover through.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.logs import log_event
from kici.orchestrator.store import cluster as cluster_store


class FencedOut(Exception):
    """This node does not (or no longer) hold the leader lease: the leader duty's write is refused."""


class Leadership:
    """This node's standing as leader. Disabled (not part of a cluster node: a component driven directly,
    as tests do), every duty may act and the fence lets everything through."""

    def __init__(self) -> None:
        self.enabled = False
        self.node_id: str | None = None
        self.term: int | None = None
        self.lease_ms = 0
        self.on_lost: Callable[[int], None] = lambda term: None
        """Told (with the lost term) when this node learns it no longer leads."""
        self.on_refused: Callable[[], None] = lambda: None
        """Told each time a leader write is refused (`kici_cluster_fenced_writes_total`)."""

    def enable(self, node_id: str, lease_ms: int) -> None:
        self.enabled = True
        self.node_id = node_id
        self.lease_ms = lease_ms

    def may_act(self) -> bool:
        """Whether leader duties should run now (the fence still has the last word)."""
        return not self.enabled or self.term is not None

    @property
    def is_leader(self) -> bool:
        return self.enabled and self.term is not None

    def gained(self, term: int) -> None:
        self.term = term

    def lost(self, term: int, *, action: str, reason: str) -> None:
        """The lease under `term` is gone (another node took over, or it ran out while this node was away)."""
        if self.term != term:
            return
        self.term = None
        log_event("cluster.leadership_lost", level="warning", node=self.node_id, term=term, action=action,
                  reason=reason)
        self.on_lost(term)

    def refuse(self, term: int, action: str) -> FencedOut:
        self.on_refused()
        log_event("cluster.leader_write_refused", level="warning", node=self.node_id, term=term, action=action,
                  reason="the leader lease is no longer held under this term")
        self.lost(term, action=action, reason="fenced")
        return FencedOut(f"{action}: node {self.node_id} no longer leads under term {term}")

    async def fence(self, conn: AsyncConnection, action: str) -> None:
        """Check, in the caller's transaction, that this node still leads under its term; `FencedOut`
        (which rolls the transaction back) when it does not. A no-op when disabled."""
        if not self.enabled:
            return
        term = self.term
        if term is None:
            raise FencedOut(f"{action}: node {self.node_id} is not the leader")
        assert self.node_id is not None
        await cluster_store.limit_idle_transaction(conn, self.lease_ms)
        now = await cluster_store.db_now(conn)
        if not await cluster_store.hold_lease(conn, self.node_id, term, now=now):
            raise self.refuse(term, action)
