"""Bandwidth cap per peer: a token bucket over wire bytes, pure (the clock is injected).

The bucket holds up to ``burst_bytes`` tokens and gains ``rate_bytes_per_s`` per second.
``take(n)`` debits ``n`` at once and returns how long the caller must wait before
writing those bytes: zero while tokens remain, else the time until the balance is back
at zero.  A frame larger than the burst is therefore never refused or split: it takes a
*deficit* that its own wait pays off, and the long-run rate is exact whatever the frame
sizes (waiting for ``n`` tokens to accumulate could never happen for ``n > burst``).

A rate of 0 or None means unlimited: ``take`` always returns 0.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Final

MIN_BURST: Final = 64 << 10
_RATE_RE: Final = re.compile(r"^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*(?:/s)?\s*$", re.IGNORECASE)
_UNITS: Final = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


class TokenBucket:
    """Token bucket of ``burst_bytes`` filled at ``rate_bytes_per_s`` (starts full)."""

    def __init__(self, rate_bytes_per_s: int | None, burst_bytes: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_bytes_per_s is not None and (
                isinstance(rate_bytes_per_s, bool) or rate_bytes_per_s < 0):
            raise ValueError(f"rate_bytes_per_s must be an integer >= 0 (0 or None: "
                             f"unlimited), got {rate_bytes_per_s!r}")
        self.rate = rate_bytes_per_s or 0
        if burst_bytes is None:
            burst_bytes = default_burst(self.rate)
        if isinstance(burst_bytes, bool) or burst_bytes < 1:
            raise ValueError(f"burst_bytes must be an integer >= 1, got {burst_bytes!r}")
        self.burst = burst_bytes
        self.clock = clock
        self.tokens = float(burst_bytes)
        self.stamp = clock()

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    def take(self, n: int) -> float:
        """Debit ``n`` bytes; return the seconds to wait before writing them."""
        if n < 0:
            raise ValueError(f"cannot take a negative number of bytes ({n})")
        if self.unlimited:
            return 0.0
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def default_burst(rate: int) -> int:
    """A quarter second of traffic, at least 64 KiB: small next to the rate, large enough
    that small frames are not paced one by one."""
    return max(MIN_BURST, rate // 4)


def parse_rate(text: str) -> int:
    """Bytes per second from '10M', '512K/s', '2MiB/s', '1000000' (binary units: K = 1024);
    any positive integer, no block alignment.  '0' means unlimited."""
    m = _RATE_RE.match(text)
    if not m:
        raise ValueError(f"invalid rate {text!r}: expected a whole number of bytes per "
                         "second with an optional unit K, M, G or T (binary), e.g. 10M")
    return int(m.group(1)) << _UNITS[m.group(2).lower()]


def format_rate(rate: int) -> str:
    """'2 MiB/s', '1500 B/s', 'unlimited'."""
    if rate == 0:
        return "unlimited"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if rate >= 1 << shift:
            return f"{rate / (1 << shift):g} {unit}/s"
    return f"{rate} B/s"
