"""Deployment environments and the gate each job deploying to one passes through.

An environment (`environments`) says which refs may deploy to it (branch and tag globs), how many
approvals a deployment needs and from whom, how long to wait once approved (the wait timer) and which
plain variables its jobs get; its secrets are `scoped_secrets` rows with scope `env:<name>`.

A job with an environment meets the gate when it becomes ready (`store.runs.settle_run` calls `enter`):
an unknown environment or a ref the environment does not allow fails the job before any step; otherwise a
gate row (`environment_gates`) records the job's passage — `approval` until enough eligible reviewers
approved, `timer` until the wait timer ran out, then `passed`, after which the job joins its environment's
job concurrency group (one deployment at a time) and is queued when admitted. A rejection cancels it.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine import glob
from kici.orchestrator.db.schema import (
    DEFAULT_ORG_ID,
    EnvironmentGateStatus,
    admin_tokens,
    environment_gates,
    environments,
    jobs,
    new_id,
    runs,
    utcnow,
)
from kici.orchestrator.store.concurrency import ENVIRONMENT_GROUP_PREFIX

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
"""The characters a secret scope `env:<name>` accepts (store.secrets), so every environment has one."""
VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_VARIABLE_BYTES = 32 * 1024
MAX_WAIT_TIMER_S = 30 * 24 * 3600
MAX_APPROVALS = 10
TOKEN_ROLES = ("owner", "admin", "auditor", "viewer")
GITHUB_ROLES = ("OWNER", "MEMBER", "COLLABORATOR", "CONTRIBUTOR", "FIRST_TIME_CONTRIBUTOR", "FIRST_TIMER", "NONE")
DEFAULT_REVIEWER_ROLES = ("owner", "admin", "OWNER", "MEMBER")
"""Who may approve when an environment names no reviewer role or user: owner and admin tokens, and the
repository's GitHub owners and organization members."""
GROUP_REPO = ""
"""An environment's job concurrency group (one deployment at a time) is per organization, not per repo."""

PENDING_STATUSES = (EnvironmentGateStatus.APPROVAL.value, EnvironmentGateStatus.TIMER.value)


class EnvironmentError(ValueError):
    """Invalid environment definition (the message names the field)."""


class EnvironmentPolicy(BaseModel):
    """What `environment create` and `set-policy` set."""

    model_config = ConfigDict(frozen=True)

    branches: list[str] = []
    tags: list[str] = []
    required_approvals: int = 0
    reviewer_roles: list[str] = []
    reviewer_users: list[str] = []
    prevent_self_review: bool = False
    wait_timer_s: int = 0
    variables: dict[str, str] = {}


class Environment(EnvironmentPolicy):
    id: str
    org_id: str
    name: str
    created_by: str | None
    updated_by: str | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @property
    def reviewers(self) -> list[str]:
        """The reviewer rule in effect: roles and users, or the default roles."""
        named = [*self.reviewer_roles, *self.reviewer_users]
        return named or list(DEFAULT_REVIEWER_ROLES)

    def ref_refusal(self, branch: str | None, tag: str | None, *, pull_request: bool = False) -> str | None:
        """Why a run of this ref may not deploy here, or None when it may. No globs at all: every ref.
        A pull request's run never matches a branch rule: its head branch is named by whoever opened it
        (a fork's `main` is not this repository's `main`)."""
        if not self.branches and not self.tags:
            return None
        if pull_request:
            return f"a pull request's run is not allowed for environment {self.name!r} (it allows only branches " \
                   "and tags)"
        if tag is not None:
            if any(glob.matches(p, tag) for p in self.tags):
                return None
            return f"tag {tag!r} is not allowed for environment {self.name!r}"
        if branch is not None:
            if any(glob.matches(p, branch) for p in self.branches):
                return None
            return f"branch {branch!r} is not allowed for environment {self.name!r}"
        return f"a run without a branch or tag is not allowed for environment {self.name!r}"

    def may_review(self, kind: str, name: str, role: str | None) -> bool:
        """An approver is eligible by name (`token:<id>`, `github:<login>`) or by role: an admin token's
        role for tokens, the GitHub `author_association` for GitHub users (the two are told apart by
        case: token roles are lower case, associations upper case)."""
        if f"{kind}:{name}" in self.reviewer_users:
            return True
        roles = self.reviewer_roles or ([] if self.reviewer_users else list(DEFAULT_REVIEWER_ROLES))
        if role is None:
            return False
        if kind == "token":
            return role.lower() in roles
        if kind == "github":
            return role.upper() in roles
        return False


# -- validation ---------------------------------------------------------------------------------------


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise EnvironmentError("name must be 1-100 letters, digits, '_', '.' or '-'")
    return name


def validate_policy(policy: EnvironmentPolicy) -> EnvironmentPolicy:
    """`EnvironmentError` naming the first bad field; the policy unchanged otherwise."""
    for field, patterns in (("branches", policy.branches), ("tags", policy.tags)):
        for pattern in patterns:
            if not pattern or len(pattern) > 255:
                raise EnvironmentError(f"{field}: a glob must be 1-255 characters")
            try:
                glob.compile_glob(pattern)
            except ValueError as exc:
                raise EnvironmentError(f"{field}: {pattern!r} is not a valid glob: {exc}") from None
    if not 0 <= policy.required_approvals <= MAX_APPROVALS:
        raise EnvironmentError(f"required_approvals must be between 0 and {MAX_APPROVALS}")
    for role in policy.reviewer_roles:
        if role not in TOKEN_ROLES and role not in GITHUB_ROLES:
            raise EnvironmentError(
                f"reviewer_roles: {role!r} is neither an admin token role ({', '.join(TOKEN_ROLES)}) nor a GitHub "
                f"author association ({', '.join(GITHUB_ROLES)})"
            )
    for user in policy.reviewer_users:
        kind, _, name = user.partition(":")
        if kind not in ("token", "github") or not name:
            raise EnvironmentError(f"reviewer_users: {user!r} must be 'token:<id>' or 'github:<login>'")
    if not 0 <= policy.wait_timer_s <= MAX_WAIT_TIMER_S:
        raise EnvironmentError(f"wait_timer_s must be between 0 and {MAX_WAIT_TIMER_S} (30 days)")
    for key, value in policy.variables.items():
        if not VARIABLE.match(key) or key.upper().startswith("KICI_"):
            raise EnvironmentError(
                f"variables: {key!r} is not a valid variable name (letters, digits, '_'; not KICI_…)"
            )
        if len(value.encode("utf-8")) > MAX_VARIABLE_BYTES:
            raise EnvironmentError(f"variables: {key!r} is longer than {MAX_VARIABLE_BYTES} bytes")
    return policy


# -- environments ---------------------------------------------------------------------------------------

_POLICY_COLUMNS = tuple(EnvironmentPolicy.model_fields)


def _environment(row: Any) -> Environment:
    return Environment(
        id=row.id, org_id=row.org_id, name=row.name, branches=list(row.branches), tags=list(row.tags),
        required_approvals=row.required_approvals, reviewer_roles=list(row.reviewer_roles),
        reviewer_users=list(row.reviewer_users), prevent_self_review=bool(row.prevent_self_review),
        wait_timer_s=row.wait_timer_s, variables=dict(row.variables), created_by=row.created_by,
        updated_by=row.updated_by, created_at=row.created_at, updated_at=row.updated_at,
    )


async def get_environment(conn: AsyncConnection, name: str, *, org_id: str = DEFAULT_ORG_ID) -> Environment | None:
    row = (
        await conn.execute(
            sa.select(environments).where(environments.c.org_id == org_id, environments.c.name == name)
        )
    ).first()
    return _environment(row) if row is not None else None


async def list_environments(conn: AsyncConnection, *, org_id: str = DEFAULT_ORG_ID) -> list[Environment]:
    query = sa.select(environments).where(environments.c.org_id == org_id).order_by(environments.c.name)
    return [_environment(r) for r in await conn.execute(query)]


async def create_environment(
    conn: AsyncConnection, name: str, policy: EnvironmentPolicy, *, org_id: str = DEFAULT_ORG_ID,
    actor: str | None = None,
) -> Environment | None:
    """The new environment, or None when one of that name exists already."""
    validate_name(name)
    validate_policy(policy)
    if await get_environment(conn, name, org_id=org_id) is not None:
        return None
    now = utcnow()
    await conn.execute(
        environments.insert().values(
            id=new_id(), org_id=org_id, name=name, **policy.model_dump(), created_by=actor, updated_by=actor,
            created_at=now, updated_at=now,
        )
    )
    return await get_environment(conn, name, org_id=org_id)


async def update_environment(
    conn: AsyncConnection, name: str, changes: Mapping[str, Any], *, org_id: str = DEFAULT_ORG_ID,
    actor: str | None = None,
) -> Environment | None:
    """Replace the policy fields in `changes` (the others are kept); None when there is no such environment.
    The whole resulting policy is validated before anything is written."""
    found = await get_environment(conn, name, org_id=org_id)
    if found is None:
        return None
    unknown = set(changes) - set(_POLICY_COLUMNS)
    if unknown:
        raise EnvironmentError(f"unknown field(s) {sorted(unknown)}")
    policy = validate_policy(EnvironmentPolicy(**{**found.model_dump(include=set(_POLICY_COLUMNS)), **changes}))
    await conn.execute(
        environments.update()
        .where(environments.c.id == found.id)
        .values(**policy.model_dump(), updated_by=actor, updated_at=utcnow())
    )
    return await get_environment(conn, name, org_id=org_id)


async def delete_environment(conn: AsyncConnection, name: str, *, org_id: str = DEFAULT_ORG_ID) -> Environment | None:
    """Delete it (the caller checked `pending_count` first); None when there is no such environment."""
    found = await get_environment(conn, name, org_id=org_id)
    if found is None:
        return None
    await conn.execute(environments.delete().where(environments.c.id == found.id))
    return found


async def pending_count(conn: AsyncConnection, name: str, *, org_id: str = DEFAULT_ORG_ID) -> int:
    """Jobs still waiting at the environment's gate (for approvals or the wait timer)."""
    query = (
        sa.select(sa.func.count())
        .select_from(environment_gates.join(jobs, jobs.c.id == environment_gates.c.job_id))
        .where(
            environment_gates.c.org_id == org_id,
            environment_gates.c.environment == name,
            environment_gates.c.status.in_(PENDING_STATUSES),
            jobs.c.status == "waiting",
        )
    )
    return int((await conn.execute(query)).scalar_one())


# -- gates --------------------------------------------------------------------------------------------


class GateRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    job_id: str
    run_id: str
    org_id: str
    environment: str
    status: str
    approvals_required: int
    approvals: list[dict[str, Any]]
    ready_at: dt.datetime | None
    created_at: dt.datetime

    @property
    def passed(self) -> bool:
        return self.status == EnvironmentGateStatus.PASSED.value


def _gate(row: Any) -> GateRow:
    return GateRow(
        job_id=row.job_id, run_id=row.run_id, org_id=row.org_id, environment=row.environment, status=row.status,
        approvals_required=row.approvals_required, approvals=list(row.approvals), ready_at=row.ready_at,
        created_at=row.created_at,
    )


async def gates_of_run(conn: AsyncConnection, run_id: str) -> dict[str, GateRow]:
    """job id → its gate row."""
    query = sa.select(environment_gates).where(environment_gates.c.run_id == run_id)
    return {str(r.job_id): _gate(r) for r in await conn.execute(query)}


def approvals_reason(environment: str, missing: int) -> str:
    """What `runs show` prints after `waiting` for a job waiting for approvals."""
    return f"environment: {environment}, needs {missing} approval{'s' if missing != 1 else ''}"


def timer_reason(environment: str, ready_at: dt.datetime) -> str:
    return f"environment: {environment}, wait timer until {ready_at.astimezone(dt.UTC):%H:%M:%S}"


def group_name(environment: str) -> str:
    return ENVIRONMENT_GROUP_PREFIX + environment


PULL_REQUEST_EVENTS = ("pr", "review", "review_comment", "comment")
"""Event types whose run is a pull request's: their `branch` is the PR's head branch, not a pushed one."""


def is_pull_request(event: Mapping[str, Any] | None) -> bool:
    return (event or {}).get("type") in PULL_REQUEST_EVENTS


def ref_of(ref: str | None, event: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """(branch, tag) of a run, from its ref (`refs/heads/…`, `refs/tags/…`), else from its event; none
    for a pull request's run."""
    if is_pull_request(event):
        return None, None
    if ref is not None and ref.startswith("refs/tags/"):
        return None, ref[len("refs/tags/"):]
    if ref is not None and ref.startswith("refs/heads/"):
        return ref[len("refs/heads/"):], None
    event = event or {}
    tag = event.get("tag")
    if isinstance(tag, str) and tag:
        return None, tag
    branch = event.get("branch")
    return (branch if isinstance(branch, str) and branch else None), None


class Entry(BaseModel):
    """What the gate decided for a job that just became ready."""

    model_config = ConfigDict(frozen=True)

    error: str | None = None
    """The job fails before any step with this message."""
    wait_reason: str | None = None
    """The job waits (`waiting`) with this reason."""

    @property
    def passed(self) -> bool:
        return self.error is None and self.wait_reason is None


async def enter(
    conn: AsyncConnection, *, job_id: str, run_id: str, org_id: str, environment: str, now: dt.datetime,
    run: Mapping[str, Any],
) -> Entry:
    """A job deploying to `environment` became ready: check the environment and the run's ref, and write
    the job's gate row. `run`: the run's `ref` and `event`."""
    env = await get_environment(conn, environment, org_id=org_id)
    if env is None:
        return Entry(error=f"environment {environment!r} does not exist")
    branch, tag = ref_of(run.get("ref"), run.get("event"))
    refusal = env.ref_refusal(branch, tag, pull_request=is_pull_request(run.get("event")))
    if refusal is not None:
        return Entry(error=refusal)
    ready_at: dt.datetime | None = None
    if env.required_approvals > 0:
        status, reason = EnvironmentGateStatus.APPROVAL, approvals_reason(environment, env.required_approvals)
    elif env.wait_timer_s > 0:
        ready_at = now + dt.timedelta(seconds=env.wait_timer_s)
        status, reason = EnvironmentGateStatus.TIMER, timer_reason(environment, ready_at)
    else:
        status, reason = EnvironmentGateStatus.PASSED, None
    await conn.execute(
        environment_gates.insert().values(
            job_id=job_id, run_id=run_id, org_id=org_id, environment=environment, status=status.value,
            approvals_required=env.required_approvals, approvals=[], ready_at=ready_at, created_at=now,
            updated_at=now,
        )
    )
    return Entry(wait_reason=reason)


async def run_facts(conn: AsyncConnection, run_id: str) -> dict[str, Any]:
    """The run's ref, event and status: what the gate checks."""
    row = (await conn.execute(sa.select(runs.c.ref, runs.c.event, runs.c.status).where(runs.c.id == run_id))).first()
    if row is None:
        return {}
    return {"ref": row.ref, "event": row.event, "status": row.status}


async def set_gate(
    conn: AsyncConnection, job_id: str, *, status: EnvironmentGateStatus,
    approvals: Sequence[dict[str, Any]] | None = None, ready_at: dt.datetime | None = None,
    decided_by: str | None = None, reason: str | None = None, now: dt.datetime,
) -> None:
    values: dict[str, Any] = {"status": status.value, "updated_at": now}
    if approvals is not None:
        values["approvals"] = list(approvals)
    if ready_at is not None:
        values["ready_at"] = ready_at
    if decided_by is not None:
        values["decided_by"] = decided_by
    if reason is not None:
        values["reason"] = reason
    await conn.execute(environment_gates.update().where(environment_gates.c.job_id == job_id).values(**values))


async def set_wait_reason(conn: AsyncConnection, job_id: str, reason: str | None) -> None:
    await conn.execute(
        jobs.update().where(jobs.c.id == job_id, jobs.c.status == "waiting").values(wait_reason=reason)
    )


async def waiting_gates(
    conn: AsyncConnection, *, org_id: str | None = None, run_id: str | None = None,
    statuses: Sequence[str] = (EnvironmentGateStatus.APPROVAL.value,),
) -> list[tuple[GateRow, dict[str, Any]]]:
    """Gates in `statuses` whose job still waits, oldest first, each with its run's facts (repo,
    workflow, sha, status, event)."""
    query = (
        sa.select(
            environment_gates, runs.c.repo, runs.c.workflow, runs.c.sha, runs.c.status.label("run_status"),
            runs.c.event,
        )
        .select_from(
            environment_gates.join(jobs, jobs.c.id == environment_gates.c.job_id).join(
                runs, runs.c.id == environment_gates.c.run_id
            )
        )
        .where(environment_gates.c.status.in_(list(statuses)), jobs.c.status == "waiting")
        .order_by(environment_gates.c.created_at, environment_gates.c.job_id)
    )
    if org_id is not None:
        query = query.where(environment_gates.c.org_id == org_id)
    if run_id is not None:
        query = query.where(environment_gates.c.run_id == run_id)
    return [
        (_gate(r), {"repo": r.repo, "workflow": r.workflow, "sha": r.sha, "status": r.run_status, "event": r.event})
        for r in await conn.execute(query)
    ]


async def due_timers(conn: AsyncConnection, *, now: dt.datetime, limit: int = 100) -> list[tuple[str, str]]:
    """(run id, job id) of waiting jobs whose wait timer has run out, oldest first."""
    query = (
        sa.select(environment_gates.c.run_id, environment_gates.c.job_id)
        .select_from(environment_gates.join(jobs, jobs.c.id == environment_gates.c.job_id))
        .where(
            environment_gates.c.status == EnvironmentGateStatus.TIMER.value,
            environment_gates.c.ready_at <= now,
            jobs.c.status == "waiting",
        )
        .order_by(environment_gates.c.ready_at)
        .limit(limit)
    )
    return [(str(r.run_id), str(r.job_id)) for r in await conn.execute(query)]


async def variables_of_job(conn: AsyncConnection, job_id: str) -> dict[str, str]:
    """The plain variables of the job's environment (none when it has none, or it is gone)."""
    query = (
        sa.select(environments.c.variables)
        .select_from(
            jobs.join(environments, sa.and_(environments.c.org_id == jobs.c.org_id,
                                            environments.c.name == jobs.c.environment))
        )
        .where(jobs.c.id == job_id)
    )
    found = (await conn.execute(query)).scalar_one_or_none()
    return {str(k): str(v) for k, v in (found or {}).items()}


async def job_environment(conn: AsyncConnection, job_id: str) -> str | None:
    """The environment the job deploys to, resolved when its run was created (None: no environment)."""
    found = (await conn.execute(sa.select(jobs.c.environment).where(jobs.c.id == job_id))).scalar_one_or_none()
    return str(found) if found is not None else None


async def run_authors(conn: AsyncConnection, kind: str, name: str) -> set[str]:
    """The values a run's event `actor` has when this approver started it: a GitHub login; for an admin
    token its label and the `admin token '<name>'` a manual run records."""
    if kind == "github":
        return {name}
    found = (await conn.execute(sa.select(admin_tokens.c.name).where(admin_tokens.c.id == name))).scalar_one_or_none()
    authors = {f"{kind}:{name}"}
    if found is not None:
        authors.add(f"admin token {str(found)!r}")
    return authors
