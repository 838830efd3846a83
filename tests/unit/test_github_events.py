"""GitHub webhook normalization (`kici.engine.github_events`): every real fixture in
`tests/fixtures/github-webhooks` against its facts table, the push changed-files contract, odd payloads,
and the normalized events going through the real trigger matcher."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kici.engine.events import Event
from kici.engine.github_events import (
    MAX_PUSH_COMMITS,
    NormalizeResult,
    changed_files_from_push,
    diff_base,
    is_zero_sha,
    normalize_github,
)
from kici.engine.lockfile import (
    BranchPattern,
    CommentTrigger,
    CreateTrigger,
    DeleteTrigger,
    DispatchTrigger,
    ForkTrigger,
    PrTrigger,
    PushTrigger,
    ReleaseTrigger,
    ReviewCommentTrigger,
    ReviewTrigger,
    StarTrigger,
    StatusTrigger,
    TagTrigger,
    Trigger,
    WatchTrigger,
    WebhookTrigger,
    WorkflowRunTrigger,
)
from kici.engine.triggers import match_trigger
from tests.paths import GITHUB_FIXTURES

FIXTURE_DIR = GITHUB_FIXTURES
FIXTURE_FILES = sorted(FIXTURE_DIR.glob("*.json"))
FIXTURES: list[Any] = FIXTURE_FILES

HEAD = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
BASE = "f95f852bd8fca8fcc58a9a2d6c842781e32a215e"
INITIAL = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
HELLO = "Codertocat/Hello-World"
OCTO = "octo-org/octo-repo"


def event_name_of(path: Path) -> str:
    """`pull_request.opened.json` → `pull_request`, `push.tag-created.json` → `push`, `fork.json` → `fork`."""
    return path.name.split(".")[0]


def load(name: str) -> tuple[bytes, dict[str, Any]]:
    raw = (FIXTURE_DIR / name).read_bytes()
    return raw, json.loads(raw)


def normalized(name: str) -> NormalizeResult:
    _, payload = load(name)
    return normalize_github(event_name_of(Path(name)), payload, delivery_id="72d3162e-cc78-11e3-81ab-4c9367dc0958")


def event_of(name: str) -> Event:
    result = normalized(name)
    assert result.event is not None, result.ignored_reason
    return result.event


def glob(pattern: str) -> BranchPattern:
    return BranchPattern(type="glob", pattern=pattern)


# ---------------------------------------------------------------------------- every fixture, exact fields

_PR_FIELDS: dict[str, Any] = {
    "branch": "changes",
    "target_branch": "master",
    "source_branch": "changes",
    "ref": "refs/pull/2/head",
    "sha": HEAD,
    "base_sha": BASE,
    "repo": HELLO,
    "source_repo": HELLO,
    "actor": "Codertocat",
    "default_branch": "master",
}
_HELLO_COMMON: dict[str, Any] = {"repo": HELLO, "actor": "Codertocat", "default_branch": "master"}

# file → (installation id, the expected Event's fields without `payload`, or the ignored reason)
EXPECTED: dict[str, tuple[int | None, dict[str, Any] | str]] = {
    "push.branch-with-commits.json": (
        None,
        {
            "type": "push",
            "name": "push",
            "branch": "changes",
            "target_branch": "changes",
            "ref": "refs/heads/changes",
            "sha": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
            "base_sha": "9049f1265b7d61be4a8904a9a27120d2064dab3b",
            "repo": "baxterthehacker/public-repo",
            "actor": "baxterthehacker",
            "default_branch": "master",
            "changed_files": ["README.md"],
        },
    ),
    "push.branch-created.json": (
        1,
        {
            "type": "push",
            "name": "push",
            "branch": "master",
            "target_branch": "master",
            "ref": "refs/heads/master",
            "sha": INITIAL,
            "base_sha": None,  # before is all zeros: a new branch
            "changed_files": None,  # no base to diff against: the orchestrator asks the compare API
            **_HELLO_COMMON,
        },
    ),
    "push.tag-created.json": (
        5,
        {"type": "tag", "name": "push", "tag": "simple-tag", "ref": "refs/tags/simple-tag", "sha": INITIAL}
        | _HELLO_COMMON,
    ),
    "push.tag-deleted.json": (1, "tag deletion push ('simple-tag'): no commit to run on"),
    "pull_request.opened.json": (1, {"type": "pr", "name": "pull_request", "action": "opened", **_PR_FIELDS}),
    "pull_request.synchronize.json": (1, {"type": "pr", "name": "pull_request", "action": "synchronize", **_PR_FIELDS}),
    "pull_request.reopened.json": (1, {"type": "pr", "name": "pull_request", "action": "reopened", **_PR_FIELDS}),
    "pull_request.closed.json": (1, {"type": "pr", "name": "pull_request", "action": "closed", **_PR_FIELDS}),
    "pull_request.labeled.json": (1, {"type": "pr", "name": "pull_request", "action": "labeled", **_PR_FIELDS}),
    "pull_request_review.submitted.json": (
        1,
        {"type": "review", "name": "pull_request_review", "action": "submitted", **_PR_FIELDS},
    ),
    "pull_request_review_comment.created.json": (
        1,
        {"type": "review_comment", "name": "pull_request_review_comment", "action": "created", **_PR_FIELDS},
    ),
    "issue_comment.created.json": (
        1,
        {"type": "comment", "name": "issue_comment", "action": "created", **_HELLO_COMMON},
    ),
    "create.json": (
        1,
        {"type": "create", "name": "create", "tag": "simple-tag", "ref": "refs/tags/simple-tag"} | _HELLO_COMMON,
    ),
    "delete.json": (
        1,
        {"type": "delete", "name": "delete", "tag": "simple-tag", "ref": "refs/tags/simple-tag"} | _HELLO_COMMON,
    ),
    "release.published.json": (
        None,
        {"type": "release", "name": "release", "action": "published", "tag": "0.0.1", **_HELLO_COMMON},
    ),
    "release.created.json": (
        1,
        {"type": "release", "name": "release", "action": "created", "tag": "0.0.1", **_HELLO_COMMON},
    ),
    "workflow_run.completed.json": (
        None,
        {
            "type": "workflow_run",
            "name": "workflow_run",
            "action": "completed",
            "branch": "master",
            "sha": "3484a3fb816e0859fd6e1cea078d76385ff50625",
            "repo": OCTO,
            "source_repo": OCTO,
            "actor": "Codertocat",
            "default_branch": "master",
        },
    ),
    "check_suite.requested.json": (
        957387,
        {"type": "webhook", "name": "check_suite", "action": "requested", "branch": "master", "sha": BASE}
        | _HELLO_COMMON,
    ),
    "status.json": (1, {"type": "status", "name": "status", "sha": INITIAL, "status": "success", **_HELLO_COMMON}),
    "ping.json": (None, "ping: webhook lifecycle event, nothing to run"),
    "installation.created.json": (957387, "installation: GitHub App installation event, nothing to run"),
    "installation.deleted.json": (2, "installation: GitHub App installation event, nothing to run"),
    "installation_repositories.added.json": (
        957387,
        "installation_repositories: GitHub App installation event, nothing to run",
    ),
    "repository_dispatch.on-demand-test.json": (
        375706,
        {
            "type": "dispatch",
            "name": "on-demand-test",
            "action": "on-demand-test",
            "branch": "master",
            "target_branch": "master",
            "inputs": {"unit": False, "integration": True},
            "repo": OCTO,
            "actor": "Codertocat",
            "default_branch": "master",
        },
    ),
    "fork.json": (
        1,
        {
            "type": "fork",
            "name": "fork",
            "repo": HELLO,
            "source_repo": "Octocoders/Hello-World",
            "actor": "Octocoders",
            "default_branch": "master",
        },
    ),
    "star.created.json": (None, {"type": "star", "name": "star", "action": "created", **_HELLO_COMMON}),
    "watch.started.json": (1, {"type": "watch", "name": "watch", "action": "started", **_HELLO_COMMON}),
}


def test_every_fixture_has_an_expectation() -> None:
    assert sorted(p.name for p in FIXTURE_FILES) == sorted(EXPECTED)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: getattr(p, "name", str(p)))
def test_fixture_normalizes_to_exact_fields(path: Path) -> None:
    raw = path.read_bytes()
    payload = json.loads(raw)
    result = normalize_github(event_name_of(path), payload, delivery_id="d-1")
    installation_id, expected = EXPECTED[path.name]
    assert result.installation_id == installation_id
    if isinstance(expected, str):
        assert result.event is None and result.ignored
        assert result.ignored_reason == expected
        assert result.sha is None
        return
    assert result.ignored_reason is None, result.ignored_reason
    event = result.event
    assert event is not None
    assert event.delivery_id == "d-1"
    skip = {"payload", "delivery_id", "pr_number", "author_association"}  # (checked in their own tests)
    got = event.model_dump(exclude=skip)
    assert got == Event(**expected).model_dump(exclude=skip)
    if event.type in ("pr", "review", "review_comment"):
        assert event.pr_number == payload["pull_request"]["number"]
    assert event.payload == payload  # the original payload, untouched
    assert (result.repo, result.sha) == (event.repo, event.sha)


def test_ignored_deliveries_keep_repo_and_installation() -> None:
    ping = normalized("ping.json")
    assert (ping.repo, ping.installation_id) == ("Octocoders/Hello-World", None)
    tag_deleted = normalized("push.tag-deleted.json")
    assert (tag_deleted.repo, tag_deleted.installation_id, tag_deleted.sha) == (HELLO, 1, None)
    installed = normalized("installation_repositories.added.json")
    assert (installed.repo, installed.installation_id) == (None, 957387)


def test_normalizing_does_not_mutate_the_payload() -> None:
    assert FIXTURE_FILES
    for path in FIXTURE_FILES:
        payload = json.loads(path.read_bytes())
        before = copy.deepcopy(payload)
        normalize_github(event_name_of(path), payload)
        assert payload == before


# ------------------------------------------------------------------ cross-check against the README facts table


def _facts_rows() -> list[dict[str, str]]:
    readme = FIXTURE_DIR / "README.md"
    text = readme.read_text(encoding="utf-8")
    table = text[text.index("<!-- facts:start -->") : text.index("<!-- facts:end -->")]
    lines = [line for line in table.splitlines() if line.startswith("| [")]
    columns = [
        "file",
        "event",
        "action",
        "ref",
        "shas",
        "repo",
        "fork",
        "pr",
        "sender",
        "installation",
        "other",
        "bytes",
    ]
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == len(columns), line
        row = dict(zip(columns, cells, strict=True))
        row["file"] = re.match(r"\[([^\]]+)\]", row["file"]).group(1)  # type: ignore[union-attr]
        rows.append(row)
    return rows


def _cell(value: str) -> str | None:
    return None if value == "–" else value.strip("`")


def test_readme_facts_table_agrees_with_normalized_events() -> None:
    rows = _facts_rows()
    assert sorted(r["file"] for r in rows) == sorted(p.name for p in FIXTURE_FILES)
    for row in rows:
        name = row["file"]
        raw, _ = load(name)
        assert len(raw) == int(row["bytes"]), f"{name}: fixture bytes changed"
        assert _cell(row["event"]) == event_name_of(Path(name))
        result = normalized(name)
        installation = _cell(row["installation"])
        assert result.installation_id == (int(installation) if installation else None), name
        event = result.event
        if event is None:
            continue
        repos = row["repo"].split(" → ")  # "head → base", or one name when they are equal
        assert event.repo == repos[-1], name
        assert event.actor == re.match(r"`([^`]+)`", row["sender"]).group(1), name  # type: ignore[union-attr]
        action = _cell(row["action"])
        if event.type != "push" and event.type != "tag":
            assert event.action == action, name
        shas = re.findall(r"[0-9a-f]{40}", row["shas"])
        if event.type in ("push", "tag"):
            before, after = shas
            assert event.ref == _cell(row["ref"])
            assert event.sha == after
            assert event.base_sha == (None if is_zero_sha(before) else before)
        elif event.type in ("pr", "review", "review_comment"):
            if row["shas"].startswith("head "):  # "head X, base Y"
                assert shas == [event.sha, event.base_sha], name
            else:  # synchronize: "before → after" of the head; base_sha stays the base branch's commit
                assert shas[-1] == event.sha and f"head.sha=`{event.sha}`" in row["other"], name
                assert event.base_sha == BASE
            source, target = _cell(row["ref"]).split(" → ")  # type: ignore[union-attr]
            assert (event.source_branch, event.target_branch) == (source, target)
            assert event.is_fork is (row["fork"] == "yes"), name
            assert event.source_repo == repos[0]
        elif event.type in ("status", "workflow_run"):
            assert shas == [event.sha], name
        elif name.startswith("check_suite"):
            assert event.sha == shas[-1]  # "before → after (head_sha X)"
        elif event.type == "fork":
            assert row["fork"] == "yes" and event.source_repo == repos[0] != event.repo


# ------------------------------------------------------------------------------- through the trigger matcher


def _matches(trigger: Trigger, event: Event) -> bool:
    ok, reason = match_trigger(trigger, event)
    assert isinstance(reason, str) and reason
    return ok


def test_pr_opened_matches_pr_trigger_on_its_base_branch() -> None:
    event = event_of("pull_request.opened.json")
    assert _matches(PrTrigger(events=["opened"], target_branches=[glob("master")]), event)
    assert _matches(PrTrigger(events=["opened", "synchronize"], target_branches=[glob("mas*")]), event)
    assert _matches(PrTrigger(events=["opened"], source_branches=[glob("chan*")], repos=["Codertocat/*"]), event)
    assert not _matches(PrTrigger(events=["opened"], target_branches=[glob("main")]), event)
    assert not _matches(PrTrigger(events=["closed"], target_branches=[glob("master")]), event)
    assert not _matches(PushTrigger(branches=[glob("changes")]), event)
    assert not event.is_fork
    # no file list in a PR payload: a paths filter cannot match until the orchestrator fills it
    assert not _matches(PrTrigger(events=["opened"], paths=["**"]), event)


def test_pr_actions_reach_their_own_triggers() -> None:
    for action in ("synchronize", "reopened", "closed", "labeled"):
        event = event_of(f"pull_request.{action}.json")
        assert _matches(PrTrigger(events=[action], target_branches=[glob("master")]), event)
        assert not _matches(PrTrigger(events=["opened"]), event)


def test_tag_fixture_matches_tag_trigger_not_push_trigger() -> None:
    event = event_of("push.tag-created.json")
    assert _matches(TagTrigger(patterns=[glob("simple-*")]), event)
    assert _matches(TagTrigger(), event)
    assert not _matches(TagTrigger(patterns=[glob("v*")]), event)
    assert not _matches(PushTrigger(), event)


def test_push_fixture_matches_push_trigger_and_paths() -> None:
    event = event_of("push.branch-with-commits.json")
    assert _matches(PushTrigger(branches=[glob("changes")]), event)
    assert _matches(PushTrigger(branches=[glob("change*")], paths=["*.md"]), event)
    assert not _matches(PushTrigger(branches=[glob("changes")], paths=["src/**"]), event)
    assert not _matches(PushTrigger(branches=[glob("main")]), event)
    assert not _matches(TagTrigger(), event)
    assert _matches(WebhookTrigger(events=["push"]), event)  # the catch-all sees the raw event name


def test_new_branch_push_needs_the_compare_api_for_paths() -> None:
    event = event_of("push.branch-created.json")
    assert _matches(PushTrigger(branches=[glob("master")]), event)
    assert event.changed_files is None
    assert not _matches(PushTrigger(branches=[glob("master")], paths=["**"]), event)
    assert diff_base(event) is None  # the first push of the default branch: every file is new


def test_other_fixtures_reach_their_triggers() -> None:
    comment = event_of("issue_comment.created.json")
    assert _matches(CommentTrigger(actions=["created"], source="issue"), comment)
    assert not _matches(CommentTrigger(source="pr"), comment)  # issue #1 is not a pull request
    assert _matches(CommentTrigger(body_match=BranchPattern(type="regex", pattern="totally right")), comment)
    assert _matches(
        ReviewTrigger(actions=["submitted"], states=["COMMENTED"]), event_of("pull_request_review.submitted.json")
    )
    assert _matches(ReviewCommentTrigger(actions=["created"]), event_of("pull_request_review_comment.created.json"))
    assert _matches(ReleaseTrigger(actions=["published"]), event_of("release.published.json"))
    assert not _matches(ReleaseTrigger(actions=["published"]), event_of("release.created.json"))
    assert _matches(CreateTrigger(ref_types=["tag"], patterns=[glob("simple-*")]), event_of("create.json"))
    assert not _matches(CreateTrigger(ref_types=["branch"]), event_of("create.json"))
    assert _matches(DeleteTrigger(ref_types=["tag"]), event_of("delete.json"))
    assert _matches(StatusTrigger(contexts=["default"], states=["success"]), event_of("status.json"))
    assert not _matches(StatusTrigger(states=["failure"]), event_of("status.json"))
    run = event_of("workflow_run.completed.json")
    assert _matches(WorkflowRunTrigger(actions=["completed"], workflows=["test"], conclusions=["success"]), run)
    assert _matches(DispatchTrigger(types=["on-demand-test"]), event_of("repository_dispatch.on-demand-test.json"))
    assert not _matches(DispatchTrigger(types=["deploy"]), event_of("repository_dispatch.on-demand-test.json"))
    assert _matches(ForkTrigger(), event_of("fork.json"))
    assert _matches(StarTrigger(actions=["created"]), event_of("star.created.json"))
    assert _matches(WatchTrigger(actions=["started"]), event_of("watch.started.json"))
    suite = event_of("check_suite.requested.json")
    assert _matches(WebhookTrigger(events=["check_suite"], actions=["requested"]), suite)
    assert not _matches(WebhookTrigger(events=["check_run"]), suite)
    assert _matches(WebhookTrigger(), suite)


# ------------------------------------------------------------------------------------------- synthetic cases

ZERO = "0" * 40
A = "a" * 40
B = "b" * 40


def push_payload(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "ref": "refs/heads/feature/x",
        "before": A,
        "after": B,
        "created": False,
        "deleted": False,
        "forced": False,
        "commits": [
            {"id": "c1", "added": ["src/new.py"], "removed": [], "modified": ["README.md"]},
            {"id": B, "added": [], "removed": ["old.txt"], "modified": ["README.md", "src/app.py"]},
        ],
        "repository": {"full_name": "acme/app", "default_branch": "main"},
        "sender": {"login": "alice"},
        "installation": {"id": 42},
    }
    payload.update(overrides)
    return payload


def test_changed_files_union_sorted_and_deduplicated() -> None:
    assert changed_files_from_push(push_payload()) == ["README.md", "old.txt", "src/app.py", "src/new.py"]
    event = normalize_github("push", push_payload()).event
    assert event is not None and event.changed_files == ["README.md", "old.txt", "src/app.py", "src/new.py"]
    assert diff_base(event) == A


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"before": ZERO, "created": True}, "new branch: no base"),
        ({"forced": True}, "force push: dropped commits are not listed"),
        ({"deleted": True, "after": ZERO}, "deletion"),
        ({"commits": []}, "no commits listed"),
        ({"commits": None}, "commits missing"),
        ({"commits": "many"}, "commits not a list"),
        ({"commits": [{"added": [], "removed": [], "modified": ["a"]}] * MAX_PUSH_COMMITS}, "may be truncated"),
        ({"commits": ["c1"]}, "commit not an object"),
        ({"commits": [{"added": ["a"], "modified": []}]}, "a file list missing"),
        ({"commits": [{"added": ["a", 3], "removed": [], "modified": []}]}, "a path not a string"),
        ({"commits": [{"added": ["a"] * 3000, "removed": [], "modified": []}]}, "a file list that may be capped"),
        ({"commits": [{"added": [], "removed": [], "modified": []}]}, "no files at all"),
        ({"before": "not-a-sha"}, "malformed before"),
    ],
)
def test_changed_files_unknown_unless_provably_complete(overrides: dict[str, Any], why: str) -> None:
    assert changed_files_from_push(push_payload(**overrides)) is None, why


def test_changed_files_just_under_the_commit_cap() -> None:
    commits = [{"added": [], "removed": [], "modified": [f"f{i % 7}"]} for i in range(MAX_PUSH_COMMITS - 1)]
    assert changed_files_from_push(push_payload(commits=commits)) == [f"f{i}" for i in range(7)]


def test_changed_files_junk_never_raises() -> None:
    junk: Any
    for junk in (None, [], "push", 3, {"commits": [None]}, {"before": A, "after": B, "commits": [{}]}):
        assert changed_files_from_push(junk) is None


def test_new_branch_diffs_against_the_default_branch() -> None:
    event = normalize_github("push", push_payload(before=ZERO, created=True)).event
    assert event is not None
    assert (event.base_sha, event.changed_files, diff_base(event)) == (None, None, "main")


def test_pr_diff_base_is_the_base_sha() -> None:
    event = event_of("pull_request.synchronize.json")
    assert diff_base(event) == BASE
    assert diff_base(event_of("issue_comment.created.json")) is None


def test_branch_deletion_push_is_ignored() -> None:
    result = normalize_github("push", push_payload(deleted=True, after=ZERO, commits=[]))
    assert result.event is None
    assert result.ignored_reason == "branch deletion push ('feature/x'): no commit to run on"
    assert (result.repo, result.installation_id, result.sha) == ("acme/app", 42, None)
    # all-zero `after` without the flag is a deletion too
    assert normalize_github("push", push_payload(after=ZERO)).event is None


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"ref": None}, "malformed push payload: no ref"),
        ({"ref": ""}, "malformed push payload: no ref"),
        ({"ref": 7}, "malformed push payload: no ref"),
        ({"after": None}, "malformed push payload: no commit sha in 'after'"),
        ({"after": "main"}, "malformed push payload: no commit sha in 'after'"),
        ({"ref": "refs/tags/v1", "after": None}, "malformed push payload: no commit sha in 'after'"),
        ({"ref": "refs/tags/v1", "deleted": True}, "tag deletion push ('v1'): no commit to run on"),
    ],
)
def test_malformed_push_payloads_are_ignored_with_a_reason(overrides: dict[str, Any], reason: str) -> None:
    result = normalize_github("push", push_payload(**overrides))
    assert result.event is None and result.ignored_reason == reason
    assert result.installation_id == 42


def test_push_to_other_refs_is_a_catch_all_webhook() -> None:
    event = normalize_github("push", push_payload(ref="refs/notes/commits")).event
    assert event is not None
    assert (event.type, event.name, event.ref, event.sha) == ("webhook", "push", "refs/notes/commits", B)
    assert event.branch is None
    assert _matches(WebhookTrigger(events=["push"]), event)
    assert not _matches(PushTrigger(), event)


def test_push_actor_falls_back_to_pusher_and_sha_is_lowercased() -> None:
    event = normalize_github("push", push_payload(sender=None, pusher={"name": "bob"}, after=B.upper())).event
    assert event is not None and event.actor == "bob" and event.sha == B


def test_sha256_repositories_are_accepted() -> None:
    long_sha = "c" * 64
    event = normalize_github("push", push_payload(after=long_sha, before="0" * 64, created=True)).event
    assert event is not None and event.sha == long_sha and event.base_sha is None


def _pr_payload(head_repo: Any, *, action: str = "opened") -> dict[str, Any]:
    return {
        "action": action,
        "number": 9,
        "pull_request": {
            "number": 9,
            "head": {"ref": "patch-1", "sha": A, "repo": head_repo},
            "base": {"ref": "main", "sha": B, "repo": {"full_name": "acme/app"}},
        },
        "repository": {"full_name": "acme/app", "default_branch": "main"},
        "sender": {"login": "mallory"},
        "installation": {"id": 42},
    }


def test_fork_pull_request_is_detected() -> None:
    event = normalize_github("pull_request", _pr_payload({"full_name": "mallory/app", "fork": True})).event
    assert event is not None
    assert (event.repo, event.source_repo, event.is_fork) == ("acme/app", "mallory/app", True)
    assert (event.ref, event.sha, event.base_sha) == ("refs/pull/9/head", A, B)
    assert _matches(PrTrigger(events=["opened"], target_branches=[glob("main")]), event)


def test_pull_request_with_deleted_head_repo() -> None:
    event = normalize_github("pull_request", _pr_payload(None, action="closed")).event
    assert event is not None
    assert event.source_repo is None and event.repo == "acme/app"


def test_malformed_pull_request_payloads_are_ignored() -> None:
    result = normalize_github("pull_request", {"action": "opened", "repository": {"full_name": "acme/app"}})
    assert result.event is None and result.ignored_reason == "malformed pull_request payload: no pull_request object"
    assert result.repo == "acme/app"
    payload = _pr_payload({"full_name": "acme/app"})
    payload["pull_request"]["head"]["sha"] = None
    result = normalize_github("pull_request", payload)
    assert result.ignored_reason == "malformed pull_request payload: no pull_request.head.sha"


def test_comment_on_a_pull_request() -> None:
    _, payload = load("issue_comment.created.json")
    payload["issue"]["pull_request"] = {"url": "https://api.github.com/repos/Codertocat/Hello-World/pulls/1"}
    event = normalize_github("issue_comment", payload).event
    assert event is not None
    assert _matches(CommentTrigger(source="pr"), event)
    assert not _matches(CommentTrigger(source="issue"), event)


def test_dispatch_inputs_only_from_an_object_client_payload() -> None:
    base = {"action": "deploy", "branch": "release", "repository": {"full_name": "acme/app", "default_branch": "main"}}
    for client_payload in (None, ["a"], "x", 3):
        event = normalize_github("repository_dispatch", {**base, "client_payload": client_payload}).event
        assert event is not None and event.inputs == {} and event.name == "deploy" and event.branch == "release"
    event = normalize_github("repository_dispatch", {"repository": {"default_branch": "main"}}).event
    assert event is not None and event.type == "dispatch" and event.branch == "main"


def test_create_and_delete_branches() -> None:
    payload = {"ref": "feature/y", "ref_type": "branch", "repository": {"full_name": "acme/app"}}
    event = normalize_github("create", payload).event
    assert event is not None
    assert (event.type, event.branch, event.tag, event.ref) == ("create", "feature/y", None, "refs/heads/feature/y")
    assert _matches(CreateTrigger(ref_types=["branch"], patterns=[glob("feature/*")]), event)
    event = normalize_github("delete", {**payload, "ref_type": "tag"}).event
    assert event is not None and event.type == "delete" and event.tag == "feature/y"


@pytest.mark.parametrize("name", ["deployment", "check_run", "merge_group", "some_future_event"])
def test_unknown_events_reach_catch_all_webhook_triggers(name: str) -> None:
    event = normalize_github(name, {"action": "created", "repository": {"full_name": "acme/app"}}).event
    assert event is not None and (event.type, event.name, event.action) == ("webhook", name, "created")
    assert _matches(WebhookTrigger(events=[name], actions=["created"]), event)
    assert _matches(WebhookTrigger(), event)


@pytest.mark.parametrize(
    ("name", "payload", "reason"),
    [
        ("push", [], "payload is not a JSON object"),
        ("push", None, "payload is not a JSON object"),
        ("push", "{}", "payload is not a JSON object"),
        ("push", {1: "x"}, "payload is not a JSON object"),
        ("", {}, "no event name (X-GitHub-Event header missing)"),
        ("   ", {}, "no event name (X-GitHub-Event header missing)"),
        (None, {}, "no event name (X-GitHub-Event header missing)"),
        ("meta", {"action": "deleted"}, "meta: webhook lifecycle event, nothing to run"),
        ("github_app_authorization", {}, "github_app_authorization: GitHub App installation event, nothing to run"),
    ],
)
def test_ignored_deliveries(name: Any, payload: Any, reason: str) -> None:
    result = normalize_github(name, payload)
    assert result.event is None and result.ignored_reason == reason


def test_odd_field_types_become_none() -> None:
    payload = {
        "action": 5,
        "repository": {"full_name": ["acme/app"], "default_branch": ""},
        "sender": "alice",
        "installation": {"id": True},
    }
    result = normalize_github("star", payload)
    assert result.event is not None and result.installation_id is None
    assert (result.event.action, result.event.repo, result.event.actor, result.event.default_branch) == (None,) * 4


# ------------------------------------------------------------------------------------ properties: never raise

_KEYS = st.sampled_from(
    [
        "ref",
        "before",
        "after",
        "deleted",
        "forced",
        "created",
        "commits",
        "added",
        "removed",
        "modified",
        "repository",
        "full_name",
        "default_branch",
        "sender",
        "login",
        "pusher",
        "name",
        "installation",
        "id",
        "pull_request",
        "head",
        "base",
        "repo",
        "sha",
        "number",
        "action",
        "client_payload",
        "branch",
        "workflow_run",
        "head_sha",
        "head_branch",
        "head_repository",
        "forkee",
        "release",
        "tag_name",
        "ref_type",
        "state",
        "check_suite",
        "issue",
        "comment",
    ]
) | st.text(max_size=8)
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from([A, ZERO, "refs/heads/main", "refs/tags/v1", "refs/heads/", "refs/tags/", "0" * 64])
)
_JSON = st.recursive(_LEAVES, lambda c: st.lists(c, max_size=3) | st.dictionaries(_KEYS, c, max_size=4), max_leaves=12)
_EVENT_NAMES = st.sampled_from(
    sorted({event_name_of(Path(name)) for name in EXPECTED} | {"check_run", "meta", "installation_target"})
) | st.text(max_size=20)


def _check_result(result: NormalizeResult) -> None:
    assert isinstance(result, NormalizeResult)
    assert (result.event is None) == (result.ignored_reason is not None)
    if result.event is not None:
        assert (result.repo, result.sha) == (result.event.repo, result.event.sha)
        if result.event.type == "push":
            assert result.event.branch and result.event.sha and result.event.ref
        if result.event.type == "tag":
            assert result.event.tag and result.event.sha
        if result.event.type == "pr":
            assert result.event.sha
    else:
        assert result.sha is None and result.ignored_reason


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=_EVENT_NAMES, payload=st.dictionaries(_KEYS, _JSON, max_size=8))
def test_random_payloads_never_raise(name: str, payload: dict[str, Any]) -> None:
    _check_result(normalize_github(name, payload))
    changed_files_from_push(payload)


_FILES = st.lists(st.sampled_from(["a.py", "docs/b.md", "", "c"]) | _LEAVES, max_size=3) | _LEAVES
_PUSH_SHAPED = st.fixed_dictionaries(
    {},
    optional={
        "ref": st.sampled_from(["refs/heads/main", "refs/tags/v1", "refs/notes/x", "refs/heads/"]) | _LEAVES,
        "before": st.sampled_from([A, ZERO, "0" * 64]) | _LEAVES,
        "after": st.sampled_from([B, ZERO]) | _LEAVES,
        "deleted": _LEAVES,
        "forced": _LEAVES,
        "commits": st.lists(
            st.fixed_dictionaries({}, optional={"added": _FILES, "removed": _FILES, "modified": _FILES}) | _LEAVES,
            max_size=3,
        )
        | _LEAVES,
        "repository": st.fixed_dictionaries({}, optional={"full_name": _LEAVES, "default_branch": _LEAVES}) | _LEAVES,
        "installation": st.fixed_dictionaries({}, optional={"id": _LEAVES}) | _LEAVES,
    },
)


@settings(max_examples=300, deadline=None)
@given(payload=_PUSH_SHAPED)
def test_push_shaped_payloads_never_raise(payload: dict[str, Any]) -> None:
    result = normalize_github("push", payload)
    _check_result(result)
    files = changed_files_from_push(payload)
    assert files is None or (files and files == sorted(set(files)) and all(isinstance(f, str) and f for f in files))
    if result.event is not None and result.event.type == "push":
        assert result.event.changed_files == files


@settings(max_examples=100, deadline=None)
@given(name=_EVENT_NAMES, payload=_JSON)
def test_random_non_object_payloads_never_raise(name: str, payload: Any) -> None:
    _check_result(normalize_github(name, payload))


@st.composite
def _mutated_fixture(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A real fixture with one value somewhere inside replaced by junk (or removed)."""
    path = draw(st.sampled_from(FIXTURE_FILES))
    payload = json.loads(path.read_bytes())
    node: Any = payload
    while True:
        keys: list[Any] = list(node) if isinstance(node, Mapping) else list(range(len(node)))
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, dict | list) and child and draw(st.booleans()):
            node = child
            continue
        if isinstance(node, dict) and draw(st.booleans()):
            del node[key]
        else:
            node[key] = draw(_JSON)
        break
    return event_name_of(path), payload


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_mutated_fixture())
def test_mutated_fixtures_never_raise(case: tuple[str, dict[str, Any]]) -> None:
    name, payload = case
    _check_result(normalize_github(name, payload))


@pytest.mark.parametrize(
    ("fixture", "association"),
    [
        ("pull_request.opened.json", "OWNER"),
        ("pull_request_review.submitted.json", None),
        ("issue_comment.created.json", "OWNER"),
        ("push.branch-with-commits.json", None),
    ],
)
def test_author_association_comes_from_the_author_of_the_event(fixture: str, association: str | None) -> None:
    payload = json.loads((FIXTURE_DIR / fixture).read_bytes())
    if fixture.startswith("pull_request_review."):
        association = payload["review"].get("author_association")
    event = event_of(fixture)
    assert event.author_association == association


def test_issue_comment_on_a_pull_request_carries_its_number() -> None:
    payload = json.loads((FIXTURE_DIR / "issue_comment.created.json").read_bytes())
    assert event_of("issue_comment.created.json").pr_number is None  # issue #1 is not a pull request
    payload["issue"]["pull_request"] = {"url": "https://api.github.com/repos/o/r/pulls/1"}
    result = normalize_github("issue_comment", payload)
    assert result.event is not None and result.event.pr_number == payload["issue"]["number"]
