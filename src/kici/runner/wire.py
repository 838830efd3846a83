"""The runner's side of `kici.engine.runner_protocol`, in plain stdlib.

The protocol's pydantic models are the definition; the runner decodes and encodes the same JSON by hand
because importing pydantic and building the models' schemas costs more than the rest of the runner's
start-up together (see the runner's docstring), and that cost is paid by every job. The parent validates
the `JobSpec` with pydantic before sending it and parses every message the runner writes with
`parse_runner_message`, and tests check that `Spec` lists exactly the fields and defaults of `JobSpec`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

SETUP_STEP_INDEX = -1
"""Same value as `runner_protocol.SETUP_STEP_INDEX`: output that belongs to no step."""


class SpecError(ValueError):
    """The first stdin line is not a valid JobSpec."""


@dataclass
class Spec:
    """Mirror of `runner_protocol.JobSpec` (see there for the meaning of each field)."""

    workspace: str
    workflow_file: str
    export: str
    workflow: str
    job: str
    display_name: str
    event: dict[str, Any]
    matrix: dict[str, Any] | None = None
    env: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    upstream_outputs: dict[str, Any] = field(default_factory=dict)
    expected_content_hash: str | None = None
    default_step_timeout_ms: int = 30 * 60 * 1000
    job_timeout_ms: int | None = None
    grace_period_ms: int | None = None
    hook_timeout_ms: int = 5 * 60 * 1000
    kici_dir: str = ".kici"
    run_id: str | None = None
    job_id: str | None = None
    run_status: str | None = None


_STR_FIELDS = ("workspace", "workflow_file", "export", "workflow", "job", "display_name", "kici_dir")
_DICT_FIELDS = ("event", "env", "secrets", "upstream_outputs")
_INT_FIELDS = ("default_step_timeout_ms", "hook_timeout_ms")
_NULLABLE = (
    "matrix", "expected_content_hash", "job_timeout_ms", "grace_period_ms", "run_id", "job_id", "run_status",
)


def parse_spec(line: bytes | str) -> Spec:
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise SpecError(f"job spec is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError("job spec is not a JSON object")
    names = {f.name for f in fields(Spec)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SpecError(f"job spec has unknown field(s): {', '.join(unknown)}")
    data = {k: v for k, v in data.items() if v is not None or k in _NULLABLE}
    missing = [
        f.name for f in fields(Spec) if f.default is MISSING and f.default_factory is MISSING and f.name not in data
    ]
    if missing:
        raise SpecError(f"job spec is missing field(s): {', '.join(missing)}")
    spec = Spec(**data)
    for name in _STR_FIELDS:
        if not isinstance(getattr(spec, name), str):
            raise SpecError(f"job spec field {name} must be a string")
    for name in _DICT_FIELDS:
        if not isinstance(getattr(spec, name), dict):
            raise SpecError(f"job spec field {name} must be an object")
    for name in _INT_FIELDS:
        if not isinstance(getattr(spec, name), int):
            raise SpecError(f"job spec field {name} must be an integer")
    if spec.run_status not in (None, "success", "failed", "cancelled"):
        raise SpecError("job spec field run_status must be success, failed or cancelled")
    if spec.matrix is not None and not isinstance(spec.matrix, dict):
        raise SpecError("job spec field matrix must be an object")
    if spec.job_timeout_ms is not None and not isinstance(spec.job_timeout_ms, int):
        raise SpecError("job spec field job_timeout_ms must be an integer")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in {**spec.env, **spec.secrets}.items()):
        raise SpecError("job spec env and secrets must map strings to strings")
    return spec


def parse_control(line: bytes | str) -> dict[str, Any] | None:
    """A control line from stdin (`CancelRequest`, `CacheReply`), or None when it is not one."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if isinstance(data, dict) and data.get("type") in ("cancel", "cache.reply"):
        return data
    return None


def _clean(text: str) -> str:
    # Lone surrogates (from odd bytes in file names, say) cannot be encoded as UTF-8 JSON.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


_encode_str: Callable[[str], str] = json.encoder.encode_basestring


class ProtocolWriter:
    """Writes messages as JSON lines to the protocol fd; thread-safe; nothing is sent after the result."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()
        self.result_sent = False
        self.broken = False
        self.on_broken: Callable[[], None] | None = None
        """Called once when a write fails: the parent is gone (the runner then cancels the job)."""

    def _write(self, message: dict[str, Any], final: bool = False) -> bool:
        payload = {k: v for k, v in message.items() if v is not None}
        try:
            text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError):
            text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=repr)
        return self._send((_clean(text) + "\n").encode("utf-8"), final)

    def _send(self, data: bytes, final: bool = False) -> bool:
        with self._lock:
            if self.result_sent or self.broken:
                return False
            if final:
                self.result_sent = True
            view = memoryview(data)
            try:
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
            except OSError:
                self.broken = True  # the parent is gone; nobody is listening
                broken = True
            else:
                broken = False
        if broken:
            if self.on_broken is not None:
                self.on_broken()
            return False
        return True

    def log(self, step_index: int, stream: str, line: str) -> None:
        self.logs(step_index, stream, [line])

    def logs(self, step_index: int, stream: str, lines: list[str]) -> None:
        """Lines of output in one write: a `LogLine` for one line, a `LogLines` for several (the hot path:
        every line of output goes through here)."""
        if not lines:
            return
        if len(lines) == 1:
            head = f'{{"type":"log","step_index":{int(step_index)},"stream":{_encode_str(stream)},"line":'
            data = f"{head}{_encode_str(lines[0])}}}\n"
        else:
            head = f'{{"type":"logs","step_index":{int(step_index)},"stream":{_encode_str(stream)},"lines":['
            data = head + ",".join([_encode_str(line) for line in lines]) + "]}\n"
        self._send(_clean(data).encode("utf-8"))

    def cache_request(self, request_id: int, step_index: int, op: str, key: str, paths: list[str],
                      restore_keys: list[str]) -> bool:
        return self._write({"type": "cache.request", "id": request_id, "step_index": step_index, "op": op,
                            "key": key, "paths": paths, "restore_keys": restore_keys})

    def job_started(self, steps: list[str]) -> None:
        self._write({"type": "job.started", "steps": steps})

    def step_status(
        self,
        step_index: int,
        step_name: str,
        state: str,
        *,
        attempt: int = 1,
        duration_ms: int | None = None,
        error: str | None = None,
        outputs: dict[str, Any] | None = None,
    ) -> None:
        self._write(
            {
                "type": "step.status",
                "step_index": step_index,
                "step_name": step_name,
                "state": state,
                "attempt": attempt,
                "duration_ms": duration_ms,
                "error": error,
                "outputs": outputs,
            }
        )

    def job_result(
        self,
        status: str,
        *,
        outputs: dict[str, Any] | None = None,
        error: str | None = None,
        failure_category: str | None = None,
        artifacts: list[str] | None = None,
    ) -> bool:
        return self._write(
            {
                "type": "job.result",
                "status": status,
                "outputs": outputs or {},
                "error": error,
                "failure_category": failure_category,
                "artifacts": artifacts or [],
            },
            final=True,
        )
