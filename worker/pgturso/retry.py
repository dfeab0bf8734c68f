"""Capped exponential backoff with full jitter, for errors that can succeed later (network, 429, 5xx)."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (1-based): uniform in [base/2, min(cap, base * 2**(attempt-1))]."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 60))  # bounded exponent: no float overflow
    return (rng or random).uniform(min(base / 2, ceiling), ceiling)
