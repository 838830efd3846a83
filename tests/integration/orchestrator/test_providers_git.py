"""The git provider on real repositories (in place and through a bare mirror), and the lock-file cache.
`GitRepo` / `WORKFLOWS` / `compile_into` are also used by the ingest tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kici.orchestrator.ingest.lockcache import LockFileCache
from kici.orchestrator.providers.base import LockFileTooLarge, ProviderError
from kici.orchestrator.providers.git import GitProvider, local_path, repo_name_from_url

WORKFLOWS = """
from kici import job, pr, push, step, tag, workflow

build = job("build", runs_on=["linux"], steps=[step("hi", "echo hi")])
ci = workflow("ci", on=[push(branches=["master", "main"])], jobs=[build])
lint = workflow(
    "lint",
    on=[push(branches=["master"]), pr(target=["master"], paths=["src/**"])],
    jobs=[job("lint", runs_on=["linux"], steps=[step("l", "echo l")])],
)
docs = workflow("docs", on=[push(branches=["changes"], paths=["docs/**"])],
                jobs=[job("docs", steps=[step("d", "echo d")])])
release = workflow("release", on=[tag(patterns=["v*", "simple-*"])], jobs=[job("ship", steps=[step("s", "echo s")])])
"""

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


class GitRepo:
    def __init__(self, path: Path, branch: str = "main") -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", branch)

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(self.path), *args], check=True, capture_output=True, text=True, env=GIT_ENV
        ).stdout.strip()

    def write(self, rel: str, text: str) -> None:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def commit(self, message: str = "c") -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")

    def compile(self, source: str = WORKFLOWS) -> None:
        compile_into(self.path, source)


def compile_into(path: Path, source: str = WORKFLOWS) -> bytes:
    """Write `.kici/workflows/ci.py` and run the real `kici compile` there; the lock file's bytes."""
    (path / ".kici" / "workflows").mkdir(parents=True, exist_ok=True)
    (path / ".kici" / "workflows" / "ci.py").write_text(source)
    subprocess.run(
        [sys.executable, "-m", "kici.cli.main", "compile"],
        cwd=path,
        check=True,
        capture_output=True,
        env={**GIT_ENV, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    return (path / ".kici" / "kici.lock.json").read_bytes()


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return GitRepo(tmp_path / "repo")


def test_local_paths_and_names() -> None:
    assert local_path("/srv/repo") == Path("/srv/repo")
    assert local_path("file:///srv/my%20repo") == Path("/srv/my repo")
    assert local_path("https://example.com/a/b.git") is None
    assert local_path("git@example.com:a/b.git") is None
    assert repo_name_from_url("git@example.com:acme/app.git") == "acme/app"
    assert repo_name_from_url("https://example.com/acme/app.git/") == "acme/app"
    assert repo_name_from_url("/srv/repos/app") == "repos/app"


async def test_reads_in_place(repo: GitRepo) -> None:
    repo.write("README.md", "hi\n")
    first = repo.commit("no lock file yet")
    repo.compile()
    repo.write("src/a.py", "x = 1\n")
    second = repo.commit("with lock file")
    provider = GitProvider("s1", str(repo.path), mirror_root=repo.path.parent / "mirrors")
    assert provider.cache_prefix == "git:s1"
    assert await provider.read_lock_file("ignored", first) is None
    assert await provider.read_lock_file("ignored", second) == (repo.path / ".kici/kici.lock.json").read_bytes()
    assert await provider.changed_files("x", first, second) == [
        ".kici/kici.lock.json",
        ".kici/workflows/ci.py",
        "src/a.py",
    ]
    assert await provider.resolve_ref("x", "main") == second
    assert await provider.resolve_ref("x", "nope") is None
    with pytest.raises(ProviderError, match="not found"):
        await provider.read_lock_file("x", "d" * 40)
    with pytest.raises(ProviderError, match="not a commit id"):
        await provider.read_lock_file("x", "--output=/tmp/pwned")
    with pytest.raises(ProviderError, match="not a usable ref"):
        await provider.changed_files("x", "--output=/tmp/pwned", second)
    assert not (repo.path.parent / "mirrors").exists(), "a local path is read in place"
    missing = GitProvider("s2", str(repo.path / "nope"), mirror_root=repo.path.parent / "mirrors")
    with pytest.raises(ProviderError, match="does not exist"):
        await missing.read_lock_file("x", second)


async def test_reads_through_a_mirror_and_fetches_new_commits(repo: GitRepo, tmp_path: Path) -> None:
    repo.compile()
    first = repo.commit()
    mirrors = tmp_path / "data" / "git-mirrors"
    provider = GitProvider("s1", f"file://{repo.path}", mirror_root=mirrors, force_mirror=True)
    assert await provider.read_lock_file("x", first) is not None
    assert len(list(mirrors.glob("*.git"))) == 1
    repo.write("docs/a.md", "doc\n")
    second = repo.commit()  # not in the mirror yet: fetched on demand
    assert await provider.changed_files("x", first, second) == ["docs/a.md"]
    assert await provider.resolve_ref("x", "main") == second
    with pytest.raises(ProviderError, match="not found"):
        await provider.read_lock_file("x", "e" * 40)


async def test_cache_lru_ttl_single_flight_and_errors() -> None:
    cache = LockFileCache(max_entries=2, ttl_ms=60_000)
    calls: list[str] = []

    def fetcher(key: str, value: bytes | None) -> object:
        async def fetch() -> bytes | None:
            calls.append(key)
            await asyncio.sleep(0.01)
            return value

        return fetch

    results = await asyncio.gather(*(cache.get("a", fetcher("a", b"A")) for _ in range(5)))  # type: ignore[arg-type]
    assert results == [b"A"] * 5 and calls == ["a"], "concurrent misses share one fetch"
    assert await cache.get("m", fetcher("m", None)) is None  # type: ignore[arg-type]
    assert await cache.get("m", fetcher("m", b"never")) is None, "a missing file is cached too"  # type: ignore[arg-type]
    await cache.get("b", fetcher("b", b"B"))  # type: ignore[arg-type]
    assert len(cache) == 2 and calls == ["a", "m", "b"]
    await cache.get("a", fetcher("a", b"A2"))  # type: ignore[arg-type]
    assert calls[-1] == "a", "least recently used entry was evicted"

    async def boom() -> bytes | None:
        raise ProviderError("down")

    with pytest.raises(ProviderError):
        await cache.get("e", boom)
    assert await cache.get("e", fetcher("e", b"E")) == b"E", "errors are not cached"  # type: ignore[arg-type]

    expiring = LockFileCache(max_entries=10, ttl_ms=1)
    await expiring.get("k", fetcher("k", b"1"))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert await expiring.get("k", fetcher("k", b"2")) == b"2"  # type: ignore[arg-type]
    disabled = LockFileCache(max_entries=0, ttl_ms=1000)
    await disabled.get("k", fetcher("k", b"1"))  # type: ignore[arg-type]
    assert len(disabled) == 0
    assert LockFileCache.key("github:s", "o/r", "abc") == "github:s:o/r:abc"


async def test_oversized_lock_file_is_refused(repo: GitRepo, monkeypatch: pytest.MonkeyPatch) -> None:
    repo.compile()
    sha = repo.commit()
    monkeypatch.setattr("kici.orchestrator.providers.git.MAX_LOCK_FILE_BYTES", 100)
    provider = GitProvider("s1", str(repo.path), mirror_root=repo.path.parent / "mirrors")
    with pytest.raises(LockFileTooLarge, match="over the 100-byte limit"):
        await provider.read_lock_file("x", sha)
