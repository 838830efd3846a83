"""Which git hook a git source needs, and where it goes: `post-commit` in a working repository (the
one commits are made in), `post-receive` in a bare repository (the one pushed to)."""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

GIT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HookPlace:
    hook: str
    """`post-commit` or `post-receive`."""
    path: Path | None
    """Where to install it, when the repository is on this machine."""


def local_repository(url: str) -> Path | None:
    """The directory of a repository given as a local path or `file://` URL; None for a remote URL."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme or (":" in url.split("/", 1)[0] and not Path(url).exists()):
        return None  # https://, ssh://, scp-like host:path
    return Path(url).expanduser()


def hook_place(url: str) -> HookPlace | None:
    """The hook a repository at `url` needs and its path; None when `url` is not a readable local one."""
    directory = local_repository(url)
    if directory is None or not directory.is_dir():
        return None
    try:
        proc = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "--is-bare-repository", "--absolute-git-dir"],
            capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = proc.stdout.split("\n")
    if proc.returncode != 0 or len(lines) < 2:
        return None
    bare, git_dir = lines[0].strip() == "true", Path(lines[1].strip())
    hook = "post-receive" if bare else "post-commit"
    return HookPlace(hook, git_dir / "hooks" / hook)


def install_advice(source_name: str, url: str) -> str:
    """What `kici-admin source add git` tells the operator to run next."""
    place = hook_place(url)
    command = f"kici-admin source hook {shlex.quote(source_name)}"
    if place is None or place.path is None:
        return (
            f"Install the git hook where the repository lives: `{command}`, saved as hooks/post-receive of the "
            "bare repository pushed to, or as .git/hooks/post-commit of a working repository committed to "
            "(then chmod 700)."
        )
    target = shlex.quote(str(place.path))
    kind = "bare repository: runs start on push" if place.hook == "post-receive" else (
        "working repository: runs start on commit")
    return f"Install the git hook ({kind}): {command} > {target} && chmod 700 {target}"
