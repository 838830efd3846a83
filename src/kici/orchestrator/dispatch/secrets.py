"""The secrets a job declares (`job(..., secrets=[...])`, the lock file's `secrets`), resolved at dispatch.

A job receives exactly the names it declares, each from the most specific scope that holds it —
`env:<the job's environment>`, then `repo:<the run's repository>`, then `org` — and only when its run may
have secrets (`runs.secrets_allowed`: false for runs of untrusted code). The lookup of every name in every
scope is one statement, and the delivery record (names and scopes, never values) is written in the same
transaction — the dispatcher runs `deliver` in the transaction that claims the job — so a value never
leaves without its record. Jobs that declare nothing cost nothing here.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine.lockfile import Job
from kici.orchestrator.crypto import Keyring
from kici.orchestrator.dispatch.payload import DispatchError
from kici.orchestrator.store import secret_deliveries as delivery_store
from kici.orchestrator.store import secrets as secret_store
from kici.orchestrator.store.runs import RunRecord

__all__ = ["JobSecretsError", "deliver", "lookup_scopes", "withheld"]


class JobSecretsError(DispatchError):
    """The job's declared secrets cannot be delivered (withheld, missing, unreadable): it fails before any
    step with this message."""


def lookup_scopes(run: RunRecord, environment: str | None) -> list[str]:
    """Where the job's secrets are looked up, most specific first. `environment`: the job's deployment
    environment as resolved when its run was created (`jobs.environment`; a `lambda event: …` has its
    value only there)."""
    scopes = [f"env:{environment}"] if environment else []
    return [*scopes, f"repo:{run.repo}", "org"]


def withheld(run: RunRecord, lock_job: Job) -> JobSecretsError:
    """Why a run that may not have secrets (untrusted code) gets none of the job's."""
    return JobSecretsError(
        f"secrets {', '.join(lock_job.secrets or [])} withheld: this run is of untrusted code "
        f"(trust: {run.trust}), and runs of untrusted code get no secrets"
    )


async def deliver(
    conn: AsyncConnection, keys: Keyring, *, run: RunRecord, lock_job: Job, environment: str | None, job_id: str,
    attempt: int,
) -> dict[str, str] | JobSecretsError:
    """The values of the job's declared secrets, with their delivery recorded in `conn`'s transaction; or
    (nothing recorded) why they cannot be delivered — returned, not raised, so a group-committed
    transaction shared with other writes is not rolled back for it."""
    if lock_job.secrets and not run.secrets_allowed:
        return withheld(run, lock_job)
    names = list(lock_job.secrets or [])
    scopes = lookup_scopes(run, environment)
    try:
        found = await secret_store.resolve_secrets(conn, keys, names=names, scopes=scopes, org_id=run.org_id)
    except secret_store.SecretError as exc:
        return JobSecretsError(str(exc))
    if found.missing:
        looked = ", ".join(scopes)
        return JobSecretsError("; ".join(f"secret {name} not found (looked in {looked})" for name in found.missing))
    await delivery_store.record_delivery(conn, run_id=run.id, job_id=job_id, attempt=attempt, scopes=found.scopes)
    return found.values
