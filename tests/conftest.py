"""Shared test helpers: real git repositories in temp dirs and the real `kici` command."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.s3server import S3Server, seaweedfs

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"

GIT_ENV = {
    "GIT_AUTHOR_NAME": "KiCI Test",
    "GIT_AUTHOR_EMAIL": "test@kici.invalid",
    "GIT_COMMITTER_NAME": "KiCI Test",
    "GIT_COMMITTER_EMAIL": "test@kici.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, env={**os.environ, **GIT_ENV}, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


def write_files(root: Path, files: Mapping[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(textwrap.dedent(content).lstrip("\n"), encoding="utf-8")


def make_repo(root: Path, files: Mapping[str, str | bytes], *, commit: bool = True, branch: str = "main") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", branch)
    write_files(root, files)
    if commit:
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "initial")
    return root


@pytest.fixture
def repo_factory(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def factory(files: Mapping[str, str | bytes], **kw: object) -> Path:
        return make_repo(tmp_path / f"repo{next(counter)}", files, **kw)  # type: ignore[arg-type]

    return factory


def kici_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KICI_")}
    # behave like a user's shell, where Python writes bytecode caches: kici must not leave them behind
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(GIT_ENV)
    env.update(extra or {})
    return env


def run_kici(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real `kici` command in a subprocess (no terminal, so no colours)."""
    return subprocess.run(
        [sys.executable, "-m", "kici", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=kici_env(env),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS) for the session, with an empty bucket `kici-test`; stopped at the end."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def die_with_test_run() -> None:
    """`preexec_fn` for the agents and orchestrators tests start: the kernel kills them if the pytest process
    dies without running its teardown (a SIGTERMed or crashed run), so none outlives the run. Agents start
    in their own session, out of reach of the terminal's signals."""
    import ctypes
    import signal as _signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(_signal.SIGKILL), 0, 0, 0)
