"""Trust policies: validation, what they decide for events built from GitHub's published payloads, and
the `/kici` comment command grammar."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from kici.engine.durations import format_duration
from kici.engine.events import Event
from kici.engine.github_events import normalize_github
from kici.orchestrator.holds.comments import Command, parse_command
from kici.orchestrator.holds.gates import Approver
from kici.orchestrator.holds.policy import (
    TrustAction,
    TrustPolicy,
    TrustPolicyError,
    decide,
    parse_duration,
    parse_policy,
)
from kici.orchestrator.holds.trust import github_eligible
from tests.paths import GITHUB_FIXTURES


def pr_event(*, login: str = "Codertocat", association: str | None = "OWNER", fork: str | None = None) -> Event:
    payload: dict[str, Any] = json.loads((GITHUB_FIXTURES / "pull_request.opened.json").read_bytes())
    payload["pull_request"]["user"]["login"] = login
    payload["sender"]["login"] = login
    if association is None:
        del payload["pull_request"]["author_association"]
    else:
        payload["pull_request"]["author_association"] = association
    if fork is not None:
        payload["pull_request"]["head"]["repo"]["full_name"] = fork
    event = normalize_github("pull_request", payload).event
    assert event is not None
    return event


def test_defaults() -> None:
    policy = parse_policy(None)
    assert policy == TrustPolicy()
    assert policy.fork_pull_requests is TrustAction.HOLD and policy.untrusted_authors is TrustAction.HOLD
    assert policy.trusted_associations == ["OWNER", "MEMBER", "COLLABORATOR"]
    assert policy.secrets_for_approved is False and policy.expiry(72) == dt.timedelta(hours=72)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"fork_pull_requests": "sometimes"}, "config.trust.fork_pull_requests: Input should be 'hold', 'allow' or"),
        ({"trusted_associations": ["owner", "FRIEND"]}, "config.trust.trusted_associations: unknown association(s)"),
        ({"trusted_users": ["not a login"]}, "config.trust.trusted_users: not a GitHub login: 'not a login'"),
        ({"trusted_teams": ["maintainers"]}, "config.trust.trusted_teams: a team is `org/team-slug`"),
        ({"hold_expiry": "0h"}, "config.trust.hold_expiry: invalid duration '0h': must be more than zero"),
        ({"hold_expiry": "tomorrow"}, "config.trust.hold_expiry: invalid duration 'tomorrow': expected a duration"),
        ({"extra": 1}, "config.trust.extra: Extra inputs are not permitted"),
        ("hold", "config.trust: Input should be a valid dictionary"),
    ],
)
def test_invalid_policies_name_the_field(raw: Any, message: str) -> None:
    with pytest.raises(TrustPolicyError) as caught:
        parse_policy(raw)
    assert str(caught.value).startswith(message), str(caught.value)


def test_values_are_normalized() -> None:
    policy = parse_policy({"trusted_associations": ["member", "MEMBER", "owner"], "trusted_users": ["a", "a", "b"],
                           "hold_expiry": "3d"})
    assert policy.trusted_associations == ["MEMBER", "OWNER"] and policy.trusted_users == ["a", "b"]
    assert policy.hold_expiry == "72h" and policy.expiry(1) == dt.timedelta(hours=72)


@pytest.mark.parametrize(("text", "seconds", "shown"), [
    ("72h", 259200, "72h"), ("30m", 1800, "30m"), ("90s", 90, "90s"), ("2d", 172800, "48h"), ("1.5h", 5400, "90m"),
    ("4", 14400, "4h"),
])
def test_durations(text: str, seconds: int, shown: str) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)
    assert format_duration(parse_duration(text)) == shown


async def test_trusted_member_pr_is_trusted() -> None:
    decision = await decide(TrustPolicy(), pr_event(association="MEMBER"))
    assert not decision.untrusted and decision.action is None


async def test_fork_pr_is_untrusted_even_from_an_owner() -> None:
    decision = await decide(TrustPolicy(), pr_event(login="alice", association="OWNER", fork="alice/Hello-World"))
    assert decision.untrusted and decision.action is TrustAction.HOLD
    assert decision.reason == "pull request #2 from fork alice/Hello-World by alice (OWNER)"
    allowed = await decide(TrustPolicy(fork_pull_requests=TrustAction.ALLOW), pr_event(fork="alice/Hello-World"))
    assert allowed.untrusted and allowed.action is TrustAction.ALLOW


async def test_unknown_author_follows_untrusted_authors() -> None:
    policy = TrustPolicy(untrusted_authors=TrustAction.REJECT)
    decision = await decide(policy, pr_event(login="bob", association="FIRST_TIME_CONTRIBUTOR"))
    assert decision.action is TrustAction.REJECT
    assert decision.reason == "pull request #2 by untrusted author bob (FIRST_TIME_CONTRIBUTOR)"


async def test_trusted_users_and_teams() -> None:
    asked: list[tuple[str, str]] = []

    async def team_check(team: str, login: str) -> bool:
        asked.append((team, login))
        return login == "erin"

    policy = TrustPolicy(trusted_users=["Dave"], trusted_teams=["octo/maint"])
    assert not (await decide(policy, pr_event(login="dave", association="NONE"), team_check=team_check)).untrusted
    assert asked == []  # a trusted user needs no API call
    assert not (await decide(policy, pr_event(login="erin", association="NONE"), team_check=team_check)).untrusted
    assert (await decide(policy, pr_event(login="frank", association="NONE"), team_check=team_check)).untrusted
    assert asked == [("octo/maint", "erin"), ("octo/maint", "frank")]


async def test_events_without_an_association_are_trusted() -> None:
    push = Event(type="push", branch="main", sha="a" * 40, repo="o/r", actor="anyone")
    assert not (await decide(TrustPolicy(), push)).untrusted


async def test_comments_are_judged_by_the_commenter() -> None:
    payload = json.loads((GITHUB_FIXTURES / "issue_comment.created.json").read_bytes())
    payload["comment"]["author_association"] = "NONE"
    payload["sender"]["login"] = "mallory"
    event = normalize_github("issue_comment", payload).event
    assert event is not None
    decision = await decide(TrustPolicy(), event)
    assert decision.untrusted and decision.reason == "comment by untrusted author mallory (NONE)"


@pytest.mark.parametrize(("body", "expected"), [
    ("/kici approve", Command("approve", None)),
    ("LGTM\n  /KICI Approve  \nthanks", Command("approve", None)),
    ("/kici reject too risky", Command("reject", "too risky")),
    ("/kici reject", Command("reject", None)),
    ("/kici approve later maybe", Command("approve", None)),
    ("please /kici approve", None),
    ("/kici approved", None),
    ("/kici", None),
    ("", None),
])
def test_comment_commands(body: str, expected: Command | None) -> None:
    assert parse_command(body) == expected


def test_github_approver_eligibility() -> None:
    policy = TrustPolicy(trusted_users=["dave"], trusted_teams=["octo/maint"])
    assert github_eligible(policy, Approver(kind="github", name="x", role="MEMBER"))
    assert github_eligible(policy, Approver(kind="github", name="Dave", role="NONE"))
    assert github_eligible(policy, Approver(kind="github", name="x", role="team:octo/maint"))
    assert not github_eligible(policy, Approver(kind="github", name="x", role="team:octo/other"))
    assert not github_eligible(policy, Approver(kind="github", name="x", role="CONTRIBUTOR"))
