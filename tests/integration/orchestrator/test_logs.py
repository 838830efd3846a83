"""Log lines: one JSON object (or one readable line) per event, with the ids bound by `log_context`."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from kici.orchestrator.logs import configure_logging, log_context, log_event, resolve_format


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_context_ids(captured: io.StringIO) -> None:
    configure_logging("info", "json", captured)
    with log_context(delivery_id="d-1"):
        log_event("webhook.accepted", repo="acme/app", skipped=None)
        with log_context(run_id="r-1"):
            log_event("run.created", jobs=2)
    log_event("after")
    log_event("too.quiet", level="debug")
    first, second, third = lines(captured)
    assert first["event"] == "webhook.accepted" and first["delivery_id"] == "d-1" and first["repo"] == "acme/app"
    assert "skipped" not in first and first["level"] == "info" and str(first["ts"]).endswith("+00:00")
    assert (second["delivery_id"], second["run_id"], second["jobs"]) == ("d-1", "r-1", 2)
    assert "delivery_id" not in third


async def test_context_follows_tasks(captured: io.StringIO) -> None:
    configure_logging("debug", "json", captured)

    async def work() -> None:
        log_event("job.dispatched")

    with log_context(job_id="j-9"):
        await asyncio.create_task(work())
    [line] = lines(captured)
    assert line["job_id"] == "j-9" and line["level"] == "info"


def test_other_libraries_records_become_events(captured: io.StringIO) -> None:
    configure_logging("info", "json", captured)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    [line] = lines(captured)
    assert line["event"] == "Exception in ASGI application" and line["logger"] == "uvicorn.error"
    assert "RuntimeError: boom" in str(line["error"])


def test_text_format(captured: io.StringIO) -> None:
    configure_logging("info", "text", captured)
    log_event("db.unreachable", level="warning", reason="connection refused", retry_in_s=1.0)
    [line] = captured.getvalue().splitlines()
    assert line.endswith('WARNING db.unreachable reason="connection refused" retry_in_s=1.0')


def test_auto_format_follows_the_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", Tty()) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("json", Tty()) == "json"
