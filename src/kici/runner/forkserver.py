"""The runner forkserver: a long-lived process that has imported the runner once and forks a fresh runner
per job, so a job no longer pays an interpreter start-up and the runner's imports (`python -m
kici.runner.forkserver --socket-fd N`; the agent's side is `kici.runner.forkclient`).

The server never runs job code: it reads requests, forks, and reports exits. Each job gets a new child
that sets itself up the way `spawn.popen_runner` sets up a spawned runner before `exec`: its own session,
the request's file descriptors as stdin, stdout/stderr and the protocol fd (everything else closed), the
request's environment (the allow-listed `runner_env`, never the agent's), the step user's uid/gid with no
supplementary groups when asked, the working directory, then `kici.runner.__main__.main`. The child is a
child subreaper like any runner (`main` does that), so cancel still reaches the whole tree.

Requests come over a `SOCK_SEQPACKET` socket pair that only the agent holds (no path anyone else could
connect to): one JSON message per request with three file descriptors (SCM_RIGHTS); answers are JSON
messages: `{"ready": pid}` once, `{"id": n, "pid": p}` or `{"id": n, "error": text}` per request, and
`{"exited": p, "code": c}` (Popen's convention: minus the signal number) when a child ends. The server
exits when the agent's end closes; children already started keep running (they end when their own stdin,
held by the agent, closes).

The server marks itself non-dumpable: a job running as the agent's user must not be able to ptrace it and
plant code in every later job. A child resets the flag (as `exec` would) once it has its final identity.
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import socket
import sys
import tempfile
import traceback
from typing import Any, NoReturn

import kici.runner.__main__ as runner_main

PR_SET_DUMPABLE = 4
MAX_MESSAGE = 1 << 20
FDS_PER_REQUEST = 3
PROTOCOL_FD = 3
"""Where a child finds its protocol pipe (after stdin, stdout and stderr)."""

_PRELOAD = (
    "kici.sdk.loader", "kici.sdk.naming", "kici.engine.content_hash", "kici.engine.events", "asyncio", "ctypes",
    "shutil", "subprocess", "traceback",
)
"""Imported once in the server (besides the runner itself), so that a forked runner finds them loaded: what
the runner imports lazily for nearly every job (loading the workflow, the drift gate, `ctx.event`) and what
steps commonly pull in. A module that fails to import here is imported (and fails) in the job instead."""


def _set_dumpable(value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_DUMPABLE, value, 0, 0, 0)) == 0


class Request:
    """One spawn request, checked before anything is forked."""

    def __init__(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise ValueError("a request must be a JSON object")
        self.id = data.get("id")
        if not isinstance(self.id, int):
            raise ValueError("request id must be an integer")
        env = data.get("env")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("env must map strings to strings")
        self.env: dict[str, str] = env
        cwd = data.get("cwd")
        if not isinstance(cwd, str) or not cwd:
            raise ValueError("cwd must be a directory path")
        self.cwd = cwd
        run_as = data.get("run_as")
        if run_as is not None and not (
            isinstance(run_as, list) and len(run_as) == 2 and all(isinstance(x, int) and x >= 0 for x in run_as)
        ):
            raise ValueError("run_as must be [uid, gid] or null")
        self.run_as: tuple[int, int] | None = (run_as[0], run_as[1]) if run_as is not None else None
        if self.run_as is not None and os.geteuid() != 0 and self.run_as != (os.geteuid(), os.getegid()):
            raise ValueError(f"cannot run as uid {self.run_as[0]}: the forkserver does not run as root")


class Server:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ, None)
        self.children: dict[int, int] = {}
        """pidfd → pid of every child not yet reaped."""

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.sendall(json.dumps(message).encode("utf-8"))
        except OSError:
            pass  # the agent is gone; the loop notices on its next read

    def serve(self) -> None:
        self.send({"ready": os.getpid()})
        while True:
            for key, _ in self.selector.select():
                if key.data is None:
                    if not self.on_request():
                        return
                else:
                    self.on_exit(key.fd, key.data)

    def on_request(self) -> bool:
        """Handle one request; False when the agent has closed its end."""
        try:
            raw, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, FDS_PER_REQUEST)
        except InterruptedError:
            return True
        except OSError:
            return False
        if not raw and not fds:
            return False
        try:
            request_id = None
            try:
                data = json.loads(raw)
                request_id = data.get("id") if isinstance(data, dict) else None
                request = Request(data)
                if len(fds) != FDS_PER_REQUEST:
                    raise ValueError(f"a request carries {FDS_PER_REQUEST} file descriptors, got {len(fds)}")
                if not os.path.isdir(request.cwd):
                    raise ValueError(f"cwd {request.cwd!r} is not a directory")
            except ValueError as exc:
                self.send({"id": request_id, "error": f"bad request: {exc}"})
                return True
            try:
                pid = self.fork(request, fds)
            except OSError as exc:
                self.send({"id": request.id, "error": f"fork failed: {exc}"})
                return True
            pidfd = os.pidfd_open(pid)
            self.children[pidfd] = pid
            self.selector.register(pidfd, selectors.EVENT_READ, pid)
            self.send({"id": request.id, "pid": pid})
            return True
        finally:
            for fd in fds:
                os.close(fd)

    def fork(self, request: Request, fds: list[int]) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, fds)
        return pid

    def on_exit(self, pidfd: int, pid: int) -> None:
        self.selector.unregister(pidfd)
        os.close(pidfd)
        del self.children[pidfd]
        _, status = os.waitpid(pid, 0)
        self.send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _child(request: Request, fds: list[int]) -> NoReturn:
    """In the forked child: become a job's runner. Never returns."""
    try:
        os.setsid()
        stdin, output, protocol = fds
        os.dup2(stdin, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.dup2(protocol, PROTOCOL_FD)
        # the server's socket, selector and pidfds, and the received originals: nothing of the server stays
        os.closerange(PROTOCOL_FD + 1, os.sysconf("SC_OPEN_MAX"))
        if request.run_as is not None:
            uid, gid = request.run_as
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        _set_dumpable(1)
        os.chdir(request.cwd)
        os.environ.clear()
        os.environ.update(request.env)
        tempfile.tempdir = None  # the new TMPDIR counts, should anything of the server have asked already
        sys.argv = [runner_main.__file__ or "kici.runner", "--protocol-fd", str(PROTOCOL_FD)]
        runner_main.main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if exc.code is not None and not isinstance(exc.code, int):
            os.write(2, f"{exc.code}\n".encode("utf-8", "replace"))
        os._exit(code)
    except BaseException:
        os.write(2, traceback.format_exc().encode("utf-8", "replace"))
        os._exit(1)
    os._exit(1)


def _preload() -> None:
    import importlib

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # the job imports it itself, and reports the error where it belongs
            pass


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "--socket-fd":
        raise SystemExit("usage: python -m kici.runner.forkserver --socket-fd N")
    sock = socket.socket(fileno=int(args[1]))
    os.set_inheritable(sock.fileno(), False)
    if not _set_dumpable(0) and sys.platform.startswith("linux"):
        raise SystemExit("forkserver: prctl(PR_SET_DUMPABLE, 0) failed")
    if not hasattr(os, "pidfd_open"):
        raise SystemExit("forkserver: needs os.pidfd_open (Linux 5.3 or later)")
    _preload()
    # everything loaded so far lives as long as the server: keep the garbage collector (in the server and
    # in every child) from walking it, and the children's pages shared
    gc.collect()
    gc.freeze()
    Server(sock).serve()


if __name__ == "__main__":
    main()
