"""Durations as operators type them: `90s`, `15m`, `24h`, `30d` (one integer and one unit).

Used for token lifetimes (`--expires-in 30d`) and relative times in filters (`--from 24h` = 24 hours
ago). Pure: no clock here, callers subtract or add the result.
"""

from __future__ import annotations

import datetime as dt
import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PATTERN = re.compile(r"^\s*(\d{1,9})\s*([smhd])\s*$")


class DurationError(ValueError):
    """Not `<integer><s|m|h|d>`, or zero."""


def parse_duration(text: str) -> dt.timedelta:
    """`30d` → 30 days. Refuses zero, negatives, fractions and units other than s/m/h/d."""
    match = _PATTERN.match(text)
    if match is None:
        raise DurationError(f"invalid duration {text!r}: expected a whole number and a unit s, m, h or d (e.g. 30d)")
    amount = int(match.group(1))
    if amount == 0:
        raise DurationError(f"invalid duration {text!r}: must be more than zero")
    return dt.timedelta(seconds=amount * _UNITS[match.group(2)])


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
