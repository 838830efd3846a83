"""GitHub webhook deliveries → the normalized `Event` (or a reason why there is nothing to run).

`normalize_github(X-GitHub-Event, parsed body)` is pure and total: it never raises, whatever the payload.
A delivery with nothing to run (`ping`, app `installation*` events, a branch or tag deletion push, a
malformed payload) gives `event=None` and an `ignored_reason`; the result still carries what could be
read (installation id, repository) for the event log and for minting an installation token.

Mapping (GitHub's webhook semantics; `name` is always the raw `X-GitHub-Event`, except dispatch):

- `push` to `refs/heads/X` → `push`: `branch` = `target_branch` = X, `sha` = `after`, `base_sha` =
  `before` (None for a new branch), `changed_files` (see below). A branch deletion is ignored.
- `push` to `refs/tags/T` → `tag`: `tag` = T. A tag deletion is ignored (the `delete` event reports it).
- `push` to any other ref (`refs/notes/…`) → `webhook` with `ref` and `sha`: only catch-all triggers see it.
- `pull_request` → `pr`: `target_branch` = base ref, `source_branch` = `branch` = head ref, `sha` = head
  sha, `base_sha` = base sha, `source_repo` = head repo (None when it was deleted), `ref` =
  `refs/pull/N/head`. `pull_request_review` → `review` and `pull_request_review_comment` →
  `review_comment` carry the same pull-request fields.
- `issue_comment` → `comment` (the payload keeps `issue.pull_request` for `comment(source=…)`).
- `release` → `release` with `tag` = `release.tag_name`. `create` / `delete` → `create` / `delete` with
  `tag` or `branch` and `ref`, from `ref` and `ref_type` (which stay in the payload).
- `status` → `status`: `sha`, `status` = `state`. `workflow_run` → `workflow_run`: `sha` = `head_sha`,
  `branch` = `head_branch`, `source_repo` = `head_repository`.
- `fork`, `star`, `watch` → the same names; a fork's `source_repo` is the new fork (`forkee`).
- `repository_dispatch` → `dispatch`: `name` = `action` = the dispatch type, `inputs` = `client_payload`
  (when an object), `branch` = `target_branch` = the payload's `branch` (else the default branch).
- anything else (`check_suite`, `deployment`, …) → `webhook` with `name` = the event and its `action`;
  `check_suite` / `check_run` also give `sha` and `branch` (their head).

Common to every event: `repo` = `repository.full_name`, `actor` = `sender.login`, `default_branch` =
`repository.default_branch`, `payload` = the original payload, `inputs` = {} (except dispatch).

`sha` is the commit the event is about, as GitHub reports it; it is None for events that name none
(comments, stars, releases, …), which run on the default branch's head. For `status`, `workflow_run` and
`check_*` it can be a fork's commit: reading the lock file there is the orchestrator's trust decision.

**Changed files of a push (the completeness contract).** `Event.changed_files` is a list only when the
push payload proves the list complete; otherwise it stays None and the orchestrator, when some trigger
filters on paths (`triggers.needs_changed_files`), asks the host for the diff between `diff_base(event)`
and `event.sha` (GitHub: the compare API). The payload's list is taken as complete when:

- the push updates an existing branch (`before` is not all zeros) and is not a deletion;
- it is not a force push (`forced: true`): the files of commits dropped from the branch are not listed;
- `commits` is a non-empty list with fewer than 2048 entries (GitHub caps the array at 2048 commits, so a
  list of exactly 2048 cannot be told apart from a truncated one);
- every commit is an object whose `added`, `removed` and `modified` are lists of strings, each shorter
  than 3000 entries (a list that long may be capped).

The list is then the sorted union of those three lists over all commits. It can be a superset of the net
`before..after` diff (a file added then removed again is listed), which errs towards running a workflow.
A new branch's push never has a list: it has no base (`before` is all zeros) and its commit list is not a
diff against anything, so `diff_base` names the default branch instead (a three-dot compare from the
merge base).
Pull-request events never carry a file list; their base is `base_sha` (three-dot `base...head`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kici.engine.events import Event, EventType
from kici.engine.refnames import event_ref_problem

__all__ = [
    "MAX_PUSH_COMMITS",
    "NormalizeResult",
    "changed_files_from_push",
    "diff_base",
    "is_zero_sha",
    "normalize_github",
]

MAX_PUSH_COMMITS = 2048
"""GitHub lists at most this many commits in a push payload; a list this long may be truncated."""

_MAX_FILES_PER_LIST = 3000
"""A per-commit `added`/`removed`/`modified` list this long may have been capped by GitHub."""

_SHA = re.compile(r"[0-9a-fA-F]{40}(?:[0-9a-fA-F]{24})?")  # SHA-1, or SHA-256 object format

_APP_EVENTS = frozenset(
    {"installation", "installation_repositories", "installation_target", "github_app_authorization"}
)
_HOOK_EVENTS = frozenset({"ping", "meta"})


@dataclass(frozen=True, slots=True)
class NormalizeResult:
    """One delivery's outcome. `event` is None when there is nothing to run; `ignored_reason` says why.

    `repo` and `sha` mirror the event's (`sha` None: no commit, run on the default branch's head). For an
    ignored delivery `installation_id` and `repo` are still filled when the payload has them, so the caller
    can log it and pick the installation token; `sha` is then None."""

    event: Event | None
    ignored_reason: str | None
    installation_id: int | None
    repo: str | None
    sha: str | None

    @property
    def ignored(self) -> bool:
        return self.event is None


# ------------------------------------------------------------------------------------------------- public API


def normalize_github(event_name: str, payload: Mapping[str, Any], *, delivery_id: str | None = None) -> NormalizeResult:
    """Normalize one GitHub delivery (`X-GitHub-Event` and the parsed JSON body). Never raises.

    `delivery_id` (`X-GitHub-Delivery`) is carried on the event for dedup, the event log and re-runs."""
    if not isinstance(payload, Mapping) or not all(isinstance(k, str) for k in payload):
        return _ignored("payload is not a JSON object")
    name = event_name.strip() if isinstance(event_name, str) else ""
    common = _Common.read(payload, delivery_id)
    if not name:
        return common.ignored("no event name (X-GitHub-Event header missing)")
    if name in _HOOK_EVENTS:
        return common.ignored(f"{name}: webhook lifecycle event, nothing to run")
    if name in _APP_EVENTS:
        return common.ignored(f"{name}: GitHub App installation event, nothing to run", repo=False)
    builder = _BUILDERS.get(name, _build_other)
    try:
        return builder(name, payload, common)
    except (TypeError, ValueError, AttributeError, RecursionError) as exc:  # pragma: no cover - defensive
        return common.ignored(f"malformed {name} payload: {type(exc).__name__}")


def changed_files_from_push(payload: Mapping[str, Any]) -> list[str] | None:
    """The files a push changed, from its payload alone, or None when the payload cannot prove the list
    complete (see the module docstring for the exact rules). An empty list never comes back: a push that
    lists no file is treated as unknown, not as "nothing changed"."""
    if not isinstance(payload, Mapping):
        return None
    if payload.get("deleted") is True or payload.get("forced") is True:
        return None
    before, after = _sha(payload.get("before")), _sha(payload.get("after"))
    if before is None or after is None or is_zero_sha(before) or is_zero_sha(after):
        return None
    commits = payload.get("commits")
    if not isinstance(commits, list) or not commits or len(commits) >= MAX_PUSH_COMMITS:
        return None
    files: set[str] = set()
    for commit in commits:
        if not isinstance(commit, Mapping):
            return None
        for key in ("added", "removed", "modified"):
            listed = commit.get(key)
            if not isinstance(listed, list) or len(listed) >= _MAX_FILES_PER_LIST:
                return None
            for path in listed:
                if not isinstance(path, str) or not path:
                    return None
                files.add(path)
    return sorted(files) if files else None


def diff_base(event: Event) -> str | None:
    """What to compare `event.sha` against to get the changed files when `event.changed_files` is None:
    a commit sha or a branch name, for a three-dot compare (`base...sha`). None when there is no sensible
    base (no commit, or the first push of the default branch, where every file is new)."""
    if event.sha is None:
        return None
    if event.type == "push":
        if event.base_sha is not None:
            return event.base_sha
        if event.default_branch is not None and event.default_branch != event.branch:
            return event.default_branch
        return None
    if event.type in ("pr", "review", "review_comment"):
        return event.base_sha or event.target_branch
    return None


def is_zero_sha(value: str) -> bool:
    """GitHub's "no commit" marker: all zeros (`before` of a new ref, `after` of a deleted one)."""
    return bool(value) and value.strip("0") == ""


# ---------------------------------------------------------------------------------------------------- helpers


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _sha(value: Any) -> str | None:
    """A well-formed commit sha (lowercased), else None."""
    if isinstance(value, str) and _SHA.fullmatch(value):
        return value.lower()
    return None


def _commit(value: Any) -> str | None:
    """A sha naming a real commit: well-formed and not all zeros."""
    sha = _sha(value)
    return None if sha is None or is_zero_sha(sha) else sha


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _ignored(reason: str) -> NormalizeResult:
    return NormalizeResult(None, reason, None, None, None)


@dataclass(frozen=True, slots=True)
class _Common:
    """The fields every GitHub payload shares."""

    payload: dict[str, Any]
    repo: str | None
    actor: str | None
    default_branch: str | None
    installation_id: int | None
    delivery_id: str | None = None

    @classmethod
    def read(cls, payload: Mapping[str, Any], delivery_id: str | None = None) -> _Common:
        return cls(
            delivery_id=delivery_id if isinstance(delivery_id, str) and delivery_id else None,
            payload=dict(payload),
            repo=_str(_get(payload, "repository", "full_name")),
            actor=_str(_get(payload, "sender", "login")),
            default_branch=_str(_get(payload, "repository", "default_branch")),
            installation_id=_int(_get(payload, "installation", "id")),
        )

    def ignored(self, reason: str, *, repo: bool = True) -> NormalizeResult:
        return NormalizeResult(None, reason, self.installation_id, self.repo if repo else None, None)

    def event(self, type_: EventType, name: str, **fields: Any) -> NormalizeResult:
        values: dict[str, Any] = {
            "repo": self.repo,
            "actor": self.actor,
            "default_branch": self.default_branch,
            "payload": self.payload,
            "delivery_id": self.delivery_id,
        }
        values.update(fields)
        # a name git would refuse to create can only come from a forged or broken delivery: filter it here,
        # before it reaches runs, logs, check names or a `git fetch` command line
        problem = event_ref_problem(
            ref=fields.get("ref"), tag=fields.get("tag"),
            branches=(fields.get("branch"), fields.get("target_branch"), fields.get("source_branch")),
        )
        if problem is not None:
            return self.ignored(problem)
        try:
            event = Event(type=type_, name=name, **values)
        except ValidationError as exc:  # pragma: no cover - every field is type-checked above
            return self.ignored(f"malformed {name} payload: {exc.error_count()} invalid field(s)")
        return NormalizeResult(event, None, self.installation_id, event.repo, event.sha)


Builder = Callable[[str, Mapping[str, Any], _Common], NormalizeResult]


# ----------------------------------------------------------------------------------------------------- builders


def _build_push(name: str, payload: Mapping[str, Any], common: _Common) -> NormalizeResult:
    ref = _str(payload.get("ref"))
    if ref is None:
        return common.ignored("malformed push payload: no ref")
    after = _commit(payload.get("after"))
    base_sha = _commit(payload.get("before"))
    actor = common.actor or _str(_get(payload, "pusher", "name"))
    deleted = payload.get("deleted") is True or is_zero_sha(_str(payload.get("after")) or "")
    if ref.startswith("refs/heads/") and len(ref) > len("refs/heads/"):
        branch = ref[len("refs/heads/") :]
        if deleted:
            return common.ignored(f"branch deletion push ({branch!r}): no commit to run on")
        if after is None:
            return common.ignored("malformed push payload: no commit sha in 'after'")
        return common.event(
            "push",
            name,
            branch=branch,
            target_branch=branch,
            ref=ref,
            sha=after,
            base_sha=base_sha,
            actor=actor,
            changed_files=changed_files_from_push(payload),
        )
    if ref.startswith("refs/tags/") and len(ref) > len("refs/tags/"):
        tag = ref[len("refs/tags/") :]
        if deleted:
            return common.ignored(f"tag deletion push ({tag!r}): no commit to run on")
        if after is None:
            return common.ignored("malformed push payload: no commit sha in 'after'")
        return common.event("tag", name, tag=tag, ref=ref, sha=after, base_sha=base_sha, actor=actor)
    # refs/notes/…, refs/pull/…, or a bare name: not a branch or a tag, so only catch-all triggers see it
    if deleted:
        return common.ignored(f"deletion push ({ref!r}): no commit to run on")
    if after is None:
        return common.ignored("malformed push payload: no commit sha in 'after'")
    return common.event("webhook", name, ref=ref, sha=after, base_sha=base_sha, actor=actor)


def _pr_fields(pr: Mapping[str, Any], common: _Common) -> dict[str, Any]:
    head_ref = _str(_get(pr, "head", "ref"))
    number = _int(pr.get("number"))
    return {
        "target_branch": _str(_get(pr, "base", "ref")),
        "source_branch": head_ref,
        "branch": head_ref,
        "sha": _commit(_get(pr, "head", "sha")),
        "base_sha": _commit(_get(pr, "base", "sha")),
        "ref": f"refs/pull/{number}/head" if number is not None else None,
        "pr_number": number,
        # the base repository; `repository` is the same one, but a PR object is the better witness
        "repo": common.repo or _str(_get(pr, "base", "repo", "full_name")),
        "source_repo": _str(_get(pr, "head", "repo", "full_name")),
    }


def _pr_like(type_: EventType) -> Builder:
    def build(name: str, payload: Mapping[str, Any], common: _Common) -> NormalizeResult:
        pr = payload.get("pull_request")
        if not isinstance(pr, Mapping):
            return common.ignored(f"malformed {name} payload: no pull_request object")
        fields = _pr_fields(pr, common)
        if fields["sha"] is None:
            return common.ignored(f"malformed {name} payload: no pull_request.head.sha")
        # whose association counts: the review's or comment's author for those, else the PR's author
        author = payload.get({"review": "review", "review_comment": "comment"}.get(type_, "pull_request"))
        association = _str(_get(author, "author_association")) if isinstance(author, Mapping) else None
        return common.event(type_, name, action=_str(payload.get("action")), author_association=association, **fields)

    return build


def _action_only(type_: EventType) -> Builder:
    def build(name: str, payload: Mapping[str, Any], common: _Common) -> NormalizeResult:
        return common.event(type_, name, action=_str(payload.get("action")))

    return build


def _build_issue_comment(name: str, payload: Mapping[str, Any], common: _Common) -> NormalizeResult:
    # a comment on a pull request carries the PR's number (`/kici approve`, trust decisions); the head
    # commit is not in the payload
    issue = payload.get("issue")
    on_pr = isinstance(issue, Mapping) and isinstance(issue.get("pull_request"), Mapping)
    return common.event(
        "comment", name, action=_str(payload.get("action")),
        author_association=_str(_get(payload, "comment", "author_association")),
        pr_number=_int(issue.get("number")) if on_pr and isinstance(issue, Mapping) else None,
    )


def _build_release(name: str, payload: Mapping[str, Any], common: _Common) -> NormalizeResult:
    return common.event(
        "release", name, action=_str(payload.get("action")), tag=_str(_get(payload, "release", "tag_name"))
    )


def _ref_event(type_: EventType) -> Builder:
    def build(name: str, payload: Mapping[str, Any], common: _Common) -> NormalizeResult:
        ref = _str(payload.get("ref"))
        ref_type = payload.get("ref_type")
        fields: dict[str, Any] = {}
        if ref is not None and ref_type == "tag":
            fields = {"tag": ref, "ref": f"refs/tags/{ref}"}
        elif ref is not None and ref_type == "branch":
            fields = {"branch": ref, "ref": f"refs/heads/{ref}"}
        return common.event(type_, name, **fields)

    return build


def _build_status(name: str, payload: Mapping[str, Any], common: _Common) -> NormalizeResult:
    return common.event("status", name, sha=_commit(payload.get("sha")), status=_str(payload.get("state")))


def _build_workflow_run(name: str, payload: Mapping[str, Any], common: _Common) -> NormalizeResult:
    run = payload.get("workflow_run")
    return common.event(
        "workflow_run",
        name,
        action=_str(payload.get("action")),
        sha=_commit(_get(run, "head_sha")),
        branch=_str(_get(run, "head_branch")),
        source_repo=_str(_get(run, "head_repository", "full_name")),
    )


def _build_fork(name: str, payload: Mapping[str, Any], common: _Common) -> NormalizeResult:
    return common.event("fork", name, source_repo=_str(_get(payload, "forkee", "full_name")))


def _build_dispatch(name: str, payload: Mapping[str, Any], common: _Common) -> NormalizeResult:
    dispatch_type = _str(payload.get("action"))
    client_payload = payload.get("client_payload")
    inputs = (
        dict(client_payload)
        if isinstance(client_payload, Mapping) and all(isinstance(k, str) for k in client_payload)
        else {}
    )
    branch = _str(payload.get("branch")) or common.default_branch
    return common.event(
        "dispatch",
        dispatch_type or name,
        action=dispatch_type,
        inputs=inputs,
        branch=branch,
        target_branch=branch,
    )


def _build_other(name: str, payload: Mapping[str, Any], common: _Common) -> NormalizeResult:
    fields: dict[str, Any] = {}
    if name in ("check_suite", "check_run"):
        obj = payload.get(name)
        fields = {"sha": _commit(_get(obj, "head_sha")), "branch": _str(_get(obj, "head_branch"))}
    return common.event("webhook", name, action=_str(payload.get("action")), **fields)


_BUILDERS: dict[str, Builder] = {
    "push": _build_push,
    "pull_request": _pr_like("pr"),
    "pull_request_review": _pr_like("review"),
    "pull_request_review_comment": _pr_like("review_comment"),
    "issue_comment": _build_issue_comment,
    "release": _build_release,
    "create": _ref_event("create"),
    "delete": _ref_event("delete"),
    "status": _build_status,
    "workflow_run": _build_workflow_run,
    "fork": _build_fork,
    "star": _action_only("star"),
    "watch": _action_only("watch"),
    "repository_dispatch": _build_dispatch,
}
