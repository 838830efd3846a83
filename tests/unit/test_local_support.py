"""`.kici/.secrets` parsing and local concurrency-group slots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kici.cli.concurrency import GroupRequest, GroupSlots, requested_groups
from kici.cli.local_run import changed_paths
from kici.cli.secrets_file import SecretsFileError, parse_secrets
from kici.engine import lockfile as lf
from kici.engine.events import Event


def test_secrets_file_format() -> None:
    text = '# comment\n\nA=1\nexport B = two words \nC="line1\\nline2 é"\nD=\'x=y\'\nE=\n'
    assert parse_secrets(text) == {"A": "1", "B": "two words", "C": "line1\nline2 é", "D": "x=y", "E": ""}


@pytest.mark.parametrize("line", ["novalue", "1BAD=x", "=x", "A B=c"])
def test_secrets_file_errors_name_the_line(line: str) -> None:
    with pytest.raises(SecretsFileError, match=r"\.secrets:2: expected KEY=value"):
        parse_secrets(f"OK=1\n{line}\n")


def _wf(name: str, group: str | lf.InlineExpr | None, cancel: bool = True, max_: int = 1) -> lf.Workflow:
    return lf.Workflow(
        name=name, source=lf.SourceRef(file="f.py", export="#x"), content_hash="0", compile_schema_version=1,
        triggers=[], jobs=[lf.Job(name="j", steps=[lf.Step(name="s")])],
        concurrency=lf.Concurrency(has_group=group is not None, group=group, cancel_in_progress=cancel, max=max_),
    )


def test_requested_groups_evaluate_lambdas_and_merge() -> None:
    ev = Event(type="push", branch="main")
    wfs = [_wf("a", lf.InlineExpr(expression="lambda e: f'deploy-{e.branch}'")), _wf("b", "deploy-main"),
           _wf("c", None)]
    assert requested_groups(wfs, ev) == [GroupRequest("deploy-main", True, 1, ("a", "b"))]


def test_slots_exclude_each_other_and_release(tmp_path: Path) -> None:
    request = GroupRequest("g", cancel_in_progress=False, max=2, workflows=("w",))
    first, second, third = (GroupSlots(tmp_path / "repo", tmp_path) for _ in range(3))
    messages: list[str] = []
    assert first.acquire(request, messages.append)
    assert second.acquire(request, messages.append)
    # both slots taken: the third waits (and says so) until told to stop
    polls = iter(range(3))
    assert not third.acquire(request, messages.append, should_stop=lambda: next(polls) >= 2, poll=0.01)
    assert messages == [f"concurrency group 'g': waiting for the run in progress (pid {os.getpid()}, {os.getpid()})"]
    first.release()
    assert third.acquire(request, messages.append, poll=0.01)
    other_repo = GroupSlots(tmp_path / "other", tmp_path)
    assert other_repo.acquire(request, messages.append)  # groups are per repository
    for slots in (second, third, other_repo):
        slots.release()


def test_changed_paths_read_git_status_porcelain_z() -> None:
    status = b"M  staged.txt\0 M unstaged.txt\0MM both.txt\0A  new.txt\0D  gone.txt\0 D removed.txt\0?? sub/x y.txt\0"
    assert changed_paths(status) == ["staged.txt", "unstaged.txt", "both.txt", "new.txt", "gone.txt", "removed.txt",
                                     "sub/x y.txt"]
    # relative to the project's directory inside the repository; an untracked nested repository is one entry
    assert changed_paths(b"M  app/a.py\0M  other/b.py\0?? app/vendor/\0", "app/") == ["a.py", "vendor"]
    assert changed_paths(b"") == []
