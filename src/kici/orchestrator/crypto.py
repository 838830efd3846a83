"""Secrets at rest: AES-256-GCM under the orchestrator's secret key (`AppState.secret_key`, 32 bytes).

A sealed value is `version (1 byte) || nonce (12 random bytes) || ciphertext || tag (16 bytes)`.

- The nonce is random per seal (96 bits, GCM's native size); with one key the birthday bound is far
  beyond the number of secrets an orchestrator ever writes.
- The associated data binds a ciphertext to where it belongs: `source:{id}:{field}` for source secrets.
  A blob copied into another row or another field fails to open instead of decrypting to a valid secret.
- The version byte names the key generation. Only version 1 exists; a key rotation adds version 2 and
  re-seals, and `open_sealed` keeps reading the old version until every row is rewritten.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["KEY_VERSION", "CryptoError", "open_sealed", "seal", "source_aad"]

KEY_VERSION = 1
_NONCE_BYTES = 12
_TAG_BYTES = 16


class CryptoError(Exception):
    """A sealed value cannot be opened (wrong key, wrong binding, tampered or truncated), or no usable key."""


def source_aad(source_id: str, field: str) -> str:
    return f"source:{source_id}:{field}"


def _aead(key: bytes | None) -> AESGCM:
    if key is None:
        raise CryptoError("no secret key configured: source secrets cannot be encrypted or decrypted")
    if len(key) != 32:
        raise CryptoError(f"the secret key must be 32 bytes, got {len(key)}")
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
