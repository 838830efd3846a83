"""Group commit for agents' reports: status writes from many agents share one transaction.

Every agent's messages are handled one at a time by its session, so under load many sessions each wait
on a small transaction of their own; the begin/commit round trips then cost more than the work. The
`WriteBatcher` runs submitted operations back to back in one transaction (up to `max_batch`) and
resolves each caller's future with its result once that transaction has committed — a caller still sees
its own write committed before it goes on, so per-agent ordering is unchanged.

If the batch fails (a deadlock victim, a constraint, a bug in one operation), it is rolled back and its
operations are run again one per transaction, so one bad operation fails only its own caller. Lanes
(keyed by run) let PostgreSQL commit several batches at once.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine import aio
from kici.orchestrator.db.database import Database

T = TypeVar("T")
Operation = Callable[[AsyncConnection], Awaitable[Any]]


@dataclass
class _Item:
    operation: Operation
    future: asyncio.Future[Any]


class WriteBatcher:
    """Group commit in `lanes` independent lanes. Operations carry a key (their run id): one key always
    uses the same lane, so two lanes never touch the same run and cannot deadlock each other, while runs
    in different lanes commit in parallel on their own connections (on SQLite, whose writers take turns
    anyway, one lane)."""

    def __init__(self, db: Database, *, max_batch: int = 64, lanes: int = 1) -> None:
        self.db = db
        self.max_batch = max_batch
        self._queues: list[asyncio.Queue[_Item]] = [asyncio.Queue() for _ in range(max(1, lanes))]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(q), name=f"kici-write-batcher-{i}") for i, q in enumerate(self._queues)
            ]

    async def stop(self) -> None:
        await aio.cancel_and_wait(*self._tasks)
        self._tasks = []
        for lane in self._queues:
            while not lane.empty():  # callers still waiting get an answer
                item = lane.get_nowait()
                if not item.future.done():
                    item.future.set_exception(RuntimeError("the orchestrator is stopping"))

    async def submit(self, operation: Callable[[AsyncConnection], Awaitable[T]], key: str = "") -> T:
        """Run `operation` in a shared transaction of `key`'s lane; its result once committed. Without a
        running batcher (not started, as in some tests) the operation gets a transaction of its own."""
        if not self._tasks or any(task.done() for task in self._tasks):
            async with self.db.transaction() as conn:
                return await operation(conn)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        lane = self._queues[zlib.crc32(key.encode()) % len(self._queues)] if len(self._queues) > 1 else self._queues[0]
        lane.put_nowait(_Item(operation, future))
        return await future

    async def _run(self, lane: asyncio.Queue[_Item]) -> None:
        while True:
            batch = [await lane.get()]
            while len(batch) < self.max_batch and not lane.empty():
                batch.append(lane.get_nowait())
            await self._apply(batch)

    async def _apply(self, batch: list[_Item]) -> None:
        live = [item for item in batch if not item.future.done()]  # a caller may have gone away
        if not live:
            return
        results: list[Any] = []
        try:
            async with self.db.transaction() as conn:
                for item in live:
                    results.append(await item.operation(conn))
        except Exception as exc:
            if len(live) == 1:
                if not live[0].future.done():
                    live[0].future.set_exception(exc)
                return
            for item in live:
                await self._alone(item)
            return
        for item, result in zip(live, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    async def _alone(self, item: _Item) -> None:
        try:
            async with self.db.transaction() as conn:
                result = await item.operation(conn)
        except Exception as exc:
            if not item.future.done():
                item.future.set_exception(exc)
            return
        if not item.future.done():
            item.future.set_result(result)
