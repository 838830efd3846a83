"""The data dir and its private files: created 0700/0600, reused, repaired, refused when unusable."""

from __future__ import annotations

import io
import json
import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kici.orchestrator.config import Settings
from kici.orchestrator.datadir import (
    DataDirError,
    ensure_data_dir,
    load_old_secret_key,
    load_or_create_secret_key,
    write_private_file,
)
from kici.orchestrator.logs import configure_logging


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = list(root.handlers)
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)


def events(stream: io.StringIO) -> list[str]:
    return [json.loads(line)["event"] for line in stream.getvalue().splitlines()]


def settings(data_dir: Path, **extra: object) -> Settings:
    return Settings(data_dir=data_dir, database_url=f"sqlite:///{data_dir}/kici.db", **extra)  # type: ignore[arg-type]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secret_key_is_generated_once_with_mode_0600(tmp_path: Path, log: io.StringIO) -> None:
    data = tmp_path / "a" / "b"
    ensure_data_dir(data)
    assert mode(data) == 0o700
    key = load_or_create_secret_key(settings(data))
    assert len(key) == 32 and mode(data / "secret-key") == 0o600
    assert load_or_create_secret_key(settings(data)) == key
    assert events(log) == ["secret_key.generated"]


def test_a_readable_key_file_is_tightened(tmp_path: Path, log: io.StringIO) -> None:
    (tmp_path / "secret-key").write_text("ab" * 32 + "\n")
    (tmp_path / "secret-key").chmod(0o644)
    assert load_or_create_secret_key(settings(tmp_path)) == bytes.fromhex("ab" * 32)
    assert mode(tmp_path / "secret-key") == 0o600
    assert events(log) == ["data_dir.file_permissions_fixed"]


def test_a_corrupt_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret-key"
    write_private_file(path, "not a key\n")
    with pytest.raises(DataDirError, match="must hold 64 hex characters"):
        load_or_create_secret_key(settings(tmp_path))


def test_configured_key_wins_and_a_different_file_key_is_flagged(tmp_path: Path, log: io.StringIO) -> None:
    write_private_file(tmp_path / "secret-key", "ab" * 32 + "\n")
    assert load_or_create_secret_key(settings(tmp_path, secret_key="cd" * 32)) == bytes.fromhex("cd" * 32)
    assert events(log) == ["secret_key.mismatch"]
    assert "cd" * 32 not in log.getvalue() and "ab" * 32 not in log.getvalue()


def test_unusable_data_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(DataDirError, match="KICI_DATA_DIR"):
        ensure_data_dir(tmp_path / "file")


def test_private_file_replace_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "token"
    assert write_private_file(path, "one\n")
    assert not write_private_file(path, "two\n")  # kept: first writer wins
    assert path.read_text() == "one\n"
    assert write_private_file(path, "three\n", replace=True)
    assert path.read_text() == "three\n" and mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["token"]  # no temp file left behind


def test_key_files_and_the_old_key(tmp_path: Path, log: io.StringIO) -> None:
    key_file, old_file = tmp_path / "new-key", tmp_path / "secret-key"
    key_file.write_text("cd" * 32 + "\n")
    write_private_file(old_file, "ab" * 32 + "\n")  # the generated key, now the old one
    rotating = settings(tmp_path, secret_key_file=key_file, secret_key_old_file=old_file)
    assert load_or_create_secret_key(rotating) == bytes.fromhex("cd" * 32)
    assert load_old_secret_key(rotating) == bytes.fromhex("ab" * 32)
    assert events(log) == []  # the data dir's key is the old key: no mismatch warning
    assert load_old_secret_key(settings(tmp_path, secret_key_old="ef" * 32)) == bytes.fromhex("ef" * 32)
    assert load_old_secret_key(settings(tmp_path)) is None
    assert load_or_create_secret_key(settings(tmp_path, secret_key_file=key_file)) == bytes.fromhex("cd" * 32)
    assert events(log) == ["secret_key.mismatch"]
    key_file.write_text("short\n")
    with pytest.raises(DataDirError, match=r"KICI_SECRET_KEY_FILE: .* must hold 64 hex characters"):
        load_or_create_secret_key(settings(tmp_path, secret_key_file=key_file))
    with pytest.raises(DataDirError, match="KICI_SECRET_KEY_OLD_FILE: cannot read"):
        load_old_secret_key(settings(tmp_path, secret_key_old_file=tmp_path / "missing"))
