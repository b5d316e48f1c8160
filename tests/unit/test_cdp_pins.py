"""Pins of CDP history across processes (blockstore/cdp.py ``hold_base``, ``add_pin``,
``may_drop``): a replica's receiver (a blockstore Volume applying batches) never drops
a base that a point view in another open file (another process's, for flock) or a
clone of a point reads, and drops it once they are gone; a reader killed with -9 pins
nothing.  Explored over random sequences of writes, time, opens, closes, clone creates
and deletes: every open reader reads exactly its point's image at every step."""

# The workload's randomness is for coverage (seeded), not secrecy.
# ruff: noqa: S311

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import blockstore.cdp as cdp_mod
from blockstore.cdp import FollowedPointView, lasting_pins, points
from blockstore.clone import Clone, delete_clone, find_clone
from blockstore.volume import Volume
from gateway import clones
from tests.conftest import ROOT
from tests.unit.test_cdp import SIZE, Clock, Model, make

MiB = 1 << 20


class Pair:
    """A primary and its replica in one process: batches shipped by hand, and the
    primary's image at each of its FLUSH points (by the point's time)."""

    def __init__(self, tmp_path: Path, clock: Clock, max_bytes: int = 1 << 30,
                 window: float = 3600.0) -> None:
        make(tmp_path / "a")
        self.rdir = tmp_path / "b"
        make(self.rdir, window=window, max_bytes=max_bytes, replica=True)
        self.p = Volume.open(tmp_path / "a", "v1", segment_bytes=MiB)
        self.r = Volume.open(self.rdir, "v1", segment_bytes=MiB, journal_max_bytes=MiB)
        self.r.set_consistent(True)
        self.clock = clock
        self.model = Model(self.p, 31)
        self.shipped = 0
        self.images: dict[int, bytes] = {}  # point time -> image

    @property
    def rpath(self) -> Path:
        return self.r.info.path

    def round(self, steps: int = 4, tick: float = 2.0) -> None:
        for _ in range(steps):
            self.model.step()
        self.p.flush()
        t = [q for q in points(self.p.info.path, 1, False) if q.flush][-1].t
        self.images[t] = bytes(self.model.img)
        self.clock.tick(tick)
        recs = [(int(h.op), int(h.flags), h.offset, h.length, bytes(d))
                for h, d in self.p.journal.records(self.shipped + 1)]  # type: ignore[union-attr]
        self.r.apply_batch(self.shipped + 1, self.p.last_seq, recs)
        self.shipped = self.p.last_seq
        self.r.checkpoint()  # releases the journal the floor allows

    def flush_points(self) -> list[tuple[int, int]]:
        """(replica seq, time) of the FLUSH points the replica can rebuild now."""
        floor = self.r.cdp.floor  # type: ignore[union-attr]
        return [(q.seq, q.t) for q in points(self.rpath, (floor or 0) + 1, True)
                if q.flush and q.t in self.images]

    def base_ids(self) -> list[int]:
        return list(self.r.cdp.bases.index.order)  # type: ignore[union-attr]

    def close(self) -> None:
        self.p.close()
        self.r.close()


def image_of(reader: FollowedPointView | Clone) -> bytes:
    buf = bytearray(reader.size)
    reader.read_into(buf, 0)
    return bytes(buf)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(cdp_mod, "time", c)
    return c


def test_a_point_view_pins_its_base_on_a_live_replica(tmp_path: Path, clock: Clock) -> None:
    pair = Pair(tmp_path, clock, window=40.0)
    for _ in range(3):
        pair.round()
    seq, t = pair.flush_points()[0]
    view = FollowedPointView(pair.rpath, "v1", SIZE, f"seq-{seq}")
    pinned = view.base.id
    for _ in range(40):  # 80 s: the window (40 s) would have dropped it twice over
        pair.round()
        assert pinned in pair.base_ids()
        assert image_of(view) == pair.images[t]
    journal_first = pair.r.journal.segments[0].first_seq  # type: ignore[union-attr]
    assert journal_first <= view.base.mark_seq + 1  # the records after it stay too
    view.close()
    pair.round()
    assert pinned not in pair.base_ids()  # unpinned: the next housekeeping drops it
    pair.close()


def test_a_clone_of_a_point_pins_its_history_past_max_bytes(tmp_path: Path,
                                                           clock: Clock) -> None:
    pair = Pair(tmp_path, clock, max_bytes=2 * MiB, window=1e9)
    pair.round()
    seq, t = pair.flush_points()[-1]
    data_dir = tmp_path / "b"
    info = clones.create(data_dir, f"v1@seq-{seq}", "c1")
    assert info.point_seq == seq and info.base_id is not None
    assert lasting_pins(pair.rpath) == {"clone-c1": (info.base_id, seq)}
    clone = Clone(info, FollowedPointView(pair.rpath, "v1", SIZE, f"seq-{seq}"))
    clone.write(b"\x5a" * 8192, 4096)
    want = bytearray(pair.images[t])
    want[4096:4096 + 8192] = b"\x5a" * 8192
    base = clone.base
    assert isinstance(base, FollowedPointView)
    base.close()
    clone.close()
    for _ in range(30):  # far past max_bytes: the oldest base stays, pinned by c1
        pair.round(steps=8)
    assert info.base_id in pair.base_ids()
    assert cdp_mod.held_bytes(pair.rpath, pair.r.cdp.floor)[0] > 2 * MiB  # type: ignore[union-attr]
    # Reopened (as nbdkit would, after a restart): still the point, plus its writes.
    clone = Clone(info, FollowedPointView(pair.rpath, "v1", SIZE, f"seq-{seq}"))
    assert image_of(clone) == bytes(want)
    assert isinstance(clone.base, FollowedPointView)
    clone.base.close()
    clone.close()
    delete_clone(data_dir, "c1")
    assert lasting_pins(pair.rpath) == {}
    pair.round()
    assert info.base_id not in pair.base_ids()
    pair.close()


def test_a_pin_outlives_no_clone_deleted_by_a_crash(tmp_path: Path, clock: Clock) -> None:
    """The clone's directory gone without its pin file (a crash inside delete_clone):
    the pin no longer counts."""
    pair = Pair(tmp_path, clock, max_bytes=2 * MiB, window=1e9)
    pair.round()
    seq, _t = pair.flush_points()[-1]
    info = clones.create(tmp_path / "b", f"v1@seq-{seq}", "c1")
    (info.path / "clone.json").unlink()
    info.data.unlink()
    info.path.rmdir()
    assert lasting_pins(pair.rpath) == {}
    for _ in range(30):
        pair.round(steps=8)
    assert info.base_id not in pair.base_ids()
    pair.close()


HOLDER = """
import sys
from pathlib import Path
from blockstore.cdp import FollowedPointView
v = FollowedPointView(Path(sys.argv[1]), "v1", int(sys.argv[2]), sys.argv[3])
print(v.base.id, flush=True)
sys.stdin.read()
"""


def test_a_reader_killed_pins_nothing(tmp_path: Path, clock: Clock) -> None:
    pair = Pair(tmp_path, clock, window=40.0)
    for _ in range(3):
        pair.round()
    seq, _t = pair.flush_points()[0]
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(pair.rpath), str(SIZE),
                             f"seq-{seq}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        pinned = int(proc.stdout.readline())
        for _ in range(30):
            pair.round()
        assert pinned in pair.base_ids()  # another process's reader: pinned
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    pair.round()
    assert pinned not in pair.base_ids()
    pair.close()


@pytest.mark.parametrize("seed", range(6))
def test_readers_and_clones_always_read_their_point(tmp_path: Path, clock: Clock,
                                                    seed: int) -> None:
    """Random sequences of rounds (writes, time, housekeeping with a small window and
    budget), point views opened and closed, clones of points created, reopened and
    deleted: every open reader reads exactly its point (plus a clone's own writes),
    and nothing pinned is dropped."""
    rng = random.Random(seed)
    pair = Pair(tmp_path, clock, max_bytes=3 * MiB, window=30.0)
    data_dir = tmp_path / "b"
    views: list[tuple[FollowedPointView, bytes]] = []
    made: dict[str, tuple[int, bytes]] = {}  # clone -> (point seq, image with its writes)
    for step in range(60):
        op = rng.random()
        if op < 0.5 or not pair.flush_points():
            pair.round(steps=rng.choice([2, 6]), tick=rng.choice([1.0, 5.0, 12.0]))
        elif op < 0.65:
            seq, t = rng.choice(pair.flush_points())
            views.append((FollowedPointView(pair.rpath, "v1", SIZE, f"seq-{seq}"),
                          pair.images[t]))
        elif op < 0.75 and views:
            v, _img = views.pop(rng.randrange(len(views)))
            v.close()
        elif op < 0.85:
            seq, t = rng.choice(pair.flush_points())
            name = f"c{step}"
            clones.create(data_dir, f"v1@seq-{seq}", name)
            img = bytearray(pair.images[t])
            off = rng.randrange(0, SIZE // 4096) * 4096
            info = find_clone(data_dir, name)
            assert info is not None
            c = Clone(info, FollowedPointView(pair.rpath, "v1", SIZE, f"seq-{seq}"))
            c.write(b"\xc3" * 4096, off)
            img[off:off + 4096] = b"\xc3" * 4096
            assert isinstance(c.base, FollowedPointView)
            c.base.close()
            c.close()
            made[name] = (seq, bytes(img))
        elif made:
            name = rng.choice(sorted(made))
            delete_clone(data_dir, name)
            del made[name]
        held = set(pair.base_ids())
        for v, img in views:
            assert v.base.id in held
            assert image_of(v) == img
        for name, (seq, img) in made.items():
            info = find_clone(data_dir, name)
            assert info is not None and info.base_id in held
            c = Clone(info, FollowedPointView(pair.rpath, "v1", SIZE, f"seq-{seq}"))
            try:
                assert image_of(c) == img, (name, step)
            finally:
                assert isinstance(c.base, FollowedPointView)
                c.base.close()
                c.close()
    for v, _img in views:
        v.close()
    pair.close()


def test_a_resync_keeps_a_pinned_base_and_builds_no_later_point_on_it(
        tmp_path: Path, clock: Clock) -> None:
    """A resync (extents written outside the journal) under an open point view: the
    view keeps reading its point; the points after the resync read the primary's image
    (a new base is taken before the first batch after it, however young the old one)."""
    pair = Pair(tmp_path, clock, window=3600.0)
    for _ in range(3):
        pair.round()
    seq, t = pair.flush_points()[0]
    view = FollowedPointView(pair.rpath, "v1", SIZE, f"seq-{seq}")
    # The primary moves on while the link is down; the replica is resynced by extents.
    for _ in range(4):
        pair.model.step()
    pair.p.flush()
    r = pair.r
    r.begin_resync()
    img = bytes(pair.model.img)
    for off in range(0, SIZE, 1 << 20):
        r.write_extent(off, 1 << 20, img[off:off + (1 << 20)])
    r.end_resync(pair.p.last_seq)
    r.set_consistent(True)
    pair.shipped = pair.p.last_seq
    assert view.base.id in pair.base_ids()
    assert image_of(view) == pair.images[t]
    pair.round()
    last_seq, last_t = pair.flush_points()[-1]
    after = FollowedPointView(pair.rpath, "v1", SIZE, f"seq-{last_seq}")
    assert image_of(after) == pair.images[last_t]
    assert after.base.id != view.base.id  # taken after the resync
    after.close()
    view.close()
    pair.close()
