"""Sending a job's test reports after its steps: the JUnit XML files its `test_reports` globs match, whether
the job succeeded or failed (a failing test run is when reports matter most; a cancelled job sends none).

Each file streams to `PUT <orchestrator>/api/v1/agent/jobs/<job id>/test-reports/<path>` with this agent's
token, picked with the artifact rules (KiCI's globs, no symlink leaving the workspace). Nothing here changes
the job's outcome: a glob matching nothing (the tests may not have run), a file the orchestrator could not
read or refused, and a failed upload are `[warning]` lines in the job's log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import quote

import httpx

from kici.agent.artifacts import UploadError, collect, put_file
from kici.engine.junit import counts_text

LABEL = "test reports"


def report_url(base_url: str, job_id: str, rel: str) -> str:
    return f"{base_url}/api/v1/agent/jobs/{quote(job_id, safe='')}/test-reports/{quote(rel, safe='/')}"


def summary(answer: dict[str, object]) -> str:
    """`12 passed, 1 failed` from the orchestrator's answer (`no tests` when the file held none)."""

    def count(key: str) -> int:
        value = answer.get(key)
        return value if isinstance(value, int) else 0

    return counts_text(count("passed"), count("failed"), count("errors"), count("skipped"))


async def send_all(
    *,
    base_url: str,
    token: str,
    job_id: str,
    workspace: Path,
    globs: Sequence[str],
    on_line: Callable[[str], None],
    timeout_s: float = 300.0,
) -> int:
    """Send the files the globs match, one after the other, saying in the log what became of each.
    Returns how many the orchestrator read."""
    found = await asyncio.to_thread(collect, workspace, globs, label=LABEL)
    for problem in found.problems:
        hint = " (did the tests run?)" if problem.endswith("matched no file") else ""
        on_line(f"[warning] {problem}{hint}")
    read = 0
    root = workspace.resolve()
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0)) as client:
        for rel in found.files:
            path = root / rel
            try:
                answer = await put_file(client, report_url(base_url, job_id, rel), token, path, path.stat().st_size)
            except (UploadError, OSError) as exc:
                on_line(f"[warning] {LABEL}: sending {rel!r} failed: {exc}")
                continue
            if answer.get("error"):
                on_line(f"[warning] {LABEL}: {rel} was not read: {answer['error']}")
                continue
            read += 1
            on_line(f"[{LABEL}] {rel}: {summary(answer)}")
    return read
