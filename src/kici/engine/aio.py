"""Cancellation-safe asyncio helpers, used instead of their standard-library namesakes everywhere.

On Python 3.11 `asyncio.wait_for` swallows a cancellation of its caller that arrives when the awaited
thing has just finished (bpo-37658 / gh-86296, fixed in 3.12 by rebuilding it on `asyncio.timeout`): a
background loop whose `wait_for(event.wait(), poll)` lost its cancellation that way kept running, and
the `stop()` awaiting it hung the orchestrator's shutdown. The usual `task.cancel(); with
suppress(CancelledError): await task` has the same flaw in the other direction: it swallows the
cancellation of the caller too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_for(awaitable: Awaitable[T], timeout: float | None) -> T:
    """`asyncio.wait_for` without the 3.11 flaw: raises `TimeoutError` after `timeout` seconds (None: no
    limit), and a cancellation of the caller always propagates."""
    async with asyncio.timeout(timeout):
        return await awaitable


async def cancel_and_wait(*tasks: asyncio.Task[object] | None) -> None:
    """Cancel `tasks` (all at once) and wait until each has finished, whatever it raises; a cancellation of
    the caller while waiting propagates (it is not mistaken for a task's own)."""
    for task in tasks:
        if task is not None:
            task.cancel()
    for task in tasks:
        if task is None:
            continue
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception:  # the task failed while stopping: it is stopped all the same
            pass
