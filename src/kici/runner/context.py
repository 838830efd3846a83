"""The runner's implementation of the step context (`kici.sdk.context.Context`).

One context is made for each callable the runner runs (a step attempt, a hook, a rule check). Changes
a step makes to the environment (`set_env`, `add_path`, `$KICI_ENV`, `$KICI_PATH`) are collected on
the context and applied by the job runner after the step, so they reach later steps only.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from kici.runner import shell
from kici.runner.calls import Call, StepAborted
from kici.sdk.context import (
    AttrDict,
    CacheError,
    Caches,
    CommandFailed,
    CommandTimedOut,
    Context,
    Logger,
    MissingSecretError,
    Secrets,
    ShellResult,
)
from kici.sdk.definitions import Job, Step

if TYPE_CHECKING:
    from kici.engine.events import Event
    from kici.runner.job_runner import JobRunner

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV = frozenset({"KICI_ENV", "KICI_PATH"})


class UnknownOutputsError(KeyError):
    """`ctx.outputs_of` of something that is neither a step of this job nor an upstream job."""

    def __str__(self) -> str:
        return str(self.args[0])


def to_attr(value: Any) -> Any:
    if isinstance(value, dict):
        return AttrDict({k: to_attr(v) for k, v in value.items()})
    if isinstance(value, list):
        return [to_attr(v) for v in value]
    return value


def make_private_dir(parent: str, prefix: str) -> str:
    """A new directory only we can use (like `tempfile.mkdtemp`, without importing it: start-up time)."""
    while True:
        path = os.path.join(parent, f"{prefix}{os.urandom(6).hex()}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path


def create_private_file(directory: str, prefix: str, data: bytes) -> str:
    """A new 0600 file holding `data`."""
    while True:
        path = os.path.join(directory, f"{prefix}{os.urandom(6).hex()}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        return path


class StepFiles:
    """A directory for one callable: its `$KICI_ENV` and `$KICI_PATH` files and mounted secrets."""

    def __init__(self, root: str) -> None:
        self.dir = make_private_dir(root, "call-")
        self.env_file = os.path.join(self.dir, "env")
        self.path_file = os.path.join(self.dir, "path")
        for path in (self.env_file, self.path_file):
            with open(path, "wb"):
                pass

    def remove(self) -> None:
        try:
            entries = list(os.scandir(self.dir))
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    import shutil

                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            os.rmdir(self.dir)
        except OSError:
            pass

    def read(self) -> tuple[str, str]:
        out = []
        for path in (self.env_file, self.path_file):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    out.append(f.read())
            except OSError:
                out.append("")
        return out[0], out[1]


class _Logger(Logger):
    def __init__(self, ctx: RunnerContext) -> None:
        self._ctx = ctx

    def _emit(self, level: str, message: str) -> None:
        for line in str(message).splitlines() or [""]:
            self._ctx.runner.emit(self._ctx.step_index, "system", f"[{level}] {line}")

    def info(self, message: str) -> None:
        self._emit("info", message)

    def warn(self, message: str) -> None:
        self._emit("warn", message)

    warning = warn

    def error(self, message: str) -> None:
        self._emit("error", message)

    def debug(self, message: str) -> None:
        self._emit("debug", message)


class _Secrets(Secrets):
    def __init__(self, ctx: RunnerContext, values: Mapping[str, str]) -> None:
        self._ctx = ctx
        self._values = values

    def get(self, key: str) -> str:
        try:
            return self._values[key]
        except KeyError:
            raise MissingSecretError(key, list(self._values)) from None

    def has(self, key: str) -> bool:
        return key in self._values

    def list(self) -> list[str]:
        return sorted(self._values)

    def expose(self, key: str, as_name: str | None = None) -> None:
        value = self.get(key)
        name = as_name or key
        if not _ENV_NAME.match(name):
            raise ValueError(f"cannot expose secret {key!r} as {name!r}: not a valid environment variable name")
        self._ctx._exposed[name] = value

    def mount_file(self, key: str) -> Path:
        value = self.get(key)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:64] or "secret"
        return Path(create_private_file(self._ctx.files.dir, f"{safe}-", value.encode("utf-8")))


class _Caches(Caches):
    def __init__(self, ctx: RunnerContext) -> None:
        self._ctx = ctx

    def _ask(self, op: str, key: str, paths: Sequence[str], restore_keys: Sequence[str] = ()) -> dict[str, Any]:
        from kici.runner.cache_requests import request

        ctx = self._ctx
        reply = request(ctx.runner.protocol, ctx.call, ctx.step_index, op, key, paths, restore_keys)
        for line in reply.get("lines") or []:
            ctx.runner.emit(ctx.step_index, "system", str(line))
        if reply.get("error"):
            raise CacheError(f"ctx.cache.{op}: {reply['error']}")
        return reply

    def restore(self, key: str, paths: Sequence[str], restore_keys: Sequence[str] = ()) -> str | None:
        matched = self._ask("restore", key, paths, restore_keys).get("matched")
        return str(matched) if matched else None

    def save(self, key: str, paths: Sequence[str]) -> bool:
        return bool(self._ask("save", key, paths).get("saved"))


class RunnerContext(Context):
    def __init__(
        self,
        runner: JobRunner,
        *,
        step_name: str,
        step_index: int,
        step: Step | None,
        call: Call,
        files: StepFiles,
        attempt: int = 1,
    ) -> None:
        spec = runner.spec
        self.runner = runner
        self.call = call
        self.files = files
        self.step_index = step_index
        self.step_def = step
        self.workspace = Path(spec.workspace)
        self.workflow = spec.workflow
        self.job = spec.display_name
        self.step = step_name
        self.matrix = AttrDict(spec.matrix or {})
        self.inputs = AttrDict(spec.event.get("inputs") or {})
        self.attempt = attempt
        self.log = _Logger(self)
        self.secrets = _Secrets(self, spec.secrets)
        self.cache = _Caches(self)
        self._exposed: dict[str, str] = {}
        self.pending_env: dict[str, str] = {}
        self.pending_paths: list[str] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<ctx {self.workflow}/{self.job}/{self.step} attempt {self.attempt}>"

    @property
    def event(self) -> Event:  # type: ignore[override]
        event: Event = self.runner.event
        return event

    @property
    def run_id(self) -> str | None:
        return self.runner.spec.run_id

    @property
    def env(self) -> Mapping[str, str]:
        return MappingProxyType(self._command_env(None))

    @property
    def cancelled(self) -> bool:
        return self.runner.cancel_requested or self.call.aborted

    # -- commands
    def _command_env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        env = self.runner.base_env(self.step_def)
        env["KICI_ENV"] = self.files.env_file
        env["KICI_PATH"] = self.files.path_file
        if extra:
            env.update({str(k): str(v) for k, v in extra.items()})
        env.update(self._exposed)
        return env

    def sh(
        self,
        command: str | Sequence[str],
        *,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        timeout: float | None = None,
        quiet: bool = False,
    ) -> ShellResult:
        if isinstance(command, str):
            argv = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", command]
            shown = command
        else:
            argv = [os.fspath(a) for a in command]
            if not argv:
                raise ValueError("ctx.sh: empty command")
            shown = shlex.join(argv)
        workdir = self.workspace / cwd if cwd is not None else self.workspace
        index = self.step_index
        emit = None if quiet else (lambda stream, lines: self.runner.protocol.logs(index, stream, lines))
        if not quiet:
            self.runner.emit(index, "system", f"$ {shown}")
        try:
            done = shell.run(
                argv,
                env=self._command_env(env),
                cwd=str(workdir),
                emit=emit,
                tracker=self.call,
                timeout=timeout,
                kill_grace=self.runner.kill_grace,
            )
        except shell.Aborted:
            raise StepAborted(self.call.reason or "stopped") from None
        if self.call.aborted:
            raise StepAborted(self.call.reason or "stopped")
        result = ShellResult(done.stdout, done.stderr, done.exit_code)
        if done.timed_out:
            raise CommandTimedOut(shown, float(timeout or 0))
        if check and done.exit_code != 0:
            raise CommandFailed(shown, result)
        return result

    async def sh_async(
        self,
        command: str | Sequence[str],
        *,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        timeout: float | None = None,
        quiet: bool = False,
    ) -> ShellResult:
        import asyncio

        loop = asyncio.get_running_loop()
        future: asyncio.Future[ShellResult] = loop.create_future()

        def deliver(value: ShellResult | None, exc: BaseException | None) -> None:
            if future.done():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(value)  # type: ignore[arg-type]

        def work() -> None:
            try:
                result = self.sh(command, check=check, env=env, cwd=cwd, timeout=timeout, quiet=quiet)
            except BaseException as exc:
                loop.call_soon_threadsafe(deliver, None, exc)
            else:
                loop.call_soon_threadsafe(deliver, result, None)

        threading.Thread(target=work, name="kici-sh", daemon=True).start()
        return await future

    # -- environment for later steps
    def _refuse(self, key: str, where: str) -> bool:
        if key in self.runner.spec.secrets:
            self.log.warn(
                f"{where}: refusing to set {key}: it is the name of a secret, and environment changes "
                "cannot override secrets"
            )
            return True
        if key in RESERVED_ENV:
            self.log.warn(f"{where}: refusing to set {key}: it is managed by the runner")
            return True
        return False

    def set_env(self, key: str, value: str) -> None:
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise ValueError(f"set_env: {key!r} is not a valid environment variable name")
        if self._refuse(key, "set_env"):
            return
        with self._lock:
            self.pending_env[key] = str(value)

    def add_path(self, directory: str | Path) -> None:
        with self._lock:
            self.pending_paths.append(os.fspath(directory))

    def upload_artifact(self, path: str | Path) -> str:
        # checked now, so the step that asked fails with the reason; the agent checks again before uploading
        root = self.workspace.resolve()
        given = Path(os.fspath(path))
        full = (given if given.is_absolute() else self.workspace / given).resolve()
        if full != root and root not in full.parents:
            raise ValueError(f"upload_artifact: {os.fspath(path)!r} is outside the workspace")
        if not full.is_file():
            raise ValueError(f"upload_artifact: {os.fspath(path)!r} is not a regular file")
        relative = full.relative_to(root).as_posix()
        with self._lock:
            if relative not in self.runner.requested_artifacts:
                self.runner.requested_artifacts.append(relative)
        return relative

    # -- outputs
    def outputs_of(self, ref: Any) -> AttrDict:
        runner = self.runner
        if isinstance(ref, Step):
            for step, name in zip(runner.job_def.steps, runner.step_names, strict=True):
                if step is ref:
                    return to_attr(runner.step_outputs.get(name, {}))  # type: ignore[no-any-return]
            raise UnknownOutputsError(f"{ref!r} is not a step of job {runner.spec.job!r} ({self._known()})")
        if isinstance(ref, Job):
            job_name = runner.job_name_of(ref)
            if job_name is None:
                raise UnknownOutputsError(f"{ref!r} is not a job of workflow {runner.spec.workflow!r}")
            ref = job_name
        if isinstance(ref, str):
            if ref in runner.step_names:
                return to_attr(runner.step_outputs.get(ref, {}))  # type: ignore[no-any-return]
            if ref in runner.spec.upstream_outputs:
                return to_attr(runner.spec.upstream_outputs[ref])  # type: ignore[no-any-return]
            raise UnknownOutputsError(f"no step or upstream job named {ref!r} ({self._known()})")
        raise TypeError(f"outputs_of takes a step, a job or a name, not {type(ref).__name__}")

    def _known(self) -> str:
        steps = ", ".join(self.runner.step_names) or "none"
        upstream = ", ".join(sorted(self.runner.spec.upstream_outputs)) or "none"
        return f"steps of this job: {steps}; upstream jobs: {upstream}"


def check_outputs(value: Any) -> dict[str, Any] | None:
    """A step's return value as outputs; raises ValueError when it cannot be."""
    if value is None:
        return None
    if isinstance(value, ShellResult):
        return None  # `return ctx.sh(...)` in a one-line step: not meant as outputs
    if not isinstance(value, dict):
        raise ValueError(
            f"step returned {type(value).__name__}; a step must return a dict of outputs or None"
        )
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"step outputs are not JSON-serialisable: {exc}") from None
    return value
