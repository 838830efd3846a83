"""Secrets at rest: AES-256-GCM under the orchestrator's secret key (`AppState.secret_key`, 32 bytes).

A sealed value is `version (1 byte) || nonce (12 random bytes) || ciphertext || tag (16 bytes)`.

- The nonce is random per seal (96 bits, GCM's native size); with one key the birthday bound is far
  beyond the number of secrets an orchestrator ever writes.
- The associated data binds a ciphertext to where it belongs: `source:{id}:{field}` for source secrets.
  A blob copied into another row or another field fails to open instead of decrypting to a valid secret.
- The version byte names the blob format (only version 1 exists), not the key. Which key sealed a value is
  recorded next to it, as the key's id (`key_id`: a fingerprint of the key, never the key); a `Keyring`
  holds the current key and, during a rotation, the old one (`KICI_SECRET_KEY_OLD`), and `open_any` tries
  the current key first, then the old one (see docs/operator/secrets.md, "Rotating the key").
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "KEY_VERSION",
    "CryptoError",
    "Keyring",
    "as_keyring",
    "fingerprint",
    "key_id",
    "open_any",
    "open_sealed",
    "seal",
    "secret_aad",
    "source_aad",
]

KEY_VERSION = 1
_NONCE_BYTES = 12
_TAG_BYTES = 16


class CryptoError(Exception):
    """A sealed value cannot be opened (wrong key, wrong binding, tampered or truncated), or no usable key."""


def source_aad(source_id: str, field: str) -> str:
    return f"source:{source_id}:{field}"


def secret_aad(org_id: str, scope: str, name: str) -> str:
    """A scoped secret's binding: the same ciphertext under another name, scope or org does not open."""
    return f"secret:{org_id}:{scope}:{name}"


@functools.lru_cache(maxsize=8)  # dispatch opens every declared secret of every job: derive once per key
def key_id(key: bytes) -> str:
    """A short, stable id of a key (12 hex characters): HMAC-SHA256 under the key of a fixed label, so the
    id says which key sealed a row without revealing anything about the key."""
    return hmac.new(key, b"kici key id v1", hashlib.sha256).hexdigest()[:12]


def fingerprint(key: bytes, value: bytes) -> str:
    """What `secret list` shows of a value: 12 hex characters of HMAC-SHA256 under a key derived from the
    secret key. Never a plain hash: a plain hash of a short or guessable value could be brute-forced from
    the listing. It changes when the key is rotated (rotation recomputes it)."""
    derived = hmac.new(key, b"kici secret fingerprint v1", hashlib.sha256).digest()
    return hmac.new(derived, value, hashlib.sha256).hexdigest()[:12]


@dataclass(frozen=True)
class Keyring:
    """The secret keys an orchestrator holds: `current` seals and is tried first; `old` (set only during a
    rotation, from `KICI_SECRET_KEY_OLD`) is tried when the current key does not open a value."""

    current: bytes | None
    old: bytes | None = None

    @property
    def current_id(self) -> str:
        if self.current is None:
            raise CryptoError("no secret key configured: secrets cannot be encrypted or decrypted")
        return key_id(self.current)

    @property
    def old_id(self) -> str | None:
        return key_id(self.old) if self.old is not None else None

    def keys(self) -> list[bytes]:
        """Current first, then old (when it differs)."""
        found = [k for k in (self.current, self.old) if k is not None]
        return found[:1] if len(found) == 2 and found[0] == found[1] else found


def as_keyring(key: Keyring | bytes | None) -> Keyring:
    return key if isinstance(key, Keyring) else Keyring(current=key)


def _aead(key: bytes | None) -> AESGCM:
    if key is None:
        raise CryptoError("no secret key configured: source secrets cannot be encrypted or decrypted")
    if len(key) != 32:
        raise CryptoError(f"the secret key must be 32 bytes, got {len(key)}")
    return _aesgcm(key)


@functools.lru_cache(maxsize=8)
def _aesgcm(key: bytes) -> AESGCM:
    # AESGCM is stateless once built (a fresh nonce comes with every call): one per key, not one per value
    return AESGCM(key)


def seal(key: bytes | None, plaintext: bytes, aad: str) -> bytes:
    """Encrypt `plaintext` bound to `aad`."""
    nonce = os.urandom(_NONCE_BYTES)
    return bytes([KEY_VERSION]) + nonce + _aead(key).encrypt(nonce, plaintext, aad.encode("utf-8"))


def open_sealed(key: bytes | None, blob: bytes, aad: str) -> bytes:
    """Decrypt a value sealed by `seal` with the same key and `aad`; `CryptoError` otherwise."""
    if len(blob) < 1 + _NONCE_BYTES + _TAG_BYTES:
        raise CryptoError("sealed value is truncated")
    if blob[0] != KEY_VERSION:
        raise CryptoError(f"sealed value has unknown key version {blob[0]}")
    nonce, ciphertext = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
    try:
        return _aead(key).decrypt(nonce, ciphertext, aad.encode("utf-8"))
    except InvalidTag:
        raise CryptoError(f"cannot open the sealed value for {aad}: wrong key or tampered data") from None


def open_any(keys: Keyring | bytes | None, blob: bytes, aad: str) -> tuple[bytes, str]:
    """Open a sealed value with the current key, else the old one: the plaintext and the id of the key that
    opened it. `CryptoError` when no key does (the message names `aad`, never the value)."""
    keyring = as_keyring(keys)
    candidates = keyring.keys()
    if not candidates:
        raise CryptoError("no secret key configured: secrets cannot be encrypted or decrypted")
    error: CryptoError | None = None
    for key in candidates:
        try:
            return open_sealed(key, blob, aad), key_id(key)
        except CryptoError as exc:
            error = exc
    assert error is not None
    if keyring.old is None and len(candidates) == 1:
        raise error
    raise CryptoError(f"cannot open the sealed value for {aad} with the current or the old key") from None
