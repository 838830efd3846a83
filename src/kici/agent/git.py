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

The token travels in an `Authorization: Basic base64(x-access-token:TOKEN)` header set through git's
`GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_0`/`GIT_CONFIG_VALUE_0` environment variables, which git reads as
command-line configuration without it ever being on a command line or in a file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

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
        self, *, env: Mapping[str, str], token: str | None, on_line: OnLine, timeout_s: float, borrow_local: bool = True
    ) -> None:
        self._borrow_local = borrow_local
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
            await asyncio.wait_for(asyncio.gather(pump(), proc.wait()), self._timeout_s)
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

    async def _verified(self, sha: str, dest: Path) -> str:
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


def _refspec(ref: str) -> str:
    if ref.startswith("refs/"):
        return ref
    if ref.startswith(("heads/", "tags/")):
        return f"refs/{ref}"
    return f"refs/heads/{ref}"


def _same_commit(head: str, sha: str) -> bool:
    head = head.strip().lower()
    if _FULL_SHA.match(sha):
        return head == sha
    return len(sha) >= 7 and head.startswith(sha)
