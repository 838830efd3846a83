"""Glob matching with picomatch semantics.

KiCI's original implementation matches branch names, tags and changed paths with the JavaScript
library *picomatch* (default options).  This module is a faithful port of picomatch 4.0.7's glob
compiler (``lib/parse.js`` and ``lib/picomatch.js``): it turns a glob into exactly the regular
expression picomatch builds, then runs that expression with Python's ``re``.  Parity is checked
against answers recorded from picomatch itself (``tests/fixtures/picomatch/cases.json``).

Summary of the rules (all as in picomatch):

* ``*`` matches any run of characters except ``/``; ``**`` as a whole path segment crosses
  segments (including none); ``?`` matches one character except ``/``.
* ``*``, ``**`` and ``?`` do not match a leading ``.`` of a segment (dotfiles) unless the pattern
  segment itself starts with ``.`` (picomatch ``dot: false``).
* Brackets ``[abc]``, ``[a-z]``, ``[^x]``, POSIX classes ``[[:alpha:]]``; braces ``{a,b}`` and
  ranges ``{1..3}``; extglobs ``!(x)``, ``@(x)``, ``+(x)``, ``*(x)``, ``?(x)``; backslash escapes.
* A leading ``!`` negates the whole pattern; a leading ``./`` is ignored.
* An empty value never matches; a value equal to the pattern always matches.
* Strings are handled as UTF-16 code units, as in JavaScript (``?`` does not match an emoji).

Deliberate differences (see ``docs/user/glob-differences.md``):

* ``[!x]`` negates like ``[^x]`` (picomatch needs its ``posix: true`` option for that);
* multi-digit numeric ranges such as ``{1..10}`` expand to the numbers (picomatch turns them into
  the character class ``[1-10]``);
* a ``.`` is always a literal dot (picomatch drops its escape in some patterns that contain
  ranges or POSIX classes);
* a pattern ending in four or more backslashes compiles (picomatch never returns for some).

Regex syntax that picomatch passes through but Python cannot express (variable-width lookbehind)
matches only the pattern string itself.

``kind`` ("branch" or "path") currently selects the same rules for both kinds.

Two regex dialects come out of one compilation:

* :func:`compile_glob` returns a Python regex with exactly JavaScript's semantics (``$`` is
  ``\\Z``, ``.`` excludes JavaScript's line terminators, ``\\s`` is JavaScript's set).
* :func:`glob_to_regex_source` returns source text in the syntax shared by Python ``re`` and
  JavaScript ``RegExp`` (no flags needed), for lock files.  It keeps ``$`` and ``.``, so in Python
  it differs from :func:`matches` only on values containing line terminators or characters outside
  the Basic Multilingual Plane.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

__all__ = ["GlobKind", "compile_glob", "glob_to_regex_source", "is_glob", "matches"]

GlobKind = Literal["branch", "path"]
_KINDS = ("branch", "path")

# ---------------------------------------------------------------------------------------------
# picomatch constants (lib/constants.js, POSIX flavour)
# ---------------------------------------------------------------------------------------------

_MAX_LENGTH = 1024 * 64
_DOT_LITERAL = "\\."
_PLUS_LITERAL = "\\+"
_SLASH_LITERAL = "\\/"
_ONE_CHAR = "(?=.)"
_QMARK = "[^/]"
_END_ANCHOR = f"(?:{_SLASH_LITERAL}|$)"
_START_ANCHOR = f"(?:^|{_SLASH_LITERAL})"
_DOTS_SLASH = f"{_DOT_LITERAL}{{1,2}}{_END_ANCHOR}"
_NO_DOT = f"(?!{_DOT_LITERAL})"
_NO_DOT_SLASH = f"(?!{_DOT_LITERAL}{{0,1}}{_END_ANCHOR})"
_QMARK_NO_DOT = f"[^.{_SLASH_LITERAL}]"
_STAR = f"{_QMARK}*?"
_GLOBSTAR = f"(?:(?:(?!{_START_ANCHOR}{_DOT_LITERAL}).)*?)"

_POSIX_REGEX_SOURCE = {
    "alnum": "a-zA-Z0-9",
    "alpha": "a-zA-Z",
    "ascii": "\\x00-\\x7F",
    "blank": " \\t",
    "cntrl": "\\x00-\\x1F\\x7F",
    "digit": "0-9",
    "graph": "\\x21-\\x7E",
    "lower": "a-z",
    "print": "\\x20-\\x7E ",
    "punct": "\\-!\"#$%&'()\\*+,./:;<=>?@[\\]^_`{|}~",
    "space": " \\t\\r\\n\\v\\f",
    "upper": "A-Z",
    "word": "A-Za-z0-9_",
    "xdigit": "A-Fa-f0-9",
}

_EXTGLOB_CHARS = {
    "!": ("negate", "(?:(?!(?:", f")){_STAR})"),
    "?": ("qmark", "(?:", ")?"),
    "+": ("plus", "(?:", ")+"),
    "*": ("star", "(?:", ")*"),
    "@": ("at", "(?:", ")"),
}

_REPLACEMENTS = {"***": "*", "**/**": "**", "**/**/**": "**"}

# JavaScript's String.prototype.trim() whitespace and line terminators.
_JS_TRIM = (
    "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)

_RE_SPECIAL = re.compile(r"[-*+?.^${}(|)\[\]]")
_RE_SPECIAL_GLOBAL = re.compile(r"([-*+?.^${}(|)\[\]])")
_RE_NON_SPECIAL = re.compile(r"[^@!\[\].,$*+?^{}()|\\/]+")
_RE_SPECIAL_BACKREF = re.compile(r"(\\?)((\W)(\3*))", re.ASCII)
_RE_FASTPATH_EXCLUDE = re.compile(r"^[*!]|[/()\[\]{}\"]")
_RE_BACKSLASHES = re.compile(r"\\+")
_RE_LEADING_BACKSLASHES = re.compile(r"\\+")
_RE_QMARK_LOOKBEHIND = re.compile(r"<([!=]|[A-Za-z0-9_]+>)")
_RE_CLOSE_PARENS = re.compile(r"\)+")
_RE_DOT_EXT = re.compile(r"\.[^\\/.]+")
_RE_SIMPLE_AT = re.compile(r"@\([^\\()\[\]{}|]+\)")
_RE_PLAIN_BRANCH_META = re.compile(r"[?*+@!()\[\]{}]")
_RE_UNESCAPE = re.compile("\\\\([^\n\r\u2028\u2029])")
_RE_STARS_QMARKS = re.compile(r"[*?]+")
_RE_FAST_EXT = re.compile("([^\n\r\u2028\u2029]*?)\\.([A-Za-z0-9_]+)")
_RE_DECIMAL = re.compile(r"[0-9]+")


def _escape_regex(s: str) -> str:
    return _RE_SPECIAL_GLOBAL.sub(r"\\\1", s)


def _js_trim(s: str) -> str:
    return s.strip(_JS_TRIM)


def _has(chars: str, ch: str) -> bool:
    """``/[chars]/.test(ch)`` for a single character or '' (JavaScript's undefined)."""
    return ch != "" and ch in chars


# ---------------------------------------------------------------------------------------------
# Repeated-extglob (ReDoS) analysis, lib/parse.js
# ---------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    bracket = paren = quote = 0
    value = ""
    escaped = False
    for ch in text:
        if escaped:
            value += ch
            escaped = False
            continue
        if ch == "\\":
            value += ch
            escaped = True
            continue
        if ch == '"':
            quote = 0 if quote == 1 else 1
            value += ch
            continue
        if quote == 0:
            if ch == "[":
                bracket += 1
            elif ch == "]" and bracket > 0:
                bracket -= 1
            elif bracket == 0:
                if ch == "(":
                    paren += 1
                elif ch == ")" and paren > 0:
                    paren -= 1
                elif ch == "|" and paren == 0:
                    parts.append(value)
                    value = ""
                    continue
        value += ch
    parts.append(value)
    return parts


def _is_plain_branch(branch: str) -> bool:
    escaped = False
    for ch in branch:
        if escaped:
            escaped = False
            continue
        if ch == "\\":
            escaped = True
            continue
        if _RE_PLAIN_BRANCH_META.match(ch):
            return False
    return True


def _normalize_simple_branch(branch: str) -> str | None:
    value = _js_trim(branch)
    while _RE_SIMPLE_AT.fullmatch(value):
        value = value[2:-1]
    if not _is_plain_branch(value):
        return None
    return _RE_UNESCAPE.sub(r"\1", value)


def _has_repeated_char_prefix_overlap(branches: list[str]) -> bool:
    values = [v for v in map(_normalize_simple_branch, branches) if v]
    for i, a in enumerate(values):
        for b in values[i + 1 :]:
            char = a[0]
            if a != char * len(a) or b != char * len(b):
                continue
            if a == b or a.startswith(b) or b.startswith(a):
                return True
    return False


def _parse_repeated_extglob(pattern: str, require_end: bool = True) -> tuple[str, str, int] | None:
    if len(pattern) < 2 or pattern[0] not in "+*" or pattern[1] != "(":
        return None
    bracket = paren = quote = 0
    escaped = False
    for i in range(1, len(pattern)):
        ch = pattern[i]
        if escaped:
            escaped = False
            continue
        if ch == "\\":
            escaped = True
            continue
        if ch == '"':
            quote = 0 if quote == 1 else 1
            continue
        if quote == 1:
            continue
        if ch == "[":
            bracket += 1
            continue
        if ch == "]" and bracket > 0:
            bracket -= 1
            continue
        if bracket > 0:
            continue
        if ch == "(":
            paren += 1
            continue
        if ch == ")":
            paren -= 1
            if paren == 0:
                if require_end and i != len(pattern) - 1:
                    return None
                return pattern[0], pattern[2:i], i
    return None


def _star_extglob_sequence_chars(pattern: str) -> list[str] | None:
    index = 0
    chars: list[str] = []
    while index < len(pattern):
        match = _parse_repeated_extglob(pattern[index:], False)
        if match is None or match[0] != "*":
            return None
        branches = [_js_trim(b) for b in _split_top_level(match[1])]
        if len(branches) != 1:
            return None
        branch = _normalize_simple_branch(branches[0])
        if not branch or len(branch) != 1:
            return None
        chars.append(branch)
        index += match[2] + 1
    return chars or None


def _repeated_extglob_recursion(pattern: str) -> int:
    depth = 0
    value = _js_trim(pattern)
    match = _parse_repeated_extglob(value)
    while match is not None:
        depth += 1
        value = _js_trim(match[1])
        match = _parse_repeated_extglob(value)
    return depth


def _analyze_repeated_extglob(body: str) -> tuple[bool, str | None]:
    """Returns (risky, safe_output)."""
    branches = [_js_trim(b) for b in _split_top_level(body)]
    if len(branches) > 1 and (
        any(b == "" for b in branches)
        or any(_RE_STARS_QMARKS.fullmatch(b) for b in branches)
        or _has_repeated_char_prefix_overlap(branches)
    ):
        return True, None
    safe_chars: list[str] = []
    saw_star_sequence = False
    combinable = True
    for branch in branches:
        chars = _star_extglob_sequence_chars(branch)
        if chars:
            saw_star_sequence = True
            safe_chars.extend(chars)
            continue
        literal = _normalize_simple_branch(branch)
        if literal and len(literal) == 1:
            safe_chars.append(literal)
            continue
        combinable = False
        if _repeated_extglob_recursion(branch) > 0:  # DEFAULT_MAX_EXTGLOB_RECURSION
            return True, None
    if saw_star_sequence:
        if not combinable:
            return True, None
        unique = list(dict.fromkeys(safe_chars))
        if len(unique) == 1:
            return True, _escape_regex(unique[0]) + "*"
        return True, "[" + "".join(_escape_regex(c) for c in unique) + "]*"
    return False, None


# ---------------------------------------------------------------------------------------------
# Brace ranges
# ---------------------------------------------------------------------------------------------


def _numeric_range_source(lo: int, hi: int, width: int) -> str:
    """Regex source (no group) matching the decimal numbers lo..hi, zero-padded to ``width``."""
    if lo > hi:
        lo, hi = hi, lo
    spans: list[tuple[int, int, int]] = []
    if width:
        spans.append((lo, hi, width))
    else:
        length = len(str(lo))
        while lo <= hi:
            top = 10**length - 1
            spans.append((lo, min(hi, top), length))
            lo = top + 1
            length += 1
    parts: list[str] = []
    for a, b, n in spans:
        while a <= b:
            k = 0
            while k + 1 <= n - 1 and a % 10 ** (k + 1) == 0 and a + 10 ** (k + 1) - 1 <= b:
                k += 1
            step = 10**k
            d = (a // step) % 10
            m = 1
            while d + m < 10 and a + (m + 1) * step - 1 <= b:
                m += 1
            s = str(a).zfill(n)
            head = s[: n - k - 1]
            digit = str(d) if m == 1 else f"[{d}-{d + m - 1}]"
            tail = "" if k == 0 else ("[0-9]" if k == 1 else f"[0-9]{{{k}}}")
            parts.append(head + digit + tail)
            a += m * step
    return "|".join(parts)


def _expand_range(args: list[str]) -> str:
    # KiCI difference: a range between two decimal numbers (at least one with several digits)
    # expands to those numbers, zero-padded like bash when an end has a leading zero.  picomatch
    # (without an ``expandRange`` option) would produce the character class ``[1-10]``.
    if (
        len(args) == 2
        and all(_RE_DECIMAL.fullmatch(a) and len(a) <= 15 for a in args)
        and not (len(args[0]) == 1 and len(args[1]) == 1)
    ):
        padded = any(len(a) > 1 and a[0] == "0" for a in args)
        width = max(len(a) for a in args) if padded else 0
        return "(?:" + _numeric_range_source(int(args[0]), int(args[1]), width) + ")"
    args = sorted(args)
    value = "[" + "-".join(args) + "]"
    if _js_regex_error(value):
        return "..".join(_escape_regex(v) for v in args)
    return value


def _js_regex_error(source: str) -> bool:
    """True if ``new RegExp(source)`` would throw."""
    try:
        re.compile(_translate(source, python=True), re.ASCII)
    except (_Unsupported, re.error):
        return True
    return False


# ---------------------------------------------------------------------------------------------
# The parser (lib/parse.js)
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Token:
    type: str
    value: str
    output: str | None = None
    extglob: bool = False
    prev: _Token | None = None
    star: bool = False
    posix: bool = False
    dots: bool = False
    comma: bool = False
    output_index: int = 0
    tokens_index: int = 0


@dataclass(eq=False)
class _Extglob:
    type: str
    open: str
    close: str
    prev: _Token
    parens: int
    output: str
    start_index: int
    tokens_index: int
    inner: str = ""


class _State(NamedTuple):
    output: str
    negated: bool


def _out(token: _Token) -> str:
    return token.output if token.output is not None else token.value


def _js_concat(a: str | None, b: str) -> str:
    return ("undefined" if a is None else a) + b


def _escape_last(text: str, char: str, last_idx: int | None = None) -> str:
    idx = text.rfind(char) if last_idx is None else text.rfind(char, 0, max(last_idx + 1, 0))
    if idx == -1:
        return text
    if idx > 0 and text[idx - 1] == "\\":
        return _escape_last(text, char, idx - 1)
    return text[:idx] + "\\" + text[idx:]


class _Parser:
    def __init__(self, text: str, fastpaths: bool) -> None:
        text = _REPLACEMENTS.get(text, text)
        if len(text) > _MAX_LENGTH:
            raise ValueError(f"glob pattern length {len(text)} exceeds the maximum of {_MAX_LENGTH}")
        self.fastpaths = fastpaths
        self.bos = _Token("bos", "", "")
        self.tokens: list[_Token] = [self.bos]
        self.output = ""
        self.negated = False
        self.backtrack = False
        self.brackets = self.braces = self.parens = self.quotes = 0
        self.index = -1
        self.start = 0
        if text.startswith("./"):
            text = text[2:]
        self.input = text
        self.len = len(text)
        self.extglobs: list[_Extglob] = []
        self.brace_stack: list[_Token] = []
        self.stack: list[str] = []
        self.prev: _Token = self.bos

    # -- helpers ------------------------------------------------------------------------------

    def eos(self) -> bool:
        return self.index == self.len - 1

    def peek(self, n: int = 1) -> str:
        i = self.index + n
        return self.input[i] if 0 <= i < self.len else ""

    def advance(self) -> str:
        self.index += 1
        return self.input[self.index] if self.index < self.len else ""

    def remaining(self) -> str:
        return self.input[self.index + 1 :]

    def append(self, value: str, output: str | None = None) -> None:
        self.output += output if output is not None else value

    def push(self, tok: _Token) -> None:
        prev = self.prev
        if prev.type == "globstar":
            is_brace = self.braces > 0 and tok.type in ("comma", "brace")
            is_extglob = tok.extglob or (bool(self.extglobs) and tok.type in ("pipe", "paren"))
            if tok.type not in ("slash", "paren") and not is_brace and not is_extglob:
                self.output = self.output[: -len(_out(prev))]
                prev.type = "star"
                prev.value = "*"
                prev.output = _STAR
                self.output += prev.output
        if self.extglobs and tok.type != "paren":
            self.extglobs[-1].inner += tok.value
        if tok.value or tok.output:
            self.append(tok.value, tok.output)
        if prev.type == "text" and tok.type == "text":
            # KiCI difference: picomatch appends tok.value here, which turns an escaped `\.` into
            # a bare `.` when the output is later rebuilt from the tokens.
            prev.output = (prev.output or prev.value) + _out(tok)
            prev.value += tok.value
            return
        tok.prev = prev
        self.tokens.append(tok)
        self.prev = tok

    def increment(self, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.stack.append(kind)

    def decrement(self, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) - 1)
        if self.stack:
            self.stack.pop()

    def negate(self) -> bool:
        count = 1
        while self.peek() == "!" and (self.peek(2) != "(" or self.peek(3) == "?"):
            self.advance()
            self.start += 1
            count += 1
        if count % 2 == 0:
            return False
        self.negated = True
        self.start += 1
        return True

    def extglob_open(self, type_: str, value: str) -> None:
        _, open_, close = _EXTGLOB_CHARS[value]
        token = _Extglob(
            type=type_,
            open=open_,
            close=close,
            prev=self.prev,
            parens=self.parens,
            output=self.output,
            start_index=self.index,
            tokens_index=len(self.tokens),
        )
        self.increment("parens")
        self.push(_Token(type_, value, "" if self.output else _ONE_CHAR))
        self.push(_Token("paren", self.advance(), open_, extglob=True))
        self.extglobs.append(token)

    def extglob_close(self, token: _Extglob, value: str) -> None:
        literal = self.input[token.start_index : self.index + 1]
        body = self.input[token.start_index + 2 : self.index]
        risky, safe = _analyze_repeated_extglob(body)
        if token.type in ("plus", "star") and risky:
            safe_output = ("" if token.output else _ONE_CHAR) + safe if safe else None
            open_tok = self.tokens[token.tokens_index]
            open_tok.type = "text"
            open_tok.value = literal
            open_tok.output = safe_output or _escape_regex(literal)
            for tok in self.tokens[token.tokens_index + 1 :]:
                tok.value = ""
                tok.output = ""
            self.output = token.output + open_tok.output
            self.backtrack = True
            self.push(_Token("paren", value, "", extglob=True))
            self.decrement("parens")
            return
        output = token.close
        if token.type == "negate":
            extglob_star = _STAR
            if len(token.inner) > 1 and "/" in token.inner:
                extglob_star = _GLOBSTAR
            if extglob_star != _STAR or self.eos() or _RE_CLOSE_PARENS.fullmatch(self.remaining()):
                output = token.close = f")$)){extglob_star}"
            rest = self.remaining()
            if "*" in token.inner and rest and _RE_DOT_EXT.fullmatch(rest):
                expression = _parse(rest, fastpaths=False).output
                output = token.close = f"){expression}){extglob_star})"
        self.push(_Token("paren", value, output, extglob=True))
        self.decrement("parens")

    # -- fast path ----------------------------------------------------------------------------

    def fast_path(self) -> str | None:
        text = self.input
        if not self.fastpaths or _RE_FASTPATH_EXCLUDE.search(text):
            return None
        backslashes = False

        def repl(m: re.Match[str]) -> str:
            nonlocal backslashes
            esc, chars, first, rest = m.group(1), m.group(2), m.group(3), m.group(4)
            if first == "\\":
                backslashes = True
                return m.group(0)
            if first == "?":
                if esc:
                    return esc + first + (_QMARK * len(rest) if rest else "")
                if m.start() == 0:
                    return _QMARK_NO_DOT + (_QMARK * len(rest) if rest else "")
                return _QMARK * len(chars)
            if first == ".":
                return _DOT_LITERAL * len(chars)
            if first == "*":
                if esc:
                    return esc + first + (_STAR if rest else "")
                return _STAR
            return m.group(0) if esc else "\\" + m.group(0)

        output = _RE_SPECIAL_BACKREF.sub(repl, text)
        if backslashes:
            output = _RE_BACKSLASHES.sub(lambda m: "\\\\" if len(m.group(0)) % 2 == 0 else "\\", output)
        return f"^(?:{output})$"

    # -- main loop ----------------------------------------------------------------------------

    def parse(self) -> _State:
        """picomatch's ``parse()`` main loop, branch for branch."""
        fast = self.fast_path()
        if fast is not None:
            return _State(fast, False)

        value = ""
        # KiCI difference: picomatch loops `while (!eos())` and never returns when collapsing a run
        # of trailing backslashes moves the index past the end (`a/` then four backslashes).
        while self.index < self.len - 1:
            value = self.advance()
            prev = self.prev

            if value == "\u0000":
                continue

            # Escaped characters
            if value == "\\":
                nxt = self.peek()
                if nxt == "/":
                    continue
                if nxt in (".", ";"):
                    continue
                if not nxt:
                    value += "\\"
                    self.push(_Token("text", value))
                    continue
                match = _RE_LEADING_BACKSLASHES.match(self.remaining())
                if match and len(match.group(0)) > 2:
                    slashes = len(match.group(0))
                    self.index += slashes
                    if slashes % 2 != 0:
                        value += "\\"
                value += self.advance()
                if self.brackets == 0:
                    self.push(_Token("text", value))
                    continue

            # Inside a bracket expression
            if self.brackets > 0 and (value != "]" or prev.value in ("[", "[^")):
                if value == ":":
                    inner = prev.value[1:]
                    if "[" in inner:
                        prev.posix = True
                        if ":" in inner:
                            idx = prev.value.rfind("[")
                            pre = prev.value[:idx]
                            rest = prev.value[idx + 2 :]
                            posix = _POSIX_REGEX_SOURCE.get(rest)
                            if posix:
                                prev.value = pre + posix
                                self.backtrack = True
                                self.advance()
                                if not self.bos.output and len(self.tokens) > 1 and self.tokens[1] is prev:
                                    self.bos.output = _ONE_CHAR
                                continue
                if (value == "[" and self.peek() != ":") or (value == "-" and self.peek() == "]"):
                    value = "\\" + value
                if value == "]" and prev.value in ("[", "[^"):
                    value = "\\" + value
                # KiCI difference: `[!...]` negates like `[^...]` (picomatch's `posix: true`).
                if value == "!" and prev.value == "[":
                    value = "^"
                prev.value += value
                self.append(value)
                continue

            # Quoted strings
            if self.quotes == 1 and value != '"':
                value = _escape_regex(value)
                prev.value += value
                self.append(value)
                continue

            if value == '"':
                self.quotes = 0 if self.quotes == 1 else 1
                continue

            # Parentheses
            if value == "(":
                self.increment("parens")
                self.push(_Token("paren", value))
                continue

            if value == ")":
                extglob = self.extglobs[-1] if self.extglobs else None
                if extglob is not None and self.parens == extglob.parens + 1:
                    self.extglob_close(self.extglobs.pop(), value)
                    continue
                self.push(_Token("paren", value, ")" if self.parens else "\\)"))
                self.decrement("parens")
                continue

            # Square brackets
            if value == "[":
                if "]" not in self.remaining():
                    value = "\\" + value
                else:
                    self.increment("brackets")
                self.push(_Token("bracket", value))
                continue

            if value == "]":
                if prev.type == "bracket" and len(prev.value) == 1:
                    self.push(_Token("text", value, "\\" + value))
                    continue
                if self.brackets == 0:
                    self.push(_Token("text", value, "\\" + value))
                    continue
                self.decrement("brackets")
                prev_value = prev.value[1:]
                if not prev.posix and prev_value[:1] == "^" and "/" not in prev_value:
                    value = "/" + value
                prev.value += value
                self.append(value)
                if _RE_SPECIAL.search(prev_value):
                    continue
                escaped = _escape_regex(prev.value)
                self.output = self.output[: -len(prev.value)]
                prev.value = f"(?:{escaped}|{prev.value})"
                self.output += prev.value
                continue

            # Braces
            if value == "{":
                self.increment("braces")
                open_brace = _Token("brace", value, "(", output_index=len(self.output), tokens_index=len(self.tokens))
                self.brace_stack.append(open_brace)
                self.push(open_brace)
                continue

            if value == "}":
                brace = self.brace_stack[-1] if self.brace_stack else None
                if brace is None:
                    self.push(_Token("text", value, value))
                    continue
                output = ")"
                if brace.dots:
                    arr = list(self.tokens)
                    rng: list[str] = []
                    for i in range(len(arr) - 1, -1, -1):
                        self.tokens.pop()
                        if arr[i].type == "brace":
                            break
                        if arr[i].type != "dots":
                            rng.insert(0, arr[i].value)
                    output = _expand_range(rng)
                    self.backtrack = True
                if not brace.comma and not brace.dots:
                    out = self.output[: brace.output_index]
                    toks = self.tokens[brace.tokens_index :]
                    brace.value = brace.output = "\\{"
                    value = output = "\\}"
                    self.output = out
                    for t in toks:
                        self.output += t.output or t.value
                self.push(_Token("brace", value, output))
                self.decrement("braces")
                self.brace_stack.pop()
                continue

            # Pipes
            if value == "|":
                self.push(_Token("text", value))
                continue

            # Commas
            if value == ",":
                output = value
                brace = self.brace_stack[-1] if self.brace_stack else None
                if brace is not None and self.stack and self.stack[-1] == "braces":
                    brace.comma = True
                    output = "|"
                self.push(_Token("comma", value, output))
                continue

            # Slashes
            if value == "/":
                if prev.type == "dot" and self.index == self.start + 1:
                    self.start = self.index + 1
                    self.output = ""
                    self.tokens.pop()
                    self.prev = self.bos
                    continue
                self.push(_Token("slash", value, _SLASH_LITERAL))
                continue

            # Dots
            if value == ".":
                if self.braces > 0 and prev.type == "dot":
                    if prev.value == ".":
                        prev.output = _DOT_LITERAL
                    brace = self.brace_stack[-1]
                    prev.type = "dots"
                    prev.output = _js_concat(prev.output, value)
                    prev.value += value
                    brace.dots = True
                    continue
                if self.braces + self.parens == 0 and prev.type not in ("bos", "slash"):
                    self.push(_Token("text", value, _DOT_LITERAL))
                    continue
                self.push(_Token("dot", value, _DOT_LITERAL))
                continue

            # Question marks
            if value == "?":
                is_group = prev.value == "("
                if not is_group and self.peek() == "(" and self.peek(2) != "?":
                    self.extglob_open("qmark", value)
                    continue
                if prev.type == "paren":
                    nxt = self.peek()
                    output = value
                    if (prev.value == "(" and not _has("!=<:", nxt)) or (
                        nxt == "<" and not _RE_QMARK_LOOKBEHIND.search(self.remaining())
                    ):
                        output = "\\" + value
                    self.push(_Token("text", value, output))
                    continue
                if prev.type in ("slash", "bos"):
                    self.push(_Token("qmark", value, _QMARK_NO_DOT))
                    continue
                self.push(_Token("qmark", value, _QMARK))
                continue

            # Exclamation
            if value == "!":
                if self.peek() == "(" and (self.peek(2) != "?" or not _has("!=<:", self.peek(3))):
                    self.extglob_open("negate", value)
                    continue
                if self.index == 0:
                    self.negate()
                    continue

            # Plus
            if value == "+":
                if self.peek() == "(" and self.peek(2) != "?":
                    self.extglob_open("plus", value)
                    continue
                if prev.value == "(":
                    self.push(_Token("plus", value, _PLUS_LITERAL))
                    continue
                if prev.type in ("bracket", "paren", "brace") or self.parens > 0:
                    self.push(_Token("plus", value))
                    continue
                self.push(_Token("plus", _PLUS_LITERAL))
                continue

            # At
            if value == "@":
                if self.peek() == "(" and self.peek(2) != "?":
                    self.push(_Token("at", value, "", extglob=True))
                    continue
                self.push(_Token("text", value))
                continue

            # Plain text
            if value != "*":
                if value in ("$", "^"):
                    value = "\\" + value
                m = _RE_NON_SPECIAL.match(self.remaining())
                if m:
                    value += m.group(0)
                    self.index += len(m.group(0))
                self.push(_Token("text", value))
                continue

            # Stars
            if prev.type == "globstar" or prev.star:
                prev.type = "star"
                prev.star = True
                prev.value += value
                prev.output = _STAR
                self.backtrack = True
                continue

            rest = self.remaining()
            if len(rest) >= 2 and rest[0] == "(" and rest[1] != "?":
                self.extglob_open("star", value)
                continue

            if prev.type == "star":
                self._globstar(prev, value, rest)
                continue

            if self.index == self.start or prev.type in ("slash", "dot"):
                if prev.type == "dot":
                    self.output += _NO_DOT_SLASH
                    prev.output = _js_concat(prev.output, _NO_DOT_SLASH)
                else:
                    self.output += _NO_DOT
                    prev.output = _js_concat(prev.output, _NO_DOT)
                if self.peek() != "*":
                    self.output += _ONE_CHAR
                    prev.output = _js_concat(prev.output, _ONE_CHAR)
            self.push(_Token("star", value, _STAR))

        while self.brackets > 0:
            self.output = _escape_last(self.output, "[")
            self.decrement("brackets")
        while self.parens > 0:
            self.output = _escape_last(self.output, "(")
            self.decrement("parens")
        while self.braces > 0:
            self.output = _escape_last(self.output, "{")
            self.decrement("braces")

        if self.prev.type in ("star", "bracket"):
            self.push(_Token("maybe_slash", "", f"{_SLASH_LITERAL}?"))

        if self.backtrack:
            self.output = "".join(_out(t) for t in self.tokens)
        return _State(self.output, self.negated)

    def _globstar(self, prev: _Token, value: str, rest: str) -> None:
        """Handles a ``*`` that follows a star token (``**`` and longer runs)."""
        prior = prev.prev
        assert prior is not None
        before = prior.prev
        is_start = prior.type in ("slash", "bos")
        after_star = before is not None and before.type in ("star", "globstar")
        is_brace = self.braces > 0 and prior.type in ("comma", "brace")
        is_extglob = bool(self.extglobs) and prior.type in ("pipe", "paren")
        if not is_start and prior.type != "paren" and not is_brace and not is_extglob:
            self.push(_Token("star", value, ""))
            return

        while rest[:3] == "/**":
            after = self.input[self.index + 4] if self.index + 4 < self.len else ""
            if after and after != "/":
                break
            rest = rest[3:]
            self.index += 3

        is_end = self.eos() or (
            self.parens > 0 and rest == ")" * self.parens and not any(e.type == "negate" for e in self.extglobs)
        )
        prior_prev_type = prior.prev.type if prior.prev is not None else ""

        if prior.type == "bos" and self.eos():
            prev.type = "globstar"
            prev.value += value
            prev.output = _GLOBSTAR
            self.output = prev.output
            return

        if prior.type == "slash" and prior_prev_type != "bos" and not after_star and is_end:
            self.output = self.output[: -len(_out(prior) + _out(prev))]
            prior.output = f"(?:{_out(prior)}"
            prev.type = "globstar"
            prev.output = _GLOBSTAR + "|$)"
            prev.value += value
            self.output += prior.output + prev.output
            return

        if prior.type == "slash" and prior_prev_type != "bos" and rest[:1] == "/":
            end = "|$" if len(rest) > 1 else ""
            self.output = self.output[: -len(_out(prior) + _out(prev))]
            prior.output = f"(?:{_out(prior)}"
            prev.type = "globstar"
            prev.output = f"{_GLOBSTAR}{_SLASH_LITERAL}|{_SLASH_LITERAL}{end})"
            prev.value += value
            self.output += prior.output + prev.output
            self.advance()
            self.push(_Token("slash", "/", ""))
            return

        if prior.type == "bos" and rest[:1] == "/":
            prev.type = "globstar"
            prev.value += value
            prev.output = f"(?:^|{_SLASH_LITERAL}|{_GLOBSTAR}{_SLASH_LITERAL})"
            self.output = prev.output
            self.advance()
            self.push(_Token("slash", "/", ""))
            return

        self.output = self.output[: -len(_out(prev))]
        prev.type = "globstar"
        prev.output = _GLOBSTAR
        prev.value += value
        self.output += prev.output


def _parse(text: str, fastpaths: bool = True) -> _State:
    return _Parser(text, fastpaths).parse()


def _fastpaths(text: str) -> str | None:
    """``parse.fastpaths`` from picomatch."""
    if len(text) > _MAX_LENGTH:
        raise ValueError(f"glob pattern length {len(text)} exceeds the maximum of {_MAX_LENGTH}")
    text = _REPLACEMENTS.get(text, text)
    if text.startswith("./"):
        text = text[2:]

    def create(s: str) -> str | None:
        if s == "*":
            return f"{_NO_DOT}{_ONE_CHAR}{_STAR}"
        if s == ".*":
            return f"{_DOT_LITERAL}{_ONE_CHAR}{_STAR}"
        if s == "*.*":
            return f"{_NO_DOT}{_STAR}{_DOT_LITERAL}{_ONE_CHAR}{_STAR}"
        if s == "*/*":
            return f"{_NO_DOT}{_STAR}{_SLASH_LITERAL}{_ONE_CHAR}{_NO_DOT}{_STAR}"
        if s == "**":
            return _NO_DOT + _GLOBSTAR
        if s == "**/*":
            return f"(?:{_NO_DOT}{_GLOBSTAR}{_SLASH_LITERAL})?{_NO_DOT}{_ONE_CHAR}{_STAR}"
        if s == "**/*.*":
            return f"(?:{_NO_DOT}{_GLOBSTAR}{_SLASH_LITERAL})?{_NO_DOT}{_STAR}{_DOT_LITERAL}{_ONE_CHAR}{_STAR}"
        if s == "**/.*":
            return f"(?:{_NO_DOT}{_GLOBSTAR}{_SLASH_LITERAL})?{_DOT_LITERAL}{_ONE_CHAR}{_STAR}"
        m = _RE_FAST_EXT.fullmatch(s)
        if not m:
            return None
        source = create(m.group(1))
        if not source:
            return None
        return source + _DOT_LITERAL + m.group(2)

    source = create(text)
    if source:
        source += f"{_SLASH_LITERAL}?"
    return source


def _picomatch_source(units: str) -> str:
    """``picomatch.makeRe(pattern).source`` before ``new RegExp`` (JavaScript syntax)."""
    output: str | None = None
    negated = False
    if units[0] in ".*":
        output = _fastpaths(units)
    if not output:
        state = _parse(units)
        output, negated = state.output, state.negated
    source = f"^(?:{output})$"
    if negated:
        source = f"^(?!{source}).*$"
    return source


# ---------------------------------------------------------------------------------------------
# JavaScript (non-unicode) regex source -> Python / portable source
# ---------------------------------------------------------------------------------------------


class _Unsupported(Exception):
    """The JavaScript source is a syntax error in JavaScript, or has no equivalent here."""


_JS_SPACE_CLASS = "\\t\\n\\v\\f\\r \\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff"
_JS_DOT = "[^\\n\\r\\u2028\\u2029]"
_HEX = "0123456789abcdefABCDEF"
_RE_QUANT = re.compile(r"\{([0-9]+)(?:(,)([0-9]*))?\}")
_RE_GROUP_NAME = re.compile(r"\(\?<([A-Za-z_][A-Za-z0-9_]*)>")
_RE_OCTAL = re.compile(r"[0-3][0-7]{0,2}|[4-7][0-7]?")
_RE_DIGITS = re.compile(r"[0-9]+")
_CLASS_ESCAPE = "\\]^-[&~|"
# Portable spellings of JavaScript's ASCII-only classes (Python's are Unicode-aware by default).
_ASCII_CLASSES = {
    "d": "[0-9]",
    "D": "[^0-9]",
    "w": "[A-Za-z0-9_]",
    "W": "[^A-Za-z0-9_]",
    "\\d": "[0-9]",
    "\\w": "[A-Za-z0-9_]",
}


def _count_groups(src: str) -> tuple[int, bool]:
    groups = 0
    named = False
    i, n = 0, len(src)
    in_class = False
    while i < n:
        c = src[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
        elif c == "[":
            in_class = True
            if src.startswith("[]", i) or src.startswith("[^]", i):
                i += 2 if src[i + 1] == "]" else 3
                in_class = False
                continue
        elif c == "(":
            if not src.startswith("(?", i):
                groups += 1
            elif _RE_GROUP_NAME.match(src, i):
                groups += 1
                named = True
        i += 1
    return groups, named


def _class_char(ch: str) -> str:
    return "\\" + ch if ch in _CLASS_ESCAPE else ch


def _legacy_octal(src: str, i: int) -> tuple[str, int]:
    m = _RE_OCTAL.match(src, i)
    assert m is not None
    return chr(int(m.group(0), 8)), m.end()


def _class_atom(src: str, i: int) -> tuple[str, str, int]:
    """Reads one class atom at ``src[i]``: returns (kind, text, next index).

    kind "char": text is one character; kind "set": text is class-body source (``\\d`` etc.)."""
    n = len(src)
    c = src[i]
    if c != "\\":
        return "char", c, i + 1
    if i + 1 >= n:
        raise _Unsupported("\\ at end of pattern")
    d = src[i + 1]
    if d in "dDwW":
        return "set", "\\" + d, i + 2
    if d == "s":
        return "set", _JS_SPACE_CLASS, i + 2
    if d == "S":
        return "set", "\\S", i + 2
    if d == "b":
        return "char", "\b", i + 2
    if d == "c":
        if i + 2 < n and (src[i + 2].isascii() and (src[i + 2].isalnum() or src[i + 2] == "_")):
            return "char", chr(ord(src[i + 2]) % 32), i + 3
        return "char", "\\", i + 1
    if d == "x" and len(src[i + 2 : i + 4]) == 2 and all(h in _HEX for h in src[i + 2 : i + 4]):
        return "char", chr(int(src[i + 2 : i + 4], 16)), i + 4
    if d == "u" and len(src[i + 2 : i + 6]) == 4 and all(h in _HEX for h in src[i + 2 : i + 6]):
        return "char", chr(int(src[i + 2 : i + 6], 16)), i + 6
    if d in "01234567":
        ch, j = _legacy_octal(src, i + 1)
        return "char", ch, j
    simple = {"n": "\n", "r": "\r", "t": "\t", "v": "\v", "f": "\f"}
    if d in simple:
        return "char", simple[d], i + 2
    return "char", d, i + 2


def _translate(src: str, python: bool) -> str:
    """Translates JavaScript (non-unicode) regex source.

    ``python=True``: Python source with JavaScript's exact semantics (compile with ``re.ASCII``).
    ``python=False``: source valid in both engines with JavaScript's semantics in JavaScript.
    Raises :class:`_Unsupported` for sources JavaScript rejects or that have no equivalent."""
    ngroups, named = _count_groups(src)
    out: list[str] = []
    i, n = 0, len(src)
    open_groups: list[int] = []  # group numbers of the open groups, 0 for non-capturing
    closed: set[int] = set()
    opened = 0
    last = "none"  # "atom" (quantifiable), "quant", "lazy", "none"

    def quantifier(text: str) -> None:
        nonlocal last
        if last == "atom":
            last = "quant"
        elif last == "quant" and text == "?":
            last = "lazy"
        else:
            raise _Unsupported("nothing to repeat")
        out.append(text)

    while i < n:
        c = src[i]
        if c == "\\":
            if i + 1 >= n:
                raise _Unsupported("\\ at end of pattern")
            d = src[i + 1]
            if d in "dDwW":
                out.append("\\" + d if python else _ASCII_CLASSES[d])
                i += 2
            elif d == "s":
                out.append(f"[{_JS_SPACE_CLASS}]")
                i += 2
            elif d == "S":
                out.append(f"[^{_JS_SPACE_CLASS}]")
                i += 2
            elif d in "bB":
                out.append("\\" + d)
                i += 2
                last = "none"
                continue
            elif d in "nrtvf":
                out.append("\\" + d)
                i += 2
            elif d == "c":
                if i + 2 < n and src[i + 2].isascii() and src[i + 2].isalpha():
                    out.append(f"\\x{ord(src[i + 2]) % 32:02x}")
                    i += 3
                else:
                    out.append("\\\\")
                    i += 1
            elif d == "x":
                hx = src[i + 2 : i + 4]
                if len(hx) == 2 and all(h in _HEX for h in hx):
                    out.append("\\x" + hx)
                    i += 4
                else:
                    out.append("x")
                    i += 2
            elif d == "u":
                hx = src[i + 2 : i + 6]
                if len(hx) == 4 and all(h in _HEX for h in hx):
                    out.append("\\u" + hx)
                    i += 6
                else:
                    out.append("u")
                    i += 2
            elif d.isascii() and d.isdigit():
                m = _RE_DIGITS.match(src, i + 1)
                assert m is not None
                num = int(m.group(0))
                if d != "0" and num <= ngroups:
                    if not python:
                        raise _Unsupported("back-reference")
                    # JavaScript: a reference to a group that has not matched matches "".
                    out.append(f"(?({num})\\{num})" if num in closed else "(?:)")
                    i = m.end()
                elif d in "89":
                    out.append(d)
                    i += 2
                else:
                    ch, i = _legacy_octal(src, i + 1)
                    out.append(f"\\x{ord(ch):02x}")
            elif d == "k" and named:
                m = _RE_GROUP_NAME.match("(?" + src[i + 2 :]) if src[i + 2 : i + 3] == "<" else None
                if m is None or not python:
                    raise _Unsupported("named back-reference")
                out.append(f"(?P={m.group(1)})")
                i += 2 + len(m.group(0)) - 2
            elif d.isascii() and d.isalpha():
                out.append(d)  # identity escape in JavaScript
                i += 2
            elif d.isascii():
                out.append("\\" + d)
                i += 2
            else:
                out.append(d)
                i += 2
            last = "atom"
            continue

        if c == "[":
            j = i + 1
            negate = j < n and src[j] == "^"
            if negate:
                j += 1
            if j < n and src[j] == "]":
                out.append("[\\s\\S]" if negate else "(?!)")
                i = j + 1
                last = "atom"
                continue
            body: list[str] = []
            while True:
                if j >= n:
                    raise _Unsupported("unterminated character class")
                if src[j] == "]":
                    break
                kind_a, a, j = _class_atom(src, j)
                if kind_a == "set" and not python and a in _ASCII_CLASSES:
                    a = _ASCII_CLASSES[a][1:-1] if a[1] in "dw" else a
                if j + 1 < n and src[j] == "-" and src[j + 1] != "]":
                    kind_b, b, j = _class_atom(src, j + 1)
                    if kind_a == "char" and kind_b == "char":
                        if ord(a) > ord(b):
                            raise _Unsupported("range out of order in character class")
                        body.append(_class_char(a) + "-" + _class_char(b))
                    else:
                        body.append((_class_char(a) if kind_a == "char" else a) + "\\-")
                        body.append(_class_char(b) if kind_b == "char" else b)
                else:
                    body.append(_class_char(a) if kind_a == "char" else a)
            out.append("[" + ("^" if negate else "") + "".join(body) + "]")
            i = j + 1
            last = "atom"
            continue

        if c == "(":
            if src.startswith("(?", i):
                if src.startswith(("(?:", "(?=", "(?!"), i):
                    out.append(src[i : i + 3])
                    i += 3
                elif src.startswith(("(?<=", "(?<!"), i):
                    if not python:
                        raise _Unsupported("lookbehind")
                    out.append(src[i : i + 4])
                    i += 4
                else:
                    m = _RE_GROUP_NAME.match(src, i)
                    if m is None or not python:
                        raise _Unsupported("invalid or named group")
                    out.append(f"(?P<{m.group(1)}>")
                    i = m.end()
                    opened += 1
                    open_groups.append(opened)
                    last = "none"
                    continue
                open_groups.append(0)
            else:
                out.append("(")
                i += 1
                opened += 1
                open_groups.append(opened)
            last = "none"
            continue
        if c == ")":
            if not open_groups:
                raise _Unsupported("unmatched ')'")
            closed.add(open_groups.pop())
            out.append(")")
            i += 1
            last = "atom"
            continue
        if c == "|":
            out.append("|")
            i += 1
            last = "none"
            continue
        if c == "^":
            out.append("^")
            i += 1
            last = "none"
            continue
        if c == "$":
            out.append("\\Z" if python else "$")
            i += 1
            last = "none"
            continue
        if c in "*+?":
            quantifier(c)
            i += 1
            continue
        if c == "{":
            m = _RE_QUANT.match(src, i)
            if m:
                if m.group(3) and int(m.group(3)) < int(m.group(1)):
                    raise _Unsupported("numbers out of order in quantifier")
                quantifier(m.group(0))
                i = m.end()
                continue
            out.append("\\{")
            i += 1
            last = "atom"
            continue
        if c in "}]":
            out.append("\\" + c)
        elif c == ".":
            out.append(_JS_DOT if python else ".")
        else:
            out.append(c)
        i += 1
        last = "atom"
    if open_groups:
        raise _Unsupported("unterminated group")
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# UTF-16 code units (JavaScript strings)
# ---------------------------------------------------------------------------------------------


def _to_units(s: str) -> str:
    if s.isascii() or max(s) <= "\uffff":
        return s
    parts: list[str] = []
    for ch in s:
        cp = ord(ch)
        if cp > 0xFFFF:
            cp -= 0x10000
            parts.append(chr(0xD800 + (cp >> 10)) + chr(0xDC00 + (cp & 0x3FF)))
        else:
            parts.append(ch)
    return "".join(parts)


def _from_units(s: str) -> str:
    if s.isascii():
        return s
    return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


_LITERAL_SPECIAL = frozenset("\\^$.|?*+()[]{}/-")


def _escape_literal(s: str) -> str:
    return "".join("\\" + c if c in _LITERAL_SPECIAL else c for c in s)


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"glob kind must be 'branch' or 'path', not {kind!r}")


class _Compiled(NamedTuple):
    regex: re.Pattern[str]  # Python dialect, including the exact-string alternative
    js_source: str  # picomatch's regex source (JavaScript syntax, UTF-16 code units)
    valid: bool  # False when picomatch's regex is invalid (picomatch then matches nothing)
    literal: bool  # True when the exact-string alternative was added


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> _Compiled:
    # Both kinds use picomatch's default options today, so the cache is keyed by pattern alone.
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a glob pattern must be a non-empty string")
    units = _to_units(pattern)
    js_source = _picomatch_source(units)
    # picomatch.test() answers true when the value equals the glob string itself, before trying
    # the regex.  The regex of a plain string matches exactly that string; for a glob, add the
    # string as an alternative (testing the regex on it instead could backtrack catastrophically).
    exact = f"^{_escape_literal(units)}\\Z"
    literal = is_glob(pattern)
    try:
        source = _translate(js_source, python=True)
        regex = re.compile(f"{exact}|{source}" if literal else source, re.ASCII)
        valid = True
    except (_Unsupported, re.error):
        # picomatch.toRegex() swallows RegExp syntax errors and returns /$^/.
        regex, valid, literal = re.compile(exact, re.ASCII), False, True
    return _Compiled(regex, js_source, valid, literal)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def compile_glob(pattern: str, kind: GlobKind = "branch") -> re.Pattern[str]:
    """Compiles ``pattern`` to a Python regex answering like ``picomatch.isMatch`` (cached with
    ``functools.lru_cache``, compiled once per pattern).

    Use ``.match(value)``.  Values are JavaScript strings: one containing characters outside the
    Basic Multilingual Plane must be given as UTF-16 code units, which :func:`matches` does.  An
    empty value matches here for negated patterns but never in :func:`matches`.  The returned
    pattern's text is Python-only syntax; use :func:`glob_to_regex_source` for lock files.
    """
    _check_kind(kind)
    return _compile(pattern).regex


def matches(pattern: str, value: str, kind: GlobKind = "branch") -> bool:
    """True if ``value`` matches the glob ``pattern`` (what ``picomatch.isMatch(value, pattern)``
    answers with default options, apart from the fixes listed in the module docstring)."""
    if kind not in _KINDS:
        _check_kind(kind)
    if not value:
        if not pattern:
            raise ValueError("a glob pattern must be a non-empty string")
        return False
    if value == pattern:
        return True
    regex = _compile(pattern).regex
    if not value.isascii() and max(value) > "\uffff":
        value = _to_units(value)
    return regex.match(value) is not None


def glob_to_regex_source(pattern: str, kind: GlobKind = "branch") -> str:
    """Regex source (``^...$`` alternatives) for ``pattern`` that compiles in Python ``re`` and
    JavaScript ``new RegExp`` without flags, for lock files.

    In JavaScript it matches exactly what :func:`matches` matches (non-empty values).  In Python it
    does too, except on values containing line terminators (``$`` and ``.``) or characters outside
    the Basic Multilingual Plane (JavaScript sees two code units).  Raises ``ValueError`` for a glob
    whose regex picomatch could not build or that needs syntax only one of the engines has."""
    _check_kind(kind)
    return _portable_source(pattern)


@functools.lru_cache(maxsize=1024)
def _portable_source(pattern: str) -> str:
    compiled = _compile(pattern)
    try:
        if not compiled.valid:
            raise _Unsupported("invalid regular expression")
        source = _translate(compiled.js_source, python=False)
        re.compile(source)
    except (_Unsupported, re.error) as exc:
        raise ValueError(f"glob {pattern!r} does not compile to a valid regular expression: {exc}") from None
    if compiled.literal:
        source = f"^{_escape_literal(_to_units(pattern))}$|{source}"
    return _from_units(source)


_GLOB_CHARS = frozenset('*?[]{}()!+@|\\"$^\u0000')


def is_glob(pattern: str) -> bool:
    """True if ``pattern`` contains glob syntax; False means it matches exactly itself
    (``matches(pattern, v)`` is ``v == pattern`` for every non-empty ``v``)."""
    return pattern.startswith("./") or any(c in _GLOB_CHARS for c in pattern)
