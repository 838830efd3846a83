"""A run's test results (from the JUnit XML files its jobs sent, `job(..., test_reports=[...])`): the
summary, each job's files and the tests, filtered by status and job; a file as sent. `runs:read`."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from kici.engine.junit import STATUSES
from kici.orchestrator.auth import (
    ERROR_RESPONSES,
    AdminError,
    AdminRoute,
    ErrorResponse,
    Permission,
    Principal,
    require,
)
from kici.orchestrator.container import AppState, app_state, services_of
from kici.orchestrator.storage.blobs import BlobNotFound, BlobStoreUnavailable
from kici.orchestrator.store import runs
from kici.orchestrator.store import test_reports as report_store
from kici.orchestrator.store.runs import JobRecord
from kici.orchestrator.store.test_reports import ReportFileRecord, TestResultRecord, TestSummary

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)
State = Annotated[AppState, Depends(app_state)]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse, "description": "No such run, job or file"}}
MAX_LIMIT = 10_000


class ReportFileInfo(BaseModel):
    id: str
    path: str = Field(description="The file's path relative to the job's workspace")
    size: int
    sha256: str | None = Field(description="Null when the file was refused before it was stored")
    passed: int
    failed: int
    errors: int
    skipped: int
    duration_ms: int
    error: str | None = Field(description="Why the file was not read (malformed, a DTD, too large); null if it was")
    created_at: dt.datetime

    @classmethod
    def of(cls, record: ReportFileRecord) -> ReportFileInfo:
        return cls.model_validate(record.model_dump(include=set(cls.model_fields)))


class JobTests(BaseModel):
    job_id: str
    job: str = Field(description="The job's name in the run (matrix suffix included)")
    summary: TestSummary
    files: list[ReportFileInfo]


class TestResultInfo(BaseModel):
    __test__ = False  # not a pytest test class, whatever its name

    job_id: str
    job: str
    suite: str | None
    classname: str | None
    name: str
    status: str = Field(description="passed, failed, error or skipped")
    duration_ms: int | None
    message: str | None
    details: str | None = Field(description="The failure's text (e.g. a traceback), truncated to 16 000 characters")
    file: str | None
    line: int | None

    @classmethod
    def of(cls, record: TestResultRecord) -> TestResultInfo:
        return cls.model_validate(record.model_dump(include=set(cls.model_fields)))


class RunTests(BaseModel):
    run_id: str
    summary: TestSummary = Field(description="Totals over every job of the run (filters do not apply)")
    jobs: list[JobTests] = Field(description="The jobs that sent test reports (only the `job` filter applies)")
    tests: list[TestResultInfo] = Field(description="The matching tests, by job name then report order")
    total: int = Field(description="How many tests match the filters (`tests` holds at most `limit` of them)")
    limit: int
    offset: int


def _statuses(value: str | None) -> list[str] | None:
    if value is None or not value.strip():
        return None
    wanted = [s.strip() for s in value.split(",") if s.strip()]
    if "failing" in wanted:  # shorthand for what fails a test run
        wanted = [s for s in wanted if s != "failing"] + ["failed", "error"]
    unknown = [s for s in wanted if s not in STATUSES]
    if unknown:
        raise AdminError(422, f"invalid request: status (query): unknown test status {unknown[0]!r}; one of "
                              f"{', '.join(STATUSES)} (or failing: failed and error)")
    return sorted(set(wanted))


async def _run_jobs(state: AppState, principal: Principal, run_id: str) -> list[JobRecord]:
    async with state.database.read() as conn:
        run = await runs.get_run(conn, run_id)
        if run is None or run.org_id != principal.token.org_id:
            raise AdminError(404, f"no run with id {run_id!r}")
        return await runs.list_jobs(conn, run_id)


@router.get(
    "/runs/{run_id}/tests",
    summary="A run's test results (JUnit XML reports its jobs sent)",
    description="`status`: passed, failed, error, skipped, several separated by commas, or `failing` (failed "
    "and error). `job`: a job's name in the run or its id. Paging: `limit` and `offset`.",
    responses=_NOT_FOUND,
)
async def run_tests(
    run_id: str,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.RUNS_READ))],
    status: Annotated[str | None, Query(description="Test statuses, separated by commas")] = None,
    job: Annotated[str | None, Query(description="Only this job (its name in the run, or its id)")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> RunTests:
    statuses = _statuses(status)
    jobs = await _run_jobs(state, principal, run_id)
    chosen: JobRecord | None = None
    if job is not None and job.strip():
        chosen = next((j for j in jobs if j.id == job.strip()), None) or next(
            (j for j in jobs if j.name == job.strip()), None)
        if chosen is None:
            raise AdminError(404, f"run {run_id!r} has no job {job.strip()!r}")
    org_id = principal.token.org_id
    async with state.database.read() as conn:
        summaries = await report_store.job_summaries(conn, run_id)
        files = await report_store.list_files(conn, run_id, org_id=org_id,
                                              job_id=chosen.id if chosen is not None else None)
        found, total = await report_store.list_results(conn, run_id, statuses=statuses,
                                                       job_id=chosen.id if chosen is not None else None,
                                                       limit=limit, offset=offset)
    totals = TestSummary()
    for summary in summaries.values():
        totals.add(summary)
    by_job: dict[str, list[ReportFileInfo]] = {}
    for record in files:
        by_job.setdefault(record.job_id, []).append(ReportFileInfo.of(record))
    listed = [JobTests(job_id=j.id, job=j.name, summary=summaries[j.id], files=by_job.get(j.id, []))
              for j in sorted(jobs, key=lambda j: j.name)
              if j.id in summaries and (chosen is None or j.id == chosen.id)]
    return RunTests(run_id=run_id, summary=totals, jobs=listed, tests=[TestResultInfo.of(r) for r in found],
                    total=total, limit=limit, offset=offset)


@router.get(
    "/runs/{run_id}/tests/files/{file_id}",
    summary="Download a test report file as the job sent it",
    responses={**_NOT_FOUND, 200: {"content": {"application/xml": {}}},
               503: {"model": ErrorResponse, "description": "Blob storage unavailable"}},
    response_class=StreamingResponse,
)
async def download_report_file(
    run_id: str, file_id: str, request: Request, state: State,
    principal: Annotated[Principal, Depends(require(Permission.RUNS_READ))],
) -> StreamingResponse:
    async with state.database.read() as conn:
        record = await report_store.get_file(conn, run_id, file_id, org_id=principal.token.org_id)
    if record is None:
        raise AdminError(404, f"no test report file {file_id!r} in run {run_id!r}")
    if record.blob_key is None:
        raise AdminError(404, f"test report {record.path!r} was not stored: {record.error}")
    try:
        reader = await services_of(request.app).blobs.open(record.blob_key)
    except BlobNotFound:
        raise AdminError(404, f"the content of test report file {file_id!r} is missing from storage") from None
    except BlobStoreUnavailable as exc:
        raise AdminError(503, f"blob storage unavailable: {exc}") from None
    name = record.path.rsplit("/", 1)[-1]
    headers = {
        "Content-Length": str(reader.info.size),
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}",
        "X-Kici-Sha256": record.sha256 or "",
    }
    return StreamingResponse(reader.chunks(), media_type="application/xml", headers=headers)
