"""Rate schedules (peerlink/ratelimit.py): which cap each minute of the week gets, windows
past midnight, the next change, the token bucket's rate change, and the config's
`peers[].rate_schedule` with its refusals."""

from __future__ import annotations

import pytest

from peerlink.ratelimit import (
    RateSchedule,
    TokenBucket,
    parse_days,
    parse_minute,
    window,
)

from .conftest import config_of, refused_top

M = 1 << 20
MON, FRI, SAT, SUN = 0, 4, 5, 6


def hm(text: str) -> int:
    return parse_minute(text)


BUSINESS = RateSchedule((window("mon-fri", "08:00", "18:00", "20M"),
                         window("daily", "22:00", "06:00", "0")), default=5 * M)


@pytest.mark.parametrize(("day", "at", "rate"), [
    (MON, "07:59", 5 * M), (MON, "08:00", 20 * M), (FRI, "17:59", 20 * M),
    (FRI, "18:00", 5 * M), (SAT, "12:00", 5 * M),      # the weekend is not business
    (SAT, "23:30", 0), (SUN, "05:59", 0), (SUN, "06:00", 5 * M),  # past midnight
    (MON, "00:30", 0),  # Sunday's night window reaches into Monday
])
def test_the_first_window_that_covers_the_minute_wins(day: int, at: str, rate: int) -> None:
    assert BUSINESS.rate_at(day, hm(at)) == rate


def test_an_earlier_window_shadows_a_later_one() -> None:
    s = RateSchedule((window("daily", "00:00", "24:00", "1M"),
                      window("mon", "08:00", "09:00", "9M")))
    assert s.rate_at(MON, hm("08:30")) == M


def test_next_change() -> None:
    assert BUSINESS.next_change(MON, hm("07:00")) == 60
    assert BUSINESS.next_change(FRI, hm("18:00")) == 4 * 60  # to 22:00
    assert RateSchedule(()).next_change(MON, 0) == 7 * 24 * 60


def test_days_and_times() -> None:
    assert parse_days("mon-fri") == frozenset(range(5))
    assert parse_days("fri-mon") == frozenset({4, 5, 6, 0})
    assert parse_days("sat,sun") == frozenset({5, 6})
    assert parse_days("Daily") == frozenset(range(7))
    assert (parse_minute("8:05"), parse_minute("24:00")) == (485, 1440)
    for bad in ("25:00", "8", "08:60", "noon"):
        with pytest.raises(ValueError, match="HH:MM"):
            parse_minute(bad)
    with pytest.raises(ValueError, match="mon-fri"):
        parse_days("weekdays")
    with pytest.raises(ValueError, match="empty"):
        window("daily", "08:00", "08:00", "1M")


def test_a_bucket_changes_rate_keeping_what_it_earned() -> None:
    now = [0.0]
    b = TokenBucket(M, clock=lambda: now[0])  # burst 256 KiB
    assert b.take(256 << 10) == 0.0
    now[0] = 0.125  # earned 128 KiB at 1 MiB/s
    b.set_rate(4 * M)  # burst 1 MiB now
    assert b.take(128 << 10) == 0.0
    assert b.take(4 * M) == pytest.approx(1.0)  # a deficit paid at the new rate
    b.set_rate(0)
    assert b.unlimited and b.take(100 * M) == 0.0


def test_the_config_reads_a_schedule() -> None:
    peer = {"name": "dc", "role": "secondary", "address": "192.0.2.2", "rate_limit": "5M",
            "rate_schedule": [{"days": "mon-fri", "from": "08:00", "to": 1080,  # 18:00
                               "rate": "20M"},
                              {"from": "22:00", "to": "06:00", "rate": 0}]}
    cfg = config_of(peers=[peer], peerlink={"insecure": True}, failover={"auto": False})
    p = cfg.peers[0]
    assert p.rate_limit == 5 * M
    assert [(sorted(w.days), w.start, w.end, w.rate) for w in p.rate_schedule] == [
        ([0, 1, 2, 3, 4], 480, 1080, 20 * M), (list(range(7)), 1320, 360, 0)]


@pytest.mark.parametrize(("item", "message"), [
    ({"from": "08:00", "rate": "1M"}, "missing key 'to' in peers[0].rate_schedule[0]"),
    ({"from": "8h", "to": "09:00", "rate": "1M"},
     "expected a time HH:MM (00:00-24:00), got '8h' in peers[0].rate_schedule[0]"),
    ({"days": "weekdays", "from": "08:00", "to": "09:00", "rate": "1M"},
     "expected days such as mon-fri"),
    ({"from": "08:00", "to": "09:00", "rate": "fast"}, "invalid rate 'fast'"),
    ({"from": "08:00", "to": "09:00", "rate": "1M", "burst": 1},
     "unknown key 'burst' in peers[0].rate_schedule[0]"),
])
def test_refusals_name_the_window(item: dict[str, object], message: str) -> None:
    peer = {"name": "dc", "role": "secondary", "address": "192.0.2.2",
            "rate_schedule": [item]}
    assert message in refused_top(peers=[peer], peerlink={"insecure": True},
                                  failover={"auto": False})


def test_the_config_reads_rpo_bounds() -> None:
    from gateway.config import RpoConfig

    base = {"name": "dc", "role": "secondary", "address": "192.0.2.2"}
    ctx = {"peerlink": {"insecure": True}, "failover": {"auto": False}}
    p = config_of(peers=[{**base, "rpo": {"seconds": 300, "bytes": "2G"}}], **ctx).peers[0]
    assert p.rpo == RpoConfig(seconds=300.0, bytes=2 << 30)
    assert config_of(peers=[base], **ctx).peers[0].rpo == RpoConfig()
    assert "expected a number of seconds > 0" in refused_top(
        peers=[{**base, "rpo": {"seconds": 0}}], **ctx)
    assert "unknown key 'records' in peers[0].rpo" in refused_top(
        peers=[{**base, "rpo": {"records": 5}}], **ctx)
