"""Cache archives: the paths of a cache as one streamed tar+gzip (`write_archive`) and its safe extraction
back into a workspace (`extract_archive`). Nothing is ever held whole in memory: the archive is written to
and read from a stream chunk by chunk.

Saving: each cache path must stay inside the workspace once symlinks are resolved (a path that leaves it
fails with `CachePathError`); inside a directory, symlinks are stored as symlinks, never followed; only
directories, regular files, symlinks and hard links are stored, without owners.

Extracting never writes outside the target: member names that are absolute or hold `..` are refused, no
member is written through a symlink (every parent must be a real directory under the workspace; an existing
link at a member's place is replaced, never followed), hard links must point at a file this archive
already extracted, set-id bits are dropped. Symlinks themselves are restored as they were stored (a venv's
`bin/python` points at its interpreter): a link is only a name, and creating one gives a job nothing it
could not do itself. Members outside the cache's declared paths are skipped.
"""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_CHUNK = 256 * 1024
GZIP_LEVEL = 1
"""Fast compression: a cache is written once per key, but the job waits for it."""


class CachePathError(ValueError):
    """A cache path that leaves the workspace (through a symlink)."""


class CacheArchiveError(ValueError):
    """An archive that cannot be extracted safely (or is corrupt); nothing should be trusted from it."""


def _inside(root: Path, path: Path) -> bool:
    return path == root or root in path.parents


def existing_paths(workspace: Path, paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """(present, missing) among `paths` (workspace-relative, already normalised); `CachePathError` when one
    of them, or a directory on its way, is a symlink leading out of the workspace."""
    root = workspace.resolve()
    present: list[str] = []
    missing: list[str] = []
    for rel in paths:
        path = root / rel
        if not os.path.lexists(path):
            resolved_parent = path.parent.resolve()
            if not _inside(root, resolved_parent):
                raise CachePathError(f"cache path {rel!r} leaves the workspace (through a symlink)")
            missing.append(rel)
            continue
        if not _inside(root, path.resolve()):
            raise CachePathError(f"cache path {rel!r} leaves the workspace (a symlink to {os.path.realpath(path)})")
        present.append(rel)
    return present, missing


def _members(root: str, rel: str,
             seen: dict[tuple[int, int], str]) -> Iterator[tuple[tarfile.TarInfo, str | None]]:
    """The archive members for `rel` and, for a directory, everything under it (symlinks not followed):
    (header, the file to read its content from). Built from `lstat` directly — tarfile's `gettarinfo`
    looks every owner up in the user and group databases, which costs more than the rest together."""
    path = os.path.join(root, rel)
    st = os.lstat(path)
    info = tarfile.TarInfo(rel)
    info.mode = st.st_mode & 0o777
    info.mtime = int(st.st_mtime)
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        yield info, None
        with os.scandir(path) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            yield from _members(root, f"{rel}/{name}", seen)
    elif stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
        yield info, None
    elif stat.S_ISREG(st.st_mode):
        first = seen.setdefault((st.st_dev, st.st_ino), rel) if st.st_nlink > 1 else rel
        if first != rel:
            info.type = tarfile.LNKTYPE
            info.linkname = first
            yield info, None
        else:
            info.size = st.st_size
            yield info, path
    # sockets, fifos, devices: nothing a cache needs


def write_archive(workspace: Path, paths: Sequence[str], out: BinaryIO) -> None:
    """Write the present `paths` (see `existing_paths`) as tar+gzip to `out`, streaming."""
    root = str(workspace.resolve())
    seen: dict[tuple[int, int], str] = {}
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as compressed, \
            tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for rel in paths:
            for info, source in _members(root, rel, seen):
                if source is None:
                    tar.addfile(info)
                    continue
                with open(source, "rb") as handle:
                    if os.fstat(handle.fileno()).st_size != info.size:
                        raise OSError(f"{info.name} changed while it was being archived")
                    tar.addfile(info, handle)


@dataclass
class Extracted:
    files: int = 0
    skipped: int = 0
    """Members outside the declared paths."""


def _member_name(name: str) -> str:
    if name.startswith("/") or "\\" in name:
        raise CacheArchiveError(f"archive member {name[:200]!r} has an absolute path")
    segments = [s for s in name.split("/") if s not in ("", ".")]
    if ".." in segments:
        raise CacheArchiveError(f"archive member {name[:200]!r} climbs out of the workspace (`..`)")
    if not segments:
        raise CacheArchiveError(f"archive member {name[:200]!r} has an empty name")
    return "/".join(segments)


def _covered(rel: str, paths: Sequence[str]) -> bool:
    return any(rel == p or rel.startswith(p + "/") for p in paths)


class _Target:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: set[str] = set()
        self.dirs: set[str] = set()
        """Directories known to be real directories under the root: nothing in an archive can replace a
        directory (see `clear`), so one check each is enough."""

    def parent_of(self, rel: str) -> Path:
        """The member's parent directory, created as real directories only (never through a symlink)."""
        parent_rel = rel.rpartition("/")[0]
        if not parent_rel or parent_rel in self.dirs:
            return self.root / parent_rel if parent_rel else self.root
        current = self.root
        walked = ""
        for segment in parent_rel.split("/"):
            current = current / segment
            walked = f"{walked}/{segment}" if walked else segment
            if walked in self.dirs:
                continue
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                self.dirs.add(walked)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise CacheArchiveError(f"archive member {rel!r} would be written through the symlink "
                                        f"{current.relative_to(self.root).as_posix()!r}")
            if not stat.S_ISDIR(st.st_mode):
                raise CacheArchiveError(f"archive member {rel!r}: {current.relative_to(self.root).as_posix()!r} "
                                        "is not a directory")
            self.dirs.add(walked)
        return current

    def clear(self, path: Path, rel: str) -> None:
        """Make room for a non-directory member: an existing file or link goes (a link is removed, never
        followed); an existing directory is an error."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise CacheArchiveError(f"archive member {rel!r} would replace a directory")
        os.unlink(path)
        self.files.discard(rel)


def extract_archive(source: BinaryIO, workspace: Path, paths: Sequence[str]) -> Extracted:
    """Extract a tar+gzip stream into `workspace`, keeping only members under `paths`. Raises
    `CacheArchiveError` on an unsafe or corrupt archive (what was extracted until then stays: the caller
    removes the cache's paths)."""
    target = _Target(workspace.resolve())
    done = Extracted()
    try:
        with gzip.GzipFile(fileobj=source, mode="rb") as compressed, \
                tarfile.open(fileobj=compressed, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                rel = _member_name(member.name)
                if not _covered(rel, paths):
                    done.skipped += 1
                    continue
                _extract_one(tar, member, rel, target)
                done.files += 1
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise CacheArchiveError(f"the cache archive is corrupt: {exc}") from None
    return done


def _extract_one(tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str, target: _Target) -> None:
    parent = target.parent_of(rel)
    path = parent / rel.rsplit("/", 1)[-1]
    mode = member.mode & 0o777
    if member.isdir():
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, mode | 0o700)
        else:
            if not stat.S_ISDIR(st.st_mode):
                target.clear(path, rel)
                os.mkdir(path, mode | 0o700)
        target.dirs.add(rel)
        return
    if member.isreg():
        reader = tar.extractfile(member)
        if reader is None:  # pragma: no cover - a regular member always has content
            raise CacheArchiveError(f"archive member {rel!r} has no content")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:  # a new file in the common case; whatever is in the way (a file, a link) goes first
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            target.clear(path, rel)
            fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "wb") as handle:
            while chunk := reader.read(_CHUNK):
                handle.write(chunk)
            os.fchmod(handle.fileno(), mode)
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
        target.files.add(rel)
        return
    if member.issym():
        target.clear(path, rel)
        os.symlink(member.linkname, path)
        return
    if member.islnk():
        source = _member_name(member.linkname)
        if source not in target.files:
            raise CacheArchiveError(f"archive member {rel!r} is a hard link to {member.linkname[:200]!r}, "
                                    "which is not a file of this archive")
        source_path = target.parent_of(source) / source.rsplit("/", 1)[-1]
        target.clear(path, rel)
        os.link(source_path, path, follow_symlinks=False)
        target.files.add(rel)
        return
    raise CacheArchiveError(f"archive member {rel!r} is neither a file, a directory nor a link")
