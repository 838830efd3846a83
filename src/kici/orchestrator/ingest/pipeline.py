"""One accepted delivery → runs: lock file at the commit → (changed files) → match → runs, atomically.

Called after the delivery is durably marked (dedup) and logged (`received`). Outcomes, recorded on the
delivery's event log row:

- `lockfile_missing`: no `.kici/kici.lock.json` at the commit (or no commit to read) → zero runs.
- `lockfile_corrupt`: the file is not a lock file this KiCI reads (invalid JSON, another
  `schemaVersion`, a hand-edited content hash, over `MAX_LOCK_FILE_BYTES`) → one failed run saying why,
  so the author sees it.
- `processed`: matched against every workflow; one run per matched workflow (`matched_count`).
- `failed`: the host could not be read or something broke; nothing half-written stays behind.

All runs of one delivery and the event log update commit in ONE transaction. The dispatch hook is
called after that commit.

Trust: for a pull request from a fork the lock file is read at the base commit, not the fork's head,
so a fork cannot choose which workflows run or what they do by editing the lock file. A GitHub source's
trust policy (`kici.orchestrator.holds.policy`) judges each event first: an untrusted one is `filtered`
(policy `reject`, no run), or its runs are created `held` (policy `hold`: nothing dispatched, no token or
secret minted, until approved), or they run without secrets (policy `allow`). A held pull request's lock
file is read at the base commit too, and a change to `.kici/` is called out in the hold reason.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from kici.engine.events import Event
from kici.engine.github_events import diff_base
from kici.engine.lockfile import LockFile, LockFileError
from kici.engine.states import RunTrust
from kici.engine.triggers import match_all, needs_changed_files
from kici.orchestrator.container import AppState
from kici.orchestrator.db.schema import EventLogStatus, SourceKind
from kici.orchestrator.holds.policy import TRUSTED, TrustAction, TrustDecision, TrustPolicy, decide, policy_of
from kici.orchestrator.ingest.service import Ingest
from kici.orchestrator.logs import log_event
from kici.orchestrator.providers.base import LockFileSource, LockFileTooLarge, ProviderError
from kici.orchestrator.providers.git import GitProvider
from kici.orchestrator.providers.github import GitHubProvider
from kici.orchestrator.reporting.targets import reporting_targets
from kici.orchestrator.scheduling.registrations import git_default_branch, register_from_lock
from kici.orchestrator.store import events as event_store
from kici.orchestrator.store.runs import NewRun, Superseded, create_failed_run, create_run
from kici.orchestrator.store.sources import Source

LOCK_RESOLUTION_WORKFLOW = "lock_resolution"
"""The workflow name of the failed run a corrupt lock file produces."""


@dataclass(frozen=True)
class Delivery:
    org_id: str
    delivery_id: str
    source: Source
    event: Event


@dataclass
class PipelineResult:
    status: EventLogStatus
    reason: str | None = None
    run_ids: list[str] = field(default_factory=list)
    matched: list[str] = field(default_factory=list)
    superseded: list[Superseded] = field(default_factory=list)


KICI_DIR = ".kici/"
_PR_TYPES = ("pr", "review", "review_comment")


def _lock_commit(event: Event, *, held: bool = False) -> str | None:
    """The commit whose lock file decides the runs: the base for a fork's PR and for a held PR (untrusted
    code must not choose which workflows run or what they do), else the event's commit."""
    if event.is_fork or (held and event.type in _PR_TYPES):
        return event.base_sha
    return event.sha


async def judge(delivery: Delivery, event: Event, provider: LockFileSource) -> tuple[TrustDecision, TrustPolicy | None]:
    """The source's trust policy applied to the event (git and generic sources: trusted, no policy)."""
    if delivery.source.kind is not SourceKind.GITHUB:
        return TRUSTED, None
    policy = policy_of(delivery.source.config)
    team_check = None
    if isinstance(provider, GitHubProvider) and policy.trusted_teams and event.repo:
        repo = event.repo

        async def team_check(team: str, login: str) -> bool:
            return await provider.team_member(repo, team, login)

    return await decide(policy, event, team_check=team_check), policy


async def process_delivery(
    state: AppState, ingest: Ingest, delivery: Delivery, provider: LockFileSource
) -> PipelineResult:
    """Run the pipeline and record the outcome; never raises for a delivery problem."""
    try:
        result = await _process(state, ingest, delivery, provider)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ProviderError) else str(exc)
        log_event(
            "ingest.delivery_failed",
            level="warning",
            delivery_id=delivery.delivery_id,
            source=delivery.source.name,
            error=reason,
        )
        async with state.database.transaction() as conn:
            await event_store.finish_event_log(
                conn, delivery.delivery_id, EventLogStatus.FAILED, org_id=delivery.org_id, reason=reason[:2000]
            )
        return PipelineResult(EventLogStatus.FAILED, reason)
    await ingest.superseded(result.superseded)
    await ingest.runs_created(result.run_ids)
    log_event(
        "ingest.delivery_processed",
        delivery_id=delivery.delivery_id,
        source=delivery.source.name,
        status=result.status.value,
        runs=len(result.run_ids),
    )
    return result


async def _finish(state: AppState, delivery: Delivery, status: EventLogStatus, reason: str) -> PipelineResult:
    async with state.database.transaction() as conn:
        await event_store.finish_event_log(conn, delivery.delivery_id, status, org_id=delivery.org_id, reason=reason)
    return PipelineResult(status, reason)


async def _process(state: AppState, ingest: Ingest, delivery: Delivery, provider: LockFileSource) -> PipelineResult:
    event = delivery.event
    repo = event.repo or ""
    if event.default_branch is None and isinstance(provider, GitProvider):
        # a git source without a configured default branch: the repository's (what new branches are
        # compared with, and whose pushes register schedules)
        event = event.model_copy(update={"default_branch": await git_default_branch(delivery.source, provider)})
    if event.sha is None:
        branch = event.branch or event.target_branch or event.default_branch
        if branch is None:
            reason = "the event names no commit or branch"
            return await _finish(state, delivery, EventLogStatus.LOCKFILE_MISSING, reason)
        sha = await provider.resolve_ref(repo, branch)
        if sha is None:
            return await _finish(state, delivery, EventLogStatus.LOCKFILE_MISSING, f"branch {branch!r} not found")
        event = event.model_copy(update={"sha": sha})
    assert event.sha is not None
    trust, policy = await judge(delivery, event, provider)
    if trust.untrusted:
        log_event("ingest.untrusted_event", delivery_id=delivery.delivery_id, source=delivery.source.name,
                  action=trust.action.value if trust.action else None, reason=trust.reason)
    if trust.action is TrustAction.REJECT:
        reason = f"{trust.reason}: rejected by the source's trust policy"
        return await _finish(state, delivery, EventLogStatus.FILTERED, reason)
    lock_sha = _lock_commit(event, held=trust.action is TrustAction.HOLD)
    if lock_sha is None:
        return await _finish(
            state, delivery, EventLogStatus.LOCKFILE_MISSING, "pull request from a fork without a base commit"
        )
    key = ingest.cache.key(provider.cache_prefix, repo, lock_sha)
    try:
        content = await ingest.cache.get(key, lambda: provider.read_lock_file(repo, lock_sha))
    except LockFileTooLarge as exc:
        return await _corrupt(state, ingest, delivery, event, str(exc))
    if content is None:
        await _register_schedules(state, delivery, event, provider, None)
        return await _finish(
            state, delivery, EventLogStatus.LOCKFILE_MISSING, f"no .kici/kici.lock.json at {lock_sha}"
        )
    try:
        lock = ingest.cache.parsed(content)
    except LockFileError as exc:
        return await _corrupt(state, ingest, delivery, event, str(exc))
    await _register_schedules(state, delivery, event, provider, lock)
    return await _match_and_create(state, delivery, event, lock, provider, trust=trust, policy=policy)


async def _register_schedules(
    state: AppState, delivery: Delivery, event: Event, provider: LockFileSource, lock: LockFile | None
) -> None:
    """A push to the default branch replaces the repository's schedule registrations with the lock file's
    (none when it has no lock file). A failure here is logged: the push's own runs still happen."""
    if event.type != "push" or event.branch is None or event.sha is None:
        return
    source = delivery.source
    try:
        if event.default_branch is None or event.branch != event.default_branch:
            return
        await register_from_lock(state, source=source, repo=event.repo or "", branch=event.branch,
                                 sha=event.sha, lock=lock)
    except Exception as exc:
        log_event("schedules.refresh_failed", level="warning", source=source.name, repo=event.repo,
                  error=f"{type(exc).__name__}: {exc}")


async def _corrupt(state: AppState, ingest: Ingest, delivery: Delivery, event: Event, reason: str) -> PipelineResult:
    assert event.sha is not None
    async with state.database.transaction() as conn:
        run_id = await create_failed_run(
            conn,
            org_id=delivery.org_id,
            workflow_name=LOCK_RESOLUTION_WORKFLOW,
            event=event,
            repo=event.repo or "",
            ref=event.ref,
            sha=event.sha,
            delivery_id=delivery.delivery_id,
            source_id=delivery.source.id,
            reason=f"lock file could not be read: {reason}",
            reporting=reporting_targets(state.settings, delivery.source, event),
        )
        await event_store.finish_event_log(
            conn, delivery.delivery_id, EventLogStatus.LOCKFILE_CORRUPT, org_id=delivery.org_id, reason=reason
        )
    return PipelineResult(EventLogStatus.LOCKFILE_CORRUPT, reason, [run_id])


async def _hold_reason(event: Event, trust: TrustDecision, provider: LockFileSource) -> tuple[Event, str]:
    """Why the run is held, calling out a change to `.kici/` (the event with its changed files, when they
    had to be read for that)."""
    reason = f"{trust.reason}: held for approval"
    sha = event.sha
    if event.type in _PR_TYPES and sha is not None:
        if event.changed_files is None:
            base = diff_base(event)
            if base is not None:
                files = await provider.changed_files(event.repo or "", base, sha)
                event = event.model_copy(update={"changed_files": files})
        if any(path.startswith(KICI_DIR) for path in event.changed_files or ()):
            reason += "; changes .kici/: the held run uses the base branch's workflows"
    return event, reason


async def _match_and_create(
    state: AppState, delivery: Delivery, event: Event, lock: LockFile, provider: LockFileSource, *,
    trust: TrustDecision = TRUSTED, policy: TrustPolicy | None = None,
) -> PipelineResult:
    assert event.sha is not None
    hold_reason: str | None = None
    hold_expiry: dt.timedelta | None = None
    if trust.action is TrustAction.HOLD:
        event, hold_reason = await _hold_reason(event, trust, provider)
        hold_expiry = (policy or TrustPolicy()).expiry(state.settings.hold_expiry_hours)
    # an untrusted event the policy lets run (`allow`) runs at once, but gets secrets only as an approved
    # one would
    secrets_allowed = not trust.untrusted or (policy is not None and policy.secrets_for_approved and
                                              hold_reason is None)
    assert event.sha is not None
    if event.changed_files is None and needs_changed_files(lock.workflows, event):
        base = diff_base(event)
        if base is not None:
            files = await provider.changed_files(event.repo or "", base, event.sha)
            event = event.model_copy(update={"changed_files": files})
    sha = event.sha
    assert sha is not None
    decisions = match_all(lock.workflows, event, explain=False)
    matched = [d.workflow for d in decisions if d.matched]
    settings = state.settings
    run_ids: list[str] = []
    superseded: list[Superseded] = []
    reason = f"matched {', '.join(matched)}" if matched else "no workflow matched"
    if matched and hold_reason is not None:
        reason += f"; {hold_reason}"
    reporting = reporting_targets(settings, delivery.source, event) if matched else None
    async with state.database.transaction() as conn:
        for name in matched:
            workflow = lock.workflow(name)
            assert workflow is not None
            created = await create_run(
                conn,
                NewRun(
                    org_id=delivery.org_id,
                    workflow=workflow,
                    event=event,
                    repo=event.repo or "",
                    ref=event.ref,
                    sha=sha,
                    lock_content_hash=lock.content_hash,
                    delivery_id=delivery.delivery_id,
                    source_id=delivery.source.id,
                    reporting=reporting,
                    trust=(RunTrust.UNTRUSTED if trust.untrusted else RunTrust.TRUSTED).value,
                    secrets_allowed=secrets_allowed,
                    hold_reason=hold_reason,
                    hold_expiry=hold_expiry,
                ),
                queue_max_depth=settings.queue_max_depth,
                queue_timeout_ms=settings.queue_timeout_ms,
            )
            run_ids.append(created.run_id)
            superseded += created.superseded
        await event_store.finish_event_log(
            conn,
            delivery.delivery_id,
            EventLogStatus.PROCESSED,
            org_id=delivery.org_id,
            reason=reason,
            matched_count=len(matched),
            sha=sha,
        )
    return PipelineResult(EventLogStatus.PROCESSED, reason, run_ids, matched, superseded)
