"""Job artifacts (the `artifacts` table): rows describing the files jobs uploaded; the content is a blob
(`blob_key`) in the orchestrator's blob store (kici.orchestrator.artifacts)."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import DEFAULT_ORG_ID, agents, artifacts, jobs, new_id, utcnow


class ArtifactRecord(BaseModel):
    id: str
    org_id: str
    run_id: str
    job_id: str
    job: str
    """The job's name in its run (matrix suffix included)."""
    path: str
    size: int
    sha256: str
    content_type: str
    blob_key: str
    created_at: dt.datetime


class UploadTarget(BaseModel):
    """What an upload is checked against: the job, its state, and the token of the agent holding it."""

    job_id: str
    run_id: str
    org_id: str
    status: str
    agent_id: str | None
    agent_token_id: str | None


_COLUMNS = (*[c for c in artifacts.c if c.name != "org_id"], artifacts.c.org_id, jobs.c.name.label("job"))


def _query() -> sa.Select[tuple[object, ...]]:
    return sa.select(*_COLUMNS).select_from(artifacts.join(jobs, jobs.c.id == artifacts.c.job_id))


async def upload_target(conn: AsyncConnection, job_id: str) -> UploadTarget | None:
    row = (
        await conn.execute(
            sa.select(jobs.c.id.label("job_id"), jobs.c.run_id, jobs.c.org_id, jobs.c.status, jobs.c.agent_id,
                      agents.c.agent_token_id)
            .select_from(jobs.outerjoin(agents, agents.c.id == jobs.c.agent_id))
            .where(jobs.c.id == job_id)
        )
    ).first()
    return None if row is None else UploadTarget.model_validate(dict(row._mapping))


async def job_bytes(conn: AsyncConnection, job_id: str, *, except_path: str | None = None) -> int:
    """Bytes of the job's artifacts so far (leaving out `except_path`, which an upload is replacing)."""
    query = sa.select(sa.func.coalesce(sa.func.sum(artifacts.c.size), 0)).where(artifacts.c.job_id == job_id)
    if except_path is not None:
        query = query.where(artifacts.c.path != except_path)
    return int((await conn.execute(query)).scalar_one())


async def replace_artifact(
    conn: AsyncConnection,
    *,
    org_id: str,
    run_id: str,
    job_id: str,
    path: str,
    size: int,
    sha256: str,
    content_type: str,
    blob_key: str,
    artifact_id: str | None = None,
) -> tuple[str, str | None]:
    """Record an uploaded file, replacing the job's earlier upload of the same path. Returns the new id and
    the blob key of the replaced row (for the caller to delete once this transaction commits), if any."""
    old = (
        await conn.execute(
            sa.select(artifacts.c.id, artifacts.c.blob_key).where(artifacts.c.job_id == job_id,
                                                                  artifacts.c.path == path)
        )
    ).first()
    if old is not None:
        await conn.execute(artifacts.delete().where(artifacts.c.id == old.id))
    new = artifact_id or new_id()
    await conn.execute(
        artifacts.insert().values(
            id=new, org_id=org_id, run_id=run_id, job_id=job_id, path=path, size=size, sha256=sha256,
            content_type=content_type, blob_key=blob_key, created_at=utcnow(),
        )
    )
    return new, (old.blob_key if old is not None else None)


async def list_run_artifacts(
    conn: AsyncConnection, run_id: str, *, org_id: str = DEFAULT_ORG_ID
) -> list[ArtifactRecord]:
    rows = await conn.execute(
        _query().where(artifacts.c.run_id == run_id, artifacts.c.org_id == org_id)
        .order_by(jobs.c.name, artifacts.c.path)
    )
    return [ArtifactRecord.model_validate(dict(row._mapping)) for row in rows]


async def get_artifact(
    conn: AsyncConnection, run_id: str, artifact_id: str, *, org_id: str = DEFAULT_ORG_ID
) -> ArtifactRecord | None:
    row = (
        await conn.execute(
            _query().where(artifacts.c.id == artifact_id, artifacts.c.run_id == run_id,
                           artifacts.c.org_id == org_id)
        )
    ).first()
    return None if row is None else ArtifactRecord.model_validate(dict(row._mapping))


async def delete_run_artifacts(conn: AsyncConnection, run_id: str) -> int:
    """Delete the run's artifact rows (their blobs are the caller's: `artifacts.delete_run_artifacts`)."""
    result = await conn.execute(artifacts.delete().where(artifacts.c.run_id == run_id))
    return int(result.rowcount or 0)
