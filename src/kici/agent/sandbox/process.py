"""`process`: the runner in its own session and process group, with an allow-listed environment.

Gives: the agent's credentials and settings stay out of the job (the runner gets `runner_env()`, steps
get the spec's env), and the whole tree dies on cancel (the runner is a child subreaper, so even
processes that `setsid` away stay below it and `proctree.kill_tree` finds them). Does not give:
filesystem, network or PID isolation; steps run as the agent's user.
"""

from __future__ import annotations

from kici.agent.sandbox.base import SandboxBackend


class ProcessSandbox(SandboxBackend):
    """The runner starts directly (`Execution._spawn_runner`, the one place a pre-started runner would
    plug in), with no wrapper of its own."""

    name = "process"

    def probe(self, run_as: tuple[int, int] | None = None) -> None:
        self.check_network()
