"""Cron arithmetic for `schedule(cron=…, timezone=…)`, on croniter.

Slots are computed in the trigger's time zone (so `0 2 * * *` in `Europe/Berlin` is 02:00 Berlin time,
whatever the offset that day) and handed back as aware UTC datetimes, which is how the database stores
them. A wall-clock time skipped by a daylight-saving jump fires at the first valid time after it; a
repeated one fires once.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from functools import lru_cache

from croniter import croniter


class CronError(ValueError):
    """A cron expression or time zone the scheduler cannot use; the message names it."""


@lru_cache(maxsize=256)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise CronError(f"unknown time zone {name!r}") from exc


def check_cron(cron: str, timezone: str) -> None:
    """`CronError` unless `cron` is a 5-field expression (or a macro such as `@daily`) and `timezone` an
    IANA zone name."""
    _zone(timezone)
    fields = cron.split()
    if not cron.strip().startswith("@") and len(fields) != 5:
        raise CronError(f"cron expression {cron!r} must have 5 fields (minute hour day month weekday)")
    if not croniter.is_valid(cron):
        raise CronError(f"cron expression {cron!r} is not valid")


def next_fire(cron: str, timezone: str, after: dt.datetime) -> dt.datetime:
    """The first slot of `cron` strictly after `after` (an aware datetime), in UTC."""
    if after.tzinfo is None:
        raise ValueError("next_fire needs an aware datetime")
    start = after.astimezone(_zone(timezone))
    try:
        slots = croniter(cron, start)
        slot = slots.get_next(dt.datetime)
        # When clocks go back, croniter repeats the wall-clock times of the repeated hour (02:30 summer
        # time, then 02:30 winter time). A wall-clock time that has already passed does not fire again.
        while slot.replace(tzinfo=None) <= start.replace(tzinfo=None):
            slot = slots.get_next(dt.datetime)
    except (ValueError, KeyError) as exc:
        raise CronError(f"cron expression {cron!r} is not valid: {exc}") from exc
    assert isinstance(slot, dt.datetime)
    return slot.astimezone(dt.UTC)
