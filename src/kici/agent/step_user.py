"""The user job steps run as when the agent itself runs as root.

A step running as root could read anything of the agent (root passes the non-dumpable protection), so an
agent running as root hands each job to an unprivileged user: the runner child drops to it before it
executes anything of the job, and the job's workspace (cloned by the agent) is given to it. The user must
be able to run the agent's Python and import `kici` (checked at start-up by running it once).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kici.runner.spawn import runner_env

DEFAULT_CANDIDATES = ("kici-step", "nobody")
ROOT_NAMES = frozenset({"root", "0"})
PROBE_TIMEOUT_S = 60.0


class StepUserError(Exception):
    """`KICI_AGENT_STEP_USER` names a user that does not exist or cannot run the runner."""


@dataclass(frozen=True)
class StepUser:
    name: str
    uid: int
    gid: int
    home: str

    @property
    def run_as(self) -> tuple[int, int]:
        return (self.uid, self.gid)

    @classmethod
    def of(cls, entry: pwd.struct_passwd) -> StepUser:
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def _lookup(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, OverflowError):
        return None


def probe(user: StepUser, python: str = sys.executable) -> str | None:
    """None when `user` can start the runner's interpreter and import kici; else why not."""
    try:
        proc = subprocess.run(
            [python, "-c", "import kici.runner"], user=user.uid, group=user.gid, extra_groups=[],
            env=runner_env(), cwd="/", capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return None


def resolve(setting: str, *, euid: int | None = None) -> tuple[StepUser | None, list[str]]:
    """The step user for `KICI_AGENT_STEP_USER` (None: steps run as the agent's own user) and warnings.

    Not root: always None (a setting is ignored with a warning). Root: `root` → None on purpose; a name or
    uid → that user, which must exist and be usable (`StepUserError` otherwise); unset → the first usable
    of `kici-step`, `nobody`, else None with a warning (the orchestrator then refuses the agent unless
    its token allows root steps).
    """
    euid = os.geteuid() if euid is None else euid
    setting = setting.strip()
    if euid != 0:
        warnings = [f"KICI_AGENT_STEP_USER={setting!r} ignored: the agent does not run as root, steps run as "
                    "its own user"] if setting else []
        return None, warnings
    if setting in ROOT_NAMES:
        return None, []
    if setting:
        entry = _lookup(setting)
        if entry is None:
            raise StepUserError(f"KICI_AGENT_STEP_USER: no user {setting!r} on this machine")
        if entry.pw_uid == 0:
            return None, []
        user = StepUser.of(entry)
        problem = probe(user)
        if problem is not None:
            raise StepUserError(
                f"KICI_AGENT_STEP_USER: user {user.name!r} cannot run {sys.executable} with kici ({problem}); "
                "install kici where that user can read it"
            )
        return user, []
    tried: list[str] = []
    for name in DEFAULT_CANDIDATES:
        entry = _lookup(name)
        if entry is None or entry.pw_uid == 0:
            continue
        user = StepUser.of(entry)
        problem = probe(user)
        if problem is None:
            return user, []
        tried.append(f"{name}: {problem}")
    detail = "; ".join(tried) or "neither kici-step nor nobody exists"
    return None, [f"no usable step user ({detail}): job steps would run as root, which the orchestrator refuses "
                  "unless this agent's token allows root steps; set KICI_AGENT_STEP_USER"]


def give_tree(path: Path, user: StepUser) -> None:
    """Hand a workspace (and everything in it) to the step user; symlinks are changed, not followed."""
    os.lchown(path, user.uid, user.gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), user.uid, user.gid)


def identity_env(user: StepUser | None) -> dict[str, str]:
    """HOME, USER and LOGNAME of the step user (the agent's own would point into root's home); empty when
    steps run as the agent's user. Workflow and job env still override them."""
    if user is None:
        return {}
    home = user.home if os.path.isdir(user.home) else "/tmp"
    return {"HOME": home, "USER": user.name, "LOGNAME": user.name}
