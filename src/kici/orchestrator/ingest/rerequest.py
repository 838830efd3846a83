"""GitHub's "Re-run" buttons: `check_run` and `check_suite` deliveries with action `rerequested`.

- `check_run.rerequested`: the check run's `external_id` is the job id KiCI gave it → a linked rerun of
  the job's run;
- `check_suite.rerequested`: every workflow run at the suite's `head_sha` in the repository → a linked
  rerun of the latest run of each workflow.

Only runs of the delivering source (and org) are rerun. The delivery's event log row says what happened.
Deliveries that echo the App's own reports (`check_run` `created` / `completed`, `check_suite`
`completed`) are filtered here: they only repeat what KiCI just reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kici.orchestrator import reruns
from kici.orchestrator.container import AppState
from kici.orchestrator.db.schema import AuditOutcome, EventLogStatus
from kici.orchestrator.logs import log_event
from kici.orchestrator.store import audit
from kici.orchestrator.store import events as event_store
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store.runs import RunRecord, Superseded
from kici.orchestrator.store.sources import Source

RERUN_EVENTS = frozenset({"check_run", "check_suite"})


@dataclass
class RerequestResult:
    status: EventLogStatus
    reason: str
    run_ids: list[str] = field(default_factory=list)
    superseded: list[Superseded] = field(default_factory=list)


def handles(event_name: str, payload: Any, source: Source) -> bool:
    """Whether this delivery is a rerun request (or an echo of our own check run) handled here."""
    if event_name not in RERUN_EVENTS or not isinstance(payload, Mapping):
        return False
    action = payload.get("action")
    if action == "rerequested":
        return True
    body = payload.get(event_name)
    app = body.get("app") if isinstance(body, Mapping) else None
    own = isinstance(app, Mapping) and app.get("id") == source.config.get("app_id")
    echoes = ("created", "completed") if event_name == "check_run" else ("completed",)
    return own and action in echoes


async def _originals(state: AppState, org_id: str, source: Source, event_name: str,
                     payload: Mapping[str, Any]) -> tuple[list[RunRecord], str]:
    body = payload.get(event_name)
    if not isinstance(body, Mapping):
        return [], f"{event_name} payload has no {event_name} object"
    repository = payload.get("repository")
    repo = repository.get("full_name") if isinstance(repository, Mapping) else None
    async with state.database.read() as conn:
        if event_name == "check_run":
            job_id = body.get("external_id")
            job = await run_store.get_job(conn, job_id) if isinstance(job_id, str) and job_id else None
            run = await run_store.get_run(conn, job.run_id) if job is not None else None
            if run is None or run.org_id != org_id or run.source_id != source.id or run.repo != repo:
                return [], f"check run {body.get('id')} (external_id {job_id!r}) is not a job of this source"
            return [run], f"rerequested check run {body.get('id')}"
        head_sha = body.get("head_sha")
        if not isinstance(head_sha, str) or not isinstance(repo, str):
            return [], "check_suite payload has no head_sha or repository"
        found = await run_store.latest_runs_at(conn, org_id=org_id, repo=repo, sha=head_sha, source_id=source.id)
        return found, f"rerequested check suite at {head_sha}"


async def handle_rerequest(
    state: AppState, org_id: str, delivery_id: str, source: Source, event_name: str, payload: Mapping[str, Any]
) -> RerequestResult:
    if payload.get("action") != "rerequested":
        action = payload.get("action")
        result = RerequestResult(EventLogStatus.FILTERED, f"{event_name}.{action}: an echo of this App's own report")
    else:
        originals, what = await _originals(state, org_id, source, event_name, payload)
        if not originals:
            result = RerequestResult(EventLogStatus.FILTERED, f"{what}: nothing to rerun")
        else:
            run_ids: list[str] = []
            refused: list[str] = []
            superseded: list[Superseded] = []
            sender = payload.get("sender")
            login = sender.get("login") if isinstance(sender, Mapping) else None
            actor = f"github:{login}" if isinstance(login, str) and login else "github:unknown"
            async with state.database.transaction() as conn:
                for original in originals:
                    try:
                        rerun = await reruns.rerun(conn, state.settings, original)
                    except reruns.RerunRefused as exc:
                        refused.append(str(exc))
                    else:
                        run_ids.append(rerun.run.id)
                        superseded += rerun.superseded
                        # a rerun is a mutation whoever asks: here a GitHub user's Re-run button
                        await audit.record(
                            conn, action="run.rerun", outcome=AuditOutcome.ALLOWED, org_id=org_id, actor=actor,
                            target=f"run:{original.id}", status=202,
                            reason=f"run {original.id} rerun as run {rerun.run.id} ({event_name} rerequested "
                                   f"on GitHub, delivery {delivery_id})",
                        )
            reason = f"{what}: reran {len(run_ids)} run(s)" + (f"; {'; '.join(refused)}" if refused else "")
            status = EventLogStatus.PROCESSED if run_ids else EventLogStatus.FILTERED
            result = RerequestResult(status, reason, run_ids, superseded)
            for original, new_id in zip(originals, run_ids, strict=False):
                log_event("run.rerun", run_id=new_id, original_run_id=original.id, by="github " + event_name)
    async with state.database.transaction() as conn:
        await event_store.finish_event_log(
            conn, delivery_id, result.status, org_id=org_id, reason=result.reason[:2000],
            matched_count=len(result.run_ids),
        )
    return result
