"""Output: aligned plain-text tables for people, JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import click


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value) or "-"
    text = str(value)
    # ISO timestamps: seconds are precise enough for a table
    if len(text) >= 19 and text[4:5] == "-" and text[10:11] == "T":
        return text[:19].replace("T", " ") + ("Z" if text.endswith(("Z", "+00:00")) else "")
    return text


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], *, empty: str) -> None:
    """`columns` are (key, header) pairs. Prints `empty` when there are no rows."""
    if not rows:
        click.echo(empty)
        return
    table = [[header.upper() for _, header in columns]]
    table += [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for r in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def print_fields(obj: Mapping[str, Any], keys: Sequence[tuple[str, str]]) -> None:
    width = max(len(label) for _, label in keys)
    for key, label in keys:
        click.echo(f"{label + ':':<{width + 1}} {cell(obj.get(key))}")


def status_text(item: Mapping[str, Any]) -> str:
    """A run's or job's status as people read it: a run or job that waits for its concurrency group
    shows `waiting (concurrency: <group>)` (the run's own status is `pending` meanwhile)."""
    reason = item.get("wait_reason")
    if reason and item.get("status") in ("pending", "waiting"):
        return f"waiting ({reason})"
    return str(item.get("status"))


def millis_text(value: Any) -> str | None:
    """A duration in milliseconds as `0.8s`, `12.3s`, or `duration()` from a minute up."""
    if not isinstance(value, int | float):
        return None
    secs = value / 1000
    return f"{secs:.1f}s" if secs < 60 else duration(secs)


def duration(seconds: float | None) -> str | None:
    """`45s`, `3m12s`, `2h05m`, `3d04h`: two units are enough to read an age at a glance."""
    if seconds is None:
        return None
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
