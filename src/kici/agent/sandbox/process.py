"""`process`: the runner in its own session and process group, with an allow-listed environment.

Gives: the agent's credentials and settings stay out of the job (the runner gets `runner_env()`, steps
get the spec's env), and the whole tree dies on cancel (the runner is a child subreaper, so even
processes that `setsid` away stay below it and `proctree.kill_tree` finds them). Does not give:
filesystem, network or PID isolation; steps run as the agent's user.
"""

from __future__ import annotations

from collections.abc import Sequence

from kici.agent.sandbox.base import SandboxBackend
from kici.engine.runner_protocol import JobSpec


class ProcessSandbox(SandboxBackend):
    name = "process"

    def probe(self) -> None:
        return None

    def argv_prefix(self, spec: JobSpec) -> Sequence[str]:
        return ()
