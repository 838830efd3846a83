"""Process-wide ingest state: the lock-file cache, GitHub installation tokens and
the hook called after runs are created (the dispatcher plugs in there)."""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kici.orchestrator.config import Settings
from kici.orchestrator.crypto import Keyring
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import SourceKind
from kici.orchestrator.ingest.lockcache import LockFileCache
from kici.orchestrator.logs import log_event
from kici.orchestrator.providers.base import LockFileSource, ProviderError
from kici.orchestrator.providers.git import GitProvider
from kici.orchestrator.providers.github import GitHubProvider, InstallationTokens
from kici.orchestrator.store.runs import Superseded
from kici.orchestrator.store.sources import DEFAULT_GITHUB_API_URL, Source, load_source_secrets

SECRETS_CACHE_MAX = 256

RunsCreatedHook = Callable[[Sequence[str]], Awaitable[None] | None]
SupersededHook = Callable[[Sequence[Superseded]], Awaitable[None]]


@dataclass
class Ingest:
    cache: LockFileCache
    mirror_root: Path
    tokens: InstallationTokens = field(default_factory=InstallationTokens)
    on_runs_created: RunsCreatedHook | None = None
    """Called with the ids of the runs one delivery created, after they are committed."""
    on_superseded: SupersededHook | None = None
    """Called with the runs a delivery's new runs cancelled (`cancel_in_progress`), after the commit,
    to send `job.cancel` to their agents."""
    http_client: Callable[[], httpx.AsyncClient] = field(default=lambda: httpx.AsyncClient())
    git_providers: dict[str, GitProvider] = field(default_factory=dict)
    secrets: dict[tuple[str, dt.datetime], dict[str, str]] = field(default_factory=dict)
    """Opened source secrets by (source id, last change), so a burst of deliveries decrypts them once."""

    async def open_secrets(self, db: Database, source: Source, key: Keyring | bytes | None) -> dict[str, str]:
        """The source's secrets, decrypted once per change of the source (the cache key is its id and
        `updated_at`, so an update is never served stale). `SourceError` when they cannot be opened."""
        cache_key = (source.id, source.updated_at)
        found = self.secrets.get(cache_key)
        if found is None:
            async with db.read() as conn:
                found = await load_source_secrets(conn, source.id, key)
            if len(self.secrets) >= SECRETS_CACHE_MAX:
                self.secrets.pop(next(iter(self.secrets)))
            self.secrets[cache_key] = found
        return found

    @classmethod
    def from_settings(cls, settings: Settings) -> Ingest:
        return cls(
            cache=LockFileCache(settings.lockfile_cache_max, settings.lockfile_cache_ttl_ms),
            mirror_root=settings.data_dir / "git-mirrors",
        )

    async def superseded(self, cancelled: Sequence[Superseded]) -> None:
        if not cancelled or self.on_superseded is None:
            return
        try:
            await self.on_superseded(list(cancelled))
        except Exception as exc:  # committed already; agents not told now learn it on their next status
            log_event("ingest.supersede_hook_failed", level="warning", error=f"{type(exc).__name__}: {exc}")

    async def runs_created(self, run_ids: Sequence[str]) -> None:
        if not run_ids or self.on_runs_created is None:
            return
        try:
            result = self.on_runs_created(list(run_ids))
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # the runs are committed; a dispatch hiccup must not fail the delivery
            log_event("ingest.dispatch_hook_failed", level="warning", error=f"{type(exc).__name__}: {exc}")

    def forget_source(self, source_id: str) -> None:
        """Drop what this process keeps about a source that changed (or is gone): its cached lock files
        (an answer may depend on its config) and its opened secrets. Its git providers stay: each holds its
        mirror's lock, and a changed URL or mirror setting gets a provider of its own anyway."""
        for kind in SourceKind:
            self.cache.forget_prefix(f"{kind.value}:{source_id}:")
        for key in [k for k in self.secrets if k[0] == source_id]:
            del self.secrets[key]

    def provider(
        self,
        source: Source,
        secrets: dict[str, str],
        *,
        client: httpx.AsyncClient | None = None,
        installation_id: int | None = None,
    ) -> LockFileSource:
        """The provider for a source (git providers are kept: they hold the mirror lock)."""
        if source.kind is SourceKind.GIT:
            git = source.git_config()
            url, mirror = git.url, bool(git.mirror)
            key = f"{source.id}:{url}:{mirror}"
            provider = self.git_providers.get(key)
            if provider is None:
                provider = GitProvider(source.id, url, mirror_root=self.mirror_root, force_mirror=mirror)
                self.git_providers[key] = provider
            return provider
        if source.kind is SourceKind.GITHUB:
            if client is None:
                raise ProviderError("internal: the GitHub provider needs an HTTP client")
            private_key = secrets.get("private_key")
            if not private_key:
                raise ProviderError(f"GitHub source {source.name!r} has no private_key secret")
            github = source.github_config()
            return GitHubProvider(
                source.id,
                client=client,
                tokens=self.tokens,
                app_id=github.app_id,
                private_key=private_key,
                installation_id=installation_id or github.installation_id,
                api_url=github.api_url or DEFAULT_GITHUB_API_URL,
            )
        raise ProviderError(f"source kind {source.kind.value} has no lock-file provider")
