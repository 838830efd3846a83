"""Where schedule registrations come from: the lock file at the head of a source's default branch.

Registrations are replaced atomically (one transaction per repository) whenever that lock file is read:
- a push to the default branch is ingested (`ingest.pipeline` calls `register_from_lock`);
- a source is added (`refresh_source`, from the admin route);
- a polled git source records its first baseline (`refresh_source`, from the poller; later moves of the
  default branch arrive as pushes).

A lock file without the schedule removes it; no lock file at all removes every schedule of that
repository; a lock file that cannot be read (corrupt, another schema version) leaves them as they are.

The default branch: GitHub says it (`repository.default_branch` in every payload, `GET /repos/…`); a git
source's is its `default_branch` config value, else the branch the repository's HEAD names, else `main`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from kici.engine.lockfile import LockFile, LockFileError, ScheduleTrigger
from kici.orchestrator.container import AppState
from kici.orchestrator.db.schema import SourceKind
from kici.orchestrator.ingest.service import Ingest
from kici.orchestrator.logs import log_event
from kici.orchestrator.providers.base import LockFileSource, ProviderError
from kici.orchestrator.providers.git import GitProvider, repo_name_from_url
from kici.orchestrator.providers.github import GitHubProvider
from kici.orchestrator.scheduling.cron import CronError, check_cron, next_fire
from kici.orchestrator.store import schedules as schedule_store
from kici.orchestrator.store.schedules import Registration, ReplaceResult
from kici.orchestrator.store.sources import Source

FALLBACK_BRANCH = "main"


def registrations_of(lock: LockFile) -> tuple[list[Registration], list[str]]:
    """The schedule triggers of every workflow in `lock`, and the problems of those the scheduler cannot
    evaluate (a cron expression or time zone croniter refuses), which are left out."""
    found: list[Registration] = []
    problems: list[str] = []
    for workflow in lock.workflows:
        for index, trigger in enumerate(workflow.triggers):
            if not isinstance(trigger, ScheduleTrigger):
                continue
            try:
                check_cron(trigger.cron_expression, trigger.timezone)
            except CronError as exc:
                problems.append(f"workflow {workflow.name!r} trigger {index}: {exc}")
                continue
            found.append(
                Registration(workflow.name, index, trigger.cron_expression, trigger.timezone,
                             dict(trigger.inputs or {}))
            )
    return found, problems


async def register_from_lock(
    state: AppState, *, source: Source, repo: str, branch: str, sha: str, lock: LockFile | None
) -> ReplaceResult:
    """Replace `source`/`repo`'s registrations with those of `lock` (None: no lock file, so none)."""
    registrations, problems = registrations_of(lock) if lock is not None else ([], [])
    for problem in problems:
        log_event("schedules.invalid", level="warning", source=source.name, repo=repo, sha=sha, problem=problem)
    async with state.database.transaction() as conn:
        result = await schedule_store.replace_registrations(
            conn, source_id=source.id, repo=repo, branch=branch, lock_commit=sha, registrations=registrations,
            next_fire=next_fire, org_id=source.org_id,
        )
    if result.added or result.changed or result.removed:
        log_event("schedules.registered", source=source.name, repo=repo, branch=branch, sha=sha[:12],
                  added=result.added, changed=result.changed, removed=result.removed, kept=len(result.kept))
    return result


def git_repo_name(source: Source) -> str:
    """The repository name a git source's events (and runs) carry."""
    return str(source.config.get("repo") or repo_name_from_url(str(source.config["url"])))


async def git_default_branch(source: Source, provider: GitProvider) -> str:
    configured = source.config.get("default_branch")
    if isinstance(configured, str) and configured:
        return configured
    return await provider.head_branch() or FALLBACK_BRANCH


@asynccontextmanager
async def open_provider(state: AppState, ingest: Ingest, source: Source) -> AsyncIterator[LockFileSource]:
    """The source's provider, with an HTTP client for the lifetime of the block when it needs one."""
    if source.kind is SourceKind.GIT:
        yield ingest.provider(source, {})
        return
    secrets = await ingest.open_secrets(state.database, source, state.keyring)
    async with ingest.http_client() as client:
        yield ingest.provider(source, secrets, client=client)


async def read_lock(ingest: Ingest, provider: LockFileSource, repo: str, sha: str) -> LockFile | None:
    """The parsed lock file at `sha` through the ingest cache; None when there is none.
    `LockFileError` when it cannot be read, `ProviderError` when the host cannot answer."""
    key = ingest.cache.key(provider.cache_prefix, repo, sha)
    content = await ingest.cache.get(key, lambda: provider.read_lock_file(repo, sha))
    return None if content is None else ingest.cache.parsed(content)


@dataclass(frozen=True)
class Refreshed:
    repo: str
    branch: str
    sha: str | None
    result: ReplaceResult | None
    problem: str | None = None


async def refresh_repo(
    state: AppState, ingest: Ingest, source: Source, provider: LockFileSource, repo: str, branch: str
) -> Refreshed:
    sha = await provider.resolve_ref(repo, branch)
    if sha is None:
        return Refreshed(repo, branch, None, None, f"default branch {branch!r} not found")
    try:
        lock = await read_lock(ingest, provider, repo, sha)
    except LockFileError as exc:
        log_event("schedules.lock_unreadable", level="warning", source=source.name, repo=repo, sha=sha,
                  error=str(exc))
        return Refreshed(repo, branch, sha, None, f"lock file at {sha[:12]} cannot be read: {exc}")
    result = await register_from_lock(state, source=source, repo=repo, branch=branch, sha=sha, lock=lock)
    return Refreshed(repo, branch, sha, result)


async def refresh_source(state: AppState, ingest: Ingest, source: Source) -> list[Refreshed]:
    """Re-read the registrations of `source` from its default branch(es) now. A git source has one
    repository; a GitHub source with an `installation_id` every repository of the installation (without
    one, its registrations come from pushes to each default branch). `ProviderError` when the host
    cannot be read."""
    if source.kind is SourceKind.GENERIC:
        return []  # a generic source reads its workflows from its lock source, which registers them
    async with open_provider(state, ingest, source) as provider:
        if isinstance(provider, GitProvider):
            branch = await git_default_branch(source, provider)
            return [await refresh_repo(state, ingest, source, provider, git_repo_name(source), branch)]
        assert isinstance(provider, GitHubProvider)
        if provider.installation_id is None:
            return []
        refreshed = []
        for repo, default in await provider.installation_repositories():
            branch = default or await provider.default_branch(repo) or FALLBACK_BRANCH
            refreshed.append(await refresh_repo(state, ingest, source, provider, repo, branch))
        return refreshed


async def refresh_source_logged(state: AppState, ingest: Ingest, source: Source) -> list[Refreshed]:
    """`refresh_source` for callers that must not fail (source add, polling): problems are logged."""
    try:
        refreshed = await refresh_source(state, ingest, source)
    except Exception as exc:  # unreachable host, unopenable secrets, a database hiccup: logged, not raised
        reason = str(exc) if isinstance(exc, ProviderError) else f"{type(exc).__name__}: {exc}"
        log_event("schedules.refresh_failed", level="warning", source=source.name, error=reason)
        return []
    for item in refreshed:
        if item.problem is not None:
            log_event("schedules.refresh_problem", level="warning", source=source.name, repo=item.repo,
                      problem=item.problem)
    return refreshed
