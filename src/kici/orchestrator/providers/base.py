"""The provider interface."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

LOCK_FILE_PATH = ".kici/kici.lock.json"

_SHA = re.compile(r"[0-9a-fA-F]{4,64}")


MAX_LOCK_FILE_BYTES = 16 * 1024 * 1024
"""A lock file larger than this is not read (it is reported as corrupt, with a failed run saying why)."""


class ProviderError(Exception):
    """The host could not answer (unreachable, unauthorised, unknown commit): the delivery fails, as
    opposed to a lock file that is simply not there (`read_lock_file` returns None)."""


class LockFileTooLarge(ProviderError):
    """The lock file exists but is over `MAX_LOCK_FILE_BYTES`."""

    def __init__(self, size: int, limit: int = MAX_LOCK_FILE_BYTES) -> None:
        super().__init__(f"lock file is {size} bytes, over the {limit}-byte limit")
        self.size = size


def check_sha(value: str) -> str:
    """A commit id, refused unless it is hex (it ends up on a command line and in URLs)."""
    if not isinstance(value, str) or _SHA.fullmatch(value) is None:
        raise ProviderError(f"not a commit id: {value!r}")
    return value.lower()


def check_ref(value: str) -> str:
    """A branch/tag name or sha safe to hand to git or put in a URL path."""
    if (
        not isinstance(value, str)
        or not value
        or value.startswith("-")
        or any(ch.isspace() or ord(ch) < 32 for ch in value)
        or ".." in value
        or "\\" in value
    ):
        raise ProviderError(f"not a usable ref: {value!r}")
    return value


@dataclass(frozen=True)
class CloneAccess:
    """How an agent clones a run's repository: the URL, and a short-lived token it sends in an HTTP
    header (never part of the URL)."""

    url: str
    token: str | None = None


class LockFileSource(Protocol):
    """What the pipeline needs from a host. `repo` is `owner/name` (ignored by the git provider, whose
    source is one repository)."""

    @property
    def cache_prefix(self) -> str:
        """The provider part of lock-file cache keys (`github:<source id>`, `git:<source id>`)."""
        ...

    async def read_lock_file(self, repo: str, sha: str) -> bytes | None:
        """`.kici/kici.lock.json` at exactly `sha`; None when the commit has no such file."""
        ...

    async def changed_files(self, repo: str, base: str, head: str) -> list[str]:
        """Paths changed between the merge base of `base` and `head`, and `head` (`base...head`)."""
        ...

    async def resolve_ref(self, repo: str, ref: str) -> str | None:
        """The commit a branch (or tag) points at now; None when it does not exist."""
        ...

    async def clone_access(self, repo: str) -> CloneAccess:
        """Where and with which credential an agent clones `repo` for a job."""
        ...
