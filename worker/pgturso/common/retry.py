"""Capped exponential backoff with full jitter, for errors that can succeed later (network, 429, 5xx), and the
server's own word on when to come back (HTTP ``Retry-After``)."""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

# A Retry-After above this is treated as this: a server asking for an hour would look like a hung worker.
RETRY_AFTER_CAP = 300.0


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (1-based): uniform in [base/2, min(cap, base * 2**(attempt-1))]."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 60))  # bounded exponent: no float overflow
    return (rng or random).uniform(min(base / 2, ceiling), ceiling)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value (delay-seconds or an HTTP date); None if absent or
    unreadable. Never negative, at most RETRY_AFTER_CAP."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def retry_delay(attempt: int, base: float, cap: float, retry_after: float | None = None,
                rng: random.Random | None = None) -> float:
    """The backoff delay, but never sooner than the server asked (``retry_after``)."""
    delay = backoff_delay(attempt, base, cap, rng)
    return delay if retry_after is None else max(delay, retry_after)
