"""GitHub check runs: one per job, created when the run is, updated as the job starts and finishes.

- name `<workflow> / <job name>`, `external_id` = the job id, `head_sha` = the run's commit;
- `queued` → `in_progress` → `completed` with a conclusion from the job's final state (`success`,
  `failure`, `cancelled`, `timed_out` for stale jobs and timeouts, `skipped`, `action_required` for a held
  job);
- output: a summary table of the steps (status, duration); for a failure, the failing step's error and
  the last `LOG_TAIL_LINES` lines of the job's log (masked by the agent), within GitHub's size limits;
- `details_url`: the run's page opened on the job (its steps and log) when `KICI_PUBLIC_URL` is set.

The state sent is the job's state *when sending*, so several pending updates collapse into one call.
Tokens: an installation token scoped to the one repository with `checks: write`, minted and cached in the
orchestrator; it never goes anywhere else.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine.states import JobState, is_terminal
from kici.orchestrator.container import AppState
from kici.orchestrator.db.schema import SourceKind
from kici.orchestrator.ingest.service import Ingest
from kici.orchestrator.providers.base import ProviderError
from kici.orchestrator.providers.github import message_of, repo_path, request
from kici.orchestrator.reporting.outcome import Outcome, classify
from kici.orchestrator.storage.logs import LogStore
from kici.orchestrator.store import check_runs
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store import test_reports as report_store
from kici.orchestrator.store.outbox import ReportRecord
from kici.orchestrator.store.runs import JobRecord, RunRecord, StepRecord
from kici.orchestrator.store.sources import DEFAULT_GITHUB_API_URL, get_source
from kici.orchestrator.store.test_reports import TestResultRecord, TestSummary

LOG_TAIL_LINES = 50
FAILING_TESTS_SHOWN = 20
"""How many failing tests (from the job's JUnit reports) a check run's summary lists, with their messages."""
MAX_OUTPUT_CHARS = 60_000
"""GitHub rejects an output `summary` or `text` over 65535 characters; stay clear of it."""
MAX_TITLE_CHARS = 200
CHECKS_PERMISSIONS = {"checks": "write"}

_TIMED_OUT_CATEGORIES = frozenset({"stale", "queue_timeout", "timeout", "job_timeout", "workflow_timeout"})


def check_run_name(workflow: str, job_name: str) -> str:
    return f"{workflow} / {job_name}"


def check_status(job: JobRecord) -> tuple[str, str | None]:
    """GitHub's (`status`, `conclusion`) for the job's current state."""
    state = job.status
    if state == JobState.HELD.value:
        return "completed", "action_required"
    if not is_terminal(state):
        on_agent = state in (JobState.RUNNING.value, JobState.RECOVERING.value, JobState.CANCELLING.value)
        return ("in_progress" if on_agent else "queued"), None
    if state == JobState.SUCCESS.value:
        return "completed", "success"
    if state == JobState.SKIPPED.value:
        return "completed", "skipped"
    if state == JobState.TIMED_OUT_STALE.value or job.failure_category in _TIMED_OUT_CATEGORIES:
        return "completed", "timed_out"
    if state == JobState.CANCELLED.value:
        if job.error and "workflow_timeout" in job.error:
            return "completed", "timed_out"
        return "completed", "cancelled"
    return "completed", "failure"


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


def _duration(ms: int | None) -> str:
    if ms is None:
        return "–"
    if ms < 1000:
        return f"{ms} ms"
    seconds = ms / 1000
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {int(seconds % 60)} s"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")[:200]


def _clip(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 40] + "\n… (truncated to fit GitHub's limit)"


def _title(job: JobRecord, conclusion: str | None, failing: StepRecord | None) -> str:
    if conclusion is None:
        return "Running" if job.status != JobState.PENDING.value and job.started_at else "Queued"
    words = {
        "success": "Succeeded", "failure": "Failed", "cancelled": "Cancelled", "timed_out": "Timed out",
        "skipped": "Skipped", "action_required": "Waiting for approval",
    }
    title = words.get(conclusion, conclusion)
    if conclusion == "failure" and failing is not None:
        title += f" at step {failing.name!r}"
    elif job.started_at and job.finished_at:
        title += f" in {_duration(int((job.finished_at - job.started_at).total_seconds() * 1000))}"
    return title[:MAX_TITLE_CHARS]


@dataclass(frozen=True)
class TestsDigest:
    """What a finished job's check run says of its test reports: the totals and the first failing tests."""

    __test__ = False  # not a pytest test class, whatever its name
    summary: TestSummary
    failures: list[TestResultRecord]


def tests_lines(digest: TestsDigest) -> list[str]:
    """`**Tests:** 120 passed, 2 failed, 3 skipped` and the first failing tests with their messages."""
    summary = digest.summary
    lines = [f"**Tests:** {summary.line()}"
             + (f" ({summary.unread_files} report file(s) could not be read)" if summary.unread_files else "")]
    failing = summary.failed + summary.errors
    if digest.failures:
        shown = len(digest.failures)
        lines += ["", f"Failing tests ({'first ' + str(shown) + ' of ' if shown < failing else ''}{failing}):", ""]
        for test in digest.failures:
            owner = test.classname or test.suite
            name = f"{owner}::{test.name}" if owner else test.name
            message = " ".join((test.message or "").split())[:300]
            lines.append(f"- `{_code(name)[:300]}` ({test.status})" + (f": {_code(message)}" if message else ""))
    return lines


def _code(text: str) -> str:
    return text.replace("`", "'")


def check_output(
    job: JobRecord, steps: list[StepRecord], conclusion: str | None, log_tail: list[str],
    tests: TestsDigest | None = None,
) -> dict[str, str]:
    """`output` of the check run: title, a step table (and the job's test results when it sent reports), and
    for a failure the error and the log's tail."""
    failing = next((s for s in steps if s.status == "failed"), None)
    lines: list[str] = []
    if steps:
        lines += ["| # | Step | Status | Duration |", "|---|---|---|---|"]
        lines += [f"| {s.step_index + 1} | {_cell(s.name)} | {s.status} | {_duration(s.duration_ms)} |" for s in steps]
    else:
        lines.append("No step has run." if conclusion else "Waiting for an agent.")
    if tests is not None:
        lines += ["", *tests_lines(tests)]
    output: dict[str, str] = {"title": _title(job, conclusion, failing), "summary": _clip("\n".join(lines))}
    if conclusion in ("failure", "timed_out", "cancelled") and (job.error or failing or log_tail):
        parts: list[str] = []
        error = (failing.error if failing is not None and failing.error else None) or job.error
        if error:
            where = f" in step {failing.step_index + 1} ({failing.name})" if failing is not None else ""
            parts.append(f"**Error{where}:**\n\n```\n{error.strip()[:8000]}\n```")
        if log_tail:
            tail = "\n".join(log_tail).replace("```", "`\u200b``")
            budget = MAX_OUTPUT_CHARS - sum(len(p) for p in parts) - 200
            if len(tail) > budget:
                tail = "…\n" + tail[-max(0, budget):]
            parts.append(f"**Last {len(log_tail)} log lines:**\n\n```\n{tail}\n```")
        output["text"] = _clip("\n\n".join(parts))
    return output


def check_body(
    run: RunRecord, job: JobRecord, steps: list[StepRecord], log_tail: list[str], details_url: str | None,
    *, create: bool, tests: TestsDigest | None = None,
) -> dict[str, Any]:
    status, conclusion = check_status(job)
    body: dict[str, Any] = {"status": status, "output": check_output(job, steps, conclusion, log_tail, tests)}
    if create:
        body |= {"name": check_run_name(run.workflow, job.name), "head_sha": run.sha, "external_id": job.id}
    if details_url:
        body["details_url"] = details_url
    if job.started_at is not None:
        body["started_at"] = _iso(job.started_at)
    if conclusion is not None:
        body["conclusion"] = conclusion
        body["completed_at"] = _iso(job.finished_at or job.started_at or job.created_at)
    if conclusion == "action_required":
        body["output"] = held_output(run)
    return body


def held_output(run: RunRecord) -> dict[str, str]:
    """The check run of a held job: why it is held and how a trusted person lets it run."""
    reason = run.hold_reason or "held for approval"
    summary = (
        f"**Held:** {reason}.\n\nNothing runs until it is approved, at exactly this commit "
        f"(`{run.sha[:12]}`): a trusted user comments `/kici approve` (or `/kici reject [reason]`) on the pull "
        f"request, or an operator runs `kici-admin held approve {run.id}` (`kici-admin held reject {run.id}`). "
        "A new push creates a new held run."
    )
    if run.hold_expires_at is not None:
        summary += f"\n\nThe hold expires at {_iso(run.hold_expires_at)}."
    return {"title": "Waiting for approval", "summary": _clip(summary)}


class CheckRunSender:
    def __init__(self, state: AppState, ingest: Ingest, logs: LogStore, client: httpx.AsyncClient) -> None:
        self.state = state
        self.ingest = ingest
        self.logs = logs
        self.client = client

    async def _context(self, run: RunRecord) -> tuple[str, int, int, str] | Outcome:
        """(API URL, installation, App id, private key) of the run's GitHub source, or why not."""
        async with self.state.database.read() as conn:
            source = await get_source(conn, run.source_id) if run.source_id else None
        github = (run.reporting or {}).get("github") or {}
        if source is None or source.kind is not SourceKind.GITHUB or not github.get("installation_id"):
            return Outcome.failed("the run's GitHub source no longer exists")
        try:
            secrets = await self.ingest.open_secrets(self.state.database, source, self.state.keyring)
        except ValueError as exc:
            return Outcome.failed(f"cannot open the GitHub App key of source {source.name!r}: {exc}")
        private_key = secrets.get("private_key")
        if not private_key:
            return Outcome.failed(f"GitHub source {source.name!r} has no private_key secret")
        api_url = str(source.config.get("api_url") or DEFAULT_GITHUB_API_URL).rstrip("/")
        return api_url, int(github["installation_id"]), int(source.config["app_id"]), private_key

    async def _call(
        self, run: RunRecord, method: str, path: str, body: dict[str, Any], now: dt.datetime, what: str
    ) -> tuple[Outcome, httpx.Response | None]:
        """One check-runs API call with the repository's `checks: write` token."""
        context = await self._context(run)
        if isinstance(context, Outcome):
            return context, None
        api_url, installation, app_id, private_key = context
        repositories = [run.repo.split("/", 1)[-1]]
        try:
            token = await self.ingest.tokens.get(
                self.client, api_url, installation, app_id, private_key,
                repositories=repositories, permissions=CHECKS_PERMISSIONS,
            )
            response = await request(self.client, method, f"{api_url}/repos/{repo_path(run.repo)}/{path}",
                                     headers={"Authorization": f"token {token}"}, json=body)
        except ProviderError as exc:  # unreachable, or GitHub refused the token (its status is in the text)
            return Outcome.retry(str(exc)), None
        if response.status_code == 401:  # the token was revoked or expired early: mint a new one next time
            self.ingest.tokens.forget(api_url, installation, repositories=repositories, permissions=CHECKS_PERMISSIONS)
            return Outcome.retry("GitHub answered 401 to the installation token; retrying with a new one"), None
        return classify(response, now, f"GitHub {what}", message_of(response)), response

    async def _send_failed_run(self, run: RunRecord, now: dt.datetime) -> Outcome:
        """The check run of a run that failed before it had jobs: created completed, never updated."""
        body: dict[str, Any] = {
            "name": run.workflow, "head_sha": run.sha, "external_id": run.id, "status": "completed",
            "conclusion": "failure", "completed_at": _iso(run.finished_at or run.created_at),
            "output": {"title": "The run failed before it had jobs",
                       "summary": _clip(run.failure_reason or "the run failed")},
        }
        details_url = self.state.settings.run_url(run.id)
        if details_url:
            body["details_url"] = details_url
        outcome, _response = await self._call(run, "POST", "check-runs", body, now, "create check run")
        return outcome

    async def send(self, report: ReportRecord, now: dt.datetime) -> Outcome:
        db = self.state.database
        if report.job_id is None:
            async with db.read() as conn:
                failed_run = await run_store.get_run(conn, report.run_id)
            if failed_run is None:
                return Outcome.failed("the run no longer exists")
            return await self._send_failed_run(failed_run, now)
        async with db.read() as conn:
            run = await run_store.get_run(conn, report.run_id)
            job = await run_store.get_job(conn, report.job_id)
            # the step table is shown once the job has started (a queued job has no steps yet)
            started = job is not None and job.started_at is not None
            steps = await run_store.list_steps(conn, report.job_id) if started else []
            check_run_id = await check_runs.get_check_run_id(conn, report.job_id)
            tests = await _tests_digest(conn, job) if job is not None and is_terminal(job.status) else None
        if run is None or job is None:
            return Outcome.failed("the run or job no longer exists")
        _status, conclusion = check_status(job)
        tail: list[str] = []
        if conclusion in ("failure", "timed_out"):
            tail = [line.line for line in await self.logs.tail(run.id, job.id, lines=LOG_TAIL_LINES)]
        body = check_body(run, job, steps, tail, self.state.settings.run_url(run.id, job.name),
                          create=check_run_id is None, tests=tests)
        if check_run_id is None:
            outcome, response = await self._call(run, "POST", "check-runs", body, now, "create check run")
        else:
            outcome, response = await self._call(run, "PATCH", f"check-runs/{check_run_id}", body, now,
                                                 f"update check run {check_run_id}")
        if outcome.kind == "sent" and check_run_id is None and response is not None:
            created = response.json()
            new_id = created.get("id") if isinstance(created, dict) else None
            if not isinstance(new_id, int):
                return Outcome.failed("GitHub's check run response has no id")
            async with db.transaction() as conn:
                await check_runs.remember_check_run(conn, job_id=job.id, run_id=run.id, repo=run.repo,
                                                    check_run_id=new_id)
        return outcome


async def _tests_digest(conn: AsyncConnection, job: JobRecord) -> TestsDigest | None:
    """The job's test report totals and first failing tests; None when it sent no reports."""
    summary = await report_store.job_summary(conn, job.run_id, job.id)
    if summary is None:
        return None
    failures = await report_store.job_failures(conn, job.id, limit=FAILING_TESTS_SHOWN) if (
        summary.failed or summary.errors) else []
    return TestsDigest(summary, failures)
