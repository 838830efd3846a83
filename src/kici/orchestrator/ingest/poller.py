"""Polling of `git` sources that have `poll_seconds`: for repositories that cannot run a hook.

Every `poll_seconds` the source's branch heads are read (a local path directly, a URL through the
orchestrator's mirror, fetched first) and compared with the heads stored at the previous poll
(`git_refs`). Each branch that moved — or appeared — becomes the same `{ref, before, after}`
notification the hook sends, and goes through the same path (`accept_git_push`): dedup, event log,
lock file, runs. The delivery id is derived from ref, before and after exactly as for a hook
notification, so a repository with both a hook and polling gets one run per push.

The first poll of a source records where its branches are and starts nothing: polling reports changes
from then on (a hook is the way to see every push). Deleted branches are forgotten. The stored heads
are updated with a compare-and-set, so with several orchestrators polling the same source a change is
reported once.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from kici.orchestrator.app import AppState, Readiness
from kici.orchestrator.background import PeriodicTask
from kici.orchestrator.db.schema import SourceKind, git_refs, sources, utcnow
from kici.orchestrator.ingest.routes import accept_git_push
from kici.orchestrator.ingest.service import Ingest
from kici.orchestrator.logs import log_event
from kici.orchestrator.providers.base import ProviderError
from kici.orchestrator.providers.git import GitProvider
from kici.orchestrator.store.sources import Source, get_source

ZERO_SHA = "0" * 40
TICK_S = 1.0


class GitPoller:
    def __init__(self, state: AppState, ingest: Ingest) -> None:
        self.state = state
        self.ingest = ingest
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
            rows = list(
                await conn.execute(
                    sa.select(sources.c.id, sources.c.config).where(
                        sources.c.kind == SourceKind.GIT.value, sources.c.enabled.is_(True)
                    )
                )
            )
        polled: list[str] = []
        for row in rows:
            interval = _interval(row.config)
            if interval is None:
                self._due.pop(row.id, None)
                continue
            if self._due.get(row.id, 0.0) > now:
                continue
            self._due[row.id] = now + interval
            polled.append(row.id)
            try:
                await self.poll(row.id)
            except ProviderError as exc:
                log_event("poll.failed", level="warning", source_id=row.id, error=str(exc))
        return polled

    async def poll(self, source_id: str) -> list[str]:
        """Poll one source now; the refs that moved (and were notified)."""
        async with self.state.database.read() as conn:
            source = await get_source(conn, source_id)
            known = {
                r.ref: r.sha
                for r in await conn.execute(sa.select(git_refs.c.ref, git_refs.c.sha).where(
                    git_refs.c.source_id == source_id
                ))
            }
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
            if not await self._store(source_id, ref, before, sha):
                continue  # another orchestrator recorded (and reported) this move
            if first:
                continue
            moved.append(ref)
            await self._notify(source, ref, before or ZERO_SHA, sha)
        gone = [ref for ref in known if ref not in heads]
        if gone:
            async with self.state.database.transaction() as conn:
                await conn.execute(git_refs.delete().where(git_refs.c.source_id == source_id, git_refs.c.ref.in_(gone)))
        if first and heads:
            log_event("poll.baseline", source=source.name, branches=len(heads))
        return moved

    async def _store(self, source_id: str, ref: str, before: str | None, sha: str) -> bool:
        async with self.state.database.transaction() as conn:
            if before is None:
                exists = (await conn.execute(
                    sa.select(git_refs.c.sha).where(git_refs.c.source_id == source_id, git_refs.c.ref == ref)
                )).first()
                if exists is not None:
                    return False
                await conn.execute(git_refs.insert().values(source_id=source_id, ref=ref, sha=sha,
                                                            updated_at=utcnow()))
                return True
            result = await conn.execute(
                git_refs.update()
                .where(git_refs.c.source_id == source_id, git_refs.c.ref == ref, git_refs.c.sha == before)
                .values(sha=sha, updated_at=utcnow())
            )
            return result.rowcount == 1

    async def _notify(self, source: Source, ref: str, before: str, after: str) -> None:
        payload = {"ref": ref, "before": before, "after": after}
        response = await accept_git_push(self.state, self.ingest, source.org_id, source, {}, payload)
        log_event("poll.change", source=source.name, ref=ref, before=before[:12], after=after[:12],
                  status=response.status_code)


def _interval(config: Any) -> float | None:
    value = config.get("poll_seconds") if isinstance(config, dict) else None
    return float(value) if isinstance(value, int | float) and value > 0 else None
