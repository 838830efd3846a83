"""Admin tokens (`kici_…`, for the admin API) and agent tokens (`kat_…`, for agents' WebSocket auth).

Only the SHA-256 of a token is stored. The plaintext exists in `CreatedToken.plaintext` once, at
creation, for the caller to show; nothing can recover it afterwards. Verification hashes the presented
token and looks the hash up: the lookup's timing can only reveal something about a hash, which does not
help guess a token, so no constant-time comparison is needed here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import DEFAULT_ORG_ID, AdminRole, admin_tokens, agent_tokens, new_id, utcnow

ADMIN_TOKEN_PREFIX = "kici_"
AGENT_TOKEN_PREFIX = "kat_"


def generate_admin_token() -> str:
    """`kici_` + 32 random bytes in hex."""
    return ADMIN_TOKEN_PREFIX + secrets.token_hex(32)


def generate_agent_token() -> str:
    """`kat_` + 64 hex characters (32 random bytes)."""
    return AGENT_TOKEN_PREFIX + secrets.token_hex(32)


def hash_token(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    org_id: str
    name: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    """None: never expires. Past it the token is refused like a revoked one."""

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= utcnow()

    @property
    def active(self) -> bool:
        return self.revoked_at is None and not self.expired


class AdminToken(_Record):
    role: AdminRole


class AgentToken(_Record):
    labels: list[str]
    allow_root_steps: bool = False
    """Agents using it may run job steps as root (otherwise an agent reporting root steps is refused)."""


class CreatedAdminToken(BaseModel):
    model_config = ConfigDict(frozen=True)

    token: AdminToken
    plaintext: str
    """Shown to the operator once; never stored."""


class CreatedAgentToken(BaseModel):
    model_config = ConfigDict(frozen=True)

    token: AgentToken
    plaintext: str


_ADMIN_COLUMNS = [c for c in admin_tokens.c if c.name != "token_hash"]
_AGENT_COLUMNS = [c for c in agent_tokens.c if c.name != "token_hash"]


def _admin(row: Any) -> AdminToken:
    return AdminToken.model_validate(dict(row._mapping))


def _agent(row: Any) -> AgentToken:
    return AgentToken.model_validate(dict(row._mapping))


# -- admin tokens -----------------------------------------------------------------------------------


async def create_admin_token(
    conn: AsyncConnection,
    *,
    name: str,
    role: AdminRole | str,
    org_id: str = DEFAULT_ORG_ID,
    plaintext: str | None = None,
    expires_at: dt.datetime | None = None,
) -> CreatedAdminToken:
    """A new admin token. `plaintext` pins the token (the bootstrap token from the environment);
    otherwise one is generated. `expires_at`: refused from then on (None: never)."""
    plaintext = plaintext or generate_admin_token()
    token_id = new_id()
    values = {
        "id": token_id,
        "org_id": org_id,
        "name": name,
        "role": AdminRole(role).value,
        "token_hash": hash_token(plaintext),
        "created_at": utcnow(),
        "expires_at": expires_at,
    }
    await conn.execute(admin_tokens.insert().values(**values))
    return CreatedAdminToken(token=await _get_admin(conn, token_id), plaintext=plaintext)


async def _get_admin(conn: AsyncConnection, token_id: str) -> AdminToken:
    row = (await conn.execute(sa.select(*_ADMIN_COLUMNS).where(admin_tokens.c.id == token_id))).one()
    return _admin(row)


async def find_admin_token(conn: AsyncConnection, plaintext: str) -> AdminToken | None:
    """The token with this plaintext, revoked or not (bootstrap uses this to respect a revocation)."""
    row = (
        await conn.execute(sa.select(*_ADMIN_COLUMNS).where(admin_tokens.c.token_hash == hash_token(plaintext)))
    ).first()
    return _admin(row) if row is not None else None


async def verify_admin_token(conn: AsyncConnection, plaintext: str, *, touch: bool = True) -> AdminToken | None:
    """The active token matching `plaintext`, or None. `touch` records the use in `last_used_at`."""
    token = await find_admin_token(conn, plaintext)
    if token is None or not token.active:
        return None
    if touch:
        now = utcnow()
        await conn.execute(admin_tokens.update().where(admin_tokens.c.id == token.id).values(last_used_at=now))
        token = token.model_copy(update={"last_used_at": now})
    return token


async def list_admin_tokens(
    conn: AsyncConnection, *, org_id: str = DEFAULT_ORG_ID, include_revoked: bool = False
) -> list[AdminToken]:
    query = sa.select(*_ADMIN_COLUMNS).where(admin_tokens.c.org_id == org_id)
    if not include_revoked:
        query = query.where(admin_tokens.c.revoked_at.is_(None))
    rows = await conn.execute(query.order_by(admin_tokens.c.created_at, admin_tokens.c.id))
    return [_admin(row) for row in rows]


def _unexpired(column: sa.ColumnElement[dt.datetime]) -> sa.ColumnElement[bool]:
    return sa.or_(column.is_(None), column > utcnow())


async def count_active_admin_tokens(conn: AsyncConnection, *, org_id: str | None = None) -> int:
    """Tokens neither revoked nor expired."""
    query = sa.select(sa.func.count()).select_from(admin_tokens).where(
        admin_tokens.c.revoked_at.is_(None), _unexpired(admin_tokens.c.expires_at)
    )
    if org_id is not None:
        query = query.where(admin_tokens.c.org_id == org_id)
    return int((await conn.execute(query)).scalar_one())


async def revoke_admin_token(conn: AsyncConnection, token_id: str, *, org_id: str = DEFAULT_ORG_ID) -> bool:
    """Revoke an active token; False when there is no such active token (unknown or already revoked)."""
    result = await conn.execute(
        admin_tokens.update()
        .where(admin_tokens.c.id == token_id, admin_tokens.c.org_id == org_id, admin_tokens.c.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return result.rowcount == 1


async def set_admin_token_role(conn: AsyncConnection, token_id: str, role: AdminRole | str) -> bool:
    result = await conn.execute(
        admin_tokens.update().where(admin_tokens.c.id == token_id).values(role=AdminRole(role).value)
    )
    return result.rowcount == 1


# -- agent tokens -----------------------------------------------------------------------------------


async def create_agent_token(
    conn: AsyncConnection,
    *,
    name: str,
    labels: Sequence[str] = (),
    org_id: str = DEFAULT_ORG_ID,
    allow_root_steps: bool = False,
    expires_at: dt.datetime | None = None,
) -> CreatedAgentToken:
    """A new agent token; `labels` are the labels an agent using it may register with;
    `allow_root_steps` lets its agents run job steps as root; `expires_at`: refused from then on."""
    plaintext = generate_agent_token()
    token_id = new_id()
    values = {
        "id": token_id,
        "org_id": org_id,
        "name": name,
        "labels": list(labels),
        "allow_root_steps": allow_root_steps,
        "token_hash": hash_token(plaintext),
        "created_at": utcnow(),
        "expires_at": expires_at,
    }
    await conn.execute(agent_tokens.insert().values(**values))
    row = (await conn.execute(sa.select(*_AGENT_COLUMNS).where(agent_tokens.c.id == token_id))).one()
    return CreatedAgentToken(token=_agent(row), plaintext=plaintext)


async def verify_agent_token(conn: AsyncConnection, plaintext: str, *, touch: bool = True) -> AgentToken | None:
    row = (
        await conn.execute(
            sa.select(*_AGENT_COLUMNS).where(
                agent_tokens.c.token_hash == hash_token(plaintext),
                agent_tokens.c.revoked_at.is_(None),
                _unexpired(agent_tokens.c.expires_at),
            )
        )
    ).first()
    if row is None:
        return None
    token = _agent(row)
    if touch:
        now = utcnow()
        await conn.execute(agent_tokens.update().where(agent_tokens.c.id == token.id).values(last_used_at=now))
        token = token.model_copy(update={"last_used_at": now})
    return token


async def find_agent_token(conn: AsyncConnection, *, token_hash: str) -> AgentToken | None:
    """The agent token whose plaintext hashes to `token_hash` (`hash_token`), revoked or not."""
    row = (await conn.execute(sa.select(*_AGENT_COLUMNS).where(agent_tokens.c.token_hash == token_hash))).first()
    return _agent(row) if row is not None else None


async def agent_token_with_hash(conn: AsyncConnection, token_id: str) -> tuple[AgentToken, str] | None:
    """The agent token with this id, revoked or not, and its stored hash."""
    row = (
        await conn.execute(sa.select(*_AGENT_COLUMNS, agent_tokens.c.token_hash).where(agent_tokens.c.id == token_id))
    ).first()
    if row is None:
        return None
    values = dict(row._mapping)
    digest = str(values.pop("token_hash"))
    return AgentToken.model_validate(values), digest


async def touch_agent_token(conn: AsyncConnection, token_id: str, *, now: dt.datetime | None = None) -> None:
    """Record that the token was used (`last_used_at`)."""
    await conn.execute(agent_tokens.update().where(agent_tokens.c.id == token_id).values(last_used_at=now or utcnow()))


async def list_agent_tokens(
    conn: AsyncConnection, *, org_id: str = DEFAULT_ORG_ID, include_revoked: bool = False
) -> list[AgentToken]:
    query = sa.select(*_AGENT_COLUMNS).where(agent_tokens.c.org_id == org_id)
    if not include_revoked:
        query = query.where(agent_tokens.c.revoked_at.is_(None))
    rows = await conn.execute(query.order_by(agent_tokens.c.created_at, agent_tokens.c.id))
    return [_agent(row) for row in rows]


async def revoke_agent_token(conn: AsyncConnection, token_id: str, *, org_id: str = DEFAULT_ORG_ID) -> bool:
    result = await conn.execute(
        agent_tokens.update()
        .where(agent_tokens.c.id == token_id, agent_tokens.c.org_id == org_id, agent_tokens.c.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return result.rowcount == 1


async def agent_token_state(conn: AsyncConnection, token_id: str) -> str:
    """`active`, `revoked`, `expired` or `unknown` (connected agents re-check this)."""
    row = (
        await conn.execute(
            sa.select(agent_tokens.c.revoked_at, agent_tokens.c.expires_at).where(agent_tokens.c.id == token_id)
        )
    ).first()
    if row is None:
        return "unknown"
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= utcnow():
        return "expired"
    return "active"


async def agent_token_active(conn: AsyncConnection, token_id: str) -> bool:
    """Whether the agent token exists and is neither revoked nor expired."""
    return await agent_token_state(conn, token_id) == "active"
