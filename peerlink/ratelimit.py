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
from dataclasses import dataclass
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

    def set_rate(self, rate_bytes_per_s: int) -> None:
        """A new rate from now on (a schedule's window began or ended): what was earned at
        the old rate is kept, up to the new burst; a deficit is kept too."""
        if not self.unlimited:
            now = self.clock()
            self.tokens = self.tokens + (now - self.stamp) * self.rate
            self.stamp = now
        else:
            self.stamp = self.clock()
        self.rate = rate_bytes_per_s
        self.burst = default_burst(rate_bytes_per_s)
        self.tokens = min(float(self.burst), self.tokens)


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


# -- rate schedules: a different cap by time of day ------------------------------------

DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM: Final = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$|^24:00$")


@dataclass(frozen=True)
class RateWindow:
    """``rate`` from ``start`` to ``end`` (minutes after midnight, local time; ``end``
    may be <= ``start``: the window runs past midnight into the next day) on ``days``
    (0 = Monday; a window past midnight belongs to the day it starts on)."""

    days: frozenset[int]
    start: int
    end: int
    rate: int

    def covers(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        # Past midnight: the evening part on its days, the morning part the day after.
        return ((weekday in self.days and minute >= self.start)
                or ((weekday - 1) % 7 in self.days and minute < self.end))


@dataclass(frozen=True)
class RateSchedule:
    """The cap at each minute of the week: the first window that covers it, else
    ``default`` (the peer's ``rate_limit``).  Pure: the caller passes local time."""

    windows: tuple[RateWindow, ...]
    default: int = 0

    def rate_at(self, weekday: int, minute: int) -> int:
        for w in self.windows:
            if w.covers(weekday, minute):
                return w.rate
        return self.default

    def next_change(self, weekday: int, minute: int) -> int:
        """Minutes from (weekday, minute) until the rate differs (at most a week)."""
        now = self.rate_at(weekday, minute)
        for step in range(1, 7 * 24 * 60 + 1):
            m = minute + step
            if self.rate_at((weekday + m // 1440) % 7, m % 1440) != now:
                return step
        return 7 * 24 * 60


def parse_minute(text: str) -> int:
    """'08:00' -> 480; '24:00' -> 1440 (the end of a day)."""
    m = _HHMM.match(text.strip())
    if not m:
        raise ValueError(f"expected a time HH:MM (00:00-24:00), got {text!r}")
    if text.strip() == "24:00":
        return 1440
    return int(m.group(1)) * 60 + int(m.group(2))


def parse_days(text: str) -> frozenset[int]:
    """'mon-fri', 'sat,sun', 'fri-mon' (wrapping), 'daily'."""
    text = text.strip().lower()
    if text in ("daily", "every day", "*"):
        return frozenset(range(7))
    out: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a = DAYS.index(lo.strip()[:3]) if len(lo.strip()) >= 3 else -1
            b = DAYS.index(hi.strip()[:3]) if sep else a
        except ValueError:
            a = b = -1
        if a < 0 or b < 0:
            raise ValueError(f"expected days such as mon-fri, sat,sun or daily, got {text!r}")
        i = a
        while True:
            out.add(i)
            if i == b:
                break
            i = (i + 1) % 7
    return frozenset(out)


def window(days: str, start: str, end: str, rate: str) -> RateWindow:
    s, e = parse_minute(start), parse_minute(end)
    if s == 1440:
        raise ValueError("a window cannot start at 24:00")
    if s == e:
        raise ValueError(f"window {start}-{end} is empty")
    return RateWindow(parse_days(days), s, e, parse_rate(rate))
