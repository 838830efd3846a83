"""ANSI colours in log lines, rendered to HTML on the server (one renderer for pages and live streams).

Text is escaped first-hand here (every byte of a log line is untrusted); SGR colour codes become `<span>`s
with classes (`a-fg1`, `a-b`, …) because the Content-Security-Policy forbids inline styles. 256-colour
codes are mapped onto the 16 base colours when they are one of them and dropped otherwise; every other
escape sequence (cursor movement, titles) is removed.
"""

from __future__ import annotations

import re
from html import escape

_ESCAPE = re.compile(r"\x1b(?:\[([0-9;:?]*)([@-~])|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class _Style:
    __slots__ = ("bg", "bold", "dim", "fg", "italic", "underline")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.fg: int | None = None
        self.bg: int | None = None
        self.bold = self.dim = self.italic = self.underline = False

    def classes(self) -> str:
        out = []
        if self.fg is not None:
            out.append(f"a-fg{self.fg}")
        if self.bg is not None:
            out.append(f"a-bg{self.bg}")
        for flag, name in ((self.bold, "a-b"), (self.dim, "a-d"), (self.italic, "a-i"), (self.underline, "a-u")):
            if flag:
                out.append(name)
        return " ".join(out)

    def apply(self, params: str) -> None:
        codes = [int(p) if p.isdigit() else 0 for p in params.replace(":", ";").split(";")] if params else [0]
        i = 0
        while i < len(codes):
            code = codes[i]
            if code == 0:
                self.reset()
            elif code == 1:
                self.bold = True
            elif code == 2:
                self.dim = True
            elif code == 3:
                self.italic = True
            elif code == 4:
                self.underline = True
            elif code == 22:
                self.bold = self.dim = False
            elif code == 23:
                self.italic = False
            elif code == 24:
                self.underline = False
            elif 30 <= code <= 37:
                self.fg = code - 30
            elif 90 <= code <= 97:
                self.fg = code - 90 + 8
            elif code == 39:
                self.fg = None
            elif 40 <= code <= 47:
                self.bg = code - 40
            elif 100 <= code <= 107:
                self.bg = code - 100 + 8
            elif code == 49:
                self.bg = None
            elif code in (38, 48):
                # 38;5;N (256 colours) or 38;2;R;G;B (true colour): N < 16 is one of ours; any other
                # colour shows as the default one
                colour: int | None = None
                if i + 2 < len(codes) and codes[i + 1] == 5:
                    colour = codes[i + 2] if codes[i + 2] < 16 else None
                    i += 2
                elif i + 1 < len(codes) and codes[i + 1] == 2:
                    i += 4
                if code == 38:
                    self.fg = colour
                else:
                    self.bg = colour
            i += 1


def ansi_to_html(line: str) -> str:
    """One log line as safe HTML: escaped text, colour spans, no control characters."""
    style = _Style()
    parts: list[str] = []
    open_span = False
    pos = 0

    def text(chunk: str) -> None:
        if chunk:
            parts.append(escape(_CONTROL.sub("", chunk), quote=False))

    for match in _ESCAPE.finditer(line):
        text(line[pos : match.start()])
        pos = match.end()
        if match.group(2) != "m":
            continue  # not a colour: drop it
        style.apply(match.group(1) or "")
        if open_span:
            parts.append("</span>")
            open_span = False
        classes = style.classes()
        if classes:
            parts.append(f'<span class="{classes}">')
            open_span = True
    text(line[pos:])
    if open_span:
        parts.append("</span>")
    return "".join(parts)


def strip_ansi(line: str) -> str:
    """The line as plain text (for search and the raw download's readers)."""
    return _CONTROL.sub("", _ESCAPE.sub("", line))
