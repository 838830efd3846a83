"""The parent's side of the runner: start `python -m kici.runner`, read its messages, cancel or kill it.

Used by `kici run local` and by the agent. Secret masking happens here, outside the runner process, so
a step cannot get around it: every line of `LogLine` and `LogLines`, every error text and every string in
step or job outputs is passed through a `SecretMasker` built from `spec.secrets`.

The runner gets its own session (so the whole tree can be signalled), an environment built from an
allow-list (`runner_env`: the parent's `KICI_*` variables and tokens never reach it), the spec on its
stdin (which stays open: closing it cancels the job) and the protocol on an extra pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from kici.engine import aio
from kici.engine.masking import SecretMasker
from kici.engine.runner_protocol import (
    SETUP_STEP_INDEX,
    CacheReply,
    CancelRequest,
    JobResult,
    JobSpec,
    LogLine,
    LogLines,
    RunnerMessage,
    StepStatus,
    parse_runner_message,
)
from kici.runner import proctree
from kici.runner.spawn import ALLOWED_ENV, Spawned, popen_runner, runner_env, safe_base_env

__all__ = ["ALLOWED_ENV", "RunnerProcess", "Spawned", "popen_runner", "runner_env", "safe_base_env"]

STDERR_TAIL = 20
"""Lines of the runner's own stderr kept for the error when it dies without a result."""

_LINE_LIMIT = 64 * 1024 * 1024


class RunnerProcess:
    """One running runner child. Create with `await RunnerProcess.start(spec)`, or `spawn()` it ahead of
    time (its interpreter start-up then overlaps with the caller's own work) and `hand()` it the spec."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        spec: JobSpec | None,
        reader: asyncio.StreamReader,
        transport: asyncio.BaseTransport,
    ) -> None:
        self._proc = proc
        self.spec = spec
        self.pid: int = proc.pid
        self.masker = SecretMasker(spec.secrets.values() if spec is not None else ())
        self._reader = reader
        self._transport = transport
        self._stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self._stderr_task = asyncio.ensure_future(self._read_stderr())
        self._iterating = False
        self.result: JobResult | None = None
        self.scratch: str | None = None
        """The runner's own TMPDIR (its private files, also the Python temp files of steps); removed
        once the runner has exited, so nothing is left behind even when it was killed."""

    @classmethod
    async def start(
        cls,
        spec: JobSpec,
        *,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        argv_prefix: Sequence[str] = (),
        run_as: tuple[int, int] | None = None,
    ) -> RunnerProcess:
        """Start a runner for `spec` in a new session and hand it the spec (as the user `run_as`, when given).

        `env` is the runner process's own environment (default `runner_env()`); steps never see it, they
        get `spec.env`. `argv_prefix` goes before the interpreter (a sandbox wrapper such as `bwrap …`,
        which must keep the protocol fd open).
        """
        self = await cls.spawn(python=python, env=env, argv_prefix=argv_prefix, run_as=run_as)
        await self.hand(spec)
        return self

    @classmethod
    async def spawn(
        cls,
        *,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        argv_prefix: Sequence[str] = (),
        run_as: tuple[int, int] | None = None,
    ) -> RunnerProcess:
        """Start a runner that waits for its spec (see `hand`). An unused one is ended with `kill()`."""
        return await cls.adopt(popen_runner(python=python, env=env, argv_prefix=argv_prefix, run_as=run_as))

    @classmethod
    async def adopt(cls, spawned: Spawned) -> RunnerProcess:
        """Take over a runner started with `popen_runner` (possibly before this event loop existed)."""
        try:
            proc = await _AdoptedProcess.attach(spawned.popen)
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=_LINE_LIMIT)
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(spawned.protocol_fd, "rb", buffering=0)
            )
        except BaseException:
            spawned.discard()
            raise
        self = cls(proc, None, reader, transport)  # type: ignore[arg-type]
        self.scratch = spawned.scratch
        spawned.adopted = True
        return self

    async def hand(self, spec: JobSpec) -> None:
        """Give a spawned runner its job (once)."""
        if self.spec is not None:
            raise RuntimeError("this runner already has a job")
        self.spec = spec
        for secret in spec.secrets.values():
            self.masker.add(secret)
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(spec.model_dump_json().encode("utf-8") + b"\n")
            await self._proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the runner died at once; messages() reports it

    async def _read_stderr(self) -> None:
        stream = self._proc.stdout  # the runner's stdout and stderr, before it redirects them
        if stream is None:
            return
        while True:
            line = await stream.readline()
            if not line:
                return
            self._stderr_tail.append(self.masker.mask(line.decode("utf-8", "replace").rstrip("\n")))

    def _mask(self, message: RunnerMessage) -> RunnerMessage:
        mask = self.masker.mask
        if isinstance(message, LogLine):
            masked = mask(message.line)
            return message if masked == message.line else message.model_copy(update={"line": masked})
        if isinstance(message, LogLines):
            lines = [mask(line) for line in message.lines]
            return message if lines == message.lines else message.model_copy(update={"lines": lines})
        if isinstance(message, StepStatus):
            update: dict[str, Any] = {}
            if message.error:
                update["error"] = mask(message.error)
            if message.outputs:
                update["outputs"] = _mask_value(message.outputs, mask)
            return message.model_copy(update=update) if update else message
        if isinstance(message, JobResult):
            update = {"outputs": _mask_value(message.outputs, mask)}
            if message.error:
                update["error"] = mask(message.error)
            return message.model_copy(update=update)
        return message

    async def messages(self) -> AsyncIterator[RunnerMessage]:
        """The runner's messages, masked, until it exits (iterate once).

        If the runner dies without a `JobResult`, a synthetic failed one (`failure_category="internal"`)
        ends the stream.
        """
        if self._iterating:
            raise RuntimeError("RunnerProcess.messages() can be iterated only once")
        self._iterating = True
        try:
            while True:
                try:
                    raw = await self._reader.readline()
                except ValueError:  # a line over the limit: skip it rather than stop
                    raw = b"\n"
                    yield LogLine(step_index=SETUP_STEP_INDEX, stream="system",
                                  line="[error] runner sent an over-long protocol message; dropped")
                    continue
                if not raw:
                    break
                if not raw.strip():
                    continue
                try:
                    message = parse_runner_message(raw)
                except ValidationError as exc:
                    text = self.masker.mask(raw.decode("utf-8", "replace").strip()[:200])
                    yield LogLine(step_index=SETUP_STEP_INDEX, stream="system",
                                  line=f"[error] invalid message from the runner ({exc.error_count()} errors): {text}")
                    continue
                message = self._mask(message)
                if isinstance(message, JobResult):
                    if self.result is not None:
                        continue
                    self.result = message
                yield message
            code = await self.wait()
            if self.result is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await aio.wait_for(asyncio.shield(self._stderr_task), 2.0)
                error = f"runner exited with code {code}"
                if self._stderr_tail:
                    error += "\n" + "\n".join(self._stderr_tail)
                self.result = JobResult(status="failed", error=error, failure_category="internal")
                yield self.result
        finally:
            self._transport.close()

    async def send_cancel(self, *, force: bool = False, reason: str = "cancelled") -> None:
        await self.send_control(CancelRequest(force=force, reason=reason))

    async def send_control(self, message: CancelRequest | CacheReply) -> None:
        """A control line on the runner's stdin (dropped when the runner is gone)."""
        stdin = self._proc.stdin
        if stdin is None or stdin.is_closing():
            return
        try:
            stdin.write(message.model_dump_json().encode("utf-8") + b"\n")
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            pass

    async def cancel(self, *, force: bool = False, grace: float = 10.0, reason: str = "cancelled") -> None:
        """Ask the runner to cancel the job; kill its whole tree if it has not exited after `grace` s."""
        await self.send_cancel(force=force, reason=reason)
        if self._proc.returncode is not None:
            return
        try:
            await aio.wait_for(asyncio.shield(self._proc.wait()), grace)
        except TimeoutError:
            await self.kill()

    async def kill(self, grace: float = 2.0) -> None:
        """SIGTERM the runner's tree (and its process group), SIGKILL what is left after `grace` s."""
        await asyncio.to_thread(proctree.kill_tree, self.pid, grace=grace)
        with contextlib.suppress(asyncio.TimeoutError):
            await aio.wait_for(asyncio.shield(self.wait()), 5.0)

    async def wait(self) -> int:
        code = await self._proc.wait()
        if self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.close()
        if self.scratch is not None:
            await asyncio.to_thread(shutil.rmtree, self.scratch, True)
            self.scratch = None
        return code

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def __aenter__(self) -> RunnerProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._proc.returncode is None:
            await self.kill()
        else:
            await self.wait()
        self._transport.close()
        self._stderr_task.cancel()


def _mask_value(value: Any, mask: Any) -> Any:
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {k: _mask_value(v, mask) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_value(v, mask) for v in value]
    return value


class _AdoptedProcess:
    """The parts of `asyncio.subprocess.Process` the client uses, over a `subprocess.Popen`: its stdin
    as a `StreamWriter`, its stdout as a `StreamReader`, and its exit through a pidfd on the loop (no
    thread per runner)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: asyncio.StreamReader | None = None
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @classmethod
    async def attach(cls, popen: subprocess.Popen[bytes]) -> _AdoptedProcess:
        self = cls(popen)
        loop = asyncio.get_running_loop()
        assert popen.stdin is not None and popen.stdout is not None
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.streams.FlowControlMixin(loop=loop), popen.stdin
        )
        self.stdin = asyncio.StreamWriter(transport, protocol, None, loop)
        self.stdout = asyncio.StreamReader(limit=_LINE_LIMIT)
        stdout = self.stdout
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout), popen.stdout)
        self._watch_exit(loop)
        return self

    def _watch_exit(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:  # no pidfd (old kernel): a thread waits instead
            task = loop.run_in_executor(None, self.popen.wait)
            task.add_done_callback(lambda f: self._settle(f.result()))
            return

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._settle(self.popen.wait())

        loop.add_reader(pidfd, on_exit)

    def _settle(self, code: int) -> None:
        if not self._exited.done():
            self._exited.set_result(code)

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)
