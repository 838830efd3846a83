"""Secret masking: every secret (and the forms it commonly takes in logs) becomes `***`.

The agent (and `kici run local`) masks on its side of the process boundary, so a step cannot bypass it.
Registration is cumulative: `add` only ever grows the set of masked values, so registering a secret
later in a job (a mounted file, a token fetched at runtime) never un-masks the earlier ones.

For each secret of at least `MIN_SECRET_LENGTH` characters the masker hides:

- the value itself;
- each line of a multi-line value (stripped of surrounding whitespace), since logs arrive line by line;
- its JSON-escaped and URL-encoded forms (a secret printed inside JSON or a URL), when they differ;
- its base64 encodings, standard and URL-safe, as written standalone (padded and unpadded) and as they
  appear *inside a longer base64 string*. Base64 works in 3-byte groups, so a secret embedded in a larger
  payload starts at one of three alignments (byte offset mod 3). For alignment `o` we encode
  `o` filler bytes + secret and keep only the characters whose 6 bits come entirely from the secret:
  characters `ceil(8*o/6)` up to `floor(8*(o+n)/6)` (exclusive) for an `n`-byte secret. Those characters
  are the same whatever bytes surround the secret, so one literal per alignment catches every embedding.
  Fragments shorter than `MIN_BASE64_FRAGMENT` characters are skipped: they would match ordinary words.
  (Base64 that a tool wrapped across lines is not recognised when the wrap falls inside the secret.)

Secrets shorter than three characters are ignored: masking "1" or "ab" would turn every log line into
asterisks without protecting anything (a one- or two-character value is guessed in a few tries, and the
masked positions would reveal it anyway). This is the original system's rule too.

Matching uses one compiled regular expression, rebuilt only when `add` registers something new. The
literals are arranged as a trie (`abc|abd` becomes `ab(?:c|d)`), which the regex engine walks without
trying each alternative in turn: about twice as fast as a flat alternation. At each position the longest
literal wins (a trie node's "stop here" is a greedy optional), so a secret containing another secret is
hidden whole, exactly as with a longest-first alternation.
A secret made only of asterisks cannot be hidden behind asterisks; nothing is done about that.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from urllib.parse import quote

MASK = "***"
MIN_SECRET_LENGTH = 3
MIN_BASE64_FRAGMENT = 4


def _base64_forms(data: bytes) -> set[str]:
    forms: set[str] = set()
    n = len(data)
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        full = encode(data).decode("ascii")
        forms.add(full)
        forms.add(full.rstrip("="))
        for offset in range(3):
            encoded = encode(b"\0" * offset + data).decode("ascii")
            start = -(-8 * offset // 6)  # ceil
            end = (8 * (offset + n)) // 6
            fragment = encoded[start:end]
            if len(fragment) >= MIN_BASE64_FRAGMENT:
                forms.add(fragment)
    return {f for f in forms if len(f) >= MIN_BASE64_FRAGMENT}


def secret_forms(secret: str) -> set[str]:
    """Every literal `mask` hides for `secret` (empty when the secret is too short to mask)."""
    if len(secret) < MIN_SECRET_LENGTH:
        return set()
    forms = {secret}
    for line in secret.splitlines():
        line = line.strip()
        if len(line) >= MIN_SECRET_LENGTH:
            forms.add(line)
    for escaped in (json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1], quote(secret, safe="")):
        if escaped != secret:
            forms.add(escaped)
    forms |= _base64_forms(secret.encode("utf-8", "surrogatepass"))
    return forms


class SecretMasker:
    """Replaces registered secrets (and their encodings) in text with `***`."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._forms: set[str] = set()
        self._regex: re.Pattern[str] | None = None
        changed = False
        for secret in secrets:
            changed |= self._register(secret)
        if changed:
            self._rebuild()

    def add(self, secret: str) -> bool:
        """Register another secret; returns whether anything new is now masked."""
        if self._register(secret):
            self._rebuild()
            return True
        return False

    def mask(self, text: str) -> str:
        if self._regex is None or not text:
            return text
        return self._regex.sub(MASK, text)

    @property
    def forms(self) -> frozenset[str]:
        """The literals currently masked."""
        return frozenset(self._forms)

    def __len__(self) -> int:
        return len(self._secrets)

    def _register(self, secret: str) -> bool:
        if secret in self._secrets:
            return False
        forms = secret_forms(secret)
        if not forms:
            return False
        self._secrets.add(secret)
        new = forms - self._forms
        self._forms |= new
        return bool(new)

    def _rebuild(self) -> None:
        self._regex = re.compile(_trie_pattern(self._forms)) if self._forms else None


class _Node:
    __slots__ = ("children", "end")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.end = False


def _trie_pattern(words: Iterable[str]) -> str:
    """A regex matching exactly `words`, preferring the longest at each position."""
    root = _Node()
    for word in words:
        node = root
        for ch in word:
            node = node.children.setdefault(ch, _Node())
        node.end = True
    return _node_pattern(root)


def _node_pattern(node: _Node) -> str:
    # Follow single-child chains iteratively so long secrets (keys, certificates) do not recurse per char.
    literal: list[str] = []
    while len(node.children) == 1 and not node.end:
        (ch, node), = node.children.items()
        literal.append(re.escape(ch))
    if not node.children:
        return "".join(literal)
    branches = [re.escape(ch) + _node_pattern(child) for ch, child in sorted(node.children.items())]
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    if node.end:
        body = "(?:" + body + ")?"
    return "".join(literal) + body
