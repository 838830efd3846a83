"""Pure parts of `kici.runner.toolchains` and the mirror helpers of `kici.agent.git`: version matching and
choice, labels, the per-job bin dir, what counts as a remote, and reading a fetch's object count."""

from __future__ import annotations

import os
from pathlib import Path

from kici.agent.git import _received_objects, is_remote, mirror_path
from kici.runner.toolchains import Interpreter, apply, choose, labels, python_bin_dir


def _py(version: str, path: str = "/opt/py/bin/python3") -> Interpreter:
    major, minor, patch = (int(p) for p in version.split("."))
    return Interpreter(path=path, real_path=path, version=(major, minor, patch))


def test_matching_is_by_whole_components_and_the_newest_wins() -> None:
    found = [_py("3.1.4", "/a"), _py("3.12.1", "/b"), _py("3.12.7", "/c"), _py("3.13.0", "/d")]
    assert choose(found, "3.12") == found[2]
    assert choose(found, "3.12.1") == found[1]
    assert choose(found, "3.1") == found[0]  # not 3.12: "3.1" is a version, not a string prefix
    assert choose(found, "3") == found[3]
    assert choose(found, "3.11") is None and choose([], "3") is None


def test_labels_are_minor_and_patch_once_each() -> None:
    assert labels([_py("3.12.1"), _py("3.12.7"), _py("3.12.7", "/other")]) == [
        "kici:python:3.12", "kici:python:3.12.1", "kici:python:3.12.7",
    ]


def test_bin_dir_is_the_interpreters_own_when_it_has_the_names(tmp_path: Path) -> None:
    real = tmp_path / "prefix" / "bin" / "python3.12"
    real.parent.mkdir(parents=True)
    real.write_text("")
    for name in ("python", "python3"):
        (real.parent / name).symlink_to("python3.12")
    interpreter = Interpreter(path=str(real.parent / "python"), real_path=str(real), version=(3, 12, 1))
    assert python_bin_dir(interpreter, tmp_path / "scratch") == str(real.parent)
    (real.parent / "python3").unlink()  # python3 missing: a job directory of links instead
    made = Path(python_bin_dir(interpreter, tmp_path / "scratch"))
    assert made == tmp_path / "scratch" / "python-bin"
    assert {os.path.realpath(made / n) for n in ("python", "python3", "python3.12")} == {str(real)}


def test_apply_puts_the_python_dirs_first() -> None:
    base = {"PATH": "/usr/bin:/bin", "HOME": "/h"}
    assert apply(base, {"PATH": "/v/bin:/p/bin", "VIRTUAL_ENV": "/v"}) == {
        "PATH": "/v/bin:/p/bin:/usr/bin:/bin", "HOME": "/h", "VIRTUAL_ENV": "/v",
    }
    assert apply(base, {}) == base


def test_remote_urls_and_mirror_paths(tmp_path: Path) -> None:
    assert is_remote("https://github.com/a/b.git") and is_remote("ssh://git@h/a.git") and is_remote("git@h:a/b")
    assert not is_remote("/srv/repo") and not is_remote("file:///srv/repo") and not is_remote("relative/repo")
    one = mirror_path(tmp_path, "https://h/a.git")
    assert one == mirror_path(tmp_path, "https://h/a.git") != mirror_path(tmp_path, "https://h/b.git")
    assert one.parent == tmp_path and len(one.name) == 32


def test_received_objects_from_fetch_progress() -> None:
    assert _received_objects("remote: Total 3 (delta 0)\nUnpacking objects: 100% (3/3), 250 bytes | done.") == 3
    assert _received_objects("Receiving objects: 100% (1200/1200), 2.1 MiB | done.") == 1200
    assert _received_objects("") == 0
