"""peerlink.ratelimit: the token bucket with a fake clock, and the rate parser."""

from __future__ import annotations

import re

import pytest

from peerlink.ratelimit import TokenBucket, default_burst, format_rate, parse_rate

MiB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_burst_then_steady_rate() -> None:
    clock = FakeClock()
    b = TokenBucket(1000, 500, clock)
    assert b.take(300) == 0.0
    assert b.take(200) == 0.0  # the burst is spent exactly
    assert b.take(100) == pytest.approx(0.1)  # 100 bytes of deficit at 1000 B/s
    clock.t += 0.1
    assert b.take(100) == pytest.approx(0.1)  # the deficit was paid, the next one waits


def test_refill_is_capped_at_the_burst() -> None:
    clock = FakeClock()
    b = TokenBucket(1000, 500, clock)
    clock.t += 60.0  # idle for a minute: still only 500 tokens
    assert b.take(500) == 0.0
    assert b.take(1) == pytest.approx(0.001)


def test_long_run_rate_is_exact() -> None:
    """A sender that sleeps as told writes at the rate, whatever the frame sizes."""
    clock = FakeClock()
    b = TokenBucket(2 * MiB, 256 << 10, clock)
    start = clock.t
    sent = 0
    for i in range(200):
        n = (i % 7 + 1) * 37_000
        clock.t += b.take(n)
        sent += n
    took = clock.t - start
    assert took == pytest.approx((sent - (256 << 10)) / (2 * MiB))


def test_frame_larger_than_the_burst_takes_a_deficit() -> None:
    clock = FakeClock()
    b = TokenBucket(1 * MiB, 64 << 10, clock)
    # 4 MiB frame with 64 KiB of tokens: goes through after the deficit is paid.
    wait = b.take(4 * MiB)
    assert wait == pytest.approx((4 * MiB - (64 << 10)) / MiB)
    assert b.take(0) == pytest.approx(wait)  # the deficit is still owed
    clock.t += wait
    assert b.take(0) == pytest.approx(0.0, abs=1e-9)  # paid off: the next frame may go


@pytest.mark.parametrize("rate", [0, None])
def test_zero_or_none_is_unlimited(rate: int | None) -> None:
    clock = FakeClock()
    b = TokenBucket(rate, None, clock)
    assert b.unlimited
    assert [b.take(1 << 30) for _ in range(3)] == [0.0, 0.0, 0.0]


def test_default_burst() -> None:
    assert default_burst(0) == 64 << 10
    assert default_burst(100_000) == 64 << 10
    assert default_burst(2 * MiB) == MiB // 2
    assert TokenBucket(2 * MiB, clock=FakeClock()).burst == MiB // 2


@pytest.mark.parametrize(("rate", "burst", "message"), [
    (-1, 10, "rate_bytes_per_s must be an integer >= 0 (0 or None: unlimited), got -1"),
    (True, 10, "rate_bytes_per_s must be an integer >= 0 (0 or None: unlimited), got True"),
    (1000, 0, "burst_bytes must be an integer >= 1, got 0"),
    (1000, -5, "burst_bytes must be an integer >= 1, got -5"),
])
def test_bad_arguments(rate: int, burst: int, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TokenBucket(rate, burst, FakeClock())


def test_negative_take() -> None:
    with pytest.raises(ValueError, match=r"^cannot take a negative number of bytes \(-1\)$"):
        TokenBucket(10, 10, FakeClock()).take(-1)


@pytest.mark.parametrize(("text", "rate"), [
    ("10M", 10 * MiB), ("10m", 10 * MiB), ("512K/s", 512 << 10), ("2MiB/s", 2 * MiB),
    ("1G", 1 << 30), ("1000000", 1_000_000), ("0", 0), (" 3 MB/s ", 3 * MiB),
    ("100B/s", 100), ("1500", 1500),
])
def test_parse_rate(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "M", "-1M", "1.5M", "10X", "10M/h", "ten"])
def test_parse_rate_rejects(text: str) -> None:
    message = (f"invalid rate {text!r}: expected a whole number of bytes per second with "
               "an optional unit K, M, G or T (binary), e.g. 10M")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_rate(text)


def test_format_rate() -> None:
    assert [format_rate(r) for r in (0, 100, 2048, 2 * MiB, 3 << 30)] == [
        "unlimited", "100 B/s", "2 KiB/s", "2 MiB/s", "3 GiB/s"]
