"""Outgoing notifications: a signed JSON event POSTed to a URL when a run (and optionally a job) finishes.

Headers (the receiving side can verify them exactly as KiCI's own generic webhooks do):
- `X-Signature-256: sha256=<hex>`: HMAC-SHA256 of the raw body under the notify secret (the source's
  `notify_secret` for the source's URLs when it has one, else `KICI_NOTIFY_SECRET`);
- `X-KiCI-Event`: `run.finished` | `job.finished`;
- `X-KiCI-Delivery`: a unique id per event, the same on every retry (deduplicate on it).

Any 2xx is delivered; 408, 429 (honouring `Retry-After`), 5xx and network errors are retried with
back-off; any other answer is final (`failed`, retryable by `kici-admin reports retry`).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import httpx

from kici.engine.webhook_auth import sign_hmac_sha256
from kici.orchestrator.container import AppState
from kici.orchestrator.ingest.service import Ingest
from kici.orchestrator.reporting.outcome import Outcome, classify
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store.outbox import JOB_FINISHED, ReportRecord
from kici.orchestrator.store.runs import JobRecord, RunRecord
from kici.orchestrator.store.sources import get_source

SIGNATURE_HEADER = "X-Signature-256"
EVENT_HEADER = "X-KiCI-Event"
DELIVERY_HEADER = "X-KiCI-Delivery"
TIMEOUT_SECONDS = 10.0


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if value is not None else None


def _job(job: JobRecord) -> dict[str, Any]:
    return {
        "id": job.id, "name": job.name, "status": job.status, "error": job.error,
        "failure_category": job.failure_category, "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }


def notification_body(
    report: ReportRecord, run: RunRecord, jobs: list[JobRecord], run_url: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event": report.event,
        "delivery_id": report.delivery_id,
        "run_id": run.id,
        "workflow": run.workflow,
        "repo": run.repo,
        "ref": run.ref,
        "sha": run.sha,
        "status": run.status,
        "failure_reason": run.failure_reason,
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "url": run_url,
        "jobs": [_job(j) for j in jobs],
    }
    if report.event == JOB_FINISHED:
        job = next((j for j in jobs if j.id == report.job_id), None)
        body["job"] = _job(job) if job is not None else None
    return body


class NotificationSender:
    def __init__(self, state: AppState, ingest: Ingest, client: httpx.AsyncClient) -> None:
        self.state = state
        self.ingest = ingest
        self.client = client

    async def _secret(self, run: RunRecord, url: str) -> str | None:
        entry = next((n for n in (run.reporting or {}).get("notify") or () if n.get("url") == url), None)
        if entry is not None and entry.get("scope") == "source" and run.source_id:
            async with self.state.database.read() as conn:
                source = await get_source(conn, run.source_id)
            if source is not None and "notify_secret" in source.secret_fields:
                secrets = await self.ingest.open_secrets(self.state.database, source, self.state.keyring)
                if secrets.get("notify_secret"):
                    return secrets["notify_secret"]
        configured = self.state.settings.notify_secret
        return configured.get_secret_value() if configured is not None else None

    async def send(self, report: ReportRecord, now: dt.datetime) -> Outcome:
        url = report.target
        if not url:
            return Outcome.failed("notification without a URL")
        async with self.state.database.read() as conn:
            run = await run_store.get_run(conn, report.run_id)
            jobs = await run_store.list_jobs(conn, report.run_id) if run is not None else []
        if run is None:
            return Outcome.failed("the run no longer exists")
        try:
            secret = await self._secret(run, url)
        except ValueError as exc:
            return Outcome.failed(f"cannot open the source's notify_secret: {exc}")
        if not secret:
            return Outcome.failed("no notify secret: set KICI_NOTIFY_SECRET or the source's notify_secret")
        body = json.dumps(
            notification_body(report, run, jobs, self.state.settings.run_url(run.id)), separators=(",", ":")
        ).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "kici-orchestrator",
            SIGNATURE_HEADER: sign_hmac_sha256(secret.encode("utf-8"), body),
            EVENT_HEADER: report.event,
            DELIVERY_HEADER: report.delivery_id,
        }
        try:
            response = await self.client.post(url, content=body, headers=headers, timeout=TIMEOUT_SECONDS)
        except httpx.HTTPError as exc:
            return Outcome.retry(f"POST {url}: {type(exc).__name__}: {exc}")
        return classify(response, now, f"POST {url}", response.text[:200] if response.status_code >= 400 else "")
