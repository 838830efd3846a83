"""`bwrap`: the runner inside bubblewrap, seeing only what the job needs of the host.

Inside: `/usr` (and the `/bin`, `/sbin`, `/lib*` links or directories) and a short list of `/etc` basics
read-only; the agent's interpreter prefix, its virtualenv and the `kici` package read-only (the runner needs
them; the step PATH still never lists them); the `python=` interpreter's prefix read-only; the job's
workspace and its scratch dir (interpreter links, virtualenv, `HOME`) read-write at their host paths; a
private `/tmp` (the runner's scratch dir, removed after the job), `/proc` and `/dev`; new PID, IPC and UTS
namespaces, a new session, and `--die-with-parent`. Nothing else exists inside: not the agent's work dir
(other jobs, git mirrors, the agent id), not its token file, not its data or the orchestrator's data.
The root of the sandbox is a read-only tmpfs. With `KICI_SANDBOX_NETWORK=none` the job gets its own
network namespace with only loopback. Run as root, bwrap drops every capability (`--cap-drop ALL`); an
agent's step user runs it unprivileged, in a user namespace of its own.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import kici
from kici.agent.sandbox.base import (
    Execution,
    ExecutionRequest,
    Network,
    SandboxBackend,
    SandboxUnavailable,
    run_probe,
)
from kici.agent.sandbox.limits import Limiter
from kici.engine.runner_protocol import JobSpec
from kici.runner.spawn import runner_env

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_BASICS = (
    "alternatives", "ca-certificates", "ca-certificates.conf", "ssl", "pki", "crypto-policies", "resolv.conf",
    "hosts", "host.conf", "nsswitch.conf", "gai.conf", "passwd", "group", "localtime", "timezone",
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "os-release", "debian_version", "lsb-release", "mime.types",
    "protocols", "services", "gitconfig", "terminfo", "bash.bashrc", "inputrc", "shells", "python3*",
)
"""What of /etc a job sees: name resolution, certificates, users and groups (no shadow), the dynamic
linker, time zone, and Debian's alternatives links and Python site customisation. Nothing else: `/etc`
is where operators keep the agent's token and environment file."""

HOME_DIR = "home"


def agent_python_paths() -> list[str]:
    """Host paths the runner's interpreter and the kici package live in (bound read-only)."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.realpath(sys.executable))}
    candidates.add(str(Path(kici.__file__).resolve().parents[1]))
    candidates.update(p for p in runner_env().get("PYTHONPATH", "").split(os.pathsep) if p)
    real = {os.path.realpath(p) for p in candidates}
    return _outermost(p for p in candidates | real if os.path.exists(p))


def _outermost(paths: Iterable[str]) -> list[str]:
    """`paths` without those inside another of them or inside the system directories (already bound)."""
    ordered = sorted({os.path.normpath(p) for p in paths}, key=len)
    kept: list[str] = []
    for path in ordered:
        if any(path == k or path.startswith(k.rstrip("/") + "/") for k in (*kept, *SYSTEM_DIRS)):
            continue
        kept.append(path)
    return sorted(kept)


def system_args() -> list[str]:
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for pattern in ETC_BASICS:
        for found in sorted(glob.glob(os.path.join("/etc", pattern))):
            if os.path.exists(found):  # a dangling link (resolv.conf of a stopped resolver) is left out
                args += ["--ro-bind", os.path.realpath(found), found]
    return args


class BwrapExecution(Execution):
    backend: BwrapSandbox

    def _home(self) -> Path:
        return self.request.scratch_dir / HOME_DIR

    def sandbox_prefix(self, scratch: str) -> list[str]:
        home = self._home()
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.request.run_as is not None:
            os.chown(self.request.scratch_dir, *self.request.run_as)
            os.chown(home, *self.request.run_as)
        return self.backend.command(
            workspace=str(self.request.workspace), scratch_dir=str(self.request.scratch_dir), tmp=scratch,
            home=str(home), read_only=[str(p) for p in self.request.read_only_paths],
            unprivileged=self.request.run_as is not None,
        )

    def prepared_spec(self) -> JobSpec:
        """HOME is the job's own (the agent's home does not exist inside) unless the job's env set one of
        the directories the job can see."""
        spec = self.request.spec
        current = spec.env.get("HOME", "")
        visible = (str(self.request.workspace), str(self.request.scratch_dir))
        if any(current == v or current.startswith(v + "/") for v in visible):
            return spec
        return spec.model_copy(update={"env": {**spec.env, "HOME": str(self._home())}})


class BwrapSandbox(SandboxBackend):
    name = "bwrap"
    supports_network_none = True

    def __init__(self, *, network: Network = "host", limiter: Limiter | None = None) -> None:
        super().__init__(network=network, limiter=limiter)
        self.bwrap = shutil.which("bwrap")
        self._python_paths = agent_python_paths()
        self._system = system_args()

    def command(self, *, workspace: str, scratch_dir: str, tmp: str, home: str, read_only: Iterable[str],
                unprivileged: bool) -> list[str]:
        """The bwrap command line the runner starts under."""
        assert self.bwrap is not None
        args = [self.bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
        if self.network == "none":
            args.append("--unshare-net")
        if not unprivileged and os.geteuid() == 0:
            args += ["--cap-drop", "ALL"]
        args += self._system
        args += ["--proc", "/proc", "--dev", "/dev", "--bind", tmp, "/tmp"]
        for path in _outermost([*self._python_paths, *read_only]):
            args += ["--ro-bind", path, path]
        for path in (scratch_dir, workspace):
            args += ["--bind", path, path]
        args += ["--remount-ro", "/", "--chdir", workspace, "--setenv", "TMPDIR", "/tmp", "--setenv", "HOME", home,
                 "--"]
        return args

    def probe(self, run_as: tuple[int, int] | None = None) -> None:
        self.check_network()
        if self.bwrap is None:
            raise SandboxUnavailable("KICI_SANDBOX=bwrap needs bubblewrap (`bwrap`), not found on PATH; install "
                                     "the distribution's `bubblewrap` package")
        with tempfile.TemporaryDirectory(prefix="kici-bwrap-probe-") as root:
            dirs = [os.path.join(root, name) for name in ("workspace", "scratch", "tmp")]
            for path in dirs:
                os.mkdir(path)
                if run_as is not None:
                    os.chown(path, *run_as)
            if run_as is not None:
                os.chmod(root, 0o755)
            argv = self.command(workspace=dirs[0], scratch_dir=dirs[1], tmp=dirs[2], home=dirs[1],
                                read_only=(), unprivileged=run_as is not None)
            try:
                proc = run_probe([*argv, sys.executable, "-c", "import kici.runner"], run_as)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise SandboxUnavailable(f"KICI_SANDBOX=bwrap: cannot run bwrap: {exc}") from None
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise SandboxUnavailable(
                f"KICI_SANDBOX=bwrap: bubblewrap cannot create its sandbox here ({detail}); it needs user "
                "namespaces for an unprivileged user (sysctl user.max_user_namespaces, "
                "kernel.apparmor_restrict_unprivileged_userns) and the agent's Python readable inside"
            )

    def prepare(self, request: ExecutionRequest) -> Execution:
        return BwrapExecution(self, request)
