"""Ingest as a service: what happens to a delivery once its HTTP request is authenticated and parsed.

`IngestService` finds the source a webhook addresses, dedups and logs the delivery (`begin`),
normalises git push notifications, handles GitHub re-requests and `/kici` comment commands, and runs the
pipeline (`kici.orchestrator.ingest.pipeline.process_delivery`). It returns a typed `Outcome` and builds
no HTTP responses: the webhook routes (`ingest.routes`) map outcomes to answers, and the git poller calls
`accept_git_push` directly.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kici.engine.events import Event
from kici.engine.github_events import normalize_github
from kici.engine.refnames import event_ref_problem
from kici.engine.triggers import json_path_get
from kici.orchestrator.container import AppState
from kici.orchestrator.db.schema import EventLogStatus, SourceKind
from kici.orchestrator.ingest import rerequest
from kici.orchestrator.ingest.pipeline import Delivery, process_delivery
from kici.orchestrator.ingest.service import Ingest
from kici.orchestrator.logs import log_event
from kici.orchestrator.providers.git import repo_name_from_url
from kici.orchestrator.store import events as event_store
from kici.orchestrator.store import rate_limits
from kici.orchestrator.store.source_configs import GenericSourceConfig
from kici.orchestrator.store.sources import (
    Source,
    SourceError,
    get_source,
    get_source_by_key,
    get_source_by_name,
    list_sources,
)

DEFAULT_GENERIC_RATE_LIMIT_RPM = 600
DEFAULT_GENERIC_DEDUP_WINDOW_SECONDS = 300


class OutcomeKind(StrEnum):
    ACCEPTED = "accepted"
    """Durably marked and logged, and the pipeline has run (`status`, `run_ids`)."""
    DUPLICATE = "duplicate"
    """The delivery id was seen before: nothing done."""
    FILTERED = "filtered"
    """Logged, nothing to run (`reason`)."""


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    delivery_id: str
    status: EventLogStatus | None = None
    """The event log's outcome for an accepted delivery."""
    run_ids: list[str] = field(default_factory=list)
    reason: str | None = None


def _duplicate(delivery_id: str) -> Outcome:
    return Outcome(OutcomeKind.DUPLICATE, delivery_id)


def _filtered(delivery_id: str, reason: str | None) -> Outcome:
    return Outcome(OutcomeKind.FILTERED, delivery_id, reason=reason)


def _accepted(delivery_id: str, status: EventLogStatus, run_ids: list[str]) -> Outcome:
    return Outcome(OutcomeKind.ACCEPTED, delivery_id, status=status, run_ids=list(run_ids))


def git_delivery_id(source: Source, payload: Any, given: str | None = None) -> str:
    """`git:<source id>:<id>`: the notifier's own id, or — a notification carries none — one derived from
    ref, before and after, so the same ref update notified twice (or by the hook and by polling) is one
    delivery."""
    if not given and isinstance(payload, dict):
        given = hashlib.sha256(
            f"{payload.get('ref')}\0{payload.get('before')}\0{payload.get('after')}".encode()
        ).hexdigest()[:32]
    return f"git:{source.id}:{(given or '')[:200]}"


def normalize_git_push(payload: Any, *, source: Source, delivery_id: str) -> tuple[Event | None, str | None]:
    """A git hook's `{ref, before, after}` → a push/tag Event, or why there is nothing to run."""
    if not isinstance(payload, dict):
        return None, "payload is not a JSON object"
    shaped = {k: payload[k] for k in ("ref", "before", "after") if k in payload}
    result = normalize_github("push", shaped, delivery_id=delivery_id)
    if result.event is None:
        return None, result.ignored_reason
    config = source.git_config()
    repo = config.repo or repo_name_from_url(config.url)
    # unset: the pipeline asks the repository (`scheduling.registrations.git_default_branch`)
    default_branch = config.default_branch or None
    return result.event.model_copy(
        update={"repo": repo, "default_branch": default_branch, "payload": payload, "source": source.name}
    ), None


class IngestService:
    """Deliveries into runs, for the webhook routes and the git poller."""

    def __init__(self, state: AppState, ingest: Ingest) -> None:
        self.state = state
        self.ingest = ingest

    async def open_secrets(self, source: Source) -> dict[str, str]:
        """The source's secrets (`SourceError` when they cannot be opened)."""
        return await self.ingest.open_secrets(self.state.database, source, self.state.keyring)

    # -- finding the source a webhook addresses ---------------------------------------------------------

    async def github_source(self, org_id: str, target_id: str | None) -> Source | None:
        """The enabled GitHub source of the org for an app id (`X-GitHub-Hook-Installation-Target-ID`);
        without one, the org's only GitHub source when it is enabled."""
        async with self.state.database.read() as conn:
            candidates = await list_sources(conn, org_id=org_id, kind=SourceKind.GITHUB)
        if target_id is not None and target_id.strip().isdigit():
            app_id = int(target_id.strip())
            matching = [s for s in candidates if s.github_config().app_id == app_id]
            if matching:
                enabled_matching = [s for s in matching if s.enabled]
                return enabled_matching[0] if enabled_matching else None
        if target_id is None:
            enabled = [s for s in candidates if s.enabled]
            if len(candidates) == 1 and len(enabled) == 1:
                return enabled[0]
        return None

    async def named_source(self, org_id: str, key: str, kind: SourceKind) -> Source | None:
        """The enabled source of this kind with this id or name."""
        async with self.state.database.read() as conn:
            source = await get_source_by_key(conn, org_id, key)
        if source is None or source.kind is not kind or not source.enabled:
            return None
        return source

    # -- dedup and event log ----------------------------------------------------------------------------

    async def begin(
        self,
        *,
        org_id: str,
        delivery_id: str,
        provider: str,
        source: Source,
        event: Event | None,
        event_name: str | None,
        ignored_reason: str | None,
        repo: str | None,
        ttl_seconds: int | None = None,
    ) -> bool:
        """Mark the delivery seen and log it (`filtered` without an event); False when it was seen."""
        async with self.state.database.transaction() as conn:
            return await event_store.begin_delivery(
                conn,
                delivery_id=delivery_id,
                provider=provider,
                ttl_seconds=ttl_seconds or self.state.settings.dedup_ttl_seconds,
                org_id=org_id,
                source_id=source.id,
                event=event.name if event is not None else event_name,
                action=event.action if event is not None else None,
                repo=event.repo if event is not None else repo,
                ref=event.ref if event is not None else None,
                sha=event.sha if event is not None else None,
                status=EventLogStatus.FILTERED if event is None else EventLogStatus.RECEIVED,
                reason=ignored_reason,
            )

    async def _failed(self, org_id: str, delivery_id: str, exc: Exception) -> Outcome:
        async with self.state.database.transaction() as conn:
            await event_store.finish_event_log(
                conn, delivery_id, EventLogStatus.FAILED, org_id=org_id, reason=str(exc)[:2000]
            )
        return _accepted(delivery_id, EventLogStatus.FAILED, [])

    # -- GitHub -----------------------------------------------------------------------------------------

    async def accept_github(
        self,
        org_id: str,
        source: Source,
        secrets: dict[str, str],
        *,
        delivery_id: str,
        event_name: str,
        payload: Any,
    ) -> Outcome:
        """An authenticated GitHub delivery: dedup, event log, re-requests, comment commands, pipeline."""
        state, ingest = self.state, self.ingest
        normalized = normalize_github(event_name, payload, delivery_id=delivery_id)
        fresh = await self.begin(
            org_id=org_id,
            delivery_id=delivery_id,
            provider="github",
            source=source,
            event=normalized.event,
            event_name=event_name or None,
            ignored_reason=normalized.ignored_reason,
            repo=normalized.repo,
        )
        if not fresh:
            return _duplicate(delivery_id)
        if rerequest.handles(event_name, payload, source):
            rerun = await rerequest.handle_rerequest(state, org_id, delivery_id, source, event_name, payload)
            if rerun.status is not EventLogStatus.PROCESSED:
                return _filtered(delivery_id, rerun.reason)
            await ingest.superseded(rerun.superseded)
            await ingest.runs_created(rerun.run_ids)
            return _accepted(delivery_id, rerun.status, rerun.run_ids)
        if normalized.event is None:
            return _filtered(delivery_id, normalized.ignored_reason)
        async with ingest.http_client() as client:
            try:
                provider = ingest.provider(source, secrets, client=client, installation_id=normalized.installation_id)
            except Exception as exc:
                return await self._failed(org_id, delivery_id, exc)
            await self._comment_command(org_id, source, normalized.event, provider)
            delivery = Delivery(org_id, delivery_id, source, normalized.event)
            result = await process_delivery(state, ingest, delivery, provider)
        return _accepted(delivery_id, result.status, result.run_ids)

    async def _comment_command(self, org_id: str, source: Source, event: Event, provider: object) -> None:
        """A `/kici approve|reject` PR comment decides the PR's held runs (`kici.orchestrator.holds.comments`);
        the delivery then goes through the pipeline like any other comment. A failure here is logged: the
        comment's own runs still happen."""
        from kici.orchestrator.holds.comments import handle_comment

        if event.type != "comment" or event.pr_number is None:
            return
        try:
            await handle_comment(self.state.database, self.state.services.held, org_id=org_id, source=source,
                                 event=event, provider=provider)
        except Exception as exc:
            log_event("held.comment_failed", level="warning", source=source.name, repo=event.repo,
                      pr=event.pr_number, error=f"{type(exc).__name__}: {exc}")

    # -- git --------------------------------------------------------------------------------------------

    async def accept_git_push(
        self,
        org_id: str,
        source: Source,
        secrets: dict[str, str],
        payload: Any,
        given_delivery: str | None = None,
    ) -> Outcome:
        """Everything after authentication for a `{ref, before, after}` notification (the hook's webhook or
        the poller): dedup, event log, pipeline."""
        delivery_id = git_delivery_id(source, payload, given_delivery)
        event, reason = normalize_git_push(payload, source=source, delivery_id=delivery_id)
        fresh = await self.begin(
            org_id=org_id,
            delivery_id=delivery_id,
            provider="git",
            source=source,
            event=event,
            event_name="push",
            ignored_reason=reason,
            repo=None,
        )
        if not fresh:
            return _duplicate(delivery_id)
        if event is None:
            return _filtered(delivery_id, reason)
        provider = self.ingest.provider(source, secrets)
        result = await process_delivery(self.state, self.ingest, Delivery(org_id, delivery_id, source, event), provider)
        return _accepted(delivery_id, result.status, result.run_ids)

    # -- generic ----------------------------------------------------------------------------------------

    async def generic_rate_limit(self, source: Source) -> float | None:
        """Take one request from the source's budget; the seconds to wait when it is spent. Shared by every
        orchestrator on the database, so a cluster enforces the source's limit, not one per node."""
        rpm = source.generic_config().rate_limit_rpm or DEFAULT_GENERIC_RATE_LIMIT_RPM
        async with self.state.database.transaction() as conn:
            return await rate_limits.take(conn, f"generic:{source.id}", rpm, time.time())

    async def accept_generic(
        self,
        org_id: str,
        source: Source,
        payload: Any,
        *,
        header_event: str | None,
        idempotency_key: str,
    ) -> Outcome:
        """An authenticated generic delivery. The event name is read at the source's `event_path` in the
        payload, else `header_event` (the value of its event header); the delivery id is the idempotency
        key, or a fresh one without it."""
        state, ingest = self.state, self.ingest
        delivery_id = f"generic:{source.id}:{idempotency_key[:200] or uuid.uuid4()}"
        config = source.generic_config()
        name = _generic_event_name(config, payload, header_event)
        allowed = config.allowed_events
        lock_source = await self._lock_source(org_id, source)
        event: Event | None = None
        reason: str | None = None
        branch = config.ref or "main"
        if allowed is not None and name not in allowed:
            reason = f"event {name!r} is not in allowed_events"
        elif (problem := event_ref_problem(branches=(branch,))) is not None:
            reason = problem  # a source configured before refs were validated
        else:
            repo = config.repo
            if repo is None and lock_source is not None and lock_source.kind is SourceKind.GIT:
                lock_config = lock_source.git_config()
                repo = lock_config.repo or repo_name_from_url(lock_config.url)
            event = Event(
                type="generic_webhook",
                name=name,
                repo=repo,
                branch=branch,
                target_branch=branch,
                default_branch=branch,
                payload=payload if isinstance(payload, dict) else {"body": payload},
                source=source.name,
                delivery_id=delivery_id,
            )
        window = config.dedup_window_seconds or DEFAULT_GENERIC_DEDUP_WINDOW_SECONDS
        fresh = await self.begin(
            org_id=org_id,
            delivery_id=delivery_id,
            provider="generic",
            source=source,
            event=event,
            event_name=name,
            ignored_reason=reason,
            repo=config.repo,
            ttl_seconds=window,
        )
        if not fresh:
            return _duplicate(delivery_id)
        if event is None:
            return _filtered(delivery_id, reason)
        if lock_source is None:
            async with state.database.transaction() as conn:
                await event_store.finish_event_log(
                    conn, delivery_id, EventLogStatus.LOCKFILE_MISSING, org_id=org_id,
                    reason="the source has no usable lock_source (an enabled git or github source of this org)",
                )
            return _accepted(delivery_id, EventLogStatus.LOCKFILE_MISSING, [])
        try:
            lock_secrets = await self.open_secrets(lock_source)
        except SourceError as exc:
            log_event("ingest.source_secrets_unreadable", level="error", source=lock_source.name, error=str(exc))
            lock_secrets = {}
        async with ingest.http_client() as client:
            try:
                provider = ingest.provider(lock_source, lock_secrets, client=client)
            except Exception as exc:
                return await self._failed(org_id, delivery_id, exc)
            result = await process_delivery(state, ingest, Delivery(org_id, delivery_id, source, event), provider)
        return _accepted(delivery_id, result.status, result.run_ids)

    async def _lock_source(self, org_id: str, source: Source) -> Source | None:
        name = source.generic_config().lock_source
        if name is None:
            return None
        async with self.state.database.read() as conn:
            found = await get_source(conn, name, org_id=org_id) or await get_source_by_name(conn, org_id, name)
        if found is None or not found.enabled or found.kind is SourceKind.GENERIC:
            return None
        return found


def _generic_event_name(config: GenericSourceConfig, payload: Any, header_event: str | None) -> str | None:
    path = config.event_path
    if path is not None:
        try:
            found, value = json_path_get(payload, path)
        except (ValueError, RecursionError):
            return None
        return str(value) if found and value is not None else None
    return header_event.strip() if header_event else None
