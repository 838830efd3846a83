"""`kici-admin source add git` names the hook a repository needs: post-commit for a working repository,
post-receive for a bare one, both for a repository it cannot see (real git repositories)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kici.admin.git_hooks import hook_place, install_advice, local_repository


def _git(*args: str) -> None:
    subprocess.run(["git", *args], check=True, capture_output=True)


def test_working_repository_gets_post_commit(tmp_path: Path) -> None:
    work = tmp_path / "my app"
    _git("init", "-q", str(work))
    place = hook_place(str(work))
    assert place is not None and place.hook == "post-commit"
    assert place.path == (work / ".git" / "hooks" / "post-commit").resolve()
    advice = install_advice("app", str(work))
    assert "(working repository: runs start on commit)" in advice
    assert f"kici-admin source hook app > '{place.path}' && chmod 700 '{place.path}'" in advice
    # a file:// URL is the same repository
    assert hook_place(work.resolve().as_uri()) == place


def test_bare_repository_gets_post_receive(tmp_path: Path) -> None:
    bare = tmp_path / "app.git"
    _git("init", "-q", "--bare", str(bare))
    place = hook_place(str(bare))
    assert place is not None and place.hook == "post-receive"
    assert place.path == (bare / "hooks" / "post-receive").resolve()
    assert "(bare repository: runs start on push)" in install_advice("app", str(bare))


def test_remote_or_missing_repositories_get_both_choices(tmp_path: Path) -> None:
    for url in ("https://git.example.com/acme/app.git", "git@git.example.com:acme/app.git",
                "ssh://git@git.example.com/acme/app.git", str(tmp_path / "not-there"), str(tmp_path)):
        assert hook_place(url) is None, url
        advice = install_advice("app", url)
        assert "hooks/post-receive of the bare repository" in advice, url
        assert ".git/hooks/post-commit of a working repository" in advice, url
    assert local_repository("https://h/x.git") is None and local_repository("h:x.git") is None
    assert local_repository("/srv/git/app.git") == Path("/srv/git/app.git")
