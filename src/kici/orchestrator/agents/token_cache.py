"""Agent tokens as this process last read them, so a reconnect storm does not cost a database round trip
(and a write to the same token row) per connection.

Every agent of a pool usually shares one token: after a node dies, a thousand agents authenticate with
it within a second. Without the cache each connection read the token row and rewrote its `last_used_at`,
and those writes queued on the row's lock, one commit (an fsync) each. Now:

- A token row read is reused for `max_age` seconds (the caller's bound; concurrent lookups of one token
  share one read). A revocation made by this process is applied at once (`forget`); one made by another
  orchestrator process is seen within that bound (`AgentTimeouts.token_cache_s` for new connections; the
  periodic re-check of a connected agent asks for a row young enough to keep its own bound, see
  `kici.orchestrator.agents.session`).
- `last_used_at` is written at most once per `TOUCH_INTERVAL_S` per token and process: it says when a
  token was last used, to the minute, like the admin tokens' column.

Unknown tokens are never cached (a client guessing tokens cannot grow it): the cache holds at most one
entry per agent token that exists.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import utcnow
from kici.orchestrator.store import tokens as token_store
from kici.orchestrator.store.tokens import AgentToken, hash_token

TOUCH_INTERVAL_S = 60.0


class AgentTokenCache:
    def __init__(self, touch_interval_s: float = TOUCH_INTERVAL_S) -> None:
        self.touch_interval_s = touch_interval_s
        self._by_digest: dict[str, tuple[float, AgentToken]] = {}
        self._digest_of: dict[str, str] = {}
        """token id → digest, to refresh or forget an entry by id."""
        self._reads: dict[str, asyncio.Task[AgentToken | None]] = {}
        """Reads in progress, by key: callers asking for the same row wait for the same read."""
        self._forgotten: dict[str, float] = {}
        """token id → when `forget` was last called for it."""
        self._touched: dict[str, float] = {}

    async def verify(self, database: Database, plaintext: str, *, max_age: float) -> AgentToken | None:
        """The active token with this plaintext (read at most `max_age` seconds ago), or None."""
        digest = hash_token(plaintext)
        cached = self._fresh(digest, max_age)
        token = cached if cached is not None else await self._read(
            "digest:" + digest, lambda: _read_by_digest(database, digest)
        )
        if token is None or not token.active:
            return None
        await self._touch(database, token)
        return token

    async def state(self, database: Database, token_id: str, *, max_age: float) -> str:
        """`active`, `revoked`, `expired` or `unknown`, from a row read at most `max_age` seconds ago."""
        digest = self._digest_of.get(token_id)
        token = self._fresh(digest, max_age) if digest is not None else None
        if token is None:
            token = await self._read("id:" + token_id, lambda: _read_by_id(database, token_id))
        if token is None:
            return "unknown"
        if token.revoked_at is not None:
            return "revoked"
        return "expired" if token.expired else "active"

    def forget(self, token_id: str) -> None:
        """Drop what is known about this token (this process revoked it, or found it inactive)."""
        self._forgotten[token_id] = time.monotonic()
        digest = self._digest_of.pop(token_id, None)
        if digest is not None:
            self._by_digest.pop(digest, None)

    def _fresh(self, digest: str, max_age: float) -> AgentToken | None:
        entry = self._by_digest.get(digest)
        if entry is None or time.monotonic() - entry[0] > max_age:
            return None
        return entry[1]

    async def _read(self, key: str, read: Callable[[], Awaitable[tuple[str, AgentToken] | None]]) -> AgentToken | None:
        # in a task of its own: a caller that goes away (its connection closed) does not cancel the read
        # the others wait for
        task = self._reads.get(key)
        if task is None:
            task = asyncio.create_task(self._load(read))
            self._reads[key] = task
            task.add_done_callback(lambda done: self._done(key, done))
        return await asyncio.shield(task)

    def _done(self, key: str, task: asyncio.Task[AgentToken | None]) -> None:
        del self._reads[key]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone

    async def _load(self, read: Callable[[], Awaitable[tuple[str, AgentToken] | None]]) -> AgentToken | None:
        started = time.monotonic()  # an entry's age counts from before the read
        found = await read()
        if found is None:
            return None
        digest, token = found
        # a row read before this process revoked the token must not be cached after `forget`
        if self._forgotten.get(token.id, -1.0) < started:
            self._by_digest[digest] = (started, token)
            self._digest_of[token.id] = digest
        return token

    async def _touch(self, database: Database, token: AgentToken) -> None:
        now = time.monotonic()
        if now - self._touched.get(token.id, -self.touch_interval_s) < self.touch_interval_s:
            return
        self._touched[token.id] = now
        async with database.transaction() as conn:
            await token_store.touch_agent_token(conn, token.id, now=utcnow())


async def _read_by_digest(database: Database, digest: str) -> tuple[str, AgentToken] | None:
    async with database.read() as conn:
        token = await token_store.find_agent_token(conn, token_hash=digest)
    return (digest, token) if token is not None else None


async def _read_by_id(database: Database, token_id: str) -> tuple[str, AgentToken] | None:
    async with database.read() as conn:
        found = await token_store.agent_token_with_hash(conn, token_id)
    return (found[1], found[0]) if found is not None else None
