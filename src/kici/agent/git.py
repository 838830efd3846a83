"""Cloning the dispatched commit into a job's workspace, with the token kept out of argv, URLs, `.git/config`
and logs.

`git init`; then, for a repository on this machine (a local path or `file://` URL), its objects are
borrowed through `objects/info/alternates` (as `git clone --shared` does) and the commit is checked out
directly, with no fetch and no copy. Otherwise (or when the local repository lacks the commit, or
`KICI_CLONE_LOCAL_SHARED=false`): `git remote add origin URL` (the URL as dispatched, which carries no
token), then `git fetch --depth=1 origin SHA`. Servers that refuse to fetch an unadvertised SHA (protocol
v0 with `uploadpack.allowReachableSHA1InWant` off) get a second try fetching the dispatched ref
(`--depth=50`), then a full (unshallowed) fetch of branches and tags. Then a detached checkout and a check
that HEAD is the SHA.

A remote repository (not a local path or `file://`) goes through a mirror cache when the agent has one
(`KICI_GIT_MIRRORS`): a bare mirror per URL under `<work dir>/mirrors/`, updated by a fetch of only what is
new under an exclusive `flock`; the job's repository borrows its objects for the checkout, then copies them
(`git repack -a -d`, as `clone --dissociate` does) and stops borrowing. A damaged mirror is recreated;
when the mirror cannot serve the commit the direct fetch below runs as usual.

The token travels in an `Authorization: Basic base64(x-access-token:TOKEN)` header set through git's
`GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_0`/`GIT_CONFIG_VALUE_0` environment variables, which git reads as
command-line configuration without it ever being on a command line or in a file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from kici.agent.log import log_event
from kici.engine import aio
from kici.runner import proctree

OnLine = Callable[[str], None]

_BASIC = re.compile(r"(Basic|Bearer)\s+[A-Za-z0-9+/=._~-]+", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"([a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
_FULL_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


class CloneError(Exception):
    """The checkout failed; the message is one redacted, human-readable line (or a few)."""


class CloneCancelled(Exception):
    """The job was cancelled while cloning."""


def auth_header(token: str) -> str:
    encoded = base64.b64encode(f"x-access-token:{token}".encode()).decode("ascii")
    return f"Authorization: Basic {encoded}"


def redact(text: str, token: str | None = None) -> str:
    """Hide credentials in git output: `Basic …`/`Bearer …` values, `user:pass@` in URLs, the token."""
    if token:
        text = text.replace(token, "[REDACTED]")
        text = text.replace(auth_header(token).split(" ", 2)[2], "[REDACTED]")
    text = _BASIC.sub(lambda m: f"{m.group(1)} [REDACTED]", text)
    return _URL_CREDENTIALS.sub(lambda m: f"{m.group(1)}[REDACTED]@", text)


def git_env(base: Mapping[str, str], token: str | None) -> dict[str, str]:
    """The environment of the agent's git commands: the agent's own minus every `KICI_*` variable, never
    prompting, plus the auth header when there is a token."""
    env = {k: v for k, v in base.items() if (not k.startswith("KICI_") and not k.startswith("GIT_CONFIG_"))
           or k in ("GIT_CONFIG_GLOBAL", "GIT_CONFIG_NOSYSTEM", "GIT_CONFIG_SYSTEM")}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GIT_ASKPASS"] = "true"  # never ask; a missing credential is a clear failure instead of a hang
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    if token:
        env["GIT_CONFIG_COUNT"] = "1"
        env["GIT_CONFIG_KEY_0"] = "http.extraHeader"
        env["GIT_CONFIG_VALUE_0"] = auth_header(token)
    return env


def remote_url(repo_url: str) -> str:
    """A local path as an absolute path; URLs unchanged (`file://` included)."""
    if "://" in repo_url or re.match(r"^[\w.-]+@[\w.-]+:", repo_url):
        return repo_url
    return str(Path(repo_url).expanduser().absolute())


def local_objects_dir(url: str) -> Path | None:
    """The object directory of a repository given as a local path (or `file://` URL), if it has one."""
    if url.startswith("file://"):
        url = urlsplit(url).path
    elif "://" in url or re.match(r"^[\w.-]+@[\w.-]+:", url):
        return None
    root = Path(url)
    for candidate in (root / ".git" / "objects", root / "objects"):
        if candidate.is_dir() and (candidate.parent / "HEAD").is_file():
            return candidate.resolve()
    return None


def shown_url(repo_url: str) -> str:
    parts = urlsplit(repo_url)
    if parts.username or parts.password:
        return redact(repo_url)
    return repo_url


class Cloner:
    """One clone; `cancel()` (from another task) kills the running git command and its children."""

    def __init__(
        self, *, env: Mapping[str, str], token: str | None, on_line: OnLine, timeout_s: float,
        borrow_local: bool = True, mirrors_dir: Path | None = None,
    ) -> None:
        self._borrow_local = borrow_local
        self._mirrors_dir = mirrors_dir
        self._env = git_env(env, token)
        self._token = token
        self._on_line = on_line
        self._timeout_s = timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            # git runs in its own session: its group holds it and the helpers it started (remote-http, …)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    async def run(self, args: Sequence[str], cwd: Path, *, show: bool = True) -> tuple[int, str]:
        """Run `git ARGS`; output lines (redacted) go to the job's setup log when `show`."""
        if self.cancelled:
            raise CloneCancelled()
        proc = await asyncio.create_subprocess_exec(
            "git", *args, cwd=cwd, env=self._env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )
        self._proc = proc
        output: list[str] = []

        async def pump() -> None:
            assert proc.stdout is not None
            while True:
                raw = await proc.stdout.readline()
                if not raw:
                    return
                # progress meters rewrite one line with \r: keep the last state of it
                line = redact(raw.decode("utf-8", "replace").rstrip("\n").split("\r")[-1], self._token)
                if line.strip():
                    output.append(line)
                    if show:
                        self._on_line(line)

        try:
            await aio.wait_for(asyncio.gather(pump(), proc.wait()), self._timeout_s)
        except TimeoutError:
            await asyncio.to_thread(proctree.kill_tree, proc.pid, grace=0)
            await proc.wait()
            raise CloneError(f"git {args[0]} timed out after {self._timeout_s:.0f}s") from None
        finally:
            if proc.returncode is None:
                await asyncio.to_thread(proctree.kill_tree, proc.pid, grace=0)
                await proc.wait()
            self._proc = None
        if self.cancelled:
            raise CloneCancelled()
        return proc.returncode or 0, "\n".join(output[-10:])

    async def checkout(self, repo_url: str, sha: str, ref: str | None, dest: Path) -> str:
        """Clone `repo_url` at `sha` into `dest` (which must exist and be empty); returns HEAD."""
        sha = sha.strip().lower()
        url = remote_url(repo_url)
        self._on_line(f"cloning {shown_url(repo_url)} at {sha}" + (f" ({ref})" if ref else ""))
        await self._must(["init", "-q"], dest, "git init failed")
        objects = local_objects_dir(url) if self._borrow_local else None
        if objects is not None and await self._checkout_borrowed(objects, sha, dest):
            return await self._verified(sha, dest)
        if self._mirrors_dir is not None and is_remote(url):
            if await self._checkout_from_mirror(url, sha, ref, dest):
                return await self._verified(sha, dest)
            await self._reset(dest)
        await self._must(["remote", "add", "origin", url], dest, "git remote add failed")
        code, _ = await self.run(["fetch", "--depth=1", "--no-tags", "origin", sha], dest, show=False)
        if code != 0 or not await self._has_commit(sha, dest):
            self._on_line("the server did not serve the commit by SHA; fetching the ref instead")
            fetched = False
            if ref:
                code, _ = await self.run(["fetch", "--depth=50", "--no-tags", "origin", _refspec(ref)], dest)
                fetched = code == 0 and await self._has_commit(sha, dest)
            if not fetched:
                # the shallow fetch above left a shallow boundary, behind which a plain fetch adds nothing
                unshallow = ["--unshallow"] if (dest / ".git" / "shallow").exists() else []
                code, tail = await self.run(
                    ["fetch", *unshallow, "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"], dest
                )
                if code != 0:
                    raise CloneError(f"git fetch from {shown_url(repo_url)} failed: {tail or f'exit code {code}'}")
                if not await self._has_commit(sha, dest):
                    raise CloneError(
                        f"SHA mismatch: commit {sha} was not found in {shown_url(repo_url)}"
                        + (f" (ref {ref})" if ref else "")
                    )
        await self._must(["-c", "advice.detachedHead=false", "checkout", "-q", "--detach", sha], dest,
                         f"git checkout of {sha} failed")
        return await self._verified(sha, dest)

    async def _checkout_borrowed(self, objects: Path, sha: str, dest: Path) -> bool:
        """A repository on this machine: borrow its objects (`objects/info/alternates`, as `git clone
        --shared` does) instead of copying them through a fetch, then check out. False (and the
        borrowing undone) when the commit is not there, so the caller fetches as usual."""
        alternates = dest / ".git" / "objects" / "info" / "alternates"
        alternates.parent.mkdir(parents=True, exist_ok=True)
        alternates.write_text(f"{objects}\n", encoding="utf-8")
        code, _ = await self.run(["-c", "advice.detachedHead=false", "checkout", "-q", "--detach", sha], dest,
                                 show=False)
        if code == 0:
            return True
        alternates.unlink(missing_ok=True)
        return False

    # -- the mirror cache ----------------------------------------------------------------------------

    async def _checkout_from_mirror(self, url: str, sha: str, ref: str | None, dest: Path) -> bool:
        """Bring the repository's mirror up to date (fetching only what is new), then check `sha` out of
        it: its objects borrowed, then copied into the job's repository (`git repack -a -d`, what
        `clone --dissociate` does) and the borrowing undone, so later mirror updates cannot affect the
        checkout. False when the mirror cannot serve the commit: the caller fetches directly."""
        assert self._mirrors_dir is not None
        mirror = mirror_path(self._mirrors_dir, url)
        async with _MirrorLock(mirror.with_name(mirror.name + ".lock"), self):
            for attempt in (1, 2):
                if not await self._update_mirror(mirror, url, sha, ref):
                    return False
                if await self._borrow_and_dissociate(mirror, sha, dest, url):
                    return True
                # the mirror says it has the commit but cannot produce it: corrupt, start over once
                log_event("git.mirror_recreated", level="warning", url=shown_url(url), reason="checkout failed")
                self._on_line("the mirror cache of this repository is damaged; recreating it")
                await asyncio.to_thread(_remove_tree, mirror)
                await self._reset(dest)
                if attempt == 2:
                    return False
        return False

    async def _update_mirror(self, mirror: Path, url: str, sha: str, ref: str | None) -> bool:
        """Fetch new objects into the bare mirror (created on first use); True when it has `sha`."""
        started = time.monotonic()
        for attempt in (1, 2):
            created = not (mirror / "HEAD").is_file()
            if created:
                await asyncio.to_thread(_remove_tree, mirror)
                mirror.mkdir(parents=True, mode=0o700)
                # no remote in its config: the URL is given per fetch (and the token only ever in a header)
                await self._must(["init", "-q", "--bare"], mirror, "git init of the mirror failed")
                await self._must(["config", "gc.auto", "0"], mirror, "git config of the mirror failed")
            # always fetched, even when the mirror has the commit already: the fetch, made with this job's
            # token, is what proves the job may read the repository (and costs one round trip when
            # nothing is new)
            self._on_line(("creating" if created else "updating") + " the mirror cache")
            code, tail = await self.run(
                ["fetch", "--progress", "--prune", "--no-tags", url, "+refs/heads/*:refs/heads/*",
                 "+refs/tags/*:refs/tags/*"], mirror, show=False)
            objects = _received_objects(tail)
            if code == 0 and not await self._has_commit(sha, mirror):
                # not on a branch or tag (any more): ask for the commit itself, then the dispatched ref
                code, more = await self.run(["fetch", "--progress", url, sha], mirror, show=False)
                if code != 0 and ref:
                    code, more = await self.run(["fetch", "--progress", url, _refspec(ref)], mirror, show=False)
                objects = (objects or 0) + (_received_objects(more) or 0)
            if code == 0:
                has = await self._has_commit(sha, mirror)
                log_event("git.mirror", url=shown_url(url), created=created, objects=objects,
                          has_commit=has, duration_ms=round((time.monotonic() - started) * 1000))
                if objects is not None:
                    self._on_line(f"mirror cache: {objects} new object(s) fetched")
                return has
            if created:
                return False  # the server or the network: the direct fetch reports it
            fsck, _ = await self.run(["fsck", "--connectivity-only", "--no-dangling"], mirror, show=False)
            if fsck == 0:
                return False
            log_event("git.mirror_recreated", level="warning", url=shown_url(url), reason="fsck failed",
                      attempt=attempt)
            self._on_line("the mirror cache of this repository is damaged; recreating it")
            await asyncio.to_thread(_remove_tree, mirror)
        return False

    async def _borrow_and_dissociate(self, mirror: Path, sha: str, dest: Path, url: str) -> bool:
        alternates = dest / ".git" / "objects" / "info" / "alternates"
        alternates.parent.mkdir(parents=True, exist_ok=True)
        alternates.write_text(f"{(mirror / 'objects').resolve()}\n", encoding="utf-8")
        code, _ = await self.run(["-c", "advice.detachedHead=false", "checkout", "-q", "--detach", sha], dest,
                                 show=False)
        if code == 0:
            code, _ = await self.run(["repack", "-a", "-d", "-q"], dest, show=False)
        alternates.unlink(missing_ok=True)
        if code != 0:
            return False
        fsck, _ = await self.run(["cat-file", "-e", f"{sha}^{{tree}}"], dest, show=False)
        if fsck != 0:
            return False
        await self._must(["remote", "add", "origin", url], dest, "git remote add failed")
        return True

    async def _reset(self, dest: Path) -> None:
        """An empty, freshly initialised repository in `dest` again (after a failed mirror checkout)."""
        await asyncio.to_thread(_empty_dir, dest)
        await self._must(["init", "-q"], dest, "git init failed")

    async def _verified(self, sha: str, dest: Path) -> str:
        # a detached checkout's HEAD file holds the commit id itself: no git process needed to read it
        head = _detached_head(dest)
        code = 0
        if head is None:
            code, head = await self.run(["rev-parse", "HEAD"], dest, show=False)
            head = head.strip().splitlines()[-1] if head.strip() else ""
        if code != 0 or not _same_commit(head, sha):
            raise CloneError(f"SHA mismatch: expected {sha}, got {head or 'nothing'}")
        self._on_line(f"checked out {head}")
        return head

    async def _must(self, args: list[str], cwd: Path, what: str) -> None:
        code, tail = await self.run(args, cwd, show=False)
        if code != 0:
            raise CloneError(f"{what}: {tail or f'exit code {code}'}")

    async def _has_commit(self, sha: str, cwd: Path) -> bool:
        code, _ = await self.run(["cat-file", "-e", f"{sha}^{{commit}}"], cwd, show=False)
        return code == 0


def is_remote(url: str) -> bool:
    """A repository reached over the network (not a local path or `file://`): those get a mirror."""
    return ("://" in url and not url.startswith("file://")) or re.match(r"^[\w.-]+@[\w.-]+:", url) is not None


def mirror_path(mirrors_dir: Path, url: str) -> Path:
    """`<mirrors>/<sha256 of the URL>`: one bare mirror per repository URL."""
    return mirrors_dir / hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]


_RECEIVED = re.compile(r"(?:Receiving|Unpacking) objects:\s+\d+% \(\d+/(\d+)\)")
_TOTAL = re.compile(r"Total (\d+)")


def _received_objects(output: str) -> int | None:
    """How many objects a fetch transferred, from its progress output; 0 when it had nothing to get."""
    for pattern in (_RECEIVED, _TOTAL):
        found = pattern.findall(output)
        if found:
            return int(found[-1])
    return 0 if "objects:" not in output else None


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _empty_dir(path: Path) -> None:
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


class _MirrorLock:
    """An exclusive `flock` on `<mirror>.lock` while a job updates and reads the mirror: concurrent jobs of
    one repository take turns (the second finds the commit already there). Polled, so a cancelled clone
    stops waiting at once."""

    def __init__(self, path: Path, cloner: Cloner) -> None:
        self.path = path
        self.cloner = cloner
        self.fd: int | None = None

    async def __aenter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if self.cloner.cancelled:
                    os.close(fd)
                    raise CloneCancelled() from None
                if not waited:
                    waited = True
                    self.cloner._on_line("waiting for another job updating the mirror cache")
                await asyncio.sleep(0.05)
        self.fd = fd

    async def __aexit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def _refspec(ref: str) -> str:
    if ref.startswith("refs/"):
        return ref
    if ref.startswith(("heads/", "tags/")):
        return f"refs/{ref}"
    return f"refs/heads/{ref}"


def _detached_head(dest: Path) -> str | None:
    """The commit id in `dest/.git/HEAD` when HEAD is detached (a full SHA-1 or SHA-256), else None."""
    try:
        text = (dest / ".git" / "HEAD").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text.lower() if _FULL_SHA.match(text) else None


def _same_commit(head: str, sha: str) -> bool:
    head = head.strip().lower()
    if _FULL_SHA.match(sha):
        return head == sha
    return len(sha) >= 7 and head.startswith(sha)
