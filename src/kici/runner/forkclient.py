"""The agent's side of the runner forkserver (`kici.runner.forkserver`): start it, ask it for a fresh
runner per job, learn when each ends, and restart it when it dies.

`ForkServer.spawn` forks one process with the given environment, working directory, user and three file
descriptors; `start_runner` builds the pipes and scratch directory a runner needs (as `spawn.popen_runner`
does for a spawned one) and returns the same `RunnerProcess` the rest of the agent already drives.

A forked runner is the server's child, not the agent's: its exit status arrives as a message from the
server. Should the server die while runners it forked are still running, their end is watched through a
pidfd instead and their exit status is unknown (`EXIT_UNKNOWN`); their results still arrive over their
own protocol pipes. The next spawn starts a new server; when one cannot be started, spawns fail with
`ForkServerUnavailable` for `retry_after_s` (callers fall back to spawning a runner).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from kici.engine import aio
from kici.engine.runner_protocol import JobSpec
from kici.runner.client import RunnerProcess
from kici.runner.spawn import runner_env

EXIT_UNKNOWN = 255
"""Exit code reported for a forked runner that ended after its forkserver died (nobody could read its
status)."""
READY_TIMEOUT_S = 60.0
"""How long a new server may take to import the runner (a loaded machine is slow)."""
REPLY_TIMEOUT_S = 30.0
MAX_MESSAGE = 1 << 16
_LINE_LIMIT = 64 * 1024 * 1024

LogEvent = Callable[..., None]


class ForkServerUnavailable(Exception):
    """No forkserver could take the request; the message says why. Spawn the runner instead."""


def _no_log(event: str, **fields: Any) -> None:
    return None


class ForkedChild:
    """A process the forkserver forked: its pid and its exit."""

    def __init__(self, pid: int, loop: asyncio.AbstractEventLoop) -> None:
        self.pid = pid
        self.exited: asyncio.Future[int] = loop.create_future()
        self._loop = loop
        self._pidfd: int | None = None
        with contextlib.suppress(OSError):
            self._pidfd = os.pidfd_open(pid)

    def settle(self, code: int) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if not self.exited.done():
            self.exited.set_result(code)

    def orphaned(self) -> None:
        """The server is gone: watch the process itself (it can no longer be reaped by us)."""
        if self.exited.done():
            return
        if self._pidfd is None:
            self.settle(EXIT_UNKNOWN)
            return
        self._loop.add_reader(self._pidfd, self.settle, EXIT_UNKNOWN)


class ForkServer:
    """One agent's runner forkserver. `start()` it ahead of the first job (or let `spawn` do it), `close()`
    it when done."""

    def __init__(
        self, *, python: str = sys.executable, env: Mapping[str, str] | None = None, log: LogEvent = _no_log,
        retry_after_s: float = 30.0,
    ) -> None:
        self.python = python
        self.env = dict(env) if env is not None else runner_env()
        self.log = log
        self.retry_after_s = retry_after_s
        self.pid: int | None = None
        """The running server's pid (None while there is none)."""
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[int] | None = None
        self._pending: dict[int, asyncio.Future[ForkedChild]] = {}
        self._children: dict[int, ForkedChild] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._failed: tuple[float, str] | None = None
        self._closed = False

    @property
    def running(self) -> bool:
        return self._sock is not None

    async def start(self) -> None:
        """Start the server unless it runs; `ForkServerUnavailable` when it cannot (retried after
        `retry_after_s`)."""
        async with self._lock:
            if self._sock is not None:
                return
            if self._closed:
                raise ForkServerUnavailable("the forkserver was closed")
            if self._failed is not None and time.monotonic() - self._failed[0] < self.retry_after_s:
                raise ForkServerUnavailable(self._failed[1])
            try:
                await self._start()
            except ForkServerUnavailable as exc:
                self._failed = (time.monotonic(), str(exc))
                self.log("forkserver.start_failed", level="warning", error=str(exc))
                raise
            self._failed = None

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                [self.python, "-m", "kici.runner.forkserver", "--socket-fd", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=self.env, pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise ForkServerUnavailable(f"cannot start the forkserver: {exc}") from None
        finally:
            theirs.close()
        ours.setblocking(False)
        self._proc, self._sock, self._loop = proc, ours, loop
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_readable)
        try:
            pid = await aio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT_S)
        except (TimeoutError, _ServerLost):
            timed_out = self._sock is not None  # else the server closed its end: it exited
            self._lost(reap=False, quiet=True)
            code = await asyncio.to_thread(_reap, proc)
            raise ForkServerUnavailable(f"the forkserver was not ready within {READY_TIMEOUT_S:.0f} s" if timed_out
                                        else f"the forkserver exited with code {code} before it was ready") from None
        self.pid = pid
        self.starts += 1
        self.log("forkserver.started", pid=pid, duration_ms=round((time.monotonic() - started) * 1000),
                 restart=self.starts > 1)

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                raw = sock.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                raw = b""
            if not raw:
                self._lost()
                return
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if isinstance(message, dict):
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "exited" in message:
            child = self._children.pop(int(message["exited"]), None)
            if child is not None:
                child.settle(int(message.get("code", EXIT_UNKNOWN)))
        elif "ready" in message:
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(int(message["ready"]))
        elif "id" in message:
            future = self._pending.pop(message["id"], None) if isinstance(message["id"], int) else None
            if future is None or future.done():
                return
            if "pid" in message:
                assert self._loop is not None
                child = ForkedChild(int(message["pid"]), self._loop)
                self._children[child.pid] = child
                future.set_result(child)
            else:
                future.set_exception(ForkServerUnavailable(str(message.get("error", "the forkserver refused"))))

    def _lost(self, *, reap: bool = True, quiet: bool = False) -> None:
        """The server is gone (or being closed): fail what waits on it, watch its orphans directly."""
        sock, proc, loop = self._sock, self._proc, self._loop
        if sock is None:
            return
        self._sock = self._proc = None
        self.pid = None
        if loop is not None:
            loop.remove_reader(sock.fileno())
        sock.close()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(_ServerLost())
        for future in self._pending.values():
            if not future.done():
                future.set_exception(_ServerLost())
        self._pending.clear()
        for child in self._children.values():
            child.orphaned()
        self._children.clear()
        if proc is not None:
            code = proc.poll()
            if not self._closed and not quiet:
                self.log("forkserver.lost", level="warning", pid=proc.pid, exit_code=code)
            if code is None and reap and loop is not None:
                loop.run_in_executor(None, _reap, proc)

    async def spawn(
        self, *, env: Mapping[str, str], cwd: str, run_as: tuple[int, int] | None, fds: tuple[int, int, int],
    ) -> ForkedChild:
        """Fork a runner: its stdin, stdout+stderr and protocol fd are `fds`. Starts (or restarts) the server
        when needed; `ForkServerUnavailable` when that fails or the server dies before answering."""
        for attempt in (1, 2):
            await self.start()
            try:
                return await self._request(env, cwd, run_as, fds)
            except _ServerLost:
                if attempt == 2:
                    raise ForkServerUnavailable("the forkserver died while forking") from None
        raise AssertionError("unreachable")

    async def _request(
        self, env: Mapping[str, str], cwd: str, run_as: tuple[int, int] | None, fds: tuple[int, int, int],
    ) -> ForkedChild:
        sock, loop = self._sock, self._loop
        if sock is None or loop is None:
            raise _ServerLost()
        request_id = next(self._ids)
        payload = json.dumps({"id": request_id, "env": dict(env), "cwd": cwd,
                              "run_as": list(run_as) if run_as is not None else None}).encode("utf-8")
        future: asyncio.Future[ForkedChild] = loop.create_future()
        self._pending[request_id] = future
        while True:
            try:
                socket.send_fds(sock, [payload], list(fds))
                break
            except (BlockingIOError, InterruptedError):
                await _writable(loop, sock)
            except OSError as exc:
                self._pending.pop(request_id, None)
                if exc.errno == errno.EMSGSIZE:  # this request, not the server, is the problem
                    raise ForkServerUnavailable(f"the request is too large for the forkserver ({len(payload)} "
                                                "bytes)") from None
                # the server is gone (EPIPE, ECONNRESET)
                self._lost()
                raise _ServerLost() from None
            if self._sock is not sock:
                raise _ServerLost()
        try:
            return await aio.wait_for(asyncio.shield(future), REPLY_TIMEOUT_S)
        except TimeoutError:
            self._pending.pop(request_id, None)
            raise ForkServerUnavailable(f"the forkserver did not answer within {REPLY_TIMEOUT_S:.0f} s") from None

    async def close(self) -> None:
        """Stop the server (children it forked keep running; their exits are watched directly)."""
        self._closed = True
        proc = self._proc
        self._lost(reap=False)
        if proc is not None:
            await asyncio.to_thread(_reap, proc)


class _ServerLost(Exception):
    pass


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_writer(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await aio.wait_for(ready, REPLY_TIMEOUT_S)
    finally:
        loop.remove_writer(sock.fileno())


def _reap(proc: subprocess.Popen[bytes]) -> int:
    """Wait for a server that was told to go (its socket closed), killing it if it does not; its exit code."""
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class ForkedProcess:
    """The parts of `asyncio.subprocess.Process` that `RunnerProcess` uses, for a forked runner: stdin as
    a `StreamWriter`, stdout as a `StreamReader`, the exit from the forkserver."""

    def __init__(self, child: ForkedChild) -> None:
        self.pid = child.pid
        self._child = child
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: asyncio.StreamReader | None = None

    @classmethod
    async def attach(cls, child: ForkedChild, stdin: IO[bytes], stdout: IO[bytes]) -> ForkedProcess:
        self = cls(child)
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.streams.FlowControlMixin(loop=loop), stdin
        )
        self.stdin = asyncio.StreamWriter(transport, protocol, None, loop)
        self.stdout = asyncio.StreamReader(limit=_LINE_LIMIT)
        reader = self.stdout
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdout)
        return self

    @property
    def returncode(self) -> int | None:
        return self._child.exited.result() if self._child.exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._child.exited)


async def start_runner(
    server: ForkServer, spec: JobSpec | None, *, run_as: tuple[int, int] | None = None,
    env: Mapping[str, str] | None = None,
) -> RunnerProcess:
    """A forked runner for `spec`, set up as `RunnerProcess.start` sets up a spawned one: its own session,
    `env` (default `runner_env()`) with a private TMPDIR, the user `run_as` when given, the spec on stdin.
    `ForkServerUnavailable` when no forkserver can take it (nothing is left behind then). With `spec` None
    the caller hands the spec over itself (`RunnerProcess.hand`), as the agent's execution seam does."""
    scratch = tempfile.mkdtemp(prefix="kici-runner-scratch-")
    environment = dict(env) if env is not None else dict(server.env)
    environment["TMPDIR"] = scratch
    loose: list[int] = []
    """Descriptors to close should anything fail (then a child already forked sees EOF and ends)."""
    files: list[Any] = []
    try:
        if run_as is not None:
            os.chown(scratch, run_as[0], run_as[1])
        for _ in range(3):
            loose.extend(os.pipe())
        stdin_r, stdin_w, out_r, out_w, proto_r, proto_w = loose
        try:
            child = await server.spawn(env=environment, cwd=scratch, run_as=run_as, fds=(stdin_r, out_w, proto_w))
        finally:
            for fd in (stdin_r, out_w, proto_w):  # the child's ends: it has its own copies now
                os.close(fd)
            loose = [stdin_w, out_r, proto_r]
        # from here the file objects own our ends: closing them tells the child to stop
        files = [os.fdopen(stdin_w, "wb", buffering=0), os.fdopen(out_r, "rb", buffering=0),
                 os.fdopen(proto_r, "rb", buffering=0)]
        loose = []
        proc = await ForkedProcess.attach(child, files[0], files[1])
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_LINE_LIMIT)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), files[2])
    except BaseException:
        for fd in loose:
            with contextlib.suppress(OSError):
                os.close(fd)
        for file in files:
            file.close()
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    runner = RunnerProcess(proc, None, reader, transport)  # type: ignore[arg-type]
    runner.scratch = scratch
    if spec is not None:
        await runner.hand(spec)
    return runner
