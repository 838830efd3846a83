"""Durations as operators type them: `90s`, `15m`, `24h`, `30d`, and compounds such as `1h30m`.

One parser for every place KiCI takes a duration — token lifetimes (`--expires-in 30d`), relative times in
filters (`--from 24h` = 24 hours ago), hold expiry (`72h`; a bare number means hours), environment wait
timers (`5m`; a bare number means seconds, `0` means none) — each stating what it accepts beyond the
common form. Pure: no clock here, callers subtract or add the result.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Literal

Unit = Literal["s", "m", "h", "d"]

_UNITS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d{1,9}(?:\.\d{1,6})?)([smhd])")
_BARE = re.compile(r"\d{1,9}(?:\.\d{1,6})?")


class DurationError(ValueError):
    """Not a duration this caller accepts (the message says what would be)."""


def parse_duration(
    text: str, *, bare_unit: Unit | None = None, fractions: bool = False, allow_zero: bool = False
) -> dt.timedelta:
    """`30d` → 30 days; `1h30m` → 90 minutes. `bare_unit`: the unit of a number written without one
    (refused when None); `fractions`: `1.5h` allowed; `allow_zero`: `0s` (or `0`) allowed. Negatives and
    other units are always refused."""
    value = text.strip()
    example = "30d, 24h, 15m, 90s or 1h30m"
    if bare_unit is not None and _BARE.fullmatch(value):
        parts = [(value, bare_unit)]
    else:
        parts = _PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            bare = f" (or a number of {_unit_name(bare_unit)})" if bare_unit else ""
            raise DurationError(f"invalid duration {text!r}: expected a duration such as {example}{bare}")
    if not fractions and any("." in number for number, _ in parts):
        raise DurationError(f"invalid duration {text!r}: whole numbers only (e.g. 90m rather than 1.5h)")
    seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if seconds <= 0 and not allow_zero:
        raise DurationError(f"invalid duration {text!r}: must be more than zero")
    return dt.timedelta(seconds=round(seconds, 6))


def format_duration(delta: dt.timedelta) -> str:
    """`72h`, `90m`, `45s`: the largest of these units that states it exactly."""
    seconds = round(delta.total_seconds())
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _unit_name(unit: Unit) -> str:
    return {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[unit]


def parse_time(text: str, *, now: dt.datetime) -> dt.datetime:
    """An ISO 8601 time (a naive one is taken as UTC) or a duration meaning that long before `now`."""
    try:
        return now - parse_duration(text)
    except DurationError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise DurationError(
            f"invalid time {text!r}: expected an ISO 8601 time (2026-01-31T12:00:00Z) or an age like 24h or 7d"
        ) from None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)
