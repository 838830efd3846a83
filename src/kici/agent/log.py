"""Structured log lines on stderr: one JSON object per line, `{"ts", "level", "event", …fields}`.

Code logs *events* with fields (`log_event("job.finished", job_id=…, state=…)`), never secrets: job
output goes to the orchestrator as `log.chunk`, not here, and clone errors are redacted before logging.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any, TextIO

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_threshold = _LEVELS["info"]
_stream: TextIO | None = None


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    global _threshold, _stream
    _threshold = _LEVELS.get(level, 20)
    _stream = stream


def log_event(event: str, *, level: str = "info", **fields: Any) -> None:
    """Write `event` with `fields` (None values dropped) if `level` passes the configured threshold."""
    if _LEVELS.get(level, 20) < _threshold:
        return
    line: dict[str, Any] = {
        "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "logger": "kici.agent",
        "event": event,
    }
    line.update({k: v for k, v in fields.items() if v is not None and k not in line})
    stream = _stream or sys.stderr
    try:
        stream.write(json.dumps(line, default=str, ensure_ascii=False, separators=(",", ":")) + "\n")
        stream.flush()
    except (OSError, ValueError):  # stderr closed: logging must never take the agent down
        pass
