"""`/kici approve` and `/kici reject [reason]` comments on a pull request (GitHub `issue_comment`
`created` deliveries).

The command is case-insensitive and must start a line of the comment (the first command line counts).
A commenter the source's trust policy trusts (association, trusted user, or member of a trusted team)
approves or rejects what is pending on that pull request's runs whose commit is the PR's head *now* (asked
from GitHub with the installation token) — trust holds, and deployment environment gates the commenter is
a reviewer of: a comment cannot approve a commit pushed after the one its author looked at and then
replaced, nor an older one. An untrusted commenter is ignored, with a `denied` audit row and a log
line. Decisions are audited as `held.approve` / `held.reject` with actor `github:<login>`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from kici.engine.events import Event
from kici.orchestrator.db.database import Database
from kici.orchestrator.holds.gates import Approver
from kici.orchestrator.holds.policy import TrustPolicy, policy_of
from kici.orchestrator.holds.service import (
    ACTION_APPROVE,
    ACTION_REJECT,
    AuditContext,
    DecisionRefused,
    HeldRunNotFound,
    HeldService,
    NotHeld,
)
from kici.orchestrator.logs import log_event
from kici.orchestrator.providers.github import GitHubProvider
from kici.orchestrator.store.runs import held_runs_of_pr
from kici.orchestrator.store.sources import Source

_COMMAND = re.compile(r"^[ \t]*/kici[ \t]+(approve|reject)\b[ \t]*(.*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Command:
    verb: str
    """`approve` or `reject`."""
    reason: str | None


def parse_command(body: str) -> Command | None:
    match = _COMMAND.search(body or "")
    if match is None:
        return None
    reason = match.group(2).strip() or None
    return Command(match.group(1).lower(), reason if match.group(1).lower() == "reject" else None)


@dataclass(frozen=True)
class CommentOutcome:
    command: Command
    login: str
    trusted: bool
    decided: list[str]
    """Run ids approved or rejected."""


async def _role(policy: TrustPolicy, login: str, association: str | None, provider: GitHubProvider,
                repo: str) -> str | None:
    """The role the commenter is trusted by (an association, `user`, or `team:<org/slug>`); None: untrusted."""
    if association is not None and association.upper() in policy.trusted_associations:
        return association.upper()
    if login.lower() in {u.lower() for u in policy.trusted_users}:
        return association or "user"
    for team in policy.trusted_teams:
        if await provider.team_member(repo, team, login):
            return f"team:{team}"
    return None


async def handle_comment(
    database: Database, held: HeldService, *, org_id: str, source: Source, event: Event, provider: object,
) -> CommentOutcome | None:
    """Act on a `/kici` command in a PR comment; None when the delivery carries none."""
    if event.type != "comment" or event.action != "created" or event.pr_number is None or not event.repo:
        return None
    comment = event.payload.get("comment") if isinstance(event.payload, Mapping) else None
    if not isinstance(comment, Mapping) or not isinstance(provider, GitHubProvider):
        return None
    command = parse_command(str(comment.get("body") or ""))
    if command is None:
        return None
    user = comment.get("user")
    login = str(user.get("login")) if isinstance(user, Mapping) and user.get("login") else (event.actor or "")
    action = ACTION_APPROVE if command.verb == "approve" else ACTION_REJECT
    ctx = AuditContext(org_id, {"actor": f"github:{login}", "client": "github", "method": "COMMENT",
                                "path": f"{event.repo}#{event.pr_number}"})
    role = await _role(policy_of(source.config), login, event.author_association, provider, event.repo)
    if role is None:
        reason = (f"/kici {command.verb} from {login} ({event.author_association or 'no association'}) ignored: "
                  "not trusted by the source's trust policy")
        log_event("held.comment_ignored", level="warning", repo=event.repo, pr=event.pr_number, login=login,
                  association=event.author_association, command=command.verb)
        await held.record_denied(f"pr:{event.repo}#{event.pr_number}", action, ctx, reason)
        return CommentOutcome(command, login, False, [])
    head = await provider.pull_request_head(event.repo, event.pr_number)
    if head is None:
        log_event("held.comment_no_pr", level="warning", repo=event.repo, pr=event.pr_number)
        return CommentOutcome(command, login, True, [])
    async with database.read() as conn:
        run_ids = await held_runs_of_pr(conn, org_id=org_id, source_id=source.id, repo=event.repo,
                                        pr_number=event.pr_number, sha=head)
    approver = Approver(kind="github", name=login, role=role)
    decided: list[str] = []
    for run_id in run_ids:
        try:
            if command.verb == "approve":
                await held.approve(run_id, approver, ctx)
            else:
                await held.reject(run_id, approver, ctx, command.reason)
        except (HeldRunNotFound, NotHeld):
            continue  # decided by someone else meanwhile
        except DecisionRefused as exc:
            await held.record_denied(f"run:{run_id}", action, ctx, str(exc))
            continue
        decided.append(run_id)
    log_event("held.comment_decided", repo=event.repo, pr=event.pr_number, login=login, command=command.verb,
              head=head, runs=decided)
    return CommentOutcome(command, login, True, decided)
