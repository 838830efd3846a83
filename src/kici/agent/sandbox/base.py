"""The sandbox seam: a backend owns the whole execution life of a job's runner.

The agent clones the repository, checks the drift gate and builds the job's `JobSpec` itself (tokens never
enter a sandbox); everything after that goes through this interface:

    backend.probe(run_as)                        # once at agent start: SandboxUnavailable says why not
    execution = backend.prepare(ExecutionRequest(spec, workspace, scratch_dir, limits, run_as, …))
    await execution.start()                      # limits set up, runner started, spec handed over
    async for message in execution.messages():   # the runner's protocol messages, masked
        ...
    await execution.interrupt(force=…, reason=…) # graceful cancel: the runner stops the job, runs hooks
    await execution.terminate(grace)             # TERM, `grace` seconds, KILL: everything the job started
    code = await execution.wait()                # the runner's exit status
    execution.limit_hit()                        # memory/process limit reached (when the limiter can tell)
    await execution.cleanup()                    # always: whatever is left is killed, limits released

`cancel(force, grace, reason)` is `interrupt`, then `terminate` if the runner has not ended within `grace`;
the agent's cancel, job timeouts and shutdown all use these methods and nothing else.

**The runner transport.** Every backend runs the same runner (`python -m kici.runner`) and carries its
three streams across its boundary unchanged: the spec and later cancel requests as JSON lines on the
runner's stdin, its protocol messages as JSON lines on an inherited pipe (`--protocol-fd N`), and the
runner's own stdout/stderr (kept for the error when it dies without a result). A backend that cannot pass a
file descriptor through (a container engine) carries the protocol on the container's stdout instead
(`docker run -i` keeps stdin; the runner's own output goes to a file in the scratch dir) — the agent-side
`RunnerProcess` reads whichever stream it is given.

**What a backend gets** (`ExecutionRequest`): the workspace (the only host directory a job may write, bind
or mount it at the same path so `spec.workspace` stays valid), the job's scratch dir beside it (its
`python=` interpreter links, virtualenv and, for filesystem-isolating backends, its home), host paths it
must be able to read (the chosen interpreter's prefix), the resolved resource limits and the user to run
as. The step environment is `spec.env`; the runner process's own environment is `runner_env()`.

**Fitting a container backend.** `prepare` picks the image (per job, e.g. from a lock-file option),
`start` runs `docker run -i --rm --init --network … --memory … --pids-limit … --cpus …` with the workspace
and scratch dir bind-mounted, the agent's interpreter and the `kici` package mounted read-only at fixed
paths (or an image that ships the same kici version), `interrupt` writes the cancel request on stdin,
`terminate` is `docker stop -t grace` (and `docker kill`), `wait` waits for the client process, `cleanup`
removes the container; `limit_hit` reads `OOMKilled` from `docker inspect`. None is offered today: no
container engine runs on the machines KiCI is developed and tested on, and a backend nobody can test is
not shipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kici.agent.sandbox.limits import JobCage, Limiter, LimitHit
from kici.engine import aio
from kici.engine.resources import ResourceLimits
from kici.engine.runner_protocol import JobSpec, RunnerMessage
from kici.runner.client import RunnerProcess
from kici.runner.spawn import popen_runner, runner_env

Network = Literal["host", "none"]


PROBE_TIMEOUT_S = 30.0


def run_probe(
    argv: Sequence[str], run_as: tuple[int, int] | None, *, cwd: str = "/"
) -> subprocess.CompletedProcess[str]:
    """Run a backend's start-up check as the user jobs will run as (raises OSError, TimeoutExpired)."""
    if run_as is None:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False,
                              stdin=subprocess.DEVNULL, cwd=cwd, env=runner_env())
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False,
                          stdin=subprocess.DEVNULL, cwd=cwd, env=runner_env(), user=run_as[0], group=run_as[1],
                          extra_groups=[])


class SandboxUnavailable(Exception):
    """The backend cannot run on this machine; the message says why and what to do."""


@dataclass(frozen=True)
class ExecutionRequest:
    spec: JobSpec
    """What the runner executes (workspace path, step environment, secrets): handed over on its stdin."""
    workspace: Path
    """The job's checkout: the one host directory the job may write."""
    scratch_dir: Path
    """The job's private scratch space beside the workspace (removed with it)."""
    limits: ResourceLimits | None = None
    """Resolved limits (job request combined with the agent's defaults); None: not limited."""
    run_as: tuple[int, int] | None = None
    """(uid, gid) the runner and every step run as (an agent running as root); None: the agent's user."""
    read_only_paths: Sequence[Path] = ()
    """Host paths the job needs to read (the `python=` interpreter's installation)."""


class Execution:
    """One job's runner, from start to cleanup. Backends override `sandbox_prefix` (the command the runner
    starts under) and, where they change what the job sees, `prepared_spec`."""

    def __init__(self, backend: SandboxBackend, request: ExecutionRequest) -> None:
        self.backend = backend
        self.request = request
        self.runner: RunnerProcess | None = None
        self.cage: JobCage | None = None
        self._hit: LimitHit | None = None
        self._cleaned = False

    # -- hooks for backends ------------------------------------------------------------------------------

    def sandbox_prefix(self, scratch: str) -> list[str]:
        """The command the runner's interpreter starts under (`scratch`: the runner's private TMPDIR)."""
        return []

    def prepared_spec(self) -> JobSpec:
        return self.request.spec

    # -- life ----------------------------------------------------------------------------------------------

    def setup_lines(self) -> list[str]:
        """What the job's setup log says about its sandbox and limits (after `start`)."""
        lines = [f"sandbox: {self.backend.describe()}"]
        if self.cage is not None:
            lines.append(self.cage.describe())
        return lines

    async def start(self) -> None:
        """Set up the limits, start the runner, hand it the spec."""
        limits = self.request.limits
        if limits is not None and not limits.is_empty():
            self.cage = await asyncio.to_thread(self.backend.limiter_for_jobs().cage, self.request.spec.job_id or "",
                                                limits)
        prefix: list[str] = []
        popen_user = self.request.run_as
        if self.cage is not None:
            prefix = self.cage.prefix(self.request.run_as)
            if self.cage.drops_privileges():
                popen_user = None
        self.runner = await self._spawn_runner(prefix, popen_user)
        await self.runner.hand(self.prepared_spec())

    async def _spawn_runner(self, limits_prefix: Sequence[str], popen_user: tuple[int, int] | None) -> RunnerProcess:
        """Start the runner process (waiting for its spec) under the limits and the sandbox."""
        scratch = tempfile.mkdtemp(prefix="kici-runner-scratch-")
        if self.request.run_as is not None:
            os.chown(scratch, *self.request.run_as)
        argv = [*limits_prefix, *self.sandbox_prefix(scratch)]
        return await RunnerProcess.adopt(popen_runner(argv_prefix=argv, run_as=popen_user, scratch=scratch))

    def _runner(self) -> RunnerProcess:
        if self.runner is None:
            raise RuntimeError("the execution has not started")
        return self.runner

    def messages(self) -> AsyncIterator[RunnerMessage]:
        return self._runner().messages()

    @property
    def running(self) -> bool:
        return self.runner is not None and self.runner.returncode is None

    async def interrupt(self, *, force: bool = False, reason: str = "cancelled") -> None:
        """Ask the runner to cancel the job (its steps get SIGTERM, then the job's hooks run unless `force`)."""
        if self.runner is not None:
            await self.runner.send_cancel(force=force, reason=reason)

    async def terminate(self, grace: float) -> None:
        """End every process of the job: SIGTERM, `grace` seconds, SIGKILL."""
        if self.runner is not None and self.runner.returncode is None:
            await self.runner.kill(grace=grace)

    async def cancel(self, *, force: bool, grace: float, reason: str) -> None:
        """`interrupt`, then `terminate` when the runner has not ended after `grace` seconds."""
        await self.interrupt(force=force, reason=reason)
        runner = self.runner
        if runner is None or runner.returncode is not None:
            return
        try:
            await aio.wait_for(asyncio.shield(runner.wait()), grace)
        except TimeoutError:
            await self.terminate(grace=2.0)

    async def wait(self) -> int:
        code = await self._runner().wait()
        if self.cage is not None and self._hit is None:
            self._hit = await asyncio.to_thread(self.cage.hit)
        return code

    def limit_hit(self) -> LimitHit | None:
        """After `wait`: the resource limit the job ran into, if the limiter can tell."""
        return self._hit

    async def cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        if self.running:
            await self.terminate(grace=0)
        if self.runner is not None:
            with contextlib.suppress(Exception):
                await aio.wait_for(self.wait(), 5.0)
        if self.cage is not None:
            await asyncio.to_thread(self.cage.release)


class SandboxBackend(ABC):
    name: str
    supports_network_none = False

    def __init__(self, *, network: Network = "host", limiter: Limiter | None = None) -> None:
        self.network: Network = network
        self.limiter = limiter

    def limiter_for_jobs(self) -> Limiter:
        if self.limiter is None:
            raise RuntimeError("resource limits requested but the agent has no limit mechanism")
        return self.limiter

    def check_network(self) -> None:
        if self.network == "none" and not self.supports_network_none:
            raise SandboxUnavailable(
                f"KICI_SANDBOX_NETWORK=none needs a sandbox with its own network namespace (userns or bwrap); "
                f"KICI_SANDBOX={self.name} runs jobs in the host's network"
            )

    @abstractmethod
    def probe(self, run_as: tuple[int, int] | None = None) -> None:
        """Raise `SandboxUnavailable` when this backend cannot work here (for jobs running as `run_as`)."""

    def describe(self) -> str:
        return f"{self.name} (network {self.network})"

    def prepare(self, request: ExecutionRequest) -> Execution:
        """The execution of one job (nothing runs before `start`)."""
        return Execution(self, request)
