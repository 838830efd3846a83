"""Job artifacts: files a job names (`job(..., artifacts=["dist/*.whl"])`) or uploads from a step
(`ctx.upload_artifact(path)`), streamed by the agent to the orchestrator after the job and kept in the blob
store (`KICI_STORAGE_BACKEND`) under `artifacts/<run id>/<job id>/<artifact id>`, one `artifacts` row each.

Agents never hold storage credentials: they upload over HTTP with their agent token, to
`PUT /api/v1/agent/jobs/{job_id}/artifacts/{path}` (kici.orchestrator.routes.agent_artifacts), accepted only
while the job runs on an agent registered with that token. People read them with
`kici-admin runs artifacts RUN_ID` and the admin API. They are kept as long as their run (like its logs):
whatever deletes a run calls `Services.delete_run_data` (logs and artifacts).
"""

from __future__ import annotations

import re

from kici.orchestrator.db.database import Database
from kici.orchestrator.storage.blobs import BlobStore
from kici.orchestrator.store import artifacts as artifact_store

MAX_PATH_LENGTH = 1024
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
DEFAULT_CONTENT_TYPE = "application/octet-stream"


class ArtifactPathError(ValueError):
    pass


def check_artifact_path(path: str, what: str = "artifact path") -> str:
    """A workspace-relative `/`-separated path: no absolute path, no `..`, no `.` or empty segment, no
    backslash or control character, at most 1024 characters. The agent checks the same before uploading
    (and refuses symlinks leaving the workspace); the orchestrator checks again because it trusts no agent."""
    if not path or len(path) > MAX_PATH_LENGTH:
        raise ArtifactPathError(f"{what} must be 1 to {MAX_PATH_LENGTH} characters")
    if path.startswith("/"):
        raise ArtifactPathError(f"{what} {path[:200]!r} is absolute; it must be relative to the workspace")
    if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ArtifactPathError(f"{what} {path[:200]!r} contains a backslash or a control character")
    for segment in path.split("/"):
        if segment == "..":
            raise ArtifactPathError(f"{what} {path[:200]!r} climbs out of the workspace (`..`)")
        if segment in ("", "."):
            raise ArtifactPathError(f"{what} {path[:200]!r} has an empty or `.` segment")
    return path


def content_type_or_default(value: str | None) -> str:
    """The uploader's `Content-Type` without parameters when it is a plain `type/subtype`, else the default."""
    if not value:
        return DEFAULT_CONTENT_TYPE
    value = value.split(";", 1)[0].strip().lower()
    return value if _CONTENT_TYPE.fullmatch(value) else DEFAULT_CONTENT_TYPE


def blob_key(run_id: str, job_id: str, artifact_id: str) -> str:
    return f"artifacts/{run_id}/{job_id}/{artifact_id}"


def run_prefix(run_id: str) -> str:
    return f"artifacts/{run_id}/"


async def delete_run_artifacts(database: Database, blobs: BlobStore, run_id: str) -> int:
    """Delete a run's artifacts (rows, then blobs). For whatever deletes a run, with its logs
    (`LogStorage.delete_run`); the rows would also go with the run's row (ON DELETE CASCADE), the blobs not.
    Returns the number of blobs deleted."""
    async with database.transaction() as conn:
        await artifact_store.delete_run_artifacts(conn, run_id)
    return await blobs.delete_prefix(run_prefix(run_id))
