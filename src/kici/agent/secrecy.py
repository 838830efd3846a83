"""Keeping the agent token away from job steps (issue 9, defect 3).

A step runs as the agent's user (or, for an agent running as root, as the step user). Whatever the agent
process exposes to its own user is exposed to a step running as that user, so:

- `/proc/<pid>/environ` shows the environment the process was *started* with; removing a variable from
  `os.environ` does not change it. A token given in `KICI_AGENT_TOKEN` is therefore taken out by
  re-executing the agent once with the variable removed; the token travels to the new image over a pipe
  whose read end is closed as soon as it is read (`--token-fd`). `KICI_AGENT_TOKEN_FILE` avoids the
  variable altogether.
- `prctl(PR_SET_DUMPABLE, 0)` makes `/proc/<pid>/environ`, `mem`, `fd/*` unreadable and `ptrace` attach
  fail for other processes of the same uid (only a process with CAP_SYS_PTRACE, i.e. root, gets past it:
  hence the step user for agents running as root). execve resets the flag, so each image sets it first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

TOKEN_ENV = "KICI_AGENT_TOKEN"
TOKEN_FD_FLAG = "--token-fd"
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
MAX_TOKEN_BYTES = 4096


class SecrecyError(Exception):
    """The token could not be handed over or protected; the message says why."""


def _prctl() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    prctl.restype = ctypes.c_int
    return prctl


def make_non_dumpable() -> bool:
    """Mark this process non-dumpable (Linux); False where that does not exist. Raises `SecrecyError`
    when the call fails on Linux (the agent must not run unprotected)."""
    prctl = _prctl()
    if prctl is None:
        return False
    if prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SecrecyError(f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(err)}")
    return True


def is_dumpable() -> bool | None:
    """The process's dumpable flag (None where there is no prctl)."""
    prctl = _prctl()
    return None if prctl is None else bool(prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))


def reexec_without_token(environ: Mapping[str, str], argv: list[str]) -> None:
    """When `KICI_AGENT_TOKEN` is set: re-execute this agent without it, handing the token over a pipe.
    Returns (doing nothing) when the variable is unset or empty."""
    token = environ.get(TOKEN_ENV, "").strip()
    if not token:
        return None
    data = token.encode("utf-8")
    if len(data) > MAX_TOKEN_BYTES:
        raise SecrecyError(f"{TOKEN_ENV} is longer than {MAX_TOKEN_BYTES} bytes")
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, data)  # far below the pipe's buffer: never blocks
    finally:
        os.close(write_fd)
    os.set_inheritable(read_fd, True)
    env = {key: value for key, value in environ.items() if key != TOKEN_ENV}
    # `-P`: the new image must not import from the current directory (a `kici-agent` console script never
    # did); a kici that is not installed (a source tree) is found through PYTHONPATH instead
    package_root = str(Path(__file__).resolve().parents[2])
    if Path(package_root).name not in ("site-packages", "dist-packages"):
        paths = [package_root, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-P", "-m", "kici.agent", TOKEN_FD_FLAG, str(read_fd), *argv], env)


def read_token_fd(raw: str) -> str:
    """Read the token the parent image wrote to fd `raw`, then close it."""
    try:
        fd = int(raw)
    except ValueError:
        raise SecrecyError(f"{TOKEN_FD_FLAG} needs a file descriptor number, got {raw!r}") from None
    chunks: list[bytes] = []
    try:
        while True:
            chunk = os.read(fd, MAX_TOKEN_BYTES + 1)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as exc:
        raise SecrecyError(f"{TOKEN_FD_FLAG} {fd}: {exc.strerror or exc}") from None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    token = b"".join(chunks).decode("utf-8", "replace").strip()
    if not token:
        raise SecrecyError(f"{TOKEN_FD_FLAG} {fd}: no token was handed over")
    return token
