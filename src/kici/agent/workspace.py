"""Per-job workspaces under `<work dir>/jobs/`: created empty for each job, removed whatever the outcome.

Jobs live one level below the work dir so that the start-up sweep of workspaces left behind by a crash
can never touch the agent id file or anything else an operator keeps in the work dir.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import sys
from pathlib import Path

from kici.agent.log import log_event

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def prepare_work_dir(work_dir: Path, *, step_user: bool = False) -> None:
    """Create the work dir and `jobs/` (0700). With a separate step user the two are 0711: the step user
    must pass through to its workspace (itself 0700 and the step user's), but can list neither."""
    mode = 0o711 if step_user else 0o700
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    jobs = work_dir / "jobs"
    jobs.mkdir(exist_ok=True, mode=0o700)
    if step_user:
        os.chmod(work_dir, mode)
    os.chmod(jobs, mode)  # checkouts may hold private code: other local users never get in


def job_dir(jobs_dir: Path, job_id: str) -> Path:
    """The job's workspace path; ids that are not plain file names are hashed (no `..`, no `/`)."""
    name = job_id if _SAFE.match(job_id) else "job-" + hashlib.sha256(job_id.encode()).hexdigest()[:32]
    return jobs_dir / name


def create(path: Path) -> None:
    if path.exists():
        remove(path)
    path.mkdir(mode=0o700)


def remove(path: Path) -> None:
    """Delete a workspace, including read-only files and directories a job left behind."""

    def on_error(func: object, target: str, exc: BaseException) -> None:
        try:
            parent = os.path.dirname(target)
            os.chmod(parent, stat.S_IRWXU)
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, stat.S_IRWXU)
                shutil.rmtree(target, ignore_errors=True)
            else:
                os.unlink(target)
        except OSError:
            pass

    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=on_error)
    else:  # pragma: no cover - 3.11 only knows onerror (deprecated from 3.12)
        shutil.rmtree(path, onerror=lambda f, t, e: on_error(f, t, e[1]))


def sweep(jobs_dir: Path) -> int:
    """Remove workspaces left by an agent that died mid-job; returns how many."""
    count = 0
    if not jobs_dir.is_dir():
        return 0
    for entry in jobs_dir.iterdir():
        remove(entry)
        count += 1
    if count:
        log_event("workspace.swept", count=count, dir=str(jobs_dir))
    return count
