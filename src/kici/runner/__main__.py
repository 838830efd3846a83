"""`python -m kici.runner --protocol-fd N`: run one job (see `kici.runner`)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from kici.runner import proctree, reaper, shell
from kici.runner.job_runner import JobRunner
from kici.runner.stdio import StdioCapture
from kici.runner.wire import SETUP_STEP_INDEX, ProtocolWriter, Spec, SpecError, parse_control, parse_spec

USAGE = "usage: python -m kici.runner --protocol-fd N   (a JobSpec JSON line on stdin)"
END_SWEEP_GRACE = 2.0
"""Seconds background processes get between SIGTERM and SIGKILL when the job ends."""


def _parse_args(argv: list[str]) -> int:
    fd: int | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--protocol-fd" and i + 1 < len(argv):
            fd = int(argv[i + 1])
            i += 2
        elif arg.startswith("--protocol-fd="):
            fd = int(arg.split("=", 1)[1])
            i += 1
        else:
            raise SystemExit(f"unknown argument {arg!r}\n{USAGE}")
    if fd is None:
        raise SystemExit(USAGE)
    return fd


def _read_line(fd: int) -> tuple[bytes, bytes]:
    """The first line of `fd` and whatever was read after it."""
    buf = bytearray()
    while True:
        at = buf.find(b"\n")
        if at >= 0:
            return bytes(buf[:at]), bytes(buf[at + 1 :])
        data = os.read(fd, 1 << 16)
        if not data:
            return bytes(buf), b""
        buf += data


class Runner:
    """Process-level state: protocol, captured stdio, the job, and the way out."""

    def __init__(self, protocol: ProtocolWriter, diag: int) -> None:
        self.protocol = protocol
        self.diag = diag
        self.capture: StdioCapture | None = None
        self.job: Any = None
        self.phase = "setup"
        self.pending_cancel: tuple[bool, str] | None = None
        """A cancel that arrived before the job object existed: (force, reason)."""
        self.cancel_lock = threading.Lock()
        self._exit_lock = threading.Lock()

    def diagnose_exception(self) -> None:
        import traceback

        self.diagnose(traceback.format_exc())

    def diagnose(self, text: str) -> None:
        try:
            os.write(self.diag, text.encode("utf-8", "replace"))
        except OSError:
            pass

    def finish(self, result: dict[str, Any], code: int = 0, grace: float = END_SWEEP_GRACE) -> NoReturn:
        """Kill what is left of the job, send the result and exit; only one thread ever gets past the lock."""
        with self._exit_lock:
            self._finish(result, code, grace)

    def finish_if(self, phases: tuple[str, ...], result: dict[str, Any], grace: float = END_SWEEP_GRACE) -> None:
        """`finish`, unless the runner has left `phases` meanwhile."""
        with self._exit_lock:
            if self.phase in phases:
                self._finish(result, 0, grace)

    def set_phase(self, phase: str) -> None:
        with self._exit_lock:
            self.phase = phase

    def _finish(self, result: dict[str, Any], code: int, grace: float) -> NoReturn:
        try:
            proctree.kill_tree(os.getpid(), grace=grace, include_root=False)
            reaper.reap_all()
            shell.join_drains(0.5)
            if self.capture is not None:
                self.capture.sync(timeout=1.0)
            self.protocol.job_result(**result)
            if self.job is not None:
                self.job.cleanup_tmp()
        except BaseException:
            self.diagnose_exception()
            code = code or 1
        finally:
            try:
                os.close(self.protocol.fd)
            except OSError:
                pass
            os._exit(code)


def _control(runner: Runner, fd: int, rest: bytes) -> None:
    """Read CancelRequests from stdin; EOF means the parent is gone: cancel."""
    buf = bytearray(rest)
    while True:
        while True:
            at = buf.find(b"\n")
            if at < 0:
                break
            line = bytes(buf[:at])
            del buf[: at + 1]
            message = parse_control(line)
            if message is not None and message.get("type") == "cache.reply":
                from kici.runner.cache_requests import deliver

                deliver(message)
            elif message is not None:
                _cancel(runner, bool(message.get("force")), str(message.get("reason") or "cancelled"))
        try:
            data = os.read(fd, 1 << 16)
        except OSError:
            data = b""
        if not data:
            _cancel(runner, False, "cancelled: the runner's parent closed its control channel")
            return
        buf += data


def _cancel(runner: Runner, force: bool, reason: str) -> None:
    with runner.cancel_lock:
        job = runner.job
        if job is None:
            runner.pending_cancel = (force or runner.pending_cancel is not None, reason)
    if job is not None:
        job.request_cancel(force, reason)
    elif force or runner.pending_cancel[0]:  # type: ignore[index]
        # Nothing of the job has started (the import itself cannot be interrupted): stop right away.
        result = {"status": "cancelled", "error": reason, "failure_category": "cancelled"}
        runner.finish_if(("setup", "import"), result, grace=0)


def _drift_error(spec: Spec) -> str | None:
    if not spec.expected_content_hash:
        return None
    from kici import __version__
    from kici.engine.content_hash import workflow_content_hash

    workspace = Path(spec.workspace)

    def read(path: str) -> bytes | None:
        try:
            return (workspace / path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    try:
        actual = workflow_content_hash(spec.workflow_file, read, spec.kici_dir)
    except FileNotFoundError:
        return (
            f"lock file is out of date: {spec.workflow_file} does not exist in the checkout (kici {__version__})"
        )
    if actual == spec.expected_content_hash:
        return None
    return (
        f"lock file is out of date: {spec.workflow_file} has contentHash {actual} but the lock file says "
        f"{spec.expected_content_hash} (kici {__version__}); run `kici compile` and commit "
        f"{spec.kici_dir}/kici.lock.json"
    )


def _load(spec: Spec) -> tuple[Any, Any] | str:
    """(workflow, job) definitions, or an error text."""
    from kici.sdk.loader import WorkflowImportError, load_module, resolve_export
    from kici.sdk.naming import WORKFLOW_HOOKS_JOB, job_names, workflow_hooks_job

    sys.dont_write_bytecode = True  # do not leave __pycache__ in the checkout
    try:
        module = load_module(Path(spec.workspace), spec.workflow_file, spec.kici_dir)
    except WorkflowImportError as exc:
        return str(exc)
    try:
        workflow = resolve_export(module, spec.export)
    except LookupError as exc:
        return f"{spec.workflow_file}: {exc}"
    if spec.job == WORKFLOW_HOOKS_JOB:
        return workflow, workflow_hooks_job(workflow, spec.run_status or "success", spec.hook_timeout_ms / 1000)
    names = job_names(workflow.jobs)
    for job, name in zip(workflow.jobs, names, strict=True):
        if name == spec.job:
            return workflow, job
    return f"job {spec.job!r} not found in workflow {workflow.name!r} (jobs: {', '.join(names) or 'none'})"


def _import_watchdog(runner: Runner, spec: Spec, started: float) -> threading.Timer | None:
    if spec.job_timeout_ms is None:
        return None

    def fire() -> None:
        error = f"job_timeout: job exceeded its timeout of {spec.job_timeout_ms}ms while importing the workflow"
        runner.finish_if(("import",), {"status": "failed", "error": error, "failure_category": "timeout"}, grace=0)

    timer = threading.Timer(max(0.0, started + spec.job_timeout_ms / 1000 - time.monotonic()), fire)
    timer.daemon = True
    timer.start()
    return timer


def main(argv: list[str] | None = None) -> NoReturn:
    started = time.monotonic()
    protocol_fd = _parse_args(sys.argv[1:] if argv is None else argv)
    os.set_inheritable(protocol_fd, False)
    protocol = ProtocolWriter(protocol_fd)
    runner = Runner(protocol, os.dup(2))
    try:
        _main(runner, started)
    except SystemExit:
        raise
    except BaseException as exc:
        runner.diagnose_exception()
        error = f"internal error: {type(exc).__name__}: {exc}"
        runner.finish({"status": "failed", "error": error, "failure_category": "internal"}, code=1)


def _main(runner: Runner, started: float) -> NoReturn:
    protocol = runner.protocol
    reaper.become_subreaper()
    # `runner_env` set these so this interpreter could import kici; they are in sys.path now. A Python
    # step's own subprocesses inherit os.environ, and KiCI's environment must not leak into them.
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        os.environ.pop(name, None)

    # stdin: the spec, then control lines. Steps get /dev/null as stdin instead.
    line, rest = _read_line(0)
    control_fd = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    runner.capture = StdioCapture(protocol.logs, SETUP_STEP_INDEX)
    threading.Thread(target=_control, args=(runner, control_fd, rest), name="kici-control", daemon=True).start()

    try:
        spec = parse_spec(line)
    except SpecError as exc:
        runner.finish({"status": "failed", "error": str(exc), "failure_category": "internal"}, code=2)

    os.chdir(spec.workspace)
    error = _drift_error(spec)
    if error is not None:
        protocol.log(SETUP_STEP_INDEX, "system", f"[error] {error}")
        runner.finish({"status": "failed", "error": error, "failure_category": "drift"})
    runner.set_phase("import")
    watchdog = _import_watchdog(runner, spec, started)
    loaded = _load(spec)
    if isinstance(loaded, str):
        runner.set_phase("done")
        for text in loaded.splitlines():
            protocol.log(SETUP_STEP_INDEX, "system", f"[error] {text}")
        runner.finish({"status": "failed", "error": loaded, "failure_category": "import"})

    job = JobRunner(spec, protocol, runner.capture, started=started)
    protocol.on_broken = lambda: job.request_cancel(False, "cancelled: the runner's parent stopped reading")
    job.workflow_def, job.job_def = loaded
    runner.set_phase("run")
    with runner.cancel_lock:
        runner.job = job
        pending = runner.pending_cancel
    if pending is not None:
        job.request_cancel(*pending)
    if watchdog is not None:
        watchdog.cancel()
    result = job.run()
    grace = 0.0 if job.cancel_force else min(job.kill_grace, END_SWEEP_GRACE)
    runner.set_phase("done")
    runner.finish(result, grace=grace)


if __name__ == "__main__":
    main()
