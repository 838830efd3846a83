"""Sources (`/sources`): list, create, show, update, enable, disable, delete — and, for a `git` source, a
ready-to-install git hook script (`/sources/{id_or_name}/hook`).

Responses never carry a secret's value, only the names of the secrets that are set — except the hook
script, which embeds the source's webhook secret and is therefore `sources:write`. Sources are addressed by
id or by name (ids are tried first). The store (`kici.orchestrator.store.sources`) validates each kind's
config and seals secrets; its `SourceError` answers 422 with its message.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from kici.orchestrator.audit_trail import record_mutation
from kici.orchestrator.auth import (
    ERROR_RESPONSES,
    AdminError,
    AdminRoute,
    ErrorResponse,
    Permission,
    Principal,
    require,
)
from kici.orchestrator.container import AppState, app_state, ingest_for
from kici.orchestrator.db.schema import SourceKind
from kici.orchestrator.logs import log_event
from kici.orchestrator.scheduling.registrations import refresh_source_logged
from kici.orchestrator.services import source_changed
from kici.orchestrator.store import sources as store
from kici.orchestrator.store.sources import Source, SourceError

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]
Reader = Annotated[Principal, Depends(require(Permission.SOURCES_READ))]
Writer = Annotated[Principal, Depends(require(Permission.SOURCES_WRITE))]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse, "description": "No such source"}}
_CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": ErrorResponse, "description": "Conflict"}}


class SourceInfo(BaseModel):
    id: str
    name: str
    kind: SourceKind
    enabled: bool
    config: dict[str, Any]
    secret_fields: list[str] = Field(description="Names of the secrets that are set (never their values)")
    webhook_path: str = Field(description="Where this source's webhooks are posted, under the orchestrator's URL")
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def of(cls, source: Source, base_path: str) -> SourceInfo:
        return cls(
            id=source.id,
            name=source.name,
            kind=source.kind,
            enabled=source.enabled,
            config=source.config,
            secret_fields=source.secret_fields,
            webhook_path=base_path + webhook_path(source),
            created_at=source.created_at,
            updated_at=source.updated_at,
        )


def webhook_path(source: Source) -> str:
    org = quote(source.org_id, safe="")
    if source.kind is SourceKind.GITHUB:
        return f"/webhook/{org}/github"
    return f"/webhook/{org}/{source.kind.value}/{quote(source.name, safe='')}"


class SourceCreate(BaseModel):
    kind: Literal["git", "github", "generic"]
    name: str = Field(min_length=1, max_length=200)
    config: dict[str, Any] = Field(default_factory=dict)
    secrets: dict[str, str] = Field(default_factory=dict, description="Sealed at rest; never returned")
    enabled: bool = True


class SourceUpdate(BaseModel):
    config: dict[str, Any] | None = Field(
        default=None, description="Merged into the current config; a key set to null is removed"
    )
    secrets: dict[str, str | None] | None = Field(
        default=None, description="Merged field by field; a secret set to null is removed"
    )


def _key(state: AppState, secrets: Any) -> bytes | None:
    if secrets and state.secret_key is None:
        raise AdminError(503, "no secret key configured on the orchestrator: source secrets cannot be stored")
    return state.secret_key


async def _find(conn: Any, org_id: str, id_or_name: str) -> Source:
    found = await store.get_source(conn, id_or_name, org_id=org_id) or await store.get_source_by_name(
        conn, org_id, id_or_name
    )
    if found is None:
        raise AdminError(404, f"no source {id_or_name!r}")
    return found


@router.get("/sources", summary="List sources (without secrets)")
async def list_sources(
    state: State,
    principal: Reader,
    kind: Annotated[Literal["git", "github", "generic"] | None, Query(description="Only this kind")] = None,
) -> list[SourceInfo]:
    async with state.database.read() as conn:
        found = await store.list_sources(conn, org_id=principal.token.org_id, kind=kind)
    return [SourceInfo.of(s, state.settings.base_path) for s in found]


@router.post("/sources", status_code=201, summary="Create a source", responses=_CONFLICT)
async def create_source(body: SourceCreate, request: Request, state: State, principal: Writer) -> SourceInfo:
    org_id = principal.token.org_id
    key = _key(state, body.secrets)
    try:
        async with state.database.transaction() as conn:
            if await store.get_source_by_name(conn, org_id, body.name.strip()) is not None:
                raise AdminError(409, f"a source named {body.name.strip()!r} already exists")
            created = await store.create_source(
                conn, key=key, name=body.name, kind=body.kind, config=body.config, secrets=body.secrets,
                enabled=body.enabled, org_id=org_id,
            )
            await record_mutation(
                conn, request, principal, action="source.create", target=f"source:{created.id}",
                permission=Permission.SOURCES_WRITE, status=201,
                reason=(f"{created.kind.value} source {created.name!r} created"
                        + (f" with secrets {', '.join(sorted(body.secrets))}" if body.secrets else "")),
            )
    except SourceError as exc:
        raise AdminError(422, str(exc)) from None
    except sa.exc.IntegrityError:  # a concurrent create with the same name
        raise AdminError(409, f"a source named {body.name.strip()!r} already exists") from None
    log_event("admin.source_created", source_id=created.id, source=created.name, kind=created.kind.value,
              by_token_id=principal.token.id)
    if created.enabled:
        # the schedules of its default branch are registered now, not at the first push
        await refresh_source_logged(state, ingest_for(request.app), created)
    return SourceInfo.of(created, state.settings.base_path)


@router.get("/sources/{id_or_name}", summary="Show a source (without secrets)", responses=_NOT_FOUND)
async def show_source(id_or_name: str, state: State, principal: Reader) -> SourceInfo:
    async with state.database.read() as conn:
        found = await _find(conn, principal.token.org_id, id_or_name)
    return SourceInfo.of(found, state.settings.base_path)


@router.patch("/sources/{id_or_name}", summary="Change a source's config and/or secrets", responses=_NOT_FOUND)
async def update_source(
    id_or_name: str, body: SourceUpdate, request: Request, state: State, principal: Writer
) -> SourceInfo:
    org_id = principal.token.org_id
    key = _key(state, {k: v for k, v in (body.secrets or {}).items() if v is not None})
    try:
        async with state.database.transaction() as conn:
            current = await _find(conn, org_id, id_or_name)
            config = None
            if body.config is not None:
                config = {**current.config, **body.config}
                config = {k: v for k, v in config.items() if v is not None}
            updated = await store.update_source(conn, current.id, key=key, org_id=org_id, config=config,
                                                secrets=body.secrets)
            if updated is not None:
                # names only: which config keys and which secrets changed, never a value
                changed = [f"config {', '.join(sorted(body.config))}" if body.config else "",
                           f"secrets {', '.join(sorted(body.secrets))}" if body.secrets else ""]
                await record_mutation(
                    conn, request, principal, action="source.update", target=f"source:{updated.id}",
                    permission=Permission.SOURCES_WRITE,
                    reason=f"source {updated.name!r} updated: {'; '.join(c for c in changed if c) or 'nothing'}",
                )
    except SourceError as exc:
        raise AdminError(422, str(exc)) from None
    if updated is None:
        raise AdminError(404, f"no source {id_or_name!r}")
    log_event("admin.source_updated", source_id=updated.id, source=updated.name,
              secrets_changed=sorted(body.secrets or {}), by_token_id=principal.token.id)
    await source_changed(request.app, updated.id)
    return SourceInfo.of(updated, state.settings.base_path)


async def _set_enabled(
    id_or_name: str, enabled: bool, request: Request, state: AppState, principal: Principal
) -> SourceInfo:
    org_id = principal.token.org_id
    async with state.database.transaction() as conn:
        current = await _find(conn, org_id, id_or_name)
        await store.set_source_enabled(conn, current.id, enabled, org_id=org_id)
        changed = await _find(conn, org_id, current.id)
        await record_mutation(
            conn, request, principal, action="source.enable" if enabled else "source.disable",
            target=f"source:{current.id}", permission=Permission.SOURCES_WRITE,
            reason=f"source {current.name!r} {'enabled' if enabled else 'disabled'}",
        )
    log_event("admin.source_enabled" if enabled else "admin.source_disabled", source_id=changed.id,
              source=changed.name, by_token_id=principal.token.id)
    await source_changed(request.app, changed.id)
    return SourceInfo.of(changed, state.settings.base_path)


@router.post("/sources/{id_or_name}/enable", summary="Enable a source", responses=_NOT_FOUND)
async def enable_source(id_or_name: str, request: Request, state: State, principal: Writer) -> SourceInfo:
    return await _set_enabled(id_or_name, True, request, state, principal)


@router.post("/sources/{id_or_name}/disable", summary="Disable a source (its webhooks answer 404)",
             responses=_NOT_FOUND)
async def disable_source(id_or_name: str, request: Request, state: State, principal: Writer) -> SourceInfo:
    return await _set_enabled(id_or_name, False, request, state, principal)


@router.delete("/sources/{id_or_name}", summary="Delete a source", responses=_NOT_FOUND)
async def delete_source(id_or_name: str, request: Request, state: State, principal: Writer) -> SourceInfo:
    org_id = principal.token.org_id
    async with state.database.transaction() as conn:
        current = await _find(conn, org_id, id_or_name)
        if not await store.delete_source(conn, current.id, org_id=org_id):
            raise AdminError(404, f"no source {id_or_name!r}")
        await record_mutation(
            conn, request, principal, action="source.delete", target=f"source:{current.id}",
            permission=Permission.SOURCES_WRITE, reason=f"{current.kind.value} source {current.name!r} deleted",
        )
    log_event("admin.source_deleted", source_id=current.id, source=current.name, by_token_id=principal.token.id)
    await source_changed(request.app, current.id)
    return SourceInfo.of(current, state.settings.base_path)


@router.get(
    "/sources/{id_or_name}/hook",
    summary="A git hook script (post-receive or post-commit) notifying this git source; embeds its secret",
    responses={**_NOT_FOUND, **_CONFLICT,
               200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "A POSIX sh script"}},
)
async def source_hook(
    id_or_name: str,
    request: Request,
    state: State,
    principal: Writer,
    url: Annotated[str | None, Query(description="The orchestrator's URL as the git host reaches it "
                                                 "(including any base path); default: this request's")] = None,
) -> PlainTextResponse:
    org_id = principal.token.org_id
    async with state.database.read() as conn:
        source = await _find(conn, org_id, id_or_name)
        if source.kind is not SourceKind.GIT:
            raise AdminError(409, f"source {source.name!r} is a {source.kind.value} source; hooks are for git sources")
        try:
            secrets = await store.load_source_secrets(conn, source.id, state.keyring)
        except SourceError as exc:
            raise AdminError(500, f"the source's secrets cannot be opened: {exc}") from None
    secret = secrets.get("webhook_secret")
    if not secret:
        raise AdminError(409, f"git source {source.name!r} has no webhook_secret; set one with PATCH (secrets)")
    if url is not None:
        base = url.strip().rstrip("/")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise AdminError(422, f"invalid url {url!r}: expected http(s)://host[:port][/base-path]")
    else:
        base = str(request.base_url).rstrip("/") + state.settings.base_path
    # not a change, but it hands out the source's webhook secret: who got it is worth a row
    async with state.database.transaction() as conn:
        await record_mutation(conn, request, principal, action="source.hook", target=f"source:{source.id}",
                              permission=Permission.SOURCES_WRITE,
                              reason=f"hook script (with the webhook secret) of git source {source.name!r} issued")
    log_event("admin.source_hook_issued", source_id=source.id, source=source.name, by_token_id=principal.token.id)
    return PlainTextResponse(hook_script(source.name, base + webhook_path(source), secret))


def _sh_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def hook_script(name: str, webhook_url: str, secret: str) -> str:
    """A POSIX sh git hook that notifies `webhook_url` of ref updates, signed with `secret`, and prints the
    runs the orchestrator started (id and, with `KICI_PUBLIC_URL`, the dashboard URL)."""
    display = " ".join(name.split())
    return f"""#!/bin/sh
# KiCI git hook for the git source {display!r}.
#
# Install it as .git/hooks/post-commit on a working repository (the one you commit to) or as
# hooks/post-receive on a bare repository (the one you push to); it tells the orchestrator which ref
# moved, from which commit to which, and prints the runs that started ("kici: run <id> <url>").
# As post-receive it reads "old new ref" lines on stdin; as post-commit it notifies HEAD's branch with
# HEAD~1 -> HEAD.
#
# THIS FILE CONTAINS THE SOURCE'S WEBHOOK SECRET: keep it readable by its owner only (chmod 0700).
# It never fails or blocks the git operation for long: errors are ignored, requests time out quickly.
# Needs: openssl, curl, sed, tr.

KICI_WEBHOOK_URL={_sh_quote(webhook_url)}
KICI_WEBHOOK_SECRET={_sh_quote(secret)}
KICI_ZERO=0000000000000000000000000000000000000000

kici_report() {{
    # $1 = the orchestrator's JSON answer, $2 = ref. One line per run it started; the answer holds
    # "runs":[{{"id":"...","url":"..." or null}},...] (ids and URLs never contain quotes).
    kici_runs=$(printf '%s' "$1" | tr -d '\\n' | sed -n 's/.*"runs": *\\[\\([^]]*\\)\\].*/\\1/p' | tr '}}' '\\n' \\
        | sed -n 's/.*"id": *"\\([^"]*\\)".*"url": *"\\([^"]*\\)".*/\\1 \\2/p; t; s/.*"id": *"\\([^"]*\\)".*/\\1/p')
    if [ -n "$kici_runs" ]; then
        printf '%s\\n' "$kici_runs" | while read -r kici_id kici_url; do
            echo "kici: $2: run $kici_id${{kici_url:+ $kici_url}}"
        done
        return 0
    fi
    # why not: the pipeline's outcome, else the reason or status (filtered), else a duplicate notification
    kici_flat=$(printf '%s' "$1" | tr -d '\\n')
    kici_why=$(printf '%s' "$kici_flat" | sed -n 's/.*"outcome": *"\\([^"]*\\)".*/\\1/p')
    [ -n "$kici_why" ] || kici_why=$(printf '%s' "$kici_flat" \\
        | sed -n 's/.*"reason": *"\\([^"]*\\)".*/\\1/p; t; s/.*"status": *"\\([^"]*\\)".*/\\1/p')
    echo "kici: $2: no run started (${{kici_why:-already notified}})"
}}

kici_notify() {{
    # $1 = old sha, $2 = new sha, $3 = ref
    kici_ref=$(printf '%s' "$3" | sed 's/\\\\/\\\\\\\\/g; s/"/\\\\"/g')
    kici_body=$(printf '{{"ref":"%s","before":"%s","after":"%s"}}' "$kici_ref" "$1" "$2")
    kici_sig=$(printf '%s' "$kici_body" | openssl dgst -sha256 -hmac "$KICI_WEBHOOK_SECRET" 2>/dev/null \\
        | sed 's/^.*= *//')
    [ -n "$kici_sig" ] || {{ echo "kici hook: openssl failed; orchestrator not notified" >&2; return 0; }}
    if kici_answer=$(curl -sS -f --connect-timeout 3 --max-time 10 -X POST \\
        -H 'Content-Type: application/json' \\
        -H "X-Hub-Signature-256: sha256=$kici_sig" \\
        --data-binary "$kici_body" "$KICI_WEBHOOK_URL" 2>&1); then
        kici_report "$kici_answer" "$3"
    else
        echo "kici hook: could not notify $KICI_WEBHOOK_URL: $kici_answer" >&2
    fi
    return 0
}}

kici_post_commit() {{
    kici_branch=$(git symbolic-ref -q HEAD 2>/dev/null) || return 0   # detached HEAD: nothing to notify
    kici_after=$(git rev-parse -q --verify HEAD 2>/dev/null) || return 0
    kici_before=$(git rev-parse -q --verify 'HEAD~1' 2>/dev/null) || kici_before=$KICI_ZERO
    kici_notify "$kici_before" "$kici_after" "$kici_branch"
}}

case "$(basename "$0")" in
    post-commit*) kici_post_commit ;;
    *)
        kici_seen=
        if [ ! -t 0 ]; then
            while read -r kici_old kici_new kici_refname; do
                [ -n "$kici_refname" ] || continue
                kici_seen=1
                kici_notify "$kici_old" "$kici_new" "$kici_refname"
            done
        fi
        [ -n "$kici_seen" ] || kici_post_commit
        ;;
esac
exit 0
"""
