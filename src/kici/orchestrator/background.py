"""A background loop that calls `tick()` at an interval once start-up has prepared the database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from kici.engine import aio
from kici.orchestrator.container import Readiness
from kici.orchestrator.logs import log_event


class PeriodicTask:
    def __init__(self, name: str, interval_s: float, tick: Callable[[], Awaitable[object]]) -> None:
        self.name = name
        self.interval_s = interval_s
        self.tick = tick
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self, readiness: Readiness) -> None:
        self._task = asyncio.create_task(self._loop(readiness), name=f"kici-{self.name}")

    async def stop(self) -> None:
        self._stopping = True  # also ends the loop should the cancellation below be lost
        if self._task is not None:
            await aio.cancel_and_wait(self._task)
            self._task = None

    async def _loop(self, readiness: Readiness) -> None:
        while not readiness.prepared:  # migrations first: the tables may not exist yet
            await asyncio.sleep(0.05)
        while not self._stopping:
            try:
                await self.tick()
            except Exception as exc:  # the database is away, say: try again next time
                log_event(f"{self.name}.tick_failed", level="error", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.interval_s)
