"""Saved overlays (DESIGN.md §7a "Opening a point fast"): a point opened through the maps
saved per sealed segment reads exactly what the slow path (every record from the base)
reads, at every point, across segment boundaries, trims, zeros and a grow; opening
reads the records of at most one segment (counted); a torn, missing or stale map is
ignored, never trusted; a dropped base takes its maps with it; a replica's points (read
in another process through the follower) use the maps its receiver saved."""

from __future__ import annotations

import bisect
import random
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

import blockstore.cdp as cdp_mod
from blockstore.cdp import (
    CDP_DIR,
    MAPS_DIR,
    FollowedPointView,
    open_point,
    points,
    update_maps,
)
from blockstore.journal import segment_firsts
from blockstore.overlay import MapKey, Overlay, decode_map, encode_map
from blockstore.volume import Volume

from .test_cdp import Clock, Model, make, replicated
from .test_cdp import clock as test_cdp_clock

KiB, MiB = 1 << 10, 1 << 20
SEG = 256 * KiB  # small segments: many sealed ones, points in the middle of each


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """test_cdp's clock: seconds move when told."""
    return test_cdp_clock.__wrapped__(monkeypatch)  # type: ignore[attr-defined, no-any-return]


class NoWriter:
    """Stands in for the map writer's thread: maps are saved only when a test says."""

    def __init__(self, *_args: object) -> None:
        self.wake = threading.Event()

    def stop(self) -> None:
        """Nothing runs."""


@pytest.fixture
def manual(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cdp_mod, "MapWriter", NoWriter)


def maps_of(vol_path: Path) -> list[Path]:
    d = vol_path / CDP_DIR / MAPS_DIR
    return sorted(d.glob("*.map")) if d.is_dir() else []


def read_view(view: object) -> bytes:
    size = view.size  # type: ignore[attr-defined]
    buf = bytearray(size)
    view.read_into(buf, 0)  # type: ignore[attr-defined]
    return bytes(buf)


def open_and_read(vol: Volume, seq: int) -> tuple[bytes, int]:
    """(the point's bytes, how many records opening it read)."""
    view = open_point(vol, f"seq-{seq}")
    try:
        return read_view(view), view.built.scanned
    finally:
        view.close()


def records_in_segment_of(vol_path: Path, seq: int) -> int:
    """How many records of the segment holding ``seq`` come up to it (the most an open
    through the previous segment's map may read)."""
    firsts = segment_firsts(vol_path / "journal")
    return seq - firsts[bisect.bisect_right(firsts, seq) - 1] + 1


def history(tmp_path: Path, clock: Clock, rounds: int = 24, seed: int = 3
            ) -> tuple[Volume, dict[int, bytes]]:
    """A volume with many sealed segments of history: random writes, trims, zeros and a
    grow, a FLUSH point and a second mark each round; the expected image at every FLUSH
    point."""
    make(tmp_path)
    vol = Volume.open(tmp_path, "v1", segment_bytes=SEG)
    model = Model(vol, seed)
    expect: dict[int, bytes] = {}
    for rnd in range(rounds):
        for i in range(6):
            model.step()
            if i == 2:
                clock.tick(1.1)  # a second mark before the next write, mid-round
        if rnd == 9:
            vol.grow(vol.size + 1 * MiB)  # across segment boundaries: a grow MARK
            model.img += bytes(1 * MiB)
            model.step()
        vol.flush()
        flush = [p for p in points(vol.info.path, 0, False) if p.flush][-1]
        expect[flush.seq] = bytes(model.img)
        clock.tick(0.3)
    return vol, expect


@pytest.mark.usefixtures("manual")
def test_points_through_saved_maps_read_as_the_slow_path(tmp_path: Path, clock: Clock
                                                         ) -> None:
    vol, expect = history(tmp_path, clock)
    path = vol.info.path
    assert len(segment_firsts(path / "journal")) > 8
    slow = {seq: open_and_read(vol, seq) for seq in expect}  # no map saved yet
    assert update_maps(path, vol.last_seq) > 5
    assert maps_of(path)
    for seq, img in expect.items():
        got, scanned = open_and_read(vol, seq)
        assert got == img == slow[seq][0], f"point seq {seq}"
        assert scanned <= records_in_segment_of(path, seq), f"point seq {seq}"
    # The maps did the work: the slow opens of the newest points read far more records.
    newest = max(expect)
    assert slow[newest][1] > 3 * records_in_segment_of(path, newest)
    vol.close()


def test_every_point_opens_with_at_most_one_segment_of_records(tmp_path: Path,
                                                                clock: Clock) -> None:
    """Every TIME mark (the per-second ones too, in the middle of segments), opened
    through the maps the writer's own thread saved (not a call of the test's)."""
    vol, _expect = history(tmp_path, clock, rounds=16, seed=5)
    path = vol.info.path
    deadline = time.monotonic() + 30
    want = len(segment_firsts(path / "journal")) - 2
    vol.cdp.kick_maps(vol)  # type: ignore[union-attr]
    while len(maps_of(path)) < want and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(maps_of(path)) >= want
    pts = points(path, 0, False)
    assert len(pts) > 30
    for p in pts:
        view = open_point(vol, f"seq-{p.seq}")
        try:
            assert view.built.scanned <= records_in_segment_of(path, p.seq), p
        finally:
            view.close()
    vol.close()


def damage(path: Path, how: str) -> None:
    if how == "torn":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif how == "flipped":
        flipped = bytearray(path.read_bytes())
        flipped[len(flipped) // 2] ^= 0x40
        path.write_bytes(bytes(flipped))
    elif how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.usefixtures("manual")
@pytest.mark.parametrize("how", ["torn", "flipped", "missing", "empty"])
def test_a_damaged_map_is_ignored_never_trusted(tmp_path: Path, clock: Clock, how: str
                                                ) -> None:
    vol, expect = history(tmp_path, clock, rounds=14, seed=7)
    path = vol.info.path
    update_maps(path, vol.last_seq)
    newest = max(expect)
    _img, fast = open_and_read(vol, newest)
    for m in maps_of(path)[-2:]:  # the map the open used, and the one before it
        damage(m, how)
    got, scanned = open_and_read(vol, newest)
    assert got == expect[newest]
    assert scanned > fast  # fell back to an older map (or none): more records read
    update_maps(path, vol.last_seq)  # the writer saves them again
    got, scanned = open_and_read(vol, newest)
    assert (got, scanned) == (expect[newest], fast)
    vol.close()


@pytest.mark.usefixtures("manual")
@pytest.mark.parametrize("field", ["last_hcrc", "base_seq", "last", "first"])
def test_a_stale_map_is_ignored(tmp_path: Path, clock: Clock, field: str) -> None:
    """An intact map that is not the overlay of this base through this segment as the
    journal holds it now (its last record is another one: a replica's cut tail appended
    again; another base's; another segment's) is not used: the point reads its own
    bytes.  The stale maps here are empty, so one trusted would read wrong bytes."""
    vol, expect = history(tmp_path, clock, rounds=14, seed=9)
    path = vol.info.path
    update_maps(path, vol.last_seq)
    newest = max(expect)
    _img, fast = open_and_read(vol, newest)
    for m in maps_of(path):
        key, _ov = decode_map(m.read_bytes())
        m.write_bytes(encode_map(replace(key, **{field: getattr(key, field) + 1}), Overlay()))
    got, scanned = open_and_read(vol, newest)
    assert got == expect[newest] and scanned > fast
    vol.close()


@pytest.mark.usefixtures("manual")
def test_dropping_a_base_removes_its_maps_and_segments_released_take_theirs(
        tmp_path: Path, clock: Clock) -> None:
    vol, _expect = history(tmp_path, clock, rounds=12, seed=11)
    path = vol.info.path
    cdp = vol.cdp
    assert cdp is not None
    update_maps(path, vol.last_seq)
    old = cdp.bases.index.order[0]
    assert any(m.name.startswith(f"{old}-") for m in maps_of(path))
    clock.tick(1.5)
    cdp.take_base(vol)
    for _ in range(40):  # the next segments' maps are on the new base
        Model(vol, 13).step()
    vol.flush()
    update_maps(path, vol.last_seq)
    assert cdp._drop(vol, old, "test")
    assert not any(m.name.startswith(f"{old}-") for m in maps_of(path))
    assert maps_of(path)  # the new base's stay
    vol.checkpoint()
    vol.release_journal()
    update_maps(path, vol.last_seq)
    firsts = set(segment_firsts(path / "journal"))
    assert all(int(m.stem.split("-")[2], 16) in firsts for m in maps_of(path))
    vol.close()


@pytest.mark.usefixtures("manual")
def test_a_replicas_points_read_through_the_follower_use_its_maps(tmp_path: Path,
                                                                   clock: Clock) -> None:
    p, r, images = replicated(tmp_path, clock, 14, 6, 21, segment_bytes=SEG)
    rpath = r.info.path
    assert update_maps(rpath, r.applied_seq) > 3
    floor = r.cdp.floor  # type: ignore[union-attr]
    assert floor is not None
    checked = 0
    for q in points(rpath, 0, True):
        if q.flush and q.seq > floor:
            view = FollowedPointView(rpath, "v1", r.size, f"seq-{q.seq}")
            try:
                assert read_view(view) == images[q.t]
                assert view.built is not None
                assert view.built.scanned <= records_in_segment_of(rpath, q.seq)
            finally:
                view.close()
            checked += 1
    assert checked > 8
    p.close()
    r.close()



def test_a_decoded_map_unpacks_buckets_as_they_are_touched() -> None:
    """decode(encode(overlay)) covers exactly what the overlay did, put and read in any
    order, and unpacks only the buckets touched (opening does not pay for the rest)."""
    rng = random.Random(5)  # noqa: S311  # coverage (seeded), not secrecy
    ov = Overlay(6)  # 64-byte buckets: many of them
    for k in range(400):
        s = rng.randrange(0, 3000)
        ov.put(s, s + rng.randrange(1, 90), None if k % 5 == 0 else (k % 7, 100 * k))
    key = MapKey(1, 2, 3, 4, 5, 6, 7)
    got_key, lazy = decode_map(encode_map(key, ov))
    assert got_key == key and len(lazy) == len(ov) and lazy.keys() == ov.keys()
    assert list(lazy.covering(100, 164)) == list(ov.covering(100, 164))
    assert len(lazy.buckets) <= 2  # only what that read touched
    for k in range(200):  # a segment's records replayed after the map, on both
        s, n = rng.randrange(0, 3000), rng.randrange(1, 90)
        src = None if k % 3 == 0 else (9, 7 * k)
        ov.put(s, s + n, src)
        lazy.put(s, s + n, src)
        if k % 50 == 0:
            a = rng.randrange(0, 3000)
            assert list(lazy.covering(a, a + 200)) == list(ov.covering(a, a + 200))
    assert list(lazy.covering(0, 4000)) == list(ov.covering(0, 4000))
