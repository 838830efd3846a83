"""Manual runs (`POST /runs`): start a workflow by hand through its `dispatch()` trigger.

Everything is checked before anything is written: the source (404), the commit (`ref` resolved through
the source — git: the repository, GitHub: the commits API — or `sha` as given; 422 when it cannot be
found), the lock file there, the workflow (404), its dispatch trigger (422) and the inputs against the
trigger's declared inputs (types, choices, required, defaults; 422 naming the input). Then the run and
an `audit_log` row (`runs.start`) are written in one transaction, and the dispatcher is woken.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from kici.engine.events import Event
from kici.engine.inputs import InputError, resolve_inputs
from kici.engine.lockfile import DispatchTrigger, LockFileError
from kici.engine.refnames import branch_name_problem, ref_name_problem
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
from kici.orchestrator.container import AppState, app_state, ingest_for, services_of
from kici.orchestrator.db.schema import SourceKind
from kici.orchestrator.logs import log_event
from kici.orchestrator.providers.base import ProviderError, check_ref, check_sha
from kici.orchestrator.providers.git import GitProvider
from kici.orchestrator.providers.github import GitHubProvider
from kici.orchestrator.routes.admin_runs import RunDetail
from kici.orchestrator.scheduling.registrations import git_default_branch, git_repo_name, open_provider, read_lock
from kici.orchestrator.store import runs
from kici.orchestrator.store.sources import SourceError, get_source, get_source_by_name

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]
Scalar = str | int | float | bool
AUDIT_ACTION = "runs.start"


class ManualRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, description="The source (name or id) whose repository holds the workflow")
    workflow: str = Field(min_length=1, description="The workflow's name in the lock file")
    ref: str | None = Field(default=None, description="A branch or tag, resolved to its commit through the "
                            "source; with neither `ref` nor `sha`, the head of the default branch")
    sha: str | None = Field(default=None, description="A commit id (instead of `ref`)")
    inputs: dict[str, Scalar] = Field(default_factory=dict, description="Values for the dispatch trigger's inputs")
    repo: str | None = Field(default=None, description="`owner/name`: required for a GitHub source (a git "
                             "source has one repository)")


_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such source or workflow"},
}


def _branch_of(ref: str) -> tuple[str | None, str]:
    """(branch or None for a tag, the full ref) of a ref given as `main`, `refs/heads/main` or `refs/tags/v1`."""
    if ref.startswith("refs/heads/"):
        return ref[len("refs/heads/"):], ref
    if ref.startswith("refs/tags/"):
        return None, ref
    return ref, f"refs/heads/{ref}"


@router.post("/runs", status_code=201, summary="Start a workflow by hand (its dispatch trigger)", responses=_RESPONSES)
async def start_run(
    body: ManualRunRequest,
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.RUNS_WRITE))],
) -> RunDetail:
    org_id = principal.token.org_id
    if body.ref is not None and body.sha is not None:
        raise AdminError(422, "invalid request: give either ref or sha, not both")
    if body.ref is not None:
        # git's own ref-name rules, before anything asks the repository about it
        problem = ref_name_problem(body.ref) if body.ref.startswith("refs/") else branch_name_problem(body.ref)
        if problem is not None:
            raise AdminError(422, f"invalid request: ref: invalid ref name {body.ref!r}: {problem}")
    async with state.database.read() as conn:
        source = await get_source(conn, body.source, org_id=org_id) or await get_source_by_name(
            conn, org_id, body.source
        )
    if source is None:
        raise AdminError(404, f"no source {body.source!r}")
    if not source.enabled:
        raise AdminError(422, f"invalid request: source: {source.name!r} is disabled")
    if source.kind is SourceKind.GENERIC:
        raise AdminError(422, f"invalid request: source: {source.name!r} is a generic source; start runs "
                              "through its lock source (a git or github source)")
    ingest = ingest_for(request.app)
    try:
        async with open_provider(state, ingest, source) as provider:
            default_branch: str | None
            if isinstance(provider, GitProvider):
                repo = git_repo_name(source)
                default_branch = await git_default_branch(source, provider)
            else:
                assert isinstance(provider, GitHubProvider)
                if not body.repo:
                    raise AdminError(422, "invalid request: repo: required for a GitHub source (owner/name)")
                repo = body.repo
                default_branch = await provider.default_branch(repo)
            if body.sha is not None:
                sha = check_sha(body.sha)
                branch, full_ref = None, None
            else:
                wanted = body.ref
                if wanted is None:
                    wanted = default_branch
                    if wanted is None:
                        raise AdminError(422, f"invalid request: ref: the default branch of {repo} is unknown")
                branch, full_ref = _branch_of(check_ref(wanted))
                found = await provider.resolve_ref(repo, wanted)
                if found is None:
                    raise AdminError(422, f"invalid request: ref: {wanted!r} not found in {repo}")
                sha = found
            try:
                lock = await read_lock(ingest, provider, repo, sha)
            except LockFileError as exc:
                raise AdminError(422, f"invalid request: the lock file at {sha[:12]} cannot be read: {exc}") from None
    except ProviderError as exc:
        field = "sha" if body.sha is not None else "ref"
        raise AdminError(422, f"invalid request: {field}: {exc}") from None
    except SourceError as exc:
        raise AdminError(422, f"invalid request: source: {exc}") from None
    if lock is None:
        raise AdminError(422, f"invalid request: no .kici/kici.lock.json at {sha}")
    workflow = lock.workflow(body.workflow)
    if workflow is None:
        raise AdminError(404, f"no workflow {body.workflow!r} in the lock file at {sha[:12]} "
                              f"(workflows: {', '.join(sorted(w.name for w in lock.workflows)) or 'none'})")
    trigger = next((t for t in workflow.triggers if isinstance(t, DispatchTrigger)), None)
    if trigger is None:
        raise AdminError(422, f"invalid request: workflow: {workflow.name!r} has no dispatch() trigger, so it "
                              "cannot be started by hand")
    try:
        inputs = resolve_inputs(trigger.inputs or {}, body.inputs) if trigger.inputs else dict(body.inputs)
    except InputError as exc:
        raise AdminError(422, f"invalid request: inputs: {exc}") from None
    if not trigger.inputs and body.inputs:
        raise AdminError(422, f"invalid request: inputs: workflow {workflow.name!r} declares no inputs; got "
                              f"{', '.join(sorted(body.inputs))}")
    by = f"admin token {principal.token.name!r}"
    event = Event(
        type="dispatch",
        branch=branch,
        target_branch=branch,
        ref=full_ref,
        tag=full_ref[len("refs/tags/"):] if full_ref and full_ref.startswith("refs/tags/") else None,
        sha=sha,
        repo=repo,
        default_branch=default_branch,
        actor=by,
        inputs=inputs,
        payload={"inputs": inputs, "started_by": by},
    )
    settings = state.settings
    async with state.database.transaction() as conn:
        created = await runs.create_run(
            conn,
            runs.NewRun(
                org_id=org_id, workflow=workflow, event=event, repo=repo, ref=full_ref, sha=sha,
                lock_content_hash=lock.content_hash, delivery_id=None, source_id=source.id,
            ),
            queue_max_depth=settings.queue_max_depth,
            queue_timeout_ms=settings.queue_timeout_ms,
        )
        await record_mutation(
            conn, request, principal, action=AUDIT_ACTION, target=f"run:{created.run_id}",
            permission=Permission.RUNS_WRITE, status=201,
            reason=f"run {created.run_id}: workflow {workflow.name} at {sha[:12]} ({source.name})",
        )
        run = await runs.get_run(conn, created.run_id)
    assert run is not None
    log_event("run.started_by_hand", run_id=run.id, workflow=workflow.name, repo=repo, sha=sha[:12],
              source=source.name, by_token_id=principal.token.id, inputs=sorted(inputs))
    await services_of(request.app).dispatcher.runs_created([run.id])
    return RunDetail.of(run)
