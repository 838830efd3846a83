"""`userns`: the runner inside fresh unprivileged user, PID, mount, IPC and UTS namespaces (`unshare`).

Adds to `process`: steps see only their own processes (a new PID namespace with its own /proc), cannot
signal or ptrace anything of the host, cannot change the host's hostname or System V IPC, and mounts they
make stay private. When the namespace's first process (the runner) dies, the kernel kills everything
left in it, which makes cancel airtight. Inside, the job runs as uid 0 mapped to the agent's own uid:
no real privilege, files it writes belong to the agent user. Not given: filesystem isolation (the host's
files are visible with the agent user's rights) and network isolation.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from kici.agent.sandbox.base import SandboxBackend, SandboxUnavailable
from kici.engine.runner_protocol import JobSpec

UNSHARE_FLAGS = ("--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts")


class UsernsSandbox(SandboxBackend):
    name = "userns"

    def __init__(self) -> None:
        self._unshare = shutil.which("unshare")

    def probe(self) -> None:
        if self._unshare is None:
            raise SandboxUnavailable("KICI_SANDBOX=userns needs the `unshare` command (util-linux), not found")
        try:
            proc = subprocess.run([self._unshare, *UNSHARE_FLAGS, "true"], capture_output=True, text=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxUnavailable(f"KICI_SANDBOX=userns: cannot run unshare: {exc}") from None
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise SandboxUnavailable(
                f"KICI_SANDBOX=userns: unprivileged user namespaces are not available here ({detail}); "
                "check sysctl user.max_user_namespaces and kernel.apparmor_restrict_unprivileged_userns, "
                "or use KICI_SANDBOX=process"
            )

    def argv_prefix(self, spec: JobSpec) -> Sequence[str]:
        assert self._unshare is not None
        return (self._unshare, *UNSHARE_FLAGS, "--")
