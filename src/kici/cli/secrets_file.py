"""`.kici/.secrets`: local secrets for `kici run local`, one `KEY=value` a line (git-ignored)."""

from __future__ import annotations

import re
from pathlib import Path

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


class SecretsFileError(ValueError):
    pass


def parse_secrets(text: str, source: str = ".kici/.secrets") -> dict[str, str]:
    """Blank lines and `#` comments are skipped; values may be quoted (`"a\\nb"` decodes `\\n`)."""
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise SecretsFileError(f"{source}:{number}: expected KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            quote, value = value[0], value[1:-1]
            if quote == '"':
                value = _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(0)), value)
        out[key] = value
    return out


def load_secrets(kici_dir: Path) -> dict[str, str]:
    path = kici_dir / ".secrets"
    if not path.is_file():
        return {}
    return parse_secrets(path.read_text(encoding="utf-8"), str(path))
