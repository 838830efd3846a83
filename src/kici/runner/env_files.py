"""`$KICI_ENV` and `$KICI_PATH`: files a step's commands append to, applied to the following steps.

`$KICI_ENV` takes `KEY=value` lines and, for multi-line values, GitHub Actions' heredoc form:

    KEY<<EOF
    line one
    line two
    EOF

`$KICI_PATH` takes one directory per line; each is prepended to PATH (the last one written ends up first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class EnvFileResult:
    env: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def parse_env_file(text: str) -> EnvFileResult:
    result = EnvFileResult()
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        raw = lines[i].rstrip("\r")
        i += 1
        if not raw.strip():
            continue
        heredoc = raw.find("<<")
        equals = raw.find("=")
        if heredoc > 0 and (equals < 0 or heredoc < equals):
            key, delimiter = raw[:heredoc], raw[heredoc + 2 :]
            if not _KEY.match(key) or not delimiter:
                result.errors.append(f"invalid line {i}: {raw!r}")
                continue
            value_lines: list[str] = []
            closed = False
            while i < len(lines):
                line = lines[i].rstrip("\r")
                i += 1
                if line == delimiter:
                    closed = True
                    break
                value_lines.append(line)
            if not closed:
                result.errors.append(f"{key}: delimiter {delimiter!r} not found")
                continue
            result.env[key] = "\n".join(value_lines)
        elif equals > 0:
            key, value = raw[:equals], raw[equals + 1 :]
            if not _KEY.match(key):
                result.errors.append(f"invalid variable name {key!r} (line {i})")
                continue
            result.env[key] = value
        else:
            result.errors.append(f"invalid line {i}: {raw!r} (expected KEY=value or KEY<<DELIMITER)")
    return result


def parse_path_file(text: str) -> list[str]:
    """Directories in the order written."""
    return [line.strip() for line in text.splitlines() if line.strip()]
