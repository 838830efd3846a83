"""Webhook endpoints (mounted under `KICI_BASE_PATH`):

- `POST /webhook/{org}/github` — GitHub App deliveries.
- `POST /webhook/{org}/git/{source}` — push notifications from a git hook (`{ref, before, after}`).
- `POST /webhook/{org}/generic/{source}` — anything else that can sign (or not) an HTTP request.

Check order (GitHub and git): unknown/disabled source → 404; body over the limit → 413; bad or missing
signature → 401 (nothing is written); unreadable body → 400; delivery id already seen → 200
`{"duplicate": true}`; nothing to run → 200 `{"status": "filtered"}`; otherwise 202 `{"status":
"accepted"}` once the delivery is durably marked and logged and the pipeline has run.
Generic: 404 → 413 → 429 (+ `Retry-After`) → 401 → duplicate idempotency key → filtered → 202.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from kici.engine.events import Event
from kici.engine.github_events import normalize_github
from kici.engine.refnames import event_ref_problem
from kici.engine.triggers import json_path_get
from kici.engine.webhook_auth import ip_allowed, verify_bearer, verify_hmac_sha256
from kici.orchestrator.app import AppState, app_state
from kici.orchestrator.db.schema import EventLogStatus, SourceKind
from kici.orchestrator.ingest import rerequest
from kici.orchestrator.ingest.pipeline import Delivery, process_delivery
from kici.orchestrator.ingest.service import Ingest, get_ingest
from kici.orchestrator.logs import log_event
from kici.orchestrator.providers.git import repo_name_from_url
from kici.orchestrator.store import events as event_store
from kici.orchestrator.store import rate_limits
from kici.orchestrator.store.sources import (
    Source,
    SourceError,
    get_source,
    get_source_by_key,
    get_source_by_name,
    list_sources,
)

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
DEFAULT_GENERIC_RATE_LIMIT_RPM = 600
DEFAULT_GENERIC_DEDUP_WINDOW_SECONDS = 300
DEFAULT_GENERIC_SIGNATURE_HEADER = "X-Signature-256"
DEFAULT_GENERIC_EVENT_HEADER = "X-Event-Type"
DEFAULT_GENERIC_IDEMPOTENCY_HEADER = "Idempotency-Key"

class WebhookRoute(APIRoute):
    """Counts every webhook answered, by provider and outcome, in `kici_webhooks_received_total`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        provider = self.name.removeprefix("webhook_")

        async def counted(request: Request) -> Response:
            response = await handler(request)
            state: AppState = request.app.state.kici
            state.metrics.webhooks.labels(provider, webhook_outcome(response)).inc()
            return response

        return counted


def webhook_outcome(response: Response) -> str:
    """`accepted`, `duplicate`, `filtered`, or `rejected_<status>` for an error answer."""
    if response.status_code >= 300:
        return f"rejected_{response.status_code}"
    body = bytes(response.body) if isinstance(response.body, bytes | memoryview) else b""
    if b'"duplicate":true' in body:
        return "duplicate"
    if b'"status":"filtered"' in body:
        return "filtered"
    return "accepted"


router = APIRouter(route_class=WebhookRoute)
StateDep = Annotated[AppState, Depends(app_state)]
IngestDep = Annotated[Ingest, Depends(get_ingest)]


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge
    return bytes(body)


def _limit(source: Source) -> int:
    value = source.config.get("max_payload_bytes")
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_MAX_PAYLOAD_BYTES


async def _secrets(state: AppState, ingest: Ingest, source: Source) -> dict[str, str] | JSONResponse:
    try:
        return await ingest.open_secrets(state.database, source, state.keyring)
    except SourceError as exc:
        log_event("ingest.source_secrets_unreadable", level="error", source=source.name, error=str(exc))
        return _error(500, "the source's secrets cannot be opened (wrong secret key?)")


async def _begin(
    state: AppState,
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
    async with state.database.transaction() as conn:
        return await event_store.begin_delivery(
            conn,
            delivery_id=delivery_id,
            provider=provider,
            ttl_seconds=ttl_seconds or state.settings.dedup_ttl_seconds,
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


def _duplicate(delivery_id: str) -> JSONResponse:
    return JSONResponse({"duplicate": True, "delivery_id": delivery_id}, status_code=200)


def _filtered(delivery_id: str, reason: str | None) -> JSONResponse:
    return JSONResponse({"status": "filtered", "reason": reason, "delivery_id": delivery_id}, status_code=200)


def _accepted(state: AppState, delivery_id: str, result_status: EventLogStatus, runs: list[str]) -> JSONResponse:
    """202 with the runs created: `run_ids`, and `runs` with each run's dashboard URL (null without
    `KICI_PUBLIC_URL`) — what the git hook prints after a commit or push."""
    return JSONResponse(
        {"status": "accepted", "delivery_id": delivery_id, "outcome": result_status.value, "run_ids": runs,
         "runs": [{"id": run_id, "url": state.settings.run_url(run_id)} for run_id in runs]},
        status_code=202,
    )


# -- GitHub -----------------------------------------------------------------------------------------


async def _github_source(state: AppState, org_id: str, target_id: str | None) -> Source | None:
    async with state.database.read() as conn:
        candidates = await list_sources(conn, org_id=org_id, kind=SourceKind.GITHUB)
    if target_id is not None and target_id.strip().isdigit():
        app_id = int(target_id.strip())
        matching = [s for s in candidates if s.config.get("app_id") == app_id]
        if matching:
            enabled_matching = [s for s in matching if s.enabled]
            return enabled_matching[0] if enabled_matching else None
    if target_id is None:
        enabled = [s for s in candidates if s.enabled]
        if len(candidates) == 1 and len(enabled) == 1:
            return enabled[0]
    return None


@router.post("/webhook/{org_id}/github", name="webhook_github")
async def github_webhook(
    org_id: str,
    request: Request,
    state: StateDep,
    ingest: IngestDep,
) -> JSONResponse:
    headers = request.headers
    source = await _github_source(state, org_id, headers.get("x-github-hook-installation-target-id"))
    if source is None:
        return _error(404, "no enabled GitHub source for this org and app id")
    try:
        body = await _read_body(request, _limit(source))
    except _TooLarge:
        return _error(413, f"payload larger than {_limit(source)} bytes")
    secrets = await _secrets(state, ingest, source)
    if isinstance(secrets, JSONResponse):
        return secrets
    webhook_secret = secrets.get("webhook_secret")
    if not webhook_secret:
        return _error(500, f"GitHub source {source.name!r} has no webhook_secret")
    if not verify_hmac_sha256(webhook_secret.encode("utf-8"), body, headers.get("x-hub-signature-256")):
        log_event("ingest.signature_rejected", level="warning", source=source.name, provider="github")
        return _error(401, "invalid or missing X-Hub-Signature-256")
    delivery_id = (headers.get("x-github-delivery") or "").strip()
    if not delivery_id or len(delivery_id) > 200:
        return _error(400, "missing X-GitHub-Delivery")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return _error(400, "body is not JSON")
    event_name = (headers.get("x-github-event") or "").strip()
    normalized = normalize_github(event_name, payload, delivery_id=delivery_id)
    fresh = await _begin(
        state,
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
        return _accepted(state, delivery_id, rerun.status, rerun.run_ids)
    if normalized.event is None:
        return _filtered(delivery_id, normalized.ignored_reason)
    async with ingest.http_client() as client:
        try:
            provider = ingest.provider(source, secrets, client=client, installation_id=normalized.installation_id)
        except Exception as exc:
            async with state.database.transaction() as conn:
                await event_store.finish_event_log(
                    conn, delivery_id, EventLogStatus.FAILED, org_id=org_id, reason=str(exc)[:2000]
                )
            return _accepted(state, delivery_id, EventLogStatus.FAILED, [])
        await _comment_command(request, state, org_id, source, normalized.event, provider)
        delivery = Delivery(org_id, delivery_id, source, normalized.event)
        result = await process_delivery(state, ingest, delivery, provider)
    return _accepted(state, delivery_id, result.status, result.run_ids)


async def _comment_command(
    request: Request, state: AppState, org_id: str, source: Source, event: Event, provider: object
) -> None:
    """A `/kici approve|reject` PR comment decides the PR's held runs (`kici.orchestrator.holds.comments`);
    the delivery then goes through the pipeline like any other comment. A failure here is logged: the
    comment's own runs still happen."""
    from kici.orchestrator.holds.comments import handle_comment
    from kici.orchestrator.services import services_of

    if event.type != "comment" or event.pr_number is None:
        return
    try:
        await handle_comment(state.database, services_of(request.app).held, org_id=org_id, source=source,
                             event=event, provider=provider)
    except Exception as exc:
        log_event("held.comment_failed", level="warning", source=source.name, repo=event.repo,
                  pr=event.pr_number, error=f"{type(exc).__name__}: {exc}")


# -- git --------------------------------------------------------------------------------------------


async def _named_source(state: AppState, org_id: str, key: str, kind: SourceKind) -> Source | None:
    async with state.database.read() as conn:
        source = await get_source_by_key(conn, org_id, key)
    if source is None or source.kind is not kind or not source.enabled:
        return None
    return source


def normalize_git_push(payload: Any, *, source: Source, delivery_id: str) -> tuple[Event | None, str | None]:
    """A git hook's `{ref, before, after}` → a push/tag Event, or why there is nothing to run."""
    if not isinstance(payload, dict):
        return None, "payload is not a JSON object"
    shaped = {k: payload[k] for k in ("ref", "before", "after") if k in payload}
    result = normalize_github("push", shaped, delivery_id=delivery_id)
    if result.event is None:
        return None, result.ignored_reason
    config = source.config
    repo = str(config.get("repo") or repo_name_from_url(str(config["url"])))
    # unset: the pipeline asks the repository (`scheduling.registrations.git_default_branch`)
    default_branch = config.get("default_branch") or None
    return result.event.model_copy(
        update={"repo": repo, "default_branch": default_branch, "payload": payload, "source": source.name}
    ), None


async def _source_and_body(
    state: AppState, org_id: str, source_key: str, kind: SourceKind, request: Request
) -> tuple[Source, bytes] | JSONResponse:
    """The first two checks of the git and generic endpoints: an enabled source (404), a body within its
    size limit (413)."""
    source = await _named_source(state, org_id, source_key, kind)
    if source is None:
        return _error(404, f"no enabled {kind.value} source with this id or name")
    try:
        body = await _read_body(request, _limit(source))
    except _TooLarge:
        return _error(413, f"payload larger than {_limit(source)} bytes")
    return source, body


@router.post("/webhook/{org_id}/git/{source_key}", name="webhook_git")
async def git_webhook(
    org_id: str,
    source_key: str,
    request: Request,
    state: StateDep,
    ingest: IngestDep,
) -> JSONResponse:
    loaded = await _source_and_body(state, org_id, source_key, SourceKind.GIT, request)
    if isinstance(loaded, JSONResponse):
        return loaded
    source, body = loaded
    secrets = await _secrets(state, ingest, source)
    if isinstance(secrets, JSONResponse):
        return secrets
    webhook_secret = secrets.get("webhook_secret")
    if not webhook_secret:
        return _error(500, f"git source {source.name!r} has no webhook_secret")
    if not verify_hmac_sha256(webhook_secret.encode("utf-8"), body, request.headers.get("x-hub-signature-256")):
        log_event("ingest.signature_rejected", level="warning", source=source.name, provider="git")
        return _error(401, "invalid or missing X-Hub-Signature-256")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return _error(400, "body is not JSON")
    given = (request.headers.get("x-kici-delivery") or "").strip()
    return await accept_git_push(state, ingest, org_id, source, secrets, payload, given or None)


def git_delivery_id(source: Source, payload: Any, given: str | None = None) -> str:
    """`git:<source id>:<id>`: the notifier's own id, or — a notification carries none — one derived from
    ref, before and after, so the same ref update notified twice (or by the hook and by polling) is one
    delivery."""
    if not given and isinstance(payload, dict):
        given = hashlib.sha256(
            f"{payload.get('ref')}\0{payload.get('before')}\0{payload.get('after')}".encode()
        ).hexdigest()[:32]
    return f"git:{source.id}:{(given or '')[:200]}"


async def accept_git_push(
    state: AppState,
    ingest: Ingest,
    org_id: str,
    source: Source,
    secrets: dict[str, str],
    payload: Any,
    given_delivery: str | None = None,
) -> JSONResponse:
    """Everything after authentication for a `{ref, before, after}` notification (the hook's webhook or
    the poller): dedup, event log, pipeline. The answer as the webhook gives it."""
    delivery_id = git_delivery_id(source, payload, given_delivery)
    event, reason = normalize_git_push(payload, source=source, delivery_id=delivery_id)
    fresh = await _begin(
        state,
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
    provider = ingest.provider(source, secrets)
    result = await process_delivery(state, ingest, Delivery(org_id, delivery_id, source, event), provider)
    return _accepted(state, delivery_id, result.status, result.run_ids)


# -- generic ----------------------------------------------------------------------------------------


def _generic_event_name(source: Source, request: Request, payload: Any) -> str | None:
    path = source.config.get("event_path")
    if isinstance(path, str):
        try:
            found, value = json_path_get(payload, path)
        except (ValueError, RecursionError):
            return None
        return str(value) if found and value is not None else None
    header = str(source.config.get("event_header") or DEFAULT_GENERIC_EVENT_HEADER)
    value = request.headers.get(header)
    return value.strip() if value else None


def _generic_authorized(source: Source, secrets: dict[str, str], request: Request, body: bytes) -> bool | None:
    """True/False; None when the source is misconfigured (no secret for its method)."""
    auth = source.config.get("auth", "hmac_sha256")
    if auth == "none":
        return True
    if auth == "hmac_sha256":
        secret = secrets.get("hmac_secret")
        if not secret:
            return None
        header = str(source.config.get("signature_header") or DEFAULT_GENERIC_SIGNATURE_HEADER)
        return verify_hmac_sha256(secret.encode("utf-8"), body, request.headers.get(header))
    if auth == "bearer_token":
        token = secrets.get("bearer_token")
        if not token:
            return None
        return verify_bearer(token, request.headers.get("authorization"))
    if auth == "ip_allowlist":
        client = request.client.host if request.client is not None else ""
        return ip_allowed(client, list(source.config.get("allowed_ips") or []))
    return None


@router.post("/webhook/{org_id}/generic/{source_key}", name="webhook_generic")
async def generic_webhook(
    org_id: str,
    source_key: str,
    request: Request,
    state: StateDep,
    ingest: IngestDep,
) -> JSONResponse:
    loaded = await _source_and_body(state, org_id, source_key, SourceKind.GENERIC, request)
    if isinstance(loaded, JSONResponse):
        return loaded
    source, body = loaded
    rpm = source.config.get("rate_limit_rpm") or DEFAULT_GENERIC_RATE_LIMIT_RPM
    # shared by every orchestrator on the database, so a cluster enforces the source's limit, not one per node
    async with state.database.transaction() as conn:
        wait = await rate_limits.take(conn, f"generic:{source.id}", int(rpm), time.time())
    if wait is not None:
        return JSONResponse(
            {"error": "rate limit exceeded"}, status_code=429, headers={"Retry-After": str(max(1, math.ceil(wait)))}
        )
    secrets = await _secrets(state, ingest, source)
    if isinstance(secrets, JSONResponse):
        return secrets
    authorized = _generic_authorized(source, secrets, request, body)
    if authorized is None:
        return _error(500, f"generic source {source.name!r} is misconfigured (no secret for its auth method)")
    if not authorized:
        log_event("ingest.signature_rejected", level="warning", source=source.name, provider="generic")
        return _error(401, "request not authenticated")
    try:
        payload: Any = json.loads(body) if body.strip() else {}
    except (ValueError, RecursionError):
        return _error(400, "body is not JSON")
    idem_header = str(source.config.get("idempotency_header") or DEFAULT_GENERIC_IDEMPOTENCY_HEADER)
    key = (request.headers.get(idem_header) or "").strip()[:200]
    delivery_id = f"generic:{source.id}:{key or uuid.uuid4()}"
    name = _generic_event_name(source, request, payload)
    allowed = source.config.get("allowed_events")
    lock_source = await _lock_source(state, org_id, source)
    event: Event | None = None
    reason: str | None = None
    branch = str(source.config.get("ref") or "main")
    if allowed is not None and name not in allowed:
        reason = f"event {name!r} is not in allowed_events"
    elif (problem := event_ref_problem(branches=(branch,))) is not None:
        reason = problem  # a source configured before refs were validated
    else:
        repo = source.config.get("repo")
        if repo is None and lock_source is not None and lock_source.kind is SourceKind.GIT:
            repo = lock_source.config.get("repo") or repo_name_from_url(str(lock_source.config["url"]))
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
    window = int(source.config.get("dedup_window_seconds") or DEFAULT_GENERIC_DEDUP_WINDOW_SECONDS)
    fresh = await _begin(
        state,
        org_id=org_id,
        delivery_id=delivery_id,
        provider="generic",
        source=source,
        event=event,
        event_name=name,
        ignored_reason=reason,
        repo=source.config.get("repo"),
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
        return _accepted(state, delivery_id, EventLogStatus.LOCKFILE_MISSING, [])
    lock_secrets = await _secrets(state, ingest, lock_source)
    if isinstance(lock_secrets, JSONResponse):
        lock_secrets = {}
    async with ingest.http_client() as client:
        try:
            provider = ingest.provider(lock_source, lock_secrets, client=client)
        except Exception as exc:
            async with state.database.transaction() as conn:
                await event_store.finish_event_log(
                    conn, delivery_id, EventLogStatus.FAILED, org_id=org_id, reason=str(exc)[:2000]
                )
            return _accepted(state, delivery_id, EventLogStatus.FAILED, [])
        result = await process_delivery(state, ingest, Delivery(org_id, delivery_id, source, event), provider)
    return _accepted(state, delivery_id, result.status, result.run_ids)


async def _lock_source(state: AppState, org_id: str, source: Source) -> Source | None:
    name = source.config.get("lock_source")
    if not isinstance(name, str):
        return None
    async with state.database.read() as conn:
        found = await get_source(conn, name, org_id=org_id) or await get_source_by_name(conn, org_id, name)
    if found is None or not found.enabled or found.kind is SourceKind.GENERIC:
        return None
    return found
