"""What the agent picks up as a job's artifacts (kici.agent.artifacts.collect), on real files and symlinks."""

from __future__ import annotations

import os
from pathlib import Path

from kici.agent.artifacts import collect, upload_url
from kici.agent.config import http_base_url
from kici.agent.test_reports import report_url, summary


def _tree(root: Path) -> Path:
    for rel in ("dist/a.whl", "dist/b.tar.gz", "reports/x.xml", "reports/deep/y.xml", ".hidden/z", "top.txt",
                ".git/config"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def test_globs_follow_kici_glob_rules(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ws")
    found = collect(root, ["dist/*.whl", "reports/**"])
    assert found.files == ["dist/a.whl", "reports/deep/y.xml", "reports/x.xml"]
    assert found.problems == []
    assert collect(root, ["**"]).files == ["dist/a.whl", "dist/b.tar.gz", "reports/deep/y.xml", "reports/x.xml",
                                           "top.txt"]  # no dotfiles, never .git
    assert collect(root, [".hidden/*"]).files == [".hidden/z"]


def test_a_glob_matching_nothing_is_a_problem(tmp_path: Path) -> None:
    found = collect(_tree(tmp_path / "ws"), ["dist/*.whl", "wheelhouse/*.whl"])
    assert found.files == ["dist/a.whl"]
    assert found.problems == ["artifacts: 'wheelhouse/*.whl' matched no file"]


def test_symlinks_leaving_the_workspace_are_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ws")
    (tmp_path / "secret").write_text("outside")
    os.symlink(tmp_path / "secret", root / "dist" / "leak.whl")
    os.symlink(root / "top.txt", root / "dist" / "inside.whl")
    os.symlink(tmp_path, root / "dist" / "dir-link")  # a directory link is not walked
    found = collect(root, ["dist/**"])
    assert found.files == ["dist/a.whl", "dist/b.tar.gz", "dist/inside.whl"]
    assert found.problems == ["artifacts: 'dist/leak.whl' is a symlink leaving the workspace; not uploaded"]


def test_requested_files_are_checked_too(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ws")
    found = collect(root, [], ["top.txt", "../outside", "missing.txt", "dist"])
    assert found.files == ["top.txt"]
    assert found.problems == ["artifacts: '../outside' is outside the workspace",
                              "artifacts: 'missing.txt' does not exist (or is a broken symlink)",
                              "artifacts: 'dist' is not a regular file"]


def test_urls() -> None:
    assert http_base_url("ws://h:4000/ws") == "http://h:4000"
    assert http_base_url("wss://ci.example.com/orch/ws") == "https://ci.example.com/orch"
    assert http_base_url("https://ci.example.com/orch") == "https://ci.example.com/orch"
    assert upload_url("http://h:4000", "j-1", "reports/a b#.xml") == (
        "http://h:4000/api/v1/agent/jobs/j-1/artifacts/reports/a%20b%23.xml")


def test_test_reports_use_the_same_rules_with_their_own_label(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ws")
    (tmp_path / "outside.xml").write_text("<testsuite/>")
    os.symlink(tmp_path / "outside.xml", root / "reports" / "leak.xml")
    found = collect(root, ["reports/*.xml", "junit/*.xml"], label="test reports")
    assert found.files == ["reports/x.xml"]
    assert found.problems == ["test reports: 'reports/leak.xml' is a symlink leaving the workspace; not uploaded",
                              "test reports: 'junit/*.xml' matched no file"]
    assert summary({"passed": 3, "failed": 1, "errors": 1, "skipped": 0}) == "3 passed, 1 failed, 1 error"
    assert summary({"passed": 0}) == "no tests"
    assert report_url("http://h:4000", "j 1", "reports/a b.xml") == (
        "http://h:4000/api/v1/agent/jobs/j%201/test-reports/reports/a%20b.xml")
