"""The event grammar of `kici preview` / `kici run local`, against real git repositories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kici.cli.events import EventOptions, EventSpecError, build_event, parse_pairs
from tests.conftest import git, write_files

Repo = Callable[..., Path]


def test_push_defaults_come_from_git(repo_factory: Repo) -> None:
    repo = repo_factory({"a.txt": "a\n", "dir/b.txt": "b\n"}, branch="trunk")
    git(repo, "remote", "add", "origin", "git@github.com:acme/widgets.git")
    ev = build_event("push", EventOptions(), repo)
    assert (ev.type, ev.branch, ev.target_branch, ev.repo) == ("push", "trunk", "trunk", "acme/widgets")
    assert ev.sha == git(repo, "rev-parse", "HEAD").strip()
    assert ev.changed_files == ["a.txt", "dir/b.txt"]  # clean tree: the last commit's files


def test_changed_files_cover_edits_renames_untracked_and_spaces(repo_factory: Repo) -> None:
    repo = repo_factory({"a.txt": "a\n", "old name.txt": "o\n", "keep.txt": "k\n"})
    write_files(repo, {"a.txt": "changed\n", "new dir/n e w.txt": "u\n"})
    git(repo, "mv", "old name.txt", "renamed file.txt")
    ev = build_event("push", EventOptions(), repo)
    assert ev.changed_files == ["a.txt", "new dir/n e w.txt", "old name.txt", "renamed file.txt"]


def test_explicit_options_win(repo_factory: Repo) -> None:
    repo = repo_factory({"a.txt": "a\n"})
    ev = build_event("pr:sync", EventOptions(branch="release/1", source_branch="feat", files=["x.py"],
                                             repo="o/r", sha="abc"), repo)
    assert (ev.type, ev.action, ev.target_branch, ev.source_branch, ev.changed_files, ev.repo, ev.sha) == (
        "pr", "synchronize", "release/1", "feat", ["x.py"], "o/r", "abc")


@pytest.mark.parametrize(("spec", "check"), [
    ("tag", lambda e: e.type == "tag" and e.tag == "v0.0.0-local"),
    ("pr", lambda e: e.action == "opened"),
    ("pr:labeled", lambda e: e.action == "labeled"),
    ("dispatch:deploy", lambda e: e.type == "dispatch" and e.name == "deploy"),
    ("kici_event:built", lambda e: e.type == "kici_event" and e.name == "built"),
    ("workflow_complete:failed", lambda e: e.status == "failed"),
    ("generic_webhook:jira:issue_created", lambda e: e.source == "jira" and e.name == "issue_created"),
    ("webhook:check_suite:requested", lambda e: e.name == "check_suite" and e.action == "requested"),
    ("comment", lambda e: e.action == "created" and e.payload["comment"] == {"body": ""}),
    ("create:tag", lambda e: e.payload["ref_type"] == "tag"),
    ("schedule:0 3 * * *", lambda e: e.name == "0 3 * * *"),
])
def test_event_grammar(repo_factory: Repo, spec: str, check: Callable[..., bool]) -> None:
    repo = repo_factory({"a.txt": "a\n"})
    assert check(build_event(spec, EventOptions(), repo))


@pytest.mark.parametrize("spec", ["shove", "kici_event", "push:extra", "generic_webhook", "webhook", "create:x"])
def test_bad_event_specs(repo_factory: Repo, spec: str) -> None:
    repo = repo_factory({"a.txt": "a\n"})
    with pytest.raises(EventSpecError):
        build_event(spec, EventOptions(), repo)


def test_not_a_git_repository(tmp_path: Path) -> None:
    ev = build_event("push", EventOptions(), tmp_path)
    assert ev.branch == "main" and ev.sha is None and ev.changed_files == []


def test_parse_pairs() -> None:
    assert parse_pairs(["A=1", "B=x=y", "C="], "--env") == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(EventSpecError, match="KEY=VALUE"):
        parse_pairs(["nope"], "--env")
