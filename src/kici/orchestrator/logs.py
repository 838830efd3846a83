"""Logging: one line per event, JSON for machines (stderr not a terminal) or readable text on a terminal.

Code logs *events* with fields, not sentences: `log_event("webhook.accepted", delivery_id=…, repo=…)`.
Ids bound with `log_context(run_id=…)` are added to every event logged inside that block (and in tasks
started from it, since they live in context variables), so an operator can follow one webhook through
the system by grepping one id. Secrets never go through here: the bootstrap admin token is printed to the
terminal by `main`, not logged.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import IO, Any, Literal

LOGGER_NAME = "kici.orchestrator"

_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "kici_log_context", default=MappingProxyType({})  # read-only: log_context always sets a new mapping
)

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach `fields` (delivery_id, run_id, job_id, …) to every event logged inside the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def log_event(event: str, *, level: str = "info", logger: str = LOGGER_NAME, **fields: Any) -> None:
    """Log `event` (a dotted name such as `db.migrated`) with `fields`, plus the bound context ids.
    `None` fields are dropped so callers can pass optional ids unconditionally."""
    log = logging.getLogger(logger)
    numeric = _LEVELS.get(level, logging.INFO)
    if not log.isEnabledFor(numeric):
        return
    merged = {**_context.get(), **{k: v for k, v in fields.items() if v is not None}}
    log.log(numeric, event, extra={"kici_event": event, "kici_fields": merged})


def _fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    event = getattr(record, "kici_event", None)
    fields = dict(getattr(record, "kici_fields", {}) or {})
    if event is None:  # a plain stdlib record (uvicorn, sqlalchemy, alembic): its message is the event
        event = record.getMessage()
        fields = {**_context.get(), **fields}
    if record.exc_info and record.exc_info[0] is not None:
        fields["error"] = logging.Formatter().formatException(record.exc_info)
    return event, fields


def _timestamp(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "event", …fields}` on one line; values that JSON cannot hold become strings."""

    def format(self, record: logging.LogRecord) -> str:
        event, fields = _fields(record)
        line = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name, "event": event}
        line.update({k: v for k, v in fields.items() if k not in line})
        return json.dumps(line, default=str, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """`HH:MM:SS LEVEL event key=value …` for people watching a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        event, fields = _fields(record)
        ts = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        error = fields.pop("error", None)
        parts = [f"{ts} {record.levelname:<7} {event}"]
        parts.extend(f"{k}={_text_value(v)}" for k, v in fields.items())
        text = " ".join(parts)
        return f"{text}\n{error}" if error else text


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


def resolve_format(fmt: Literal["auto", "json", "text"], stream: IO[str]) -> Literal["json", "text"]:
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def configure_logging(
    level: str = "info", fmt: Literal["auto", "json", "text"] = "auto", stream: IO[str] | None = None
) -> None:
    """Route every logger (ours, uvicorn's, SQLAlchemy's, Alembic's) through one handler on `stream`."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if resolve_format(fmt, stream) == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # uvicorn configures its own handlers unless told not to (main passes log_config=None); make sure its
    # loggers propagate to ours, and keep per-request access lines out (the metrics count requests).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # Alembic announces every migration step at INFO; our own `db.migrated` event says it once.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
