"""Cache key templates: `hash_files` and the placeholders, checked by the compiler and resolved on a real
checkout at run time (kici.sdk.caching, kici.runner.cache_keys)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from kici import hash_files
from kici.compiler.errors import CompileFailed
from kici.compiler.project import Project, compile_project
from kici.runner.cache_keys import CacheKeyError, KeyContext, matched_files, resolve_key
from kici.sdk.caching import KeyTemplateError, normalize_path, parse_key


def _tree(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_hash_files_over_paths_and_contents(tmp_path: Path) -> None:
    ws = _tree(tmp_path / "ws", {"requirements.txt": "click\n", "requirements-dev.txt": "pytest\n",
                                 "src/setup.cfg": "x", ".git/requirements.txt": "never"})
    key = resolve_key("pip-" + hash_files("requirements*.txt"), KeyContext(ws))
    expected = hashlib.sha256()
    for rel, text in (("requirements-dev.txt", "pytest\n"), ("requirements.txt", "click\n")):
        expected.update(f"{rel}\0{len(text)}\0".encode() + text.encode())
    assert key == "pip-" + expected.hexdigest()
    # the same contents give the same key; any change to a matched file, or a new match, changes it
    assert resolve_key("pip-" + hash_files("requirements*.txt"), KeyContext(ws)) == key
    (ws / "requirements.txt").write_text("click==8\n")
    changed = resolve_key("pip-" + hash_files("requirements*.txt"), KeyContext(ws))
    assert changed != key
    (ws / "requirements-ci.txt").write_text("")
    assert resolve_key("pip-" + hash_files("requirements*.txt"), KeyContext(ws)) != changed
    assert matched_files(ws, ["**/*.cfg", "requirements.txt"]) == ["requirements.txt", "src/setup.cfg"]


def test_a_glob_matching_nothing_is_an_error_naming_it(tmp_path: Path) -> None:
    ws = _tree(tmp_path / "ws", {"requirements.txt": "x"})
    with pytest.raises(CacheKeyError, match=r"hash_files: 'poetry\.lock' matches no file in the checkout"):
        resolve_key("k-" + hash_files("requirements.txt", "poetry.lock"), KeyContext(ws))


def test_a_matched_symlink_leaving_the_workspace_is_refused(tmp_path: Path) -> None:
    ws = _tree(tmp_path / "ws", {})
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", ws / "deps.txt")
    with pytest.raises(CacheKeyError, match="symlink leaving the workspace"):
        resolve_key(hash_files("deps.txt"), KeyContext(ws))


def test_placeholders(tmp_path: Path) -> None:
    ctx = KeyContext(tmp_path, matrix={"py": "3.12", "n": 2}, python="3.12.7", os_name="linux", arch="x86_64")
    assert resolve_key("v-{{os}}-{{ arch }}-{{python}}-{{matrix.py}}-{{matrix.n}}", ctx) == \
        "v-linux-x86_64-3.12.7-3.12-2"
    with pytest.raises(CacheKeyError, match="no matrix value 'other'"):
        resolve_key("{{matrix.other}}", ctx)
    with pytest.raises(CacheKeyError, match="needs the job's python="):
        resolve_key("{{python}}", KeyContext(tmp_path))
    for bad in ("{{nope}}", "a{{", "x}}", "{{matrix.}}", "{{hash_files:[]}}"):
        with pytest.raises(KeyTemplateError):
            parse_key(bad)


def test_braces_in_globs_survive_the_placeholder(tmp_path: Path) -> None:
    ws = _tree(tmp_path / "ws", {"a.cfg": "1", "b.toml": "2"})
    template = hash_files("*.{cfg,toml}")
    [part] = parse_key(template)
    assert part.globs == ("*.{cfg,toml}",)
    assert len(resolve_key(template, KeyContext(ws))) == 64


@pytest.mark.parametrize(("path", "problem"), [
    ("~/.cache/pip", "`~` is not supported"), ("/etc", "is absolute"), ("../up", "climbs out"),
    ("a/../../b", "climbs out"), (".", "whole workspace"), (".git/x", "inside .git"), ("", "non-empty"),
])
def test_cache_paths_must_stay_in_the_workspace(path: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        normalize_path(path)
    assert normalize_path("./.venv/") == ".venv"


def _compile(tmp_path: Path, body: str) -> list[str]:
    (tmp_path / ".kici/workflows").mkdir(parents=True)
    (tmp_path / ".kici/workflows/wf.py").write_text(
        "from kici import Cache, hash_files, job, push, step, workflow\n" + body + "\n")
    try:
        compile_project(Project(root=tmp_path, kici_dir=tmp_path / ".kici"))
    except CompileFailed as failed:
        return [str(e) for e in failed.errors]
    return []


def test_the_compiler_checks_keys_and_paths(tmp_path: Path) -> None:
    errors = _compile(tmp_path, '''
ok = job("ok", steps=[step("s", "true")], python="3.12", matrix={"py": ["a", "b"]},
         cache=Cache(key="v-{{python}}-{{matrix.py}}-" + hash_files("*.txt"), paths=[".venv"], restore_keys=["v-"]))
bad = job("bad", steps=[step("s", "true")],
          cache=[Cache(key="v-{{python}}", paths=[".venv"]), Cache(key="w-{{matrix.py}}", paths=["x"]),
                 Cache(key="k", paths=["~/.cache"]), Cache(key="k", paths=["../x"]), Cache(key="", paths=["x"]),
                 Cache(key="k-{{oops}}", paths=["x"])])
ci = workflow("ci", on=push(), jobs=[ok, bad])''')
    text = "\n".join(errors)
    assert all("job 'bad'" in e for e in errors), text
    assert "{{python}} needs the job's python=" in text
    assert "{{matrix.py}} is not an axis of the job's matrix (axes: none: the job has no matrix)" in text
    assert "`~` is not supported" in text and "climbs out of the workspace" in text
    assert "cache needs a non-empty `key`" in text and "unknown placeholder {{oops}}" in text
    assert len(errors) == 6, text


def test_the_compiler_refuses_unusable_key_text(tmp_path: Path) -> None:
    errors = _compile(tmp_path, '''
bad = job("bad", steps=[step("s", "true")],
          cache=[Cache(key=" lead", paths=["x"]), Cache(key="tab\\tkey", paths=["x"]),
                 Cache(key="k" * 600, paths=["x"]), Cache(key="{{os}} ok", paths=["x"])])
ci = workflow("ci", on=push(), jobs=[bad])''')
    text = "\\n".join(errors)
    assert text.count("control character or white space at an end") == 2, text
    assert "longer than 512 characters" in text and len(errors) == 3, text
