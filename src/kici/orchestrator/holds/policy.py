"""A source's trust policy, and what it decides for one event.

The policy lives in the source's config under `trust` (absent: every default). It is read for GitHub
sources only: a `git` or `generic` source's events come from the operator's own hooks and systems, so they
are trusted (docs/operator/trust.md).

What an event from GitHub is:
- trusted: its author's `author_association` is in `trusted_associations`, or the author is one of
  `trusted_users` or a member of one of `trusted_teams` — and, for a pull request, its head lives in the
  base repository (or the policy allows forks);
- otherwise untrusted, and the policy's action for the case applies: `hold` (the run is created `held`
  until approved), `allow` (it runs at once, recorded untrusted, with secrets only when
  `secrets_for_approved` says so), `reject` (no run; the delivery is filtered with a reason).

A fork pull request is judged by `fork_pull_requests` even when its author is trusted: its head can be
pushed to by people the base repository knows nothing about. An event without an author association
(a push, a schedule, a tag) is trusted: only people with write access can cause it.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kici.engine import durations
from kici.engine.durations import format_duration
from kici.engine.events import Event

DEFAULT_TRUSTED_ASSOCIATIONS: tuple[str, ...] = ("OWNER", "MEMBER", "COLLABORATOR")
ASSOCIATIONS = frozenset(
    {"OWNER", "MEMBER", "COLLABORATOR", "CONTRIBUTOR", "FIRST_TIME_CONTRIBUTOR", "FIRST_TIMER", "MANNEQUIN", "NONE"}
)
"""GitHub's `author_association` values."""

_LOGIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})(?:\[bot\])?$")
_TEAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TrustAction(StrEnum):
    HOLD = "hold"
    ALLOW = "allow"
    REJECT = "reject"


def parse_duration(value: str | int | float) -> dt.timedelta:
    """A hold expiry: `72h`, `30m`, `3d`, `1.5h`, or a bare number of hours (also a JSON number);
    `ValueError` otherwise (or when not positive)."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 72h, 30m or 3d")
    return durations.parse_duration(str(value), bare_unit="h", fractions=True)


class TrustPolicy(BaseModel):
    """What a GitHub source does with events from people it does not trust (`config.trust`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fork_pull_requests: TrustAction = TrustAction.HOLD
    """Pull requests (and their reviews) whose head lives in another repository."""
    untrusted_authors: TrustAction = TrustAction.HOLD
    """Events whose author is not trusted (PRs from the base repository, comments, reviews)."""
    trusted_associations: list[str] = Field(default_factory=lambda: list(DEFAULT_TRUSTED_ASSOCIATIONS))
    trusted_users: list[str] = []
    """GitHub logins trusted whatever their association."""
    trusted_teams: list[str] = []
    """`org/team` slugs whose members are trusted (asked through the GitHub API with the installation token)."""
    secrets_for_approved: bool = False
    """Whether an approved run of untrusted code may receive the secrets its jobs declare."""
    hold_expiry: str | None = None
    """How long a held run waits for a decision (`72h`, `3d`); None: `KICI_HOLD_EXPIRY_HOURS`."""

    @field_validator("trusted_associations")
    @classmethod
    def _associations(cls, value: list[str]) -> list[str]:
        out = [v.strip().upper() for v in value]
        unknown = sorted(set(out) - ASSOCIATIONS)
        if unknown:
            raise ValueError(f"unknown association(s) {', '.join(unknown)}; known: {', '.join(sorted(ASSOCIATIONS))}")
        return sorted(set(out), key=out.index)

    @field_validator("trusted_users")
    @classmethod
    def _users(cls, value: list[str]) -> list[str]:
        out = [v.strip() for v in value]
        bad = [v for v in out if not _LOGIN.match(v)]
        if bad:
            raise ValueError(f"not a GitHub login: {', '.join(repr(b) for b in bad)}")
        return sorted(set(out), key=out.index)

    @field_validator("trusted_teams")
    @classmethod
    def _teams(cls, value: list[str]) -> list[str]:
        out = [v.strip() for v in value]
        bad = [v for v in out if not _TEAM.match(v)]
        if bad:
            raise ValueError(f"a team is `org/team-slug`, not {', '.join(repr(b) for b in bad)}")
        return sorted(set(out), key=out.index)

    @field_validator("hold_expiry")
    @classmethod
    def _expiry(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return format_duration(parse_duration(value))

    def expiry(self, default_hours: float) -> dt.timedelta:
        return parse_duration(self.hold_expiry) if self.hold_expiry else dt.timedelta(hours=default_hours)


class TrustPolicyError(ValueError):
    """A trust policy that does not validate; the message names the field."""


def parse_policy(raw: Any) -> TrustPolicy:
    """`config.trust` as a policy (None: the defaults); `TrustPolicyError` naming the first problem."""
    if raw is None:
        return TrustPolicy()
    try:
        return TrustPolicy.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise TrustPolicyError(f"config.trust{'.' + where if where else ''}: {message}") from None


def policy_of(config: Mapping[str, Any]) -> TrustPolicy:
    return parse_policy(config.get("trust"))


TeamCheck = Callable[[str, str], Awaitable[bool]]
"""`(org/team, login)` → whether the user is an active member (GitHub's team-membership endpoint)."""


class TrustDecision(BaseModel):
    model_config = ConfigDict(frozen=True)

    untrusted: bool = False
    action: TrustAction | None = None
    """For an untrusted event: what the policy does with it (None for a trusted one)."""
    reason: str | None = None
    """Why the event is untrusted ("pull request #3 from fork alice/repo by alice (CONTRIBUTOR)")."""


TRUSTED = TrustDecision()


async def author_trusted(policy: TrustPolicy, login: str | None, association: str | None,
                         team_check: TeamCheck | None) -> bool:
    """Whether the policy trusts this GitHub user (association, user list, then team membership)."""
    if association is not None and association.upper() in policy.trusted_associations:
        return True
    if login is None:
        return False
    if login.lower() in {u.lower() for u in policy.trusted_users}:
        return True
    if team_check is not None:
        for team in policy.trusted_teams:
            if await team_check(team, login):
                return True
    return False


def _who(event: Event) -> str:
    login = event.actor or "an unknown user"
    return f"{login} ({event.author_association})" if event.author_association else login


def _author_login(event: Event) -> str | None:
    """The event's author: a PR's author rather than whoever pushed its latest commit."""
    if event.type == "pr":
        user = event.payload.get("pull_request", {}).get("user", {}) if isinstance(event.payload, Mapping) else {}
        login = user.get("login") if isinstance(user, Mapping) else None
        if isinstance(login, str) and login:
            return login
    return event.actor


async def decide(policy: TrustPolicy, event: Event, *, team_check: TeamCheck | None = None) -> TrustDecision:
    """What the policy does with a GitHub event (see the module docstring)."""
    login = _author_login(event)
    if event.type in ("pr", "review", "review_comment") and event.is_fork:
        where = f"fork {event.source_repo}" if event.source_repo else "a deleted fork"
        number = f" #{event.pr_number}" if event.pr_number is not None else ""
        return TrustDecision(
            untrusted=True, action=policy.fork_pull_requests,
            reason=f"pull request{number} from {where} by {_who(event.model_copy(update={'actor': login}))}",
        )
    if event.author_association is None:
        return TRUSTED
    if await author_trusted(policy, login, event.author_association, team_check):
        return TRUSTED
    what = {"pr": "pull request", "comment": "comment", "review": "review", "review_comment": "review comment"}
    number = f" #{event.pr_number}" if event.pr_number is not None else ""
    return TrustDecision(
        untrusted=True, action=policy.untrusted_authors,
        reason=f"{what.get(event.type, event.type)}{number} by untrusted author "
        f"{_who(event.model_copy(update={'actor': login}))}",
    )
