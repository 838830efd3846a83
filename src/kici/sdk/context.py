"""The step context (`ctx`): what every step, rule and hook receives.

This module defines the interface and its small value types; the runner (`kici.runner`) implements it,
for `kici run local` and for agents alike.
"""

from __future__ import annotations

import abc
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kici.engine.events import Event


class StepFailure(Exception):
    """Raise (or let `ctx.sh` raise) to fail the current step with a message but no traceback."""


class CommandFailed(StepFailure):
    """A `ctx.sh` command exited non-zero with `check=True`."""

    def __init__(self, command: str, result: ShellResult) -> None:
        self.command = command
        self.result = result
        super().__init__(f"command failed with exit code {result.exit_code}: {command}")


class CommandTimedOut(StepFailure):
    def __init__(self, command: str, timeout: float) -> None:
        self.command = command
        self.timeout = timeout
        super().__init__(f"command timed out after {timeout:g}s: {command}")


class MissingSecretError(KeyError):
    """`ctx.secrets.get` of a key that is not configured; lists the keys that are."""

    def __init__(self, key: str, available: Sequence[str]) -> None:
        self.key = key
        self.available = list(available)
        names = ", ".join(sorted(available)) or "none"
        super().__init__(f"secret {key!r} is not available (available: {names})")

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ShellResult:
    """What a finished command returned. Awaitable, so `await ctx.sh(...)` also reads naturally."""

    stdout: str
    stderr: str
    exit_code: int

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def __await__(self) -> Generator[Any, None, ShellResult]:
        return self
        yield  # pragma: no cover - makes this a generator


class Logger(abc.ABC):
    @abc.abstractmethod
    def info(self, message: str) -> None: ...

    @abc.abstractmethod
    def warn(self, message: str) -> None: ...

    @abc.abstractmethod
    def error(self, message: str) -> None: ...

    @abc.abstractmethod
    def debug(self, message: str) -> None: ...

    def __call__(self, message: str) -> None:
        self.info(message)


class Secrets(abc.ABC):
    """Secrets are never put in the environment by themselves; `expose` and `mount_file` are explicit."""

    @abc.abstractmethod
    def get(self, key: str) -> str: ...

    @abc.abstractmethod
    def has(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self) -> list[str]: ...

    @abc.abstractmethod
    def expose(self, key: str, as_name: str | None = None) -> None:
        """Put the secret into the environment of the commands this step runs from now on."""

    @abc.abstractmethod
    def mount_file(self, key: str) -> Path:
        """Write the secret to a private temporary file (removed after the step) and return its path."""


class CacheError(StepFailure):
    """`ctx.cache` could not do what was asked for a reason the job must fix (a key whose `hash_files`
    glob matches nothing, a path leaving the workspace). Storage trouble is never raised: a failed
    restore is a miss, a failed save returns False."""


class Caches(abc.ABC):
    """Caches taken in a step (`ctx.cache`), beside the job's own `cache=`; the same keys, rules and
    storage (see docs/user/caches.md)."""

    @abc.abstractmethod
    def restore(self, key: str, paths: Sequence[str], restore_keys: Sequence[str] = ()) -> str | None:
        """Restore `paths` (relative to the workspace) from the cache `key`, else from the newest cache whose
        key starts with one of `restore_keys` (in order). Returns the key restored, or None on a miss."""

    @abc.abstractmethod
    def save(self, key: str, paths: Sequence[str]) -> bool:
        """Save `paths` as the cache `key` now. True when saved; False when the key already exists (keys are
        immutable), none of the paths exists, or storage failed (the step's log says which)."""


class AttrDict(dict[str, Any]):
    """A dict whose keys also read as attributes (`ctx.matrix.py`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Context(abc.ABC):
    """The step context. `ctx.sh` runs a shell command, streaming its output to the step's log."""

    workspace: Path
    event: Event
    workflow: str
    job: str
    step: str
    matrix: AttrDict
    inputs: AttrDict
    attempt: int
    log: Logger
    secrets: Secrets
    cache: Caches

    @property
    @abc.abstractmethod
    def env(self) -> Mapping[str, str]:
        """The environment commands run with (read-only; change it with `set_env`)."""

    @property
    @abc.abstractmethod
    def cancelled(self) -> bool: ...

    @abc.abstractmethod
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
        """Run `command` (a shell string for bash, or an argv list), stream its output, return the result.

        Raises `CommandFailed` on a non-zero exit when `check` is true.
        """

    @abc.abstractmethod
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
        """`sh` for `async def` steps that want several commands at once (`asyncio.gather`)."""

    @abc.abstractmethod
    def set_env(self, key: str, value: str) -> None:
        """Set an environment variable for the following steps of this job (not this one)."""

    @abc.abstractmethod
    def add_path(self, directory: str | Path) -> None:
        """Prepend a directory to PATH for the following steps of this job."""

    @abc.abstractmethod
    def upload_artifact(self, path: str | Path) -> str:
        """Keep a file of the workspace as an artifact of this job: the agent uploads it after the job,
        whatever the job's outcome. Returns its workspace-relative path. A path outside the workspace, or
        not a regular file, raises `ValueError`."""

    @abc.abstractmethod
    def outputs_of(self, ref: Any) -> AttrDict:
        """Outputs of an earlier step of this job, or of an upstream job (by object or name)."""
