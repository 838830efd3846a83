"""Test reports (`test_report_files`, `test_results`): the JUnit XML files jobs sent, with their counts or
why they were not read, and the test cases they hold (kici.orchestrator.test_reports)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine.junit import JUnitReport, TestCounts, counts_text
from kici.orchestrator.db.schema import DEFAULT_ORG_ID, jobs, test_report_files, test_results, utcnow

INSERT_BATCH = 1000
FAILING = ("failed", "error")


class TestSummary(BaseModel):
    __test__ = False  # not a pytest test class, whatever its name

    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    total: int = 0
    duration_ms: int = 0
    """The sum of the tests' own times (a parallel run took less wall-clock time)."""
    files: int = 0
    unread_files: int = 0
    """Files that were refused or could not be read (their `error` says why); they add no tests."""

    def add(self, other: TestSummary) -> None:
        for name in type(self).model_fields:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def line(self) -> str:
        """`120 passed, 2 failed, 3 skipped`: the non-zero counts (`no tests` when there are none)."""
        return counts_text(self.passed, self.failed, self.errors, self.skipped)


class ReportFileRecord(BaseModel):
    id: str
    run_id: str
    job_id: str
    job: str
    path: str
    size: int
    sha256: str | None
    blob_key: str | None
    passed: int
    failed: int
    errors: int
    skipped: int
    duration_ms: int
    error: str | None
    created_at: dt.datetime


class TestResultRecord(BaseModel):
    __test__ = False  # not a pytest test class, whatever its name

    id: int
    run_id: str
    job_id: str
    job: str
    suite: str | None
    classname: str | None
    name: str
    status: str
    duration_ms: int | None
    message: str | None
    details: str | None
    file: str | None
    line: int | None


async def replace_report_file(
    conn: AsyncConnection,
    *,
    file_id: str,
    org_id: str,
    run_id: str,
    job_id: str,
    path: str,
    size: int,
    sha256: str | None,
    blob_key: str | None,
    report: JUnitReport | None,
    error: str | None,
) -> str | None:
    """Record a file the job sent and its test cases, replacing the job's earlier file of that path (with its
    results). Returns the replaced row's blob key (for the caller to delete after the commit), if any."""
    old = (
        await conn.execute(
            sa.select(test_report_files.c.id, test_report_files.c.blob_key)
            .where(test_report_files.c.job_id == job_id, test_report_files.c.path == path)
        )
    ).first()
    if old is not None:
        await conn.execute(test_results.delete().where(test_results.c.file_id == old.id))
        await conn.execute(test_report_files.delete().where(test_report_files.c.id == old.id))
    counts = report.counts() if report is not None else TestCounts()
    await conn.execute(
        test_report_files.insert().values(
            id=file_id, org_id=org_id, run_id=run_id, job_id=job_id, path=path, size=size, sha256=sha256,
            blob_key=blob_key, passed=counts.passed, failed=counts.failed, errors=counts.errors,
            skipped=counts.skipped, duration_ms=counts.duration_ms, error=error, created_at=utcnow(),
        )
    )
    cases = report.cases if report is not None else []
    for start in range(0, len(cases), INSERT_BATCH):
        await conn.execute(
            test_results.insert(),
            [
                {"file_id": file_id, "run_id": run_id, "job_id": job_id, "suite": c.suite, "classname": c.classname,
                 "name": c.name, "status": c.status, "duration_ms": c.duration_ms, "message": c.message,
                 "details": c.details, "file": c.file, "line": c.line}
                for c in cases[start:start + INSERT_BATCH]
            ],
        )
    return old.blob_key if old is not None else None


async def job_file_count(conn: AsyncConnection, job_id: str, *, except_path: str) -> int:
    query = sa.select(sa.func.count()).select_from(test_report_files).where(
        test_report_files.c.job_id == job_id, test_report_files.c.path != except_path)
    return int((await conn.execute(query)).scalar_one())


async def job_summaries(conn: AsyncConnection, run_id: str, *, job_id: str | None = None) -> dict[str, TestSummary]:
    """Each job's totals over its report files, by job id (jobs that sent none are absent)."""
    f = test_report_files.c
    query = sa.select(
        f.job_id, sa.func.sum(f.passed), sa.func.sum(f.failed), sa.func.sum(f.errors), sa.func.sum(f.skipped),
        sa.func.sum(f.duration_ms), sa.func.count(), sa.func.count(f.error),
    ).where(f.run_id == run_id).group_by(f.job_id)
    if job_id is not None:
        query = query.where(f.job_id == job_id)
    rows = await conn.execute(query)
    out: dict[str, TestSummary] = {}
    for job_id, passed, failed, errors, skipped, duration, files, unread in rows:
        passed, failed, errors, skipped = int(passed), int(failed), int(errors), int(skipped)
        out[job_id] = TestSummary(passed=passed, failed=failed, errors=errors, skipped=skipped,
                                  total=passed + failed + errors + skipped, duration_ms=int(duration),
                                  files=int(files), unread_files=int(unread))
    return out


async def list_files(conn: AsyncConnection, run_id: str, *, org_id: str = DEFAULT_ORG_ID,
                     job_id: str | None = None) -> list[ReportFileRecord]:
    query = (
        sa.select(*test_report_files.c, jobs.c.name.label("job"))
        .select_from(test_report_files.join(jobs, jobs.c.id == test_report_files.c.job_id))
        .where(test_report_files.c.run_id == run_id, test_report_files.c.org_id == org_id)
        .order_by(jobs.c.name, test_report_files.c.path)
    )
    if job_id is not None:
        query = query.where(test_report_files.c.job_id == job_id)
    return [ReportFileRecord.model_validate(dict(row._mapping)) for row in await conn.execute(query)]


async def get_file(conn: AsyncConnection, run_id: str, file_id: str, *,
                   org_id: str = DEFAULT_ORG_ID) -> ReportFileRecord | None:
    row = (
        await conn.execute(
            sa.select(*test_report_files.c, jobs.c.name.label("job"))
            .select_from(test_report_files.join(jobs, jobs.c.id == test_report_files.c.job_id))
            .where(test_report_files.c.id == file_id, test_report_files.c.run_id == run_id,
                   test_report_files.c.org_id == org_id)
        )
    ).first()
    return None if row is None else ReportFileRecord.model_validate(dict(row._mapping))


def _results_query(run_id: str, statuses: Sequence[str] | None, job_id: str | None) -> sa.Select[tuple[object, ...]]:
    r = test_results.c
    query = (
        sa.select(*test_results.c, jobs.c.name.label("job"))
        .select_from(test_results.join(jobs, jobs.c.id == r.job_id))
        .where(r.run_id == run_id)
    )
    if statuses:
        query = query.where(r.status.in_(list(statuses)))
    if job_id is not None:
        query = query.where(r.job_id == job_id)
    return query


async def list_results(
    conn: AsyncConnection,
    run_id: str,
    *,
    statuses: Sequence[str] | None = None,
    job_id: str | None = None,
    limit: int,
    offset: int = 0,
) -> tuple[list[TestResultRecord], int]:
    """One page of the run's test results, by job name and then in the order the reports listed them, and
    how many match in all."""
    query = _results_query(run_id, statuses, job_id)
    total = int((await conn.execute(sa.select(sa.func.count()).select_from(query.subquery()))).scalar_one())
    rows = await conn.execute(query.order_by(jobs.c.name, test_results.c.id).limit(limit).offset(offset))
    return [TestResultRecord.model_validate(dict(row._mapping)) for row in rows], total


async def job_failures(conn: AsyncConnection, job_id: str, *, limit: int) -> list[TestResultRecord]:
    """The job's first `limit` failing tests (failed or error), in report order."""
    r = test_results.c
    rows = await conn.execute(
        sa.select(*test_results.c, jobs.c.name.label("job"))
        .select_from(test_results.join(jobs, jobs.c.id == r.job_id))
        .where(r.job_id == job_id, r.status.in_(FAILING)).order_by(r.id).limit(limit)
    )
    return [TestResultRecord.model_validate(dict(row._mapping)) for row in rows]


async def job_summary(conn: AsyncConnection, run_id: str, job_id: str) -> TestSummary | None:
    return (await job_summaries(conn, run_id, job_id=job_id)).get(job_id)


async def delete_run_reports(conn: AsyncConnection, run_id: str) -> int:
    """Delete the run's report rows (their blobs are the caller's: `test_reports.delete_run_reports`)."""
    await conn.execute(test_results.delete().where(test_results.c.run_id == run_id))
    result = await conn.execute(test_report_files.delete().where(test_report_files.c.run_id == run_id))
    return int(result.rowcount or 0)
