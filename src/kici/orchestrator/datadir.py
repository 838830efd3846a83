"""The data dir and the private files in it (secret key, bootstrap admin token).

Private files are created with mode 0600 from the first byte (`os.open` with the mode, not chmod after
writing), so there is no window in which another local user could read them.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path

from kici.orchestrator.config import Settings
from kici.orchestrator.logs import log_event

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class DataDirError(Exception):
    """The data dir or one of its files cannot be used; the message names the path."""


def ensure_data_dir(path: Path) -> None:
    """Create `path` (mode 0700) if missing. An existing directory is left as the operator made it, with a
    warning when other users can read it."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise DataDirError(f"KICI_DATA_DIR: cannot create {path}: {exc.strerror}") from None
    if not path.is_dir():
        raise DataDirError(f"KICI_DATA_DIR: {path} exists and is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataDirError(f"KICI_DATA_DIR: {path} is not writable by this user")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log_event("data_dir.permissive", level="warning", path=str(path), mode=oct(mode),
                  hint="other users can list it; chmod 700 unless that is intended")


def write_private_file(path: Path, text: str, *, replace: bool = False) -> bool:
    """Write `text` to `path` with mode 0600. Without `replace`, an existing file is kept and False is
    returned (so two processes racing to create it agree on the first one)."""
    if not replace:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return True
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return True


def _tighten(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        path.chmod(0o600)
        log_event("data_dir.file_permissions_fixed", level="warning", path=str(path), was=oct(mode), now="0o600")


def _read_key_file(path: Path, setting: str) -> bytes:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise DataDirError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    if not _HEX64.match(text):
        raise DataDirError(f"{setting}: {path} must hold 64 hex characters (32 bytes)")
    return bytes.fromhex(text)


def load_old_secret_key(settings: Settings) -> bytes | None:
    """The previous key during a rotation (`KICI_SECRET_KEY_OLD` or `_OLD_FILE`); None outside one."""
    if settings.secret_key_old is not None:
        return bytes.fromhex(settings.secret_key_old.get_secret_value())
    if settings.secret_key_old_file is not None:
        return _read_key_file(settings.secret_key_old_file, "KICI_SECRET_KEY_OLD_FILE")
    return None


def load_or_create_secret_key(settings: Settings) -> bytes:
    """The 32-byte secret key: `KICI_SECRET_KEY`, else the file `KICI_SECRET_KEY_FILE` names, else
    `<data dir>/secret-key`, generated on first use."""
    path = settings.generated_secret_key_file
    if settings.secret_key is not None or settings.secret_key_file is not None:
        if settings.secret_key is not None:
            key = bytes.fromhex(settings.secret_key.get_secret_value())
        else:
            assert settings.secret_key_file is not None
            key = _read_key_file(settings.secret_key_file, "KICI_SECRET_KEY_FILE")
        if settings.secret_key_file != path:
            _warn_if_file_key_differs(path, key, load_old_secret_key(settings))
        return key
    try:
        if write_private_file(path, secrets.token_hex(32) + "\n"):
            log_event("secret_key.generated", path=str(path),
                      hint="back this file up: it decrypts the source secrets stored in the database")
        _tighten(path)
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise DataDirError(f"secret key file {path}: {exc.strerror}") from None
    if not _HEX64.match(text):
        raise DataDirError(f"secret key file {path}: must hold 64 hex characters (32 bytes)")
    return bytes.fromhex(text)


def _warn_if_file_key_differs(path: Path, key: bytes, old_key: bytes | None) -> None:
    # Switching from the generated file to KICI_SECRET_KEY with a different value would make every secret
    # encrypted so far unreadable; say so at start rather than at the first failed decryption.
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return
    # During a rotation away from the generated key, that key is the old one: it still opens what it sealed.
    if _HEX64.match(text) and bytes.fromhex(text) not in (key, old_key):
        log_event("secret_key.mismatch", level="warning", path=str(path),
                  hint="KICI_SECRET_KEY differs from the generated key file; secrets encrypted with the file's "
                  "key cannot be decrypted with KICI_SECRET_KEY")
