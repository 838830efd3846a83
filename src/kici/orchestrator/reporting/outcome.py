"""What one delivery attempt of a report came to, and how HTTP answers map onto it."""

from __future__ import annotations

import datetime as dt
import email.utils
from dataclasses import dataclass
from typing import Literal

import httpx

MAX_RATE_LIMIT_WAIT = dt.timedelta(hours=1)
"""A `Retry-After` / `x-ratelimit-reset` further away than this is capped (a clock problem, not a plan)."""


@dataclass(frozen=True)
class Outcome:
    kind: Literal["sent", "retry", "failed"]
    error: str | None = None
    retry_at: dt.datetime | None = None
    """For `retry`: when the server said to come back (rate limits); None → the worker's back-off."""

    @classmethod
    def sent(cls) -> Outcome:
        return cls("sent")

    @classmethod
    def retry(cls, error: str, at: dt.datetime | None = None) -> Outcome:
        return cls("retry", error, at)

    @classmethod
    def failed(cls, error: str) -> Outcome:
        return cls("failed", error)


def _retry_after(value: str | None, now: dt.datetime) -> dt.datetime | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return now + min(dt.timedelta(seconds=int(value)), MAX_RATE_LIMIT_WAIT)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return min(max(when, now), now + MAX_RATE_LIMIT_WAIT)


def rate_limit_until(response: httpx.Response, now: dt.datetime) -> dt.datetime | None:
    """When a 403/429 rate-limit answer says to try again: `Retry-After` (secondary limits), else
    `x-ratelimit-reset` when `x-ratelimit-remaining` is 0 (primary limit); None when it is no rate limit."""
    after = _retry_after(response.headers.get("retry-after"), now)
    if after is not None:
        return after
    if response.headers.get("x-ratelimit-remaining") == "0":
        reset = response.headers.get("x-ratelimit-reset", "").strip()
        if reset.isdigit():
            when = dt.datetime.fromtimestamp(int(reset), dt.UTC)
            return min(max(when, now), now + MAX_RATE_LIMIT_WAIT)
        return now + dt.timedelta(seconds=60)
    return None


def classify(response: httpx.Response, now: dt.datetime, what: str, message: str = "") -> Outcome:
    """2xx sent; rate limits and 5xx / 408 retried; any other answer is final (retrying cannot fix a 404
    or a 422, so the report is marked failed at once, visible and retryable by an operator)."""
    status = response.status_code
    if 200 <= status < 300:
        return Outcome.sent()
    error = f"{what}: HTTP {status}" + (f" {message}" if message else "")
    if status in (403, 429):
        until = rate_limit_until(response, now)
        if until is not None:
            return Outcome.retry(f"{error} (rate limited until {until.isoformat()})", until)
        if status == 429:
            return Outcome.retry(error)
        return Outcome.failed(error)
    if status >= 500 or status == 408:
        return Outcome.retry(error)
    return Outcome.failed(error)
