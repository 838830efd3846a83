"""Running one user callable (step, hook, rule check) so that it can be timed out and cancelled.

The runner's main thread never runs user code: it starts the callable and waits for it, a deadline or an
abort. Sync callables run in a fresh daemon thread; `async def` callables run as a task on the runner's
asyncio loop, which lives in its own thread (started, and asyncio imported, only when a job first needs
it). Either way a blocking callable cannot stall the main thread, so timeouts and cancel always fire.

Stopping a callable (`Call.abort`) kills what it started: the process trees of its `ctx.sh` commands
and any process adopted by the runner (a double-forked daemon) or started directly by it since the call
began; an async callable's task is also cancelled. A sync callable blocked in `ctx.sh` then sees its
command die and gets `StepAborted`. Python cannot kill a thread, so if the callable does not return
within `THREAD_GRACE` seconds after its commands are dead (a step looping in pure Python, or blocked in
`time.sleep`), the call is reported as *hung*: the runner reports the step as stopped, ends the job, and
exits with `os._exit` instead of waiting for the thread.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kici.runner import proctree, reaper

if TYPE_CHECKING:
    import asyncio
    import subprocess

THREAD_GRACE = 3.0
"""Seconds a stopped callable gets to return after its commands were killed."""

CANCEL = "cancel"
FORCE = "force"
TIMEOUT = "timeout"
JOB_TIMEOUT = "job_timeout"


class StepAborted(BaseException):
    """Raised inside a step whose commands were killed because it is being stopped.

    A BaseException, so that `except Exception` in step code does not swallow it.
    """


@dataclass
class Outcome:
    kind: str
    """`ok`, `error`, `aborted` or `hung`."""
    value: Any = None
    exc: BaseException | None = None
    reason: str | None = None


class Call:
    """One running callable: what can stop it, and the commands it runs (`shell.Tracker`)."""

    def __init__(self, accepts: frozenset[str], kill_grace: float) -> None:
        self.accepts = accepts
        self.kill_grace = kill_grace
        self.reason: str | None = None
        self.force = False
        self.wake = threading.Event()
        self.finished = False
        self.value: Any = None
        self.exc: BaseException | None = None
        self.aborted_at: float | None = None
        self.killed_at: float | None = None
        """When the processes of an aborted call were dead (the thread grace starts then)."""
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._baseline: set[tuple[int, int]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None

    # -- shell.Tracker
    def register(self, proc: subprocess.Popen[bytes]) -> bool:
        with self._lock:
            if self.reason is not None:
                return False
            self._procs.add(proc)
            return True

    def unregister(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.discard(proc)

    @property
    def aborted(self) -> bool:
        return self.reason is not None

    # -- lifecycle
    def snapshot_children(self) -> None:
        me = os.getpid()
        self._baseline = {(c.pid, c.start) for c in proctree.children(me)}

    def finish(self, value: Any = None, exc: BaseException | None = None) -> None:
        self.value, self.exc = value, exc
        self.finished = True
        self.wake.set()

    def abort(self, reason: str, *, force: bool = False) -> bool:
        """Stop the callable for `reason` (if this call accepts it); False when it does not apply."""
        if reason not in self.accepts and not (force and FORCE in self.accepts):
            return False
        with self._lock:
            first = self.reason is None
            if first:
                self.reason = reason
                self.aborted_at = time.monotonic()
            elif not (force and not self.force):
                return True
            self.force = self.force or force
            procs = list(self._procs)
            loop, task = self._loop, self._task
        self.wake.set()
        grace = 0.0 if self.force else self.kill_grace
        targets = {p.pid for p in procs}
        owned_elsewhere = set(reaper.owned) - targets
        for child in proctree.children(os.getpid()):
            if (child.pid, child.start) not in self._baseline and child.pid not in owned_elsewhere and child.alive:
                targets.add(child.pid)
        if targets:
            threading.Thread(target=self._kill, args=(targets, grace), daemon=True).start()
        else:
            self.killed_at = time.monotonic()
        if loop is not None and task is not None:
            loop.call_soon_threadsafe(task.cancel)
        return True

    def _kill(self, targets: set[int], grace: float) -> None:
        try:
            proctree.kill_trees(targets, grace=grace)
        finally:
            self.killed_at = time.monotonic()
            self.wake.set()

    def attach_task(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
        with self._lock:
            self._loop, self._task = loop, task
            aborted = self.reason is not None
        if aborted:
            task.cancel()


class _LoopThread:
    """The runner's asyncio loop, running in a daemon thread; created on first use."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                import asyncio

                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                threading.Thread(target=serve, name="kici-asyncio", daemon=True).start()
                ready.wait()
                cls._loop = loop
            return cls._loop


def _run_awaitable(awaitable: Any, call: Call) -> Any:
    """Run `awaitable` on the runner loop as a task `call` can cancel; blocks the calling thread."""
    import asyncio

    loop = _LoopThread.get()

    async def wrapper() -> Any:
        task = asyncio.current_task()
        assert task is not None
        call.attach_task(loop, task)
        return await awaitable

    return asyncio.run_coroutine_threadsafe(wrapper(), loop).result()


def start(fn: Callable[[Any], Any], ctx: Any, call: Call, name: str) -> None:
    """Start `fn(ctx)`; `call.finish` is called when it returns or raises."""
    if inspect.iscoroutinefunction(fn) or (
        not inspect.isfunction(fn) and inspect.iscoroutinefunction(type(fn).__call__)
    ):
        import asyncio

        loop = _LoopThread.get()

        async def wrapper() -> Any:
            task = asyncio.current_task()
            assert task is not None
            call.attach_task(loop, task)
            return await fn(ctx)

        future = asyncio.run_coroutine_threadsafe(wrapper(), loop)

        def done(f: Any) -> None:
            if f.cancelled():
                call.finish(exc=StepAborted("cancelled"))
            elif f.exception() is not None:
                call.finish(exc=f.exception())
            else:
                call.finish(value=f.result())

        future.add_done_callback(done)
        return

    def target() -> None:
        try:
            value = fn(ctx)
            if inspect.isawaitable(value):
                value = _run_awaitable(value, call)
        except BaseException as exc:
            call.finish(exc=exc)
        else:
            call.finish(value=value)

    threading.Thread(target=target, name=f"kici-{name}", daemon=True).start()


def wait(call: Call, *, timeout: float | None, job_deadline: float | None, on_abort: Callable[[str], None]) -> Outcome:
    """Wait for a started call: its own `timeout` (seconds) and the job's deadline (monotonic) abort it.

    `on_abort(reason)` is told when a deadline aborted the call (the job marks itself timed out).
    """
    own = time.monotonic() + timeout if timeout is not None else None
    while True:
        call.wake.clear()
        if call.finished or call.reason is not None:
            break
        now = time.monotonic()
        if own is not None and now >= own and call.abort(TIMEOUT):
            on_abort(TIMEOUT)
            continue
        if job_deadline is not None and now >= job_deadline and call.abort(JOB_TIMEOUT):
            on_abort(JOB_TIMEOUT)
            continue
        limits = [t - now for t in (own, job_deadline) if t is not None]
        call.wake.wait(max(0.0, min(limits)) if limits else None)
    if not call.finished:
        while not call.finished:
            call.wake.clear()
            if call.finished:
                break
            assert call.aborted_at is not None
            if call.killed_at is not None:
                left = call.killed_at + THREAD_GRACE - time.monotonic()
            else:  # still killing: SIGKILL comes after the grace, and takes a moment itself
                grace = 0.0 if call.force else call.kill_grace
                left = call.aborted_at + grace + 5.0 + THREAD_GRACE - time.monotonic()
            if left <= 0:
                return Outcome("hung", reason=call.reason)
            call.wake.wait(left)
    if call.reason is not None:
        return Outcome("aborted", value=call.value, exc=call.exc, reason=call.reason)
    if call.exc is not None:
        return Outcome("error", exc=call.exc)
    return Outcome("ok", value=call.value)
