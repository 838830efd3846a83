"""Uploading a job's artifacts after its steps: the files its `artifacts` globs match (when its outcome
matches `artifacts_when`) and the files its steps asked for with `ctx.upload_artifact`.

Each file streams to the orchestrator over HTTP, `PUT <orchestrator>/api/v1/agent/jobs/<job id>/artifacts/
<path>`, authenticated with this agent's token: the agent holds no storage credentials, and the orchestrator
accepts only jobs running on an agent of that token. Globs use KiCI's glob rules (picomatch: `*` within a
segment, `**` across segments, dotfiles only when named). A symlink is followed only when its target stays
inside the workspace; one leaving it is refused, as is anything that is not a regular file.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from kici.engine.glob import compile_glob

CHUNK_SIZE = 256 * 1024
ATTEMPTS = 3
RETRY_DELAY_S = 1.0


@dataclass
class Collected:
    files: list[str] = field(default_factory=list)
    """Workspace-relative paths, sorted, each once."""
    problems: list[str] = field(default_factory=list)


def collect(workspace: Path, globs: Sequence[str], requested: Sequence[str] = (), *,
            label: str = "artifacts") -> Collected:
    """The files to upload, and what is wrong (a glob matching nothing, a symlink leaving the workspace),
    each problem starting with `label` (test reports use this too)."""
    out = Collected()
    root = workspace.resolve()
    chosen: set[str] = set()
    patterns: list[tuple[str, re.Pattern[str]]] = [(g, compile_glob(g, "path")) for g in globs]
    matched: dict[str, int] = {g: 0 for g in globs}
    if patterns:
        for dirpath, dirnames, filenames in os.walk(root):  # symlinked directories are not entered
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d != ".git"]
            for name in filenames:
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                hits = [g for g, rx in patterns if rx.match(rel)]
                if not hits:
                    continue
                for g in hits:
                    matched[g] += 1
                problem = _check(root, rel, label)
                if problem is None:
                    chosen.add(rel)
                else:
                    out.problems.append(problem)
        out.problems.extend(f"{label}: {g!r} matched no file" for g, n in matched.items() if n == 0)
    for rel in requested:
        problem = _check(root, rel, label)
        if problem is None:
            chosen.add(rel)
        else:
            out.problems.append(problem)
    out.files = sorted(chosen)
    return out


def _check(root: Path, rel: str, label: str) -> str | None:
    if rel.startswith("/") or ".." in rel.split("/"):
        return f"{label}: {rel!r} is outside the workspace"
    path = root / rel
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return f"{label}: {rel!r} does not exist (or is a broken symlink)"
    if root not in target.parents:
        return f"{label}: {rel!r} is a symlink leaving the workspace; not uploaded"
    if not target.is_file():
        return f"{label}: {rel!r} is not a regular file"
    return None


def upload_url(base_url: str, job_id: str, rel: str) -> str:
    return f"{base_url}/api/v1/agent/jobs/{quote(job_id, safe='')}/artifacts/{quote(rel, safe='/')}"


class UploadError(Exception):
    pass


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as handle:
        while True:
            chunk = await asyncio.to_thread(handle.read, CHUNK_SIZE)
            if not chunk:
                return
            yield chunk


async def upload_all(
    *,
    base_url: str,
    token: str,
    job_id: str,
    workspace: Path,
    files: Sequence[str],
    on_line: Callable[[str], None],
    timeout_s: float = 300.0,
) -> list[str]:
    """Upload `files` one after the other; the errors (one line each), empty when all went up."""
    errors: list[str] = []
    root = workspace.resolve()
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        for rel in files:
            path = root / rel
            try:
                size = path.stat().st_size
                answer = await put_file(client, upload_url(base_url, job_id, rel), token, path, size)
            except (UploadError, OSError) as exc:
                errors.append(f"artifacts: uploading {rel!r} failed: {exc}")
                on_line(f"[error] {errors[-1]}")
                continue
            on_line(f"[artifacts] uploaded {rel} ({int(answer.get('size', size))} bytes)")
    return errors


async def put_file(client: httpx.AsyncClient, url: str, token: str, path: Path, size: int) -> dict[str, Any]:
    """PUT the file with the agent's token; the orchestrator's JSON answer (201), else `UploadError`
    (a refusal at once; unreachable or 5xx after `ATTEMPTS` tries)."""
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type, "Content-Length": str(size)}
    last = ""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            response = await client.put(url, content=_file_chunks(path), headers=headers)
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code == 201:
                body = response.json()
                return body if isinstance(body, dict) else {}
            try:
                last = str(response.json().get("error") or response.text)
            except ValueError:
                last = response.text[:300]
            last = f"HTTP {response.status_code}: {last}"
            if response.status_code < 500:  # refused (size, path, job state): retrying will not help
                raise UploadError(last)
        if attempt < ATTEMPTS:
            await asyncio.sleep(RETRY_DELAY_S * attempt)
    raise UploadError(last)
