"""Webhook authentication primitives: HMAC-SHA256 signatures, bearer tokens and IP allow-lists.

Used by the GitHub route (`X-Hub-Signature-256`) and by generic sources (`hmac_sha256`, `bearer_token`,
`ip_allowlist`). Every verifier is total: a missing, malformed or hostile header gives `False`, never an
exception, and secrets are compared in constant time (`hmac.compare_digest`).

- `verify_hmac_sha256` accepts `sha256=<hex>` (the prefix case-insensitive) or the bare hex digest, in
  either case, with surrounding whitespace. An empty secret verifies nothing: a source configured with no
  secret must be rejected, not be forgeable with the well-known empty key.
- `verify_bearer` accepts `Bearer <token>` with the scheme case-insensitive (RFC 6750 / RFC 9110) and any
  run of spaces or tabs after it. Both tokens are hashed before comparing, so the time taken does not
  depend on the expected token's length either. An empty expected token verifies nothing.
- `ip_allowed` matches an address against CIDR entries (`10.0.0.0/8`, `2001:db8::/32`) or single addresses;
  host bits in an entry are ignored (`10.0.0.7/24` means `10.0.0.0/24`). An IPv4-mapped IPv6 client
  (`::ffff:10.1.2.3`, what a dual-stack socket reports) matches IPv4 entries, and an IPv4 client matches
  IPv4-mapped IPv6 entries. Unparseable entries are skipped; an empty allow-list allows nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["ip_allowed", "sign_hmac_sha256", "verify_bearer", "verify_hmac_sha256"]

_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_SHA256_PREFIX = "sha256="

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def sign_hmac_sha256(secret: bytes, body: bytes) -> str:
    """`sha256=<lowercase hex>` of HMAC-SHA256(secret, body): GitHub's `X-Hub-Signature-256` value."""
    return _SHA256_PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_hmac_sha256(secret: bytes, body: bytes, header: str | None) -> bool:
    """Whether `header` (`sha256=<hex>` or bare hex) is the HMAC-SHA256 of exactly `body` under `secret`."""
    if not isinstance(header, str) or not secret:
        return False
    value = header.strip()
    if value[: len(_SHA256_PREFIX)].lower() == _SHA256_PREFIX:
        value = value[len(_SHA256_PREFIX) :]
    if _HEX_DIGEST.fullmatch(value) is None:  # also guarantees ASCII, which compare_digest needs for str
        return False
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, value.lower())


def verify_bearer(expected: str, authorization: str | None) -> bool:
    """Whether an `Authorization` header carries `Bearer <expected>`."""
    if not isinstance(authorization, str) or not isinstance(expected, str) or not expected:
        return False
    parts = authorization.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return False
    token = parts[1].strip()
    if not token:
        return False
    return hmac.compare_digest(_digest(token), _digest(expected))


def _digest(text: str) -> bytes:
    # surrogatepass: a header decoded with surrogateescape (or a hostile str) must not raise
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def ip_allowed(client_ip: str, allowlist: Sequence[str]) -> bool:
    """Whether `client_ip` lies in one of the allow-list's networks or addresses."""
    if not isinstance(client_ip, str):
        return False
    entries: Sequence[object] = (allowlist,) if isinstance(allowlist, str) else allowlist
    try:
        candidates = _candidates(client_ip)
    except (TypeError, ValueError):
        return False
    if not candidates:
        return False
    try:
        items = list(entries)
    except TypeError:
        return False
    for entry in items:
        if not isinstance(entry, str):
            continue
        network = _parse_network(entry)
        if network is None:
            continue
        for address in candidates:
            if address.version == network.version and address in network:
                return True
    return False


def _candidates(client_ip: str) -> tuple[IPAddress, ...]:
    """The client address, plus its other form when it is IPv4 or IPv4-mapped IPv6."""
    text = client_ip.strip()
    if text.startswith("[") and text.endswith("]"):  # "[::1]" as written in URLs and some proxies
        text = text[1:-1]
    if not text:
        return ()
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return (address,) if mapped is None else (address, mapped)
    return (address, ipaddress.IPv6Address(f"::ffff:{address}"))


@lru_cache(maxsize=1024)
def _parse_network(entry: str) -> IPNetwork | None:
    text = entry.strip()
    if not text:
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
