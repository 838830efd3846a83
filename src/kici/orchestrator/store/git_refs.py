"""The branch heads a polled `git` source had at its last poll (`git_refs`): what the next poll compares
against. Updates are compare-and-set, so with several orchestrators polling one source a move is
recorded (and reported) by one of them."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import git_refs, utcnow


async def known_heads(conn: AsyncConnection, source_id: str) -> dict[str, str]:
    """`refs/heads/<branch>` → commit, as recorded at the previous poll."""
    query = sa.select(git_refs.c.ref, git_refs.c.sha).where(git_refs.c.source_id == source_id)
    return {str(r.ref): str(r.sha) for r in await conn.execute(query)}


async def record_head(conn: AsyncConnection, source_id: str, ref: str, before: str | None, sha: str) -> bool:
    """Move `ref` from `before` (None: not recorded yet) to `sha`; False when the stored head is not
    `before` any more (another poller got there first)."""
    if before is None:
        exists = await conn.execute(
            sa.select(git_refs.c.sha).where(git_refs.c.source_id == source_id, git_refs.c.ref == ref)
        )
        if exists.first() is not None:
            return False
        await conn.execute(git_refs.insert().values(source_id=source_id, ref=ref, sha=sha, updated_at=utcnow()))
        return True
    result = await conn.execute(
        git_refs.update()
        .where(git_refs.c.source_id == source_id, git_refs.c.ref == ref, git_refs.c.sha == before)
        .values(sha=sha, updated_at=utcnow())
    )
    return result.rowcount == 1


async def forget_heads(conn: AsyncConnection, source_id: str, refs: Sequence[str]) -> None:
    """Branches that no longer exist."""
    if refs:
        await conn.execute(git_refs.delete().where(git_refs.c.source_id == source_id, git_refs.c.ref.in_(list(refs))))
