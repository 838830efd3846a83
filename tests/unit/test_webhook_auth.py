"""Webhook authentication (`kici.engine.webhook_auth`): HMAC-SHA256 over the real GitHub fixtures' exact
bytes, bearer tokens, IP allow-lists, and "junk never raises" properties."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kici.engine.webhook_auth import ip_allowed, sign_hmac_sha256, verify_bearer, verify_hmac_sha256
from tests.paths import GITHUB_FIXTURES

FIXTURE_DIR = GITHUB_FIXTURES
FIXTURES: list[Any] = sorted(FIXTURE_DIR.glob("*.json"))

SECRET = b"kici-test-webhook-secret"


# ------------------------------------------------------------------------------------------------ HMAC-SHA256


def test_github_documentation_vector() -> None:
    # GitHub's "Validating webhook deliveries" example
    sig = sign_hmac_sha256(b"It's a Secret to Everybody", b"Hello, World!")
    assert sig == "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert verify_hmac_sha256(b"It's a Secret to Everybody", b"Hello, World!", sig)


def test_sign_matches_stdlib_hmac() -> None:
    body = b'{"zen": "Keep it logically awesome."}\n'
    assert sign_hmac_sha256(SECRET, body) == "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: getattr(p, "name", str(p)))
def test_fixture_bytes_sign_and_verify(path: Path) -> None:
    body = path.read_bytes()
    sig = sign_hmac_sha256(SECRET, body)
    assert sig.startswith("sha256=") and len(sig) == len("sha256=") + 64
    assert verify_hmac_sha256(SECRET, body, sig)
    assert verify_hmac_sha256(SECRET, body, sig.removeprefix("sha256="))  # raw hex (generic sources)
    assert not verify_hmac_sha256(SECRET + b"x", body, sig)  # wrong secret
    assert not verify_hmac_sha256(b"", body, sign_hmac_sha256(b"", body))  # empty secret never verifies
    for index in (0, len(body) // 2, len(body) - 1):  # one byte changed anywhere
        tampered = bytearray(body)
        tampered[index] ^= 0x01
        assert not verify_hmac_sha256(SECRET, bytes(tampered), sig)
    assert not verify_hmac_sha256(SECRET, body + b"\n", sig)  # a byte added
    assert not verify_hmac_sha256(SECRET, body[:-1], sig)  # a byte removed


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: getattr(p, "name", str(p)))
def test_reserialized_fixture_fails(path: Path) -> None:
    import json

    body = path.read_bytes()
    reserialized = json.dumps(json.loads(body)).encode()
    assert reserialized != body
    assert not verify_hmac_sha256(SECRET, reserialized, sign_hmac_sha256(SECRET, body))


def test_header_variants_accepted() -> None:
    body = b"payload"
    hexdigest = sign_hmac_sha256(SECRET, body).removeprefix("sha256=")
    for header in (
        f"sha256={hexdigest}",
        hexdigest,
        hexdigest.upper(),
        f"SHA256={hexdigest}",
        f"  sha256={hexdigest}\r\n",
    ):
        assert verify_hmac_sha256(SECRET, body, header), header


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "sha256=",
        "sha256",
        "sha1=0123456789abcdef0123456789abcdef01234567",
        "sha256=" + "0" * 64,
        "sha256=" + "g" * 64,
        "sha256=" + "a" * 63,
        "sha256=" + "a" * 65,
        "sha256=sha256=" + "a" * 64,
        "sha256 = " + "a" * 64,
        "é" * 64,
        "\x00" * 64,
        "\ud800" * 64,
    ],
)
def test_bad_hmac_headers_rejected(header: str | None) -> None:
    assert not verify_hmac_sha256(SECRET, b"payload", header)


def test_truncated_or_prefixed_signature_rejected() -> None:
    sig = sign_hmac_sha256(SECRET, b"payload")
    assert not verify_hmac_sha256(SECRET, b"payload", sig[:-1])
    assert not verify_hmac_sha256(SECRET, b"payload", sig + "0")
    assert not verify_hmac_sha256(SECRET, b"payload", "x" + sig)


def test_non_string_header_rejected() -> None:
    junk: Any
    for junk in (b"sha256=00", 12, ["sha256="], {"a": 1}, object()):
        assert not verify_hmac_sha256(SECRET, b"payload", junk)


@settings(max_examples=400, deadline=None)
@given(header=st.text(), body=st.binary(max_size=256), secret=st.binary(max_size=64))
def test_random_hmac_headers_never_raise(header: str, body: bytes, secret: bytes) -> None:
    result = verify_hmac_sha256(secret, body, header)
    assert result is False or header.strip().lower().removeprefix("sha256=") == sign_hmac_sha256(
        secret, body
    ).removeprefix("sha256=")


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=512), secret=st.binary(min_size=1, max_size=64))
def test_random_bodies_round_trip(body: bytes, secret: bytes) -> None:
    assert verify_hmac_sha256(secret, body, sign_hmac_sha256(secret, body))


# --------------------------------------------------------------------------------------------------- bearer


@pytest.mark.parametrize(
    "header",
    [
        "Bearer s3cr3t-token",
        "bearer s3cr3t-token",
        "BEARER s3cr3t-token",
        "Bearer   s3cr3t-token  ",
        "Bearer\ts3cr3t-token",
    ],
)
def test_bearer_accepted(header: str) -> None:
    assert verify_bearer("s3cr3t-token", header)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "s3cr3t-token",
        "Basic s3cr3t-token",
        "Bearer s3cr3t-toke",
        "Bearer s3cr3t-token2",
        "Bearer S3CR3T-TOKEN",
        "Bearers3cr3t-token",
        "Token s3cr3t-token",
        "Bearer s3cr3t-token extra",
        "Bearer \ud800",
    ],
)
def test_bearer_rejected(header: str | None) -> None:
    assert not verify_bearer("s3cr3t-token", header)


def test_bearer_empty_expected_token_verifies_nothing() -> None:
    assert not verify_bearer("", "Bearer ")
    assert not verify_bearer("", "Bearer x")


def test_bearer_non_ascii_tokens() -> None:
    assert verify_bearer("jeton-été-🔑", "Bearer jeton-été-🔑")
    assert not verify_bearer("jeton-été-🔑", "Bearer jeton-ete-🔑")


@settings(max_examples=400, deadline=None)
@given(expected=st.text(), header=st.text())
def test_random_bearer_headers_never_raise(expected: str, header: str) -> None:
    result = verify_bearer(expected, header)
    assert isinstance(result, bool)
    if result:
        assert expected and header.split(None, 1)[1].strip() == expected


@given(token=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc", "Zl", "Zp")), min_size=1))
def test_random_bearer_round_trip(token: str) -> None:
    assert verify_bearer(token, f"Bearer {token}")


# ------------------------------------------------------------------------------------------------ allow-list


@pytest.mark.parametrize(
    ("client", "allowlist", "allowed"),
    [
        ("10.1.2.3", ["10.0.0.0/8"], True),
        ("11.1.2.3", ["10.0.0.0/8"], False),
        ("192.168.1.7", ["192.168.1.7"], True),
        ("192.168.1.8", ["192.168.1.7"], False),
        ("192.168.1.8", ["192.168.1.7/24"], True),  # host bits ignored
        ("2001:db8::1", ["2001:db8::/32"], True),
        ("2001:db9::1", ["2001:db8::/32"], False),
        ("::1", ["::1"], True),
        ("[::1]", ["::1/128"], True),
        ("::ffff:10.1.2.3", ["10.0.0.0/8"], True),  # IPv4-mapped client, IPv4 entry
        ("::ffff:11.1.2.3", ["10.0.0.0/8"], False),
        ("10.1.2.3", ["::ffff:10.0.0.0/104"], True),  # IPv4 client, IPv4-mapped entry
        ("::ffff:10.1.2.3", ["::ffff:10.0.0.0/104"], True),
        ("10.1.2.3", ["2001:db8::/32"], False),
        ("2001:db8::1", ["0.0.0.0/0"], False),
        ("fe80::1%eth0", ["fe80::/10"], True),
        (" 10.1.2.3 ", [" 10.0.0.0/8 "], True),
        ("10.1.2.3", ["junk", "", "10.0.0.0/33", "10.0.0.0/8"], True),  # junk entries skipped
        ("10.1.2.3", ["junk", "300.0.0.0/8"], False),
        ("10.1.2.3", [], False),
        ("10.1.2.3", "10.0.0.0/8", True),  # a bare string is one entry, not a list of characters
        ("", ["0.0.0.0/0"], False),
        ("junk", ["0.0.0.0/0", "::/0"], False),
        ("10.1.2.3:443", ["0.0.0.0/0"], False),
        ("1.2.3.4", ["0.0.0.0/0"], True),
        ("2001:db8::1", ["::/0"], True),
    ],
)
def test_ip_allowed(client: str, allowlist: list[str], allowed: bool) -> None:
    assert ip_allowed(client, allowlist) is allowed


def test_ip_allowed_non_string_junk() -> None:
    junk: Any
    assert not ip_allowed("10.1.2.3", [None, 10, b"10.0.0.0/8"])  # type: ignore[list-item]
    for junk in (None, 167837955, b"10.1.2.3"):
        assert not ip_allowed(junk, ["0.0.0.0/0"])
    assert ip_allowed("10.1.2.3", ("10.0.0.0/8",))


_ip_like = st.one_of(
    st.text(max_size=50),
    st.ip_addresses().map(str),
    st.ip_addresses().map(lambda a: f"{a}/{a.max_prefixlen // 2}"),
    st.from_regex(r"[0-9a-fA-F:./%\[\] ]{0,45}", fullmatch=True),
)


@settings(max_examples=400, deadline=None)
@given(client=_ip_like, allowlist=st.lists(_ip_like, max_size=5))
def test_random_ip_inputs_never_raise(client: str, allowlist: list[str]) -> None:
    assert isinstance(ip_allowed(client, allowlist), bool)


@settings(max_examples=200, deadline=None)
@given(address=st.ip_addresses())
def test_every_address_matches_itself_and_the_whole_space(address: Any) -> None:
    assert ip_allowed(str(address), [str(address)])
    assert ip_allowed(str(address), ["0.0.0.0/0" if address.version == 4 else "::/0"])
