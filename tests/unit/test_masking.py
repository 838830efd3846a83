from __future__ import annotations

import base64
import json
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kici.engine.masking import MASK, MIN_SECRET_LENGTH, SecretMasker, secret_forms

SECRET = "s3cr3t-Value_42!"


def test_masks_the_value_everywhere_in_a_line() -> None:
    masker = SecretMasker([SECRET])
    assert masker.mask(f"token={SECRET} and again {SECRET}.") == "token=*** and again ***."
    assert masker.mask("nothing secret here") == "nothing secret here"


def test_empty_masker_and_empty_text() -> None:
    assert SecretMasker().mask("abc") == "abc"
    assert SecretMasker([SECRET]).mask("") == ""


@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_standalone_base64_forms(encode: object) -> None:
    masker = SecretMasker([SECRET])
    full = encode(SECRET.encode()).decode()  # type: ignore[operator]
    assert masker.mask(f"b64: {full}") == "b64: ***"
    assert masker.mask(f"b64: {full.rstrip('=')}") == "b64: ***"


@pytest.mark.parametrize("prefix", [b"", b"x", b"xy", b"xyz", b"{\"token\": \"", b"0123456789"])
@pytest.mark.parametrize("suffix", [b"", b"!", b"\"}", b"trailing bytes"])
@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_base64_embedded_in_a_longer_string_at_every_alignment(prefix: bytes, suffix: bytes, encode: object) -> None:
    secret = "pa?ss>>wo~rd-that-is-long"  # ? > ~ give + and / in standard base64
    masker = SecretMasker([secret])
    blob = encode(prefix + secret.encode() + suffix).decode()  # type: ignore[operator]
    masked = masker.mask(blob)
    assert MASK in masked
    # What is left cannot decode back to the secret: at most a few bits around the edges survive.
    for encoded in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encoded(secret.encode()).decode().rstrip("=")
        assert whole[:8] not in masked


def test_each_line_of_a_multi_line_secret() -> None:
    key = "-----BEGIN KEY-----\nMIIEvAIBADANBgkqhkiG9w0BAQEFAASC\n  c2VjcmV0LWxpbmUtdHdv  \n-----END KEY-----"
    masker = SecretMasker([key])
    for line in key.splitlines():
        assert masker.mask(f"> {line.strip()} <") == "> *** <"
    assert masker.mask(key) == MASK
    # repr/JSON of the whole value (as a program might print it)
    assert masker.mask(json.dumps({"k": key})) == '{"k": "***"}'


def test_url_encoded_and_json_escaped_forms() -> None:
    secret = 'p@ss word/"quoted"'
    masker = SecretMasker([secret])
    assert masker.mask(f"https://x/?t={quote(secret, safe='')}") == "https://x/?t=***"
    assert masker.mask(json.dumps({"t": secret})) == '{"t": "***"}'


def test_add_is_cumulative() -> None:
    masker = SecretMasker(["first-secret"])
    assert masker.add("second-secret") is True
    assert masker.add("second-secret") is False  # already known: no rebuild
    text = "first-secret second-secret"
    assert masker.mask(text) == "*** ***"
    masker.add("mounted-file-content")
    assert masker.mask(text) == "*** ***"  # regression: a later add never un-masks earlier secrets
    assert len(masker) == 3


def test_longest_secret_wins_when_one_contains_another() -> None:
    masker = SecretMasker(["abcdef", "abc"])
    assert masker.mask("xabcdefx abcx") == "x***x ***x"


@pytest.mark.parametrize("short", ["", "a", "ab"])
def test_short_secrets_are_ignored(short: str) -> None:
    assert len(short) < MIN_SECRET_LENGTH
    masker = SecretMasker([short])
    assert masker.add(short) is False
    assert secret_forms(short) == set()
    assert masker.mask("a b ab abc") == "a b ab abc"


def test_three_characters_are_masked() -> None:
    assert SecretMasker(["xyz"]).mask("a xyz b") == "a *** b"


def test_regex_metacharacters_are_literal() -> None:
    secret = r"a.b*c+(d)[e]{f}|g\h^$"
    masker = SecretMasker([secret])
    assert masker.mask(f"<{secret}>") == "<***>"
    assert masker.mask("aXbbbc") == "aXbbbc"


def test_long_secret_does_not_recurse() -> None:
    secret = "k" * 20_000
    masker = SecretMasker([secret])
    assert masker.mask("x" + secret + "x") == "x***x"


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
_secret = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=MIN_SECRET_LENGTH, max_size=60).filter(
    lambda s: "*" not in s  # a secret made of asterisks cannot be hidden behind asterisks
)


@settings(max_examples=300, deadline=None)
@given(secret=_secret, before=_text, after=_text, others=st.lists(_secret, max_size=3))
def test_a_secret_never_survives_masking(secret: str, before: str, after: str, others: list[str]) -> None:
    masker = SecretMasker([*others, secret])
    masked = masker.mask(before + secret + after)
    assert secret not in masked


@settings(max_examples=200, deadline=None)
@given(
    secret=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=6, max_size=40),
    prefix=st.binary(max_size=10),
    suffix=st.binary(max_size=10),
)
def test_base64_of_a_secret_inside_random_bytes_is_masked(secret: str, prefix: bytes, suffix: bytes) -> None:
    masker = SecretMasker([secret])
    blob = base64.b64encode(prefix + secret.encode() + suffix).decode()
    masked = masker.mask(blob)
    assert masked != blob
    # the masked text no longer contains the secret's aligned base64 core
    core = base64.b64encode(secret.encode()).decode()[: (8 * len(secret.encode())) // 6]
    assert core not in masked or len(core) < 4
