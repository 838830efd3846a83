"""Starting a runner process, with the standard library only.

`kici run local` starts the first runner before it imports anything heavy (pydantic, the compiler,
asyncio), so the runner's own start-up runs on the other core meanwhile; `RunnerProcess.adopt` then
takes the process over. The agent uses the same functions through `RunnerProcess.start`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ALLOWED_ENV = ("PATH", "HOME", "USER", "SHELL", "LANG", "LC_ALL", "TERM", "TMPDIR", "TZ")
"""Variables of the parent's environment that reach the runner and (through `safe_base_env`) steps."""

SHARED_BIN_DIRS = frozenset({"/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"})
"""Directories every program on the machine relies on: never dropped from PATH, even when the KiCI
interpreter lives there (a system-wide install has no environment of its own to hide)."""


def kici_bin_dirs(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The `bin` directories of KiCI's own interpreter and virtualenv (`sys.prefix`, `sys.base_prefix`,
    `$VIRTUAL_ENV` and the interpreter's directory), as given and resolved, minus `SHARED_BIN_DIRS`.

    A step that finds these first on PATH runs `python`, `pytest` or `ruff` from KiCI's environment
    instead of the machine's or the project's: the agent's and the CLI's environment must not leak.
    """
    environ = os.environ if environ is None else environ
    candidates = [Path(sys.prefix) / "bin", Path(sys.base_prefix) / "bin", Path(sys.executable).parent]
    if environ.get("VIRTUAL_ENV"):
        candidates.append(Path(environ["VIRTUAL_ENV"]) / "bin")
    found: set[str] = set()
    for candidate in candidates:
        for form in (os.path.normpath(candidate), os.path.realpath(candidate)):
            if form not in SHARED_BIN_DIRS and os.path.realpath(form) not in SHARED_BIN_DIRS:
                found.add(form)
    return frozenset(found)


def step_path(path: str, environ: Mapping[str, str] | None = None) -> str:
    """`path` without KiCI's own interpreter and virtualenv directories (see `kici_bin_dirs`)."""
    hidden = kici_bin_dirs(environ)
    kept = [
        entry for entry in path.split(os.pathsep)
        if entry and os.path.normpath(entry) not in hidden and os.path.realpath(entry) not in hidden
    ]
    return os.pathsep.join(kept)


def safe_base_env(extra: Mapping[str, str] | None = None, *, source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of this process's environment (plus `extra`), for `JobSpec.env`.

    PATH loses KiCI's own interpreter directories (`step_path`); VIRTUAL_ENV, PYTHONHOME and PYTHONPATH
    are not on the allow-list, so they reach a step only when the workflow, job, step or `extra` sets them.
    """
    source = os.environ if source is None else source
    env = {key: source[key] for key in ALLOWED_ENV if key in source}
    if "PATH" in env:
        env["PATH"] = step_path(env["PATH"], source)
    if extra:
        env.update({str(k): str(v) for k, v in extra.items()})
    return env


def runner_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The runner process's own environment: the allow-list plus what it needs to import kici."""
    env = safe_base_env()
    package_root = str(Path(__file__).resolve().parents[2])  # the directory holding the `kici` package
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if Path(package_root).name not in ("site-packages", "dist-packages"):
        paths.insert(0, package_root)  # a source checkout; an installed kici is found by the interpreter
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if "VIRTUAL_ENV" in os.environ:
        env["VIRTUAL_ENV"] = os.environ["VIRTUAL_ENV"]
    if extra:
        env.update(extra)
    return env


@dataclass
class Spawned:
    """A started runner waiting for its spec: the process, the read end of its protocol pipe and its
    private TMPDIR."""

    popen: subprocess.Popen[bytes]
    protocol_fd: int
    scratch: str
    adopted: bool = False
    """Set once a `RunnerProcess` owns it (and with it the pipes and the scratch directory)."""

    def discard(self) -> None:
        """End an unused runner (it exits by itself once its stdin closes; this does not wait long)."""
        if self.popen.stdin is not None:
            self.popen.stdin.close()
        try:
            self.popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        os.close(self.protocol_fd)
        shutil.rmtree(self.scratch, ignore_errors=True)


def popen_runner(
    *,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    argv_prefix: Sequence[str] = (),
    run_as: tuple[int, int] | None = None,
    scratch: str | None = None,
) -> Spawned:
    """Start `python -m kici.runner` in a new session; it waits for its spec on stdin. `run_as` (uid, gid):
    the runner drops to that user (no supplementary groups) before it executes anything, and its scratch
    directory is that user's. `scratch`: the runner's TMPDIR made by the caller (a sandbox that must know
    it before building `argv_prefix`); it is the runner's from here on and removed with it."""
    scratch = scratch if scratch is not None else tempfile.mkdtemp(prefix="kici-runner-scratch-")
    environment = dict(env) if env is not None else runner_env()
    environment["TMPDIR"] = scratch
    identity: dict[str, object] = {}
    if run_as is not None:
        os.chown(scratch, run_as[0], run_as[1])
        identity = {"user": run_as[0], "group": run_as[1], "extra_groups": []}
    read_fd, write_fd = os.pipe()
    try:
        popen = subprocess.Popen(
            [*argv_prefix, python, "-m", "kici.runner", "--protocol-fd", str(write_fd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environment,
            pass_fds=(write_fd,),
            start_new_session=True,
            **identity,  # type: ignore[arg-type]
        )
    except BaseException:
        os.close(read_fd)
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        os.close(write_fd)
    return Spawned(popen, read_fd, scratch)
