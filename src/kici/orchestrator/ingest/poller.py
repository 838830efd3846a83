"""Polling of `git` sources that have `poll_seconds`: for repositories that cannot run a hook.

Every `poll_seconds` the source's branch heads are read (a local path directly, a URL through the
orchestrator's mirror, fetched first) and compared with the heads stored at the previous poll
(`git_refs`). Each branch that moved — or appeared — becomes the same `{ref, before, after}`
notification the hook sends, and goes through the same path (`IngestService.accept_git_push`): dedup, event log,
lock file, runs. The delivery id is derived from ref, before and after exactly as for a hook
notification, so a repository with both a hook and polling gets one run per push.

The first poll of a source records where its branches are and starts nothing: polling reports changes
from then on (a hook is the way to see every push). Deleted branches are forgotten. The stored heads
are updated with a compare-and-set, so with several orchestrators polling the same source a change is
reported once.
"""

from __future__ import annotations

import time

from kici.orchestrator.background import PeriodicTask
from kici.orchestrator.container import AppState, Readiness
from kici.orchestrator.db.schema import SourceKind
from kici.orchestrator.ingest.intake import IngestService
from kici.orchestrator.logs import log_event
from kici.orchestrator.providers.base import ProviderError
from kici.orchestrator.providers.git import GitProvider
from kici.orchestrator.scheduling.registrations import refresh_source_logged
from kici.orchestrator.store import git_refs as git_ref_store
from kici.orchestrator.store.sources import Source, enabled_sources_of_kind, get_source

ZERO_SHA = "0" * 40
TICK_S = 1.0


class GitPoller:
    def __init__(self, state: AppState, intake: IngestService) -> None:
        self.state = state
        self.intake = intake
        self.ingest = intake.ingest
        self._due: dict[str, float] = {}
        self._periodic = PeriodicTask("poll", TICK_S, self.tick)

    async def start(self, readiness: Readiness) -> None:
        await self._periodic.start(readiness)

    async def stop(self) -> None:
        await self._periodic.stop()

    async def tick(self, *, now: float | None = None) -> list[str]:
        """Poll every polled source that is due; the ids polled."""
        now = time.monotonic() if now is None else now
        async with self.state.database.read() as conn:
            candidates = await enabled_sources_of_kind(conn, SourceKind.GIT)
        polled: list[str] = []
        for source in candidates:
            interval = source.git_config().poll_seconds
            if interval is None:
                self._due.pop(source.id, None)
                continue
            if self._due.get(source.id, 0.0) > now:
                continue
            self._due[source.id] = now + interval
            polled.append(source.id)
            try:
                await self.poll(source.id)
            except ProviderError as exc:
                log_event("poll.failed", level="warning", source_id=source.id, error=str(exc))
        return polled

    async def poll(self, source_id: str) -> list[str]:
        """Poll one source now; the refs that moved (and were notified)."""
        async with self.state.database.read() as conn:
            source = await get_source(conn, source_id)
            known = await git_ref_store.known_heads(conn, source_id)
        if source is None or source.kind is not SourceKind.GIT or not source.enabled:
            return []
        provider = self.ingest.provider(source, {})
        assert isinstance(provider, GitProvider)
        heads = await provider.branch_heads()
        first = not known
        moved: list[str] = []
        for ref, sha in sorted(heads.items()):
            before = known.get(ref)
            if before == sha:
                continue
            async with self.state.database.transaction() as conn:
                recorded = await git_ref_store.record_head(conn, source_id, ref, before, sha)
            if not recorded:
                continue  # another orchestrator recorded (and reported) this move
            if first:
                continue
            moved.append(ref)
            await self._notify(source, ref, before or ZERO_SHA, sha)
        gone = [ref for ref in known if ref not in heads]
        if gone:
            async with self.state.database.transaction() as conn:
                await git_ref_store.forget_heads(conn, source_id, gone)
        if first and heads:
            log_event("poll.baseline", source=source.name, branches=len(heads))
            # no push will report the default branch's current lock file: read its schedules now
            await refresh_source_logged(self.state, self.ingest, source)
        return moved

    async def _notify(self, source: Source, ref: str, before: str, after: str) -> None:
        payload = {"ref": ref, "before": before, "after": after}
        outcome = await self.intake.accept_git_push(source.org_id, source, {}, payload)
        log_event("poll.change", source=source.name, ref=ref, before=before[:12], after=after[:12],
                  outcome=outcome.kind.value, status=outcome.status.value if outcome.status else None)

