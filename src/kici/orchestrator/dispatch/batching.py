"""Group commit for agents' reports: status writes from many agents share one transaction.

Every agent's messages are handled one at a time by its session, so under load many sessions each wait
on a small transaction of their own; the begin/commit round trips then cost more than the work. The
`WriteBatcher` runs submitted operations back to back in one transaction (up to `max_batch`) and
resolves each caller's future with its result once that transaction has committed — a caller still sees
its own write committed before it goes on, so per-agent ordering is unchanged.

If the batch fails (a deadlock victim, a constraint, a bug in one operation), it is rolled back and its
operations are run again one per transaction, so one bad operation fails only its own caller.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.database import Database

T = TypeVar("T")
Operation = Callable[[AsyncConnection], Awaitable[Any]]


@dataclass
class _Item:
    operation: Operation
    future: asyncio.Future[Any]


class WriteBatcher:
    def __init__(self, db: Database, *, max_batch: int = 64) -> None:
        self.db = db
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="kici-write-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():  # callers still waiting get an answer
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the orchestrator is stopping"))

    async def submit(self, operation: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run `operation` in a shared transaction; its result once committed. Without a running batcher
        (not started, as in some tests) the operation gets a transaction of its own."""
        if self._task is None or self._task.done():
            async with self.db.transaction() as conn:
                return await operation(conn)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(operation, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
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
