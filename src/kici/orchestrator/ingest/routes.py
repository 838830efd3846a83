"""Webhook endpoints (mounted under `KICI_BASE_PATH`):

- `POST /webhook/{org}/github` — GitHub App deliveries.
- `POST /webhook/{org}/git/{source}` — push notifications from a git hook (`{ref, before, after}`).
- `POST /webhook/{org}/generic/{source}` — anything else that can sign (or not) an HTTP request.

Check order (GitHub and git): unknown/disabled source → 404; body over the limit → 413; bad or missing
signature → 401 (nothing is written); unreadable body → 400; delivery id already seen → 200
`{"duplicate": true}`; nothing to run → 200 `{"status": "filtered"}`; otherwise 202 `{"status":
"accepted"}` once the delivery is durably marked and logged and the pipeline has run.
Generic: 404 → 413 → 429 (+ `Retry-After`) → 401 → duplicate idempotency key → filtered → 202.

This module keeps the HTTP side only (body limits, signature headers, the answers); what a delivery does
is `kici.orchestrator.ingest.intake.IngestService`'s, which the git poller calls too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from kici.engine.webhook_auth import ip_allowed, verify_bearer, verify_hmac_sha256
from kici.orchestrator.container import AppState, app_state
from kici.orchestrator.db.schema import SourceKind
from kici.orchestrator.ingest.intake import IngestService, Outcome, OutcomeKind
from kici.orchestrator.logs import log_event
from kici.orchestrator.store.sources import Source, SourceError

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
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


def ingest_service(request: Request) -> IngestService:
    """FastAPI dependency: the app's ingest service."""
    return app_state(request).services.intake


IntakeDep = Annotated[IngestService, Depends(ingest_service)]


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
    return source.typed_config.max_payload_bytes or DEFAULT_MAX_PAYLOAD_BYTES


async def _secrets(intake: IngestService, source: Source) -> dict[str, str] | JSONResponse:
    try:
        return await intake.open_secrets(source)
    except SourceError as exc:
        log_event("ingest.source_secrets_unreadable", level="error", source=source.name, error=str(exc))
        return _error(500, "the source's secrets cannot be opened (wrong secret key?)")


def _answer(state: AppState, outcome: Outcome) -> JSONResponse:
    """The webhook's answer for an outcome: 200 duplicate, 200 filtered, or 202 with the runs created:
    `run_ids`, and `runs` with each run's dashboard URL (null without `KICI_PUBLIC_URL`) — what the git
    hook prints after a commit or push."""
    delivery_id = outcome.delivery_id
    if outcome.kind is OutcomeKind.DUPLICATE:
        return JSONResponse({"duplicate": True, "delivery_id": delivery_id}, status_code=200)
    if outcome.kind is OutcomeKind.FILTERED:
        return JSONResponse({"status": "filtered", "reason": outcome.reason, "delivery_id": delivery_id},
                            status_code=200)
    assert outcome.status is not None  # an accepted outcome always has one
    runs = outcome.run_ids
    return JSONResponse(
        {"status": "accepted", "delivery_id": delivery_id, "outcome": outcome.status.value, "run_ids": runs,
         "runs": [{"id": run_id, "url": state.settings.run_url(run_id)} for run_id in runs]},
        status_code=202,
    )


# -- GitHub -----------------------------------------------------------------------------------------


@router.post("/webhook/{org_id}/github", name="webhook_github")
async def github_webhook(
    org_id: str,
    request: Request,
    state: StateDep,
    intake: IntakeDep,
) -> JSONResponse:
    headers = request.headers
    source = await intake.github_source(org_id, headers.get("x-github-hook-installation-target-id"))
    if source is None:
        return _error(404, "no enabled GitHub source for this org and app id")
    try:
        body = await _read_body(request, _limit(source))
    except _TooLarge:
        return _error(413, f"payload larger than {_limit(source)} bytes")
    secrets = await _secrets(intake, source)
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
    outcome = await intake.accept_github(org_id, source, secrets, delivery_id=delivery_id, event_name=event_name,
                                         payload=payload)
    return _answer(state, outcome)


# -- git --------------------------------------------------------------------------------------------


async def _source_and_body(
    intake: IngestService, org_id: str, source_key: str, kind: SourceKind, request: Request
) -> tuple[Source, bytes] | JSONResponse:
    """The first two checks of the git and generic endpoints: an enabled source (404), a body within its
    size limit (413)."""
    source = await intake.named_source(org_id, source_key, kind)
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
    intake: IntakeDep,
) -> JSONResponse:
    loaded = await _source_and_body(intake, org_id, source_key, SourceKind.GIT, request)
    if isinstance(loaded, JSONResponse):
        return loaded
    source, body = loaded
    secrets = await _secrets(intake, source)
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
    return _answer(state, await intake.accept_git_push(org_id, source, secrets, payload, given or None))


# -- generic ----------------------------------------------------------------------------------------


def _generic_authorized(source: Source, secrets: dict[str, str], request: Request, body: bytes) -> bool | None:
    """True/False; None when the source is misconfigured (no secret for its method)."""
    config = source.generic_config()
    auth = config.auth
    if auth == "none":
        return True
    if auth == "hmac_sha256":
        secret = secrets.get("hmac_secret")
        if not secret:
            return None
        header = config.signature_header or DEFAULT_GENERIC_SIGNATURE_HEADER
        return verify_hmac_sha256(secret.encode("utf-8"), body, request.headers.get(header))
    if auth == "bearer_token":
        token = secrets.get("bearer_token")
        if not token:
            return None
        return verify_bearer(token, request.headers.get("authorization"))
    if auth == "ip_allowlist":
        client = request.client.host if request.client is not None else ""
        return ip_allowed(client, list(config.allowed_ips or []))
    return None


@router.post("/webhook/{org_id}/generic/{source_key}", name="webhook_generic")
async def generic_webhook(
    org_id: str,
    source_key: str,
    request: Request,
    state: StateDep,
    intake: IntakeDep,
) -> JSONResponse:
    loaded = await _source_and_body(intake, org_id, source_key, SourceKind.GENERIC, request)
    if isinstance(loaded, JSONResponse):
        return loaded
    source, body = loaded
    wait = await intake.generic_rate_limit(source)
    if wait is not None:
        return JSONResponse(
            {"error": "rate limit exceeded"}, status_code=429, headers={"Retry-After": str(max(1, math.ceil(wait)))}
        )
    secrets = await _secrets(intake, source)
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
    config = source.generic_config()
    idem_header = config.idempotency_header or DEFAULT_GENERIC_IDEMPOTENCY_HEADER
    event_header = config.event_header or DEFAULT_GENERIC_EVENT_HEADER
    outcome = await intake.accept_generic(
        org_id, source, payload, header_event=request.headers.get(event_header),
        idempotency_key=(request.headers.get(idem_header) or "").strip()[:200],
    )
    return _answer(state, outcome)
