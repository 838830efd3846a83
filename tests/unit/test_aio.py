"""kici.engine.aio: cancellation is never lost (the 3.11 `asyncio.wait_for` flaw that hung a shutdown)."""

from __future__ import annotations

import asyncio

import pytest

from kici.engine import aio


async def _loop_until_cancelled(event: asyncio.Event, turns: list[int]) -> None:
    while True:
        try:
            await aio.wait_for(event.wait(), 5)
        except TimeoutError:
            pass
        turns.append(1)
        event.clear()


async def test_a_cancellation_arriving_with_the_result_is_not_swallowed() -> None:
    event = asyncio.Event()
    turns: list[int] = []
    task = asyncio.create_task(_loop_until_cancelled(event, turns))
    await asyncio.sleep(0)  # the task waits on the event
    event.set()  # the awaited thing finishes in the same loop turn as the cancellation below
    task.cancel()
    await asyncio.wait({task}, timeout=2)
    try:
        assert task.done() and task.cancelled(), "the loop went on: its cancellation was lost"
        assert turns == []
    finally:
        task.cancel()


async def test_wait_for_times_out_and_returns_results() -> None:
    with pytest.raises(TimeoutError):
        await aio.wait_for(asyncio.sleep(5), 0.01)
    assert await aio.wait_for(asyncio.sleep(0, result=7), 1) == 7
    assert await aio.wait_for(asyncio.sleep(0, result=8), None) == 8


async def test_cancel_and_wait_stops_a_task_and_absorbs_its_failure() -> None:
    async def fails_when_cancelled() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            raise RuntimeError("broke while stopping") from None

    task = asyncio.create_task(fails_when_cancelled())
    await asyncio.sleep(0)
    await aio.cancel_and_wait(task)
    assert task.done()
    await aio.cancel_and_wait(None)


async def test_cancel_and_wait_lets_the_callers_own_cancellation_through() -> None:
    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            await asyncio.sleep(5)  # takes its time over stopping

    inner = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(aio.cancel_and_wait(inner))
    await asyncio.sleep(0.01)
    stopper.cancel()  # whoever stops the stopper (a shutdown deadline) wins
    await asyncio.wait({stopper}, timeout=2)
    assert stopper.done() and stopper.cancelled()
    inner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await inner


def test_the_code_base_uses_the_safe_wait_for() -> None:
    from pathlib import Path

    import kici

    root = Path(kici.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if "asyncio.wait_for(" in p.read_text()]
    assert offenders == [], "use kici.engine.aio.wait_for (asyncio.wait_for loses cancellations on Python 3.11)"

