"""`userns`: the runner inside fresh unprivileged user, PID, mount, IPC and UTS namespaces (`unshare`).

Adds to `process`: steps see only their own processes (a new PID namespace with its own /proc), cannot
signal or ptrace anything of the host, cannot change the host's hostname or System V IPC, and mounts they
make stay private. When the namespace's first process (the runner) dies, the kernel kills everything
left in it, which makes cancel airtight. Inside, the job runs as uid 0 mapped to the agent's own uid:
no real privilege, files it writes belong to the agent user. With `KICI_SANDBOX_NETWORK=none` it also
gets its own network namespace, in which no interface is up (not even loopback). Not given: filesystem
isolation (the host's files are visible with the agent user's rights).
"""

from __future__ import annotations

import shutil
import subprocess

from kici.agent.sandbox.base import Execution, ExecutionRequest, Network, SandboxBackend, SandboxUnavailable, run_probe
from kici.agent.sandbox.limits import Limiter

UNSHARE_FLAGS = ("--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts")


class UsernsExecution(Execution):
    backend: UsernsSandbox

    def sandbox_prefix(self, scratch: str) -> list[str]:
        return self.backend.argv_prefix()


class UsernsSandbox(SandboxBackend):
    name = "userns"
    supports_network_none = True

    def __init__(self, *, network: Network = "host", limiter: Limiter | None = None) -> None:
        super().__init__(network=network, limiter=limiter)
        self._unshare = shutil.which("unshare")

    def argv_prefix(self) -> list[str]:
        assert self._unshare is not None
        return [self._unshare, *UNSHARE_FLAGS, *(["--net"] if self.network == "none" else []), "--"]

    def probe(self, run_as: tuple[int, int] | None = None) -> None:
        if self._unshare is None:
            raise SandboxUnavailable("KICI_SANDBOX=userns needs the `unshare` command (util-linux), not found")
        try:
            proc = run_probe([*self.argv_prefix(), "true"], run_as)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxUnavailable(f"KICI_SANDBOX=userns: cannot run unshare: {exc}") from None
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise SandboxUnavailable(
                f"KICI_SANDBOX=userns: unprivileged user namespaces are not available here ({detail}); "
                "check sysctl user.max_user_namespaces and kernel.apparmor_restrict_unprivileged_userns, "
                "or use KICI_SANDBOX=process"
            )

    def prepare(self, request: ExecutionRequest) -> Execution:
        return UsernsExecution(self, request)
