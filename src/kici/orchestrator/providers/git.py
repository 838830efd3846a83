"""The `git` provider: a repository reachable with the `git` command (a local path, `file://`, or any URL).

- A local path (or `file://` URL) is read in place: `git -C <path> show <sha>:.kici/kici.lock.json` and
  `git -C <path> diff --name-only -z <base>...<head>`. Nothing is copied.
- Any other URL (or `mirror: true` in the source config) is read through a bare mirror under
  `<data dir>/git-mirrors/<hash of the URL>.git`. A commit the mirror does not have is fetched first
  (all branches and tags; then the commit itself, for hosts that allow fetching by id).

Every argument that reaches git is checked (`check_sha` / `check_ref`), and options end with `--`
where git accepts it, so a ref can never be read as an option. Git runs with prompts disabled, so an
unreachable or password-protected URL fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from kici.engine import aio
from kici.orchestrator.providers.base import (
    LOCK_FILE_PATH,
    MAX_LOCK_FILE_BYTES,
    CloneAccess,
    LockFileTooLarge,
    ProviderError,
    check_ref,
    check_sha,
)

GIT_TIMEOUT_SECONDS = 120.0
HEAD_BRANCH_TTL_S = 60.0


def local_path(url: str) -> Path | None:
    """The directory for a local path or `file://` URL; None for a remote URL."""
    if url.startswith("file://"):
        return Path(unquote(urlparse(url).path))
    if "://" in url:
        return None
    head = url.split("/", 1)[0]
    if ":" in head and not url.startswith(("/", ".")):  # scp-like `host:path`
        return None
    return Path(url).expanduser()


def repo_name_from_url(url: str) -> str:
    """A readable `owner/name` for events from a git URL or path (`…/acme/app.git` → `acme/app`)."""
    text = url.rstrip("/").removesuffix(".git")
    text = text.split("://", 1)[-1].replace(":", "/")
    parts = [p for p in text.split("/") if p]
    return "/".join(parts[-2:]) if parts else url


class GitProvider:
    def __init__(self, source_id: str, url: str, *, mirror_root: Path, force_mirror: bool = False) -> None:
        self.source_id = source_id
        self.url = url
        path = None if force_mirror else local_path(url)
        self._worktree = path
        digest = hashlib.sha256(url.encode()).hexdigest()[:24]
        self._mirror = None if path is not None else mirror_root / f"{digest}.git"
        self._mirror_lock = asyncio.Lock()
        self._head_branch: tuple[float, str | None] | None = None
        """(valid until, branch) of the last `head_branch` answer."""

    @property
    def cache_prefix(self) -> str:
        return f"git:{self.source_id}"

    async def clone_access(self, repo: str) -> CloneAccess:
        # agents reach the repository the way the source names it (a path on a shared machine, a file://
        # or network URL); credentials for private git servers belong in the agent's git configuration
        return CloneAccess(self.url)

    @property
    def git_dir(self) -> Path:
        path = self._worktree if self._worktree is not None else self._mirror
        assert path is not None
        return path

    async def _git(self, *args: str, check: bool = True) -> tuple[int, bytes, bytes]:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "LC_ALL": "C"}
        try:
            proc = await asyncio.create_subprocess_exec(
                "git", "-C", str(self.git_dir), *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        except OSError as exc:
            raise ProviderError(f"cannot run git: {exc}") from None
        try:
            out, err = await aio.wait_for(proc.communicate(), GIT_TIMEOUT_SECONDS)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ProviderError(f"git {args[0]} timed out after {GIT_TIMEOUT_SECONDS:.0f}s") from None
        code = proc.returncode if proc.returncode is not None else -1
        if check and code != 0:
            raise ProviderError(f"git {args[0]} failed: {err.decode(errors='replace').strip()[:300]}")
        return code, out, err

    async def _has_commit(self, sha: str) -> bool:
        code, _, _ = await self._git("cat-file", "-e", f"{sha}^{{commit}}", check=False)
        return code == 0

    async def _ensure_commit(self, sha: str) -> None:
        if self._worktree is not None:
            if not self._worktree.exists():
                raise ProviderError(f"git source path {self._worktree} does not exist")
            if not await self._has_commit(sha):
                raise ProviderError(f"commit {sha} not found in {self._worktree}")
            return
        async with self._mirror_lock:
            await self._init_mirror()
            if await self._has_commit(sha):
                return
            await self._fetch_all()
            if await self._has_commit(sha):
                return
            await self._git("fetch", "--quiet", "--no-tags", "--", self.url, sha, check=False)
            if not await self._has_commit(sha):
                raise ProviderError(f"commit {sha} not found at {self.url}")

    async def _init_mirror(self) -> None:
        assert self._mirror is not None
        if (self._mirror / "HEAD").exists():
            return
        self._mirror.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        proc = await asyncio.create_subprocess_exec(
            "git", "init", "--bare", "--quiet", str(self._mirror),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise ProviderError(f"git init of the mirror failed: {err.decode(errors='replace').strip()}")

    async def _fetch_all(self) -> None:
        await self._git(
            "fetch", "--quiet", "--prune", "--no-tags", "--", self.url,
            "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*",
        )

    async def read_lock_file(self, repo: str, sha: str) -> bytes | None:
        sha = check_sha(sha)
        await self._ensure_commit(sha)
        code, out, _ = await self._git("cat-file", "-t", f"{sha}:{LOCK_FILE_PATH}", check=False)
        if code != 0 or out.strip() != b"blob":
            return None
        _, size, _ = await self._git("cat-file", "-s", f"{sha}:{LOCK_FILE_PATH}")
        if int(size.strip() or 0) > MAX_LOCK_FILE_BYTES:
            raise LockFileTooLarge(int(size.strip()), MAX_LOCK_FILE_BYTES)
        _, out, _ = await self._git("cat-file", "blob", f"{sha}:{LOCK_FILE_PATH}")
        return out

    async def changed_files(self, repo: str, base: str, head: str) -> list[str]:
        head = check_sha(head)
        base = check_ref(base)
        await self._ensure_commit(head)
        _, out, _ = await self._git("diff", "--name-only", "-z", "--no-renames", f"{base}...{head}", "--")
        return sorted({p for p in out.decode("utf-8", errors="surrogateescape").split("\0") if p})

    async def branch_heads(self) -> dict[str, str]:
        """`refs/heads/<branch>` → commit, as the repository has them now (a mirror is fetched first)."""
        if self._worktree is not None and not self._worktree.exists():
            raise ProviderError(f"git source path {self._worktree} does not exist")
        if self._mirror is not None:
            async with self._mirror_lock:
                await self._init_mirror()
                await self._fetch_all()
        _, out, _ = await self._git("for-each-ref", "--format=%(refname) %(objectname)", "refs/heads")
        heads: dict[str, str] = {}
        for line in out.decode("utf-8", errors="replace").splitlines():
            ref, _, sha = line.partition(" ")
            if ref and sha:
                heads[ref] = sha
        return heads

    async def head_branch(self) -> str | None:
        """The repository's default branch as git knows it: the branch HEAD names in a bare or remote
        repository. A working repository's HEAD is whatever is checked out, so there `main` (or `master`)
        wins when it exists, and HEAD's branch is the last resort. None when nothing names a branch.

        Remembered for `HEAD_BRANCH_TTL_S`: every push asks (is it the default branch?), and a default
        branch changes rarely."""
        now = time.monotonic()
        if self._head_branch is not None and self._head_branch[0] > now:
            return self._head_branch[1]
        branch = await self._read_head_branch()
        self._head_branch = (now + HEAD_BRANCH_TTL_S, branch)
        return branch

    async def _read_head_branch(self) -> str | None:
        if self._worktree is not None:
            if not self._worktree.exists():
                raise ProviderError(f"git source path {self._worktree} does not exist")
            _, bare, _ = await self._git("rev-parse", "--is-bare-repository", check=False)
            if bare.strip() != b"true":
                for candidate in ("main", "master"):
                    code, _, _ = await self._git("rev-parse", "--verify", "--quiet", f"refs/heads/{candidate}",
                                                 check=False)
                    if code == 0:
                        return candidate
            code, out, _ = await self._git("symbolic-ref", "--quiet", "HEAD", check=False)
        else:
            async with self._mirror_lock:
                await self._init_mirror()
            code, out, _ = await self._git("ls-remote", "--symref", "--", self.url, "HEAD", check=False)
            lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("ref: ")]
            out = lines[0][len("ref: "):].split("\t")[0].encode() if lines else b""
        ref = out.decode(errors="replace").strip()
        if code != 0 or not ref.startswith("refs/heads/"):
            return None
        return ref[len("refs/heads/"):]

    async def resolve_ref(self, repo: str, ref: str) -> str | None:
        ref = check_ref(ref)
        if self._mirror is not None:
            async with self._mirror_lock:
                await self._init_mirror()
                await self._fetch_all()
        for candidate in (ref, f"refs/heads/{ref}", f"refs/tags/{ref}"):
            code, out, _ = await self._git("rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}", check=False)
            if code == 0:
                return out.decode().strip()
        return None
