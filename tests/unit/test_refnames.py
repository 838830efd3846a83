"""`kici.engine.refnames` against the real `git check-ref-format` over a generated list of names."""

from __future__ import annotations

import itertools
import shutil
import subprocess

import pytest

from kici.engine.github_events import normalize_github
from kici.engine.refnames import branch_name_problem, event_ref_problem, is_valid_ref_name, ref_name_problem

GIT = shutil.which("git")

PIECES = ["a", "main", ".", "..", "/", "//", ".lock", "@", "@{", "{", "~", "^", ":", "?", "*", "[", "\\", " ",
          "\t", "\x01", "\x7f", "-", "é", "x.y", "foo.lock", ".hidden", "feature", "v1.2"]


def _names() -> list[str]:
    """Full names built from risky pieces in every position, plus hand-picked edge cases."""
    names = {"refs/heads/" + a + b for a, b in itertools.product(PIECES, repeat=2)}
    names |= {a + "/" + b for a, b in itertools.product(PIECES, repeat=2)}
    names |= {
        "@", "", "refs", "HEAD", "refs/heads/main", "refs/heads/", "/refs/heads/main", "refs/heads/main/",
        "refs//heads/main", "refs/heads/main.", "refs/heads/.main", "refs/heads/main.lock", "refs/heads/a.lock/b",
        "refs/heads/a..b", "refs/heads/a@{b", "refs/heads/@", "refs/heads/a@b", "refs/tags/v1.0.0",
        "refs/pull/12/head", "refs/heads/feature/x-y_z", "refs/heads/-dash", "refs/heads/lock.a", "refs/heads/.",
        "refs/heads/a/.b", "refs/heads/a.lock.b",
    }
    return sorted(names)


def _git_accepts(name: str) -> bool:
    assert GIT is not None
    return subprocess.run([GIT, "check-ref-format", name], capture_output=True, timeout=10).returncode == 0


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_agrees_with_git_check_ref_format() -> None:
    names = _names()
    assert len(names) > 1000
    disagree = [(n, _git_accepts(n), ref_name_problem(n)) for n in names if is_valid_ref_name(n) != _git_accepts(n)]
    assert disagree == [], disagree[:20]
    # both kinds are well represented, so the comparison means something
    valid = sum(is_valid_ref_name(n) for n in names)
    assert 100 < valid < len(names) - 100


def test_reasons_name_the_rule() -> None:
    assert ref_name_problem("refs/heads/a..b") == "it contains '..'"
    assert ref_name_problem("refs/heads/x.lock") == "the component 'x.lock' ends with '.lock'"
    assert ref_name_problem("refs/heads/a b") == "it contains ' '"
    assert ref_name_problem("refs/heads/a\x00b") == "it contains the control character '\\x00'"  # argv cannot test NUL
    assert ref_name_problem("main") is not None  # one level: not a full ref name
    assert branch_name_problem("main") is None and branch_name_problem("-x") == "it begins with '-'"
    assert event_ref_problem(ref="refs/heads/ok", branches=("ok", None), tag=None) is None
    assert event_ref_problem(branches=("bad..name",)) == "invalid ref name 'bad..name': it contains '..'"


def test_github_push_with_an_invalid_ref_is_filtered_with_a_reason() -> None:
    payload = {"ref": "refs/heads/evil..name", "before": "0" * 39 + "1", "after": "a" * 40,
               "repository": {"full_name": "acme/app"}}
    result = normalize_github("push", payload, delivery_id="d1")
    assert result.event is None
    assert result.ignored_reason == "invalid ref name 'refs/heads/evil..name': it contains '..'"
    pr = {"action": "opened", "number": 3, "repository": {"full_name": "acme/app"},
          "pull_request": {"number": 3, "head": {"ref": "x~1", "sha": "b" * 40},
                           "base": {"ref": "main", "sha": "c" * 40}}}
    filtered = normalize_github("pull_request", pr, delivery_id="d2")
    assert filtered.event is None and filtered.ignored_reason == "invalid ref name 'x~1': it contains '~'"
    good = normalize_github("push", {**payload, "ref": "refs/heads/feature/ok"}, delivery_id="d3")
    assert good.event is not None and good.event.branch == "feature/ok"
