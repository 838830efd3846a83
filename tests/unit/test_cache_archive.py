"""Cache archives (kici.runner.cache_archive): a streamed tar+gzip round trip keeps files, modes, symlinks and
hard links; extraction refuses anything that would write outside the workspace."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from kici.runner.cache_archive import (
    CacheArchiveError,
    CachePathError,
    existing_paths,
    extract_archive,
    write_archive,
)


def _archive(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> io.BytesIO:
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw.seek(0)
    return raw


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def test_round_trip(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / ".venv/bin").mkdir(parents=True)
    (ws / ".venv/bin/tool").write_text("#!/bin/sh\n")
    (ws / ".venv/bin/tool").chmod(0o755)
    (ws / ".venv/bin/python").symlink_to("/usr/bin/python3")  # a venv's interpreter: restored as it was
    (ws / ".venv/data.bin").write_bytes(os.urandom(600_000))
    os.link(ws / ".venv/data.bin", ws / ".venv/same.bin")
    (ws / "other.txt").write_text("not cached")
    out = io.BytesIO()
    write_archive(ws, [".venv"], out)
    out.seek(0)
    target = tmp_path / "restored"
    target.mkdir()
    done = extract_archive(out, target, [".venv"])
    assert done.files == 6 and done.skipped == 0
    assert (target / ".venv/data.bin").read_bytes() == (ws / ".venv/data.bin").read_bytes()
    assert os.stat(target / ".venv/same.bin").st_ino == os.stat(target / ".venv/data.bin").st_ino
    assert os.readlink(target / ".venv/bin/python") == "/usr/bin/python3"
    assert os.stat(target / ".venv/bin/tool").st_mode & 0o777 == 0o755
    assert not (target / "other.txt").exists()


def test_members_outside_the_declared_paths_are_skipped(tmp_path: Path) -> None:
    done = extract_archive(_archive([_file("keep/a"), _file("elsewhere/b")]), tmp_path, ["keep"])
    assert (done.files, done.skipped) == (1, 1) and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(("members", "problem"), [
    ([_file("/etc/evil")], "absolute path"),
    ([_file("keep/../../evil")], "climbs out"),
    ([_link("keep/out", "/tmp"), _file("keep/out/evil")], "through the symlink 'keep/out'"),
    ([_link("keep/hard", "/etc/passwd", tarfile.LNKTYPE)], "absolute path"),
    ([_link("keep/hard", "keep/never-extracted", tarfile.LNKTYPE)], "not a file of this archive"),
    ([_link("keep/hard", "keep/../../x", tarfile.LNKTYPE)], "climbs out"),
])
def test_unsafe_archives_are_refused(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]],
                                     problem: str) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    with pytest.raises(CacheArchiveError, match=problem):
        extract_archive(_archive(members), ws, ["keep", "etc"])
    assert not any(p.name == "evil" for p in tmp_path.rglob("*")) and not Path("/tmp/evil").exists()


def test_an_existing_link_is_replaced_never_followed(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "keep").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    os.symlink(victim, ws / "keep/file")
    extract_archive(_archive([_file("keep/file", b"new")]), ws, ["keep"])
    assert victim.read_text() == "untouched" and (ws / "keep/file").read_bytes() == b"new"
    assert not (ws / "keep/file").is_symlink()


def test_a_corrupt_archive_is_an_error(tmp_path: Path) -> None:
    data = _archive([_file("keep/a", os.urandom(100_000))]).getvalue()
    with pytest.raises(CacheArchiveError, match="corrupt"):
        extract_archive(io.BytesIO(data[: len(data) // 2]), tmp_path, ["keep"])
    with pytest.raises(CacheArchiveError, match="corrupt"):
        extract_archive(io.BytesIO(b"not gzip at all"), tmp_path, ["keep"])


def test_cache_paths_leaving_the_workspace(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "real").mkdir(parents=True)
    os.symlink(tmp_path, ws / "up")
    os.symlink(ws / "real", ws / "inside")
    assert existing_paths(ws, ["real", "inside", "gone"]) == (["real", "inside"], ["gone"])
    with pytest.raises(CachePathError, match="'up' leaves the workspace"):
        existing_paths(ws, ["up"])
    with pytest.raises(CachePathError, match="'up/x' leaves the workspace"):
        existing_paths(ws, ["up/x"])
