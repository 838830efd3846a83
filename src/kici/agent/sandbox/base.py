"""The sandbox backend interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from kici.engine.runner_protocol import JobSpec
from kici.runner.client import RunnerProcess


class SandboxUnavailable(Exception):
    """The backend cannot run on this machine; the message says why and what to do."""


class SandboxBackend(ABC):
    name: str

    @abstractmethod
    def probe(self) -> None:
        """Raise `SandboxUnavailable` when this backend cannot work here."""

    @abstractmethod
    def argv_prefix(self, spec: JobSpec) -> Sequence[str]:
        """The command the runner's interpreter is started under (empty: none)."""

    async def start(self, spec: JobSpec, *, run_as: tuple[int, int] | None = None) -> RunnerProcess:
        """Start the job's runner (in its own session, with the allow-listed environment; as the user
        `run_as` (uid, gid) when given)."""
        return await RunnerProcess.start(spec, argv_prefix=self.argv_prefix(spec), run_as=run_as)

    async def kill(self, runner: RunnerProcess, grace: float) -> None:
        """End the runner's whole process tree (TERM, `grace` seconds, KILL)."""
        await runner.kill(grace=grace)

    async def wait(self, runner: RunnerProcess) -> int:
        return await runner.wait()
