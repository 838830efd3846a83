"""`process`: the runner in its own session and process group, with an allow-listed environment.

Gives: the agent's credentials and settings stay out of the job (the runner gets `runner_env()`, steps
get the spec's env), and the whole tree dies on cancel (the runner is a child subreaper, so even
processes that `setsid` away stay below it and `proctree.kill_tree` finds them). Does not give:
filesystem, network or PID isolation; steps run as the agent's user.

With a `forkserver` (KICI_RUNNER_PRESTART), runners are forked from it rather than started as new
interpreters, set up the same way (`kici.runner.forkclient`); when it cannot take a job, the runner is
spawned as without it.
"""

from __future__ import annotations

from collections.abc import Sequence

from kici.agent.log import log_event
from kici.agent.sandbox.base import SandboxBackend
from kici.engine.runner_protocol import JobSpec
from kici.runner.client import RunnerProcess
from kici.runner.forkclient import ForkServer, ForkServerUnavailable, start_runner


class ProcessSandbox(SandboxBackend):
    name = "process"

    def __init__(self) -> None:
        self.forkserver: ForkServer | None = None
        """Runners are forked from this server when set (the agent sets it for KICI_RUNNER_PRESTART)."""

    def probe(self) -> None:
        return None

    def argv_prefix(self, spec: JobSpec) -> Sequence[str]:
        return ()

    async def start(self, spec: JobSpec, *, run_as: tuple[int, int] | None = None) -> RunnerProcess:
        if self.forkserver is not None:
            try:
                return await start_runner(self.forkserver, spec, run_as=run_as)
            except ForkServerUnavailable as exc:
                log_event("runner.spawned_instead", level="warning", job_id=spec.job_id, reason=str(exc))
        return await super().start(spec, run_as=run_as)
