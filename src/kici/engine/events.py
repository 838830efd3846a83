"""The normalized event: what a webhook (or `kici preview` / `kici run local`) becomes before matching.

Providers (GitHub, git, generic) turn their payloads into an `Event`; trigger matching, inline
expressions and the step context (`ctx.event`) all read this one shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

EventType = Literal[
    "push",
    "tag",
    "pr",
    "comment",
    "review",
    "review_comment",
    "release",
    "dispatch",
    "create",
    "delete",
    "status",
    "workflow_run",
    "fork",
    "star",
    "watch",
    "schedule",
    "kici_event",
    "workflow_complete",
    "job_complete",
    "generic_webhook",
    "webhook",
]

PR_ACTIONS_DEFAULT: tuple[str, ...] = ("opened", "synchronize", "reopened", "closed")


class Event(BaseModel):
    """One event, normalized across providers.

    - push: `branch` (= `target_branch`) is the pushed branch.
    - pr: `target_branch` is the base branch, `source_branch` (= `branch`) the head branch.
    - tag: `tag` is the tag name (no `refs/tags/`).
    - `name` is the provider's raw event name (GitHub `X-GitHub-Event`, a kici_event's name, a generic
      webhook's event type); `action` its action where it has one.
    - `changed_files` is None when not known (then a trigger filtering on paths does not match).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: EventType
    action: str | None = None
    name: str | None = None
    branch: str | None = None
    target_branch: str | None = None
    source_branch: str | None = None
    tag: str | None = None
    ref: str | None = None
    sha: str | None = None
    base_sha: str | None = None
    repo: str | None = None
    """`owner/name` of the repository the event is about."""
    source_repo: str | None = None
    """For PRs: the head repository (differs from `repo` for forks)."""
    actor: str | None = None
    default_branch: str | None = None
    changed_files: list[str] | None = None
    inputs: dict[str, Any] = {}
    payload: dict[str, Any] = {}
    source: str | None = None
    """Where the event came from: a generic source name, a workflow name for chained events, …"""
    status: str | None = None
    """workflow_complete / job_complete: the finished status."""
    workflow: str | None = None
    job: str | None = None
    depth: int = 0
    """Chain depth of kici events (emitted by a step); events beyond the limit are dropped."""
    delivery_id: str | None = None
    """The provider's delivery id (dedup, event log, re-runs)."""
    pr_number: int | None = None
    author_association: str | None = None
    """GitHub's `author_association` of the event's author (the PR's author for `pr`, the commenter for
    comments, the reviewer for reviews): OWNER, MEMBER, COLLABORATOR, CONTRIBUTOR, FIRST_TIME_CONTRIBUTOR,
    FIRST_TIMER, NONE, … None for events that carry none (pushes, other providers). Trust policies read it."""

    @property
    def is_fork(self) -> bool:
        """A PR (or review) whose head lives in another repository — including one whose head repository
        was deleted (`source_repo` None), which can no longer be trusted either."""
        return (
            self.type in ("pr", "review", "review_comment")
            and self.repo is not None
            and self.source_repo != self.repo
        )
