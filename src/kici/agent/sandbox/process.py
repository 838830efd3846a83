"""`process`: the runner in its own session and process group, with an allow-listed environment.

Gives: the agent's credentials and settings stay out of the job (the runner gets `runner_env()`, steps
get the spec's env), and the whole tree dies on cancel (the runner is a child subreaper, so even
processes that `setsid` away stay below it and `proctree.kill_tree` finds them). Does not give:
filesystem, network or PID isolation; steps run as the agent's user.

With a `forkserver` (KICI_RUNNER_PRESTART), runners are forked from it rather than started as new
interpreters, set up the same way (`kici.runner.forkclient`); when it cannot take a job, the runner is
spawned as without it. A job with resource limits starts under the limit wrapper instead (the wrapper puts
the new process into the job's cgroup before it execs), so it is always spawned.
"""

from __future__ import annotations

from collections.abc import Sequence

from kici.agent.log import log_event
from kici.agent.sandbox.base import Execution, ExecutionRequest, SandboxBackend
from kici.runner.client import RunnerProcess
from kici.runner.forkclient import ForkServer, ForkServerUnavailable, start_runner


class ProcessSandbox(SandboxBackend):
    """The runner starts directly, with no wrapper of its own: forked from the agent's forkserver when
    there is one, else as a new interpreter."""

    name = "process"
    forkserver: ForkServer | None = None
    """Runners are forked from this server when set (the agent sets it for KICI_RUNNER_PRESTART)."""

    def probe(self, run_as: tuple[int, int] | None = None) -> None:
        self.check_network()

    def prepare(self, request: ExecutionRequest) -> Execution:
        return ProcessExecution(self, request)


class ProcessExecution(Execution):
    backend: ProcessSandbox

    async def _spawn_runner(self, limits_prefix: Sequence[str], popen_user: tuple[int, int] | None) -> RunnerProcess:
        server = self.backend.forkserver
        if server is not None and not limits_prefix:
            try:
                return await start_runner(server, None, run_as=popen_user)
            except ForkServerUnavailable as exc:
                log_event("runner.spawned_instead", level="warning", job_id=self.request.spec.job_id, reason=str(exc))
        return await super()._spawn_runner(limits_prefix, popen_user)
