"""Which GitHub check run reports which job: written when GitHub answers the check run's creation, read
for every later update (PATCH by id)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import github_check_runs, utcnow


async def get_check_run_id(conn: AsyncConnection, job_id: str) -> int | None:
    query = sa.select(github_check_runs.c.check_run_id).where(github_check_runs.c.job_id == job_id)
    value = (await conn.execute(query)).scalar_one_or_none()
    return int(value) if value is not None else None


async def remember_check_run(conn: AsyncConnection, *, job_id: str, run_id: str, repo: str, check_run_id: int) -> None:
    await conn.execute(
        github_check_runs.insert().values(
            job_id=job_id, run_id=run_id, repo=repo, check_run_id=check_run_id, created_at=utcnow()
        )
    )


async def forget_check_runs(conn: AsyncConnection, job_ids: list[str]) -> None:
    """The jobs' next report creates a new check run instead of updating the one they had. For a held job
    approved: its check run is `completed` (`action_required`), and GitHub does not let a completed check
    run change its status again; a new one of the same name takes its place on the commit."""
    if job_ids:
        await conn.execute(github_check_runs.delete().where(github_check_runs.c.job_id.in_(job_ids)))
