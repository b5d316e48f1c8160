"""CDP on a blockstore Volume, in-process on real files: the time index (TIME marks at
FLUSH and every second of writing), point views read back exactly at every point across
segment rotation, trims, zeros, a grow and a crash; base rotation by the window and
pruning by max_bytes; the overlay against a brute-force model."""

# The workload's randomness is for coverage (seeded), not secrecy.
# ruff: noqa: S311

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

import blockstore.cdp as cdp_mod
from blockstore.cdp import (
    CdpError,
    CdpPolicy,
    Overlay,
    open_point,
    parse_duration,
    parse_instant,
    points,
    resolve,
    summary,
    write_policy,
)
from blockstore.volume import Volume, create_volume

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB


class Clock:
    """Stands in for the time module inside blockstore.cdp: seconds move when told."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def time(self) -> float:
        return self.now

    def time_ns(self) -> int:
        return int(self.now * 1e9)

    def monotonic(self) -> float:
        return self.now

    def tick(self, s: float) -> None:
        self.now += s


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(cdp_mod, "time", c)
    return c


def crash(vol: Volume) -> None:
    if vol.checkpointer is not None:
        vol.checkpointer.stop()
    vol._close_files()
    vol.lock.release()


def make(tmp_path: Path, window: float = 3600.0, max_bytes: int = 1 << 30,
         size: int = SIZE, replica: bool = False, name: str = "v1") -> Path:
    info = create_volume(tmp_path, name, size, replica=replica)
    write_policy(info.path, CdpPolicy(window, max_bytes))
    return info.path


def read_point(vol: Volume, text: str) -> bytes:
    view = open_point(vol, text)
    try:
        buf = bytearray(view.size)
        # In pieces that cross the overlay's ranges (and one whole read).
        view.read_into(buf, 0)
        whole = bytes(buf)
        for off in range(0, view.size, 192 * KiB):
            n = min(192 * KiB, view.size - off)
            part = bytearray(n)
            view.read_into(part, off)
            assert bytes(part) == whole[off:off + n]
        return whole
    finally:
        view.close()


class Model:
    def __init__(self, vol: Volume, seed: int) -> None:
        self.vol = vol
        self.rng = random.Random(seed)
        self.img = bytearray(vol.size)

    def step(self) -> None:
        rng = self.rng
        n = rng.choice([4 * KiB, 4 * KiB, 12 * KiB, 64 * KiB, 300 * KiB])
        off = rng.randrange(0, (self.vol.size - n) // 4096 + 1) * 4096
        kind = rng.random()
        if kind < 0.1:
            self.vol.trim(off, n)
            self.img[off:off + n] = bytes(n)
        elif kind < 0.2:
            self.vol.zero(off, n, may_trim=rng.random() < 0.5)
            self.img[off:off + n] = bytes(n)
        else:
            data = rng.randbytes(n)
            self.vol.write(data, off)
            self.img[off:off + n] = data


@pytest.mark.parametrize("shift", [5, 26])  # ranges cut at 32-byte buckets, or none
def test_overlay_against_a_model(shift: int) -> None:
    rng = random.Random(7)
    ov = Overlay(shift)
    model: list[tuple[int, int] | None] = [None] * 400  # byte -> (file, pos) or zero
    written = [False] * 400
    for k in range(600):
        s = rng.randrange(0, 399)
        e = rng.randrange(s + 1, min(400, s + 60) + 1)
        src = None if rng.random() < 0.3 else (k, 1000 * k)
        ov.put(s, e, src)
        for b in range(s, e):
            model[b] = None if src is None else (src[0], src[1] + b - s)
            written[b] = True
        if k % 50 == 0 or k == 599:
            a0, z0 = rng.randrange(0, 200), rng.randrange(200, 401)
            got: list[tuple[int, int] | None] = [None] * 400
            seen = [False] * 400
            prev_end = -1
            for a, z, sr in ov.covering(a0, z0):
                assert a0 <= a < z <= z0 and a >= prev_end  # clipped, sorted, disjoint
                prev_end = z
                for b in range(a, z):
                    got[b] = None if sr is None else (sr[0], sr[1] + b - a)
                    seen[b] = True
            assert seen[a0:z0] == written[a0:z0]
            assert [g for g, w in zip(got[a0:z0], written[a0:z0], strict=True) if w] == [
                m for m, w in zip(model[a0:z0], written[a0:z0], strict=True) if w]


def test_every_flush_point_reads_back_exactly(tmp_path: Path, clock: Clock) -> None:
    """Known data at known points, with segment rotation, trims, zeros, a grow in the
    middle and a crash (reopen without close): each FLUSH point reads back exactly."""
    make(tmp_path)
    vol = Volume.open(tmp_path, "v1", segment_bytes=1 * MiB)
    model = Model(vol, 1)
    expect: dict[int, bytes] = {}
    for rnd in range(12):
        for _ in range(8):
            model.step()
        if rnd == 5:
            vol.grow(SIZE + 1 * MiB)
            model.img += bytes(1 * MiB)
            model.step()
        vol.flush()
        flushes = [p for p in points(vol.info.path, 0, False) if p.flush]
        expect[flushes[-1].seq] = bytes(model.img)
        clock.tick(0.4 if rnd % 2 else 1.5)
        if rnd == 8:
            crash(vol)
            vol = Volume.open(tmp_path, "v1", segment_bytes=1 * MiB)
            model.vol = vol
    assert len(vol.journal.segments) > 3  # type: ignore[union-attr]  # rotated
    pts = points(vol.info.path, 0, False)
    assert [p.seq for p in pts if p.flush] == sorted(expect)
    assert sum(1 for p in pts if not p.flush) >= 3  # the per-second marks
    for seq, img in expect.items():
        assert read_point(vol, f"seq-{seq}") == img, f"point seq {seq}"
    vol.close()
    vol = Volume.open(tmp_path, "v1")  # clean reopen: the same points
    for seq, img in expect.items():
        assert read_point(vol, f"seq-{seq}") == img, f"point seq {seq} after reopen"
    vol.close()


def test_instants_resolve_to_the_last_flush_at_or_before(tmp_path: Path, clock: Clock
                                                          ) -> None:
    make(tmp_path)
    vol = Volume.open(tmp_path, "v1")
    images = []
    for i in range(3):
        vol.write(bytes([i + 1]) * 8192, 0)
        vol.flush()
        images.append((clock.time_ns(), b"" + bytes([i + 1]) * 8192))
        clock.tick(10)
    floor = vol.cdp.floor  # type: ignore[union-attr]
    pts = points(vol.info.path, floor + 1, False)
    for t, img in images:
        for dt in (0, 5 * 10**9):
            p = resolve(pts, "at", t + dt, floor)
            view = open_point(vol, f"seq-{p.seq}")
            buf = bytearray(8192)
            view.read_into(buf, 0)
            view.close()
            assert bytes(buf) == img
    with pytest.raises(CdpError, match="no consistency point at or before"):
        resolve(pts, "at", images[0][0] - 1, floor)
    before = resolve(pts, "before-last-flush", 0, floor)
    assert before.t == images[1][0]
    view = open_point(vol, cdp_mod.format_instant(images[1][0] + 10**9))
    buf = bytearray(8192)
    view.read_into(buf, 0)
    view.close()
    assert bytes(buf) == images[1][1]
    assert parse_instant("2026-12-02T10:15:03Z") == 1_796_206_503 * 10**9
    assert parse_duration("24h") == 86400 and parse_duration("90m") == 5400
    vol.close()


def test_points_stay_right_while_the_volume_keeps_writing(tmp_path: Path, clock: Clock
                                                          ) -> None:
    make(tmp_path)
    vol = Volume.open(tmp_path, "v1")
    model = Model(vol, 3)
    for _ in range(20):
        model.step()
    vol.flush()
    seq = [p for p in points(vol.info.path, 0, False) if p.flush][-1].seq
    want = bytes(model.img)
    view = open_point(vol, f"seq-{seq}")
    for _ in range(60):  # overwrite the base's extents after the view opened
        model.step()
        clock.tick(0.3)
    buf = bytearray(view.size)
    view.read_into(buf, 0)
    assert bytes(buf) == want
    view.close()
    vol.close()


def test_bases_rotate_with_the_window_and_the_journal_is_released(tmp_path: Path,
                                                                  clock: Clock) -> None:
    make(tmp_path, window=100.0)
    vol = Volume.open(tmp_path, "v1", segment_bytes=1 * MiB, journal_max_bytes=1 * MiB)
    model = Model(vol, 5)
    kept: list[tuple[float, int, bytes]] = []  # (time, seq, image)
    for _ in range(40):  # 200 s of writing, a base every 25 s
        for _ in range(3):
            model.step()
        vol.flush()
        seq = [p for p in points(vol.info.path, (vol.cdp.floor or 0) + 1, False)  # type: ignore[union-attr]
               if p.flush][-1].seq
        kept.append((clock.time(), seq, bytes(model.img)))
        clock.tick(5)
        vol.checkpoint()
    cdp = vol.cdp
    assert cdp is not None
    bases = [cdp.bases.index.snaps[i] for i in cdp.bases.index.order]
    assert 4 <= len(bases) <= 6
    # The oldest base is at most one base period older than the window.
    assert clock.time() - bases[1].created <= 100.0
    assert clock.time() - bases[0].created <= 100.0 + 25.0 + 5.0
    assert vol.journal.segments[0].first_seq <= bases[0].mark_seq + 1  # type: ignore[union-attr]
    assert vol.journal.segments[0].first_seq > 1  # type: ignore[union-attr]  # released
    inside = [(t, s, img) for t, s, img in kept if s > bases[0].mark_seq]
    assert inside and inside[0][0] <= clock.time() - 100.0
    for _t, s, img in inside[:: max(1, len(inside) // 6)]:
        assert read_point(vol, f"seq-{s}") == img
    with pytest.raises(CdpError, match="no point at seq"):
        open_point(vol, f"seq-{kept[0][1]}")
    info = summary(vol.info.path, False)
    assert info is not None and info["oldest_point"]["seq"] >= bases[0].mark_seq
    vol.close()


def test_max_bytes_drops_the_oldest_history_and_never_fails_a_write(
        tmp_path: Path, clock: Clock) -> None:
    # A window never reached (one base per 250 days): only max_bytes drops history.
    make(tmp_path, window=1e9, max_bytes=3 * MiB)
    vol = Volume.open(tmp_path, "v1", segment_bytes=1 * MiB, journal_max_bytes=1 * MiB)
    model = Model(vol, 9)
    for _ in range(60):
        for _ in range(4):
            model.step()
        vol.flush()
        clock.tick(2)
        vol.checkpoint()
    cdp = vol.cdp
    assert cdp is not None
    assert cdp.bases.index.order[0] > 3  # dropped early, and the history restarted
    info = summary(vol.info.path, False)
    assert info is not None
    # Bounded: the budget plus what one housekeeping period may add.
    assert info["bytes_held"] <= 3 * MiB + 2 * MiB
    last = info["points"][-1]
    assert read_point(vol, f"seq-{last['seq']}") == bytes(model.img)
    assert vol.journal.segments[0].first_seq > 1  # type: ignore[union-attr]
    vol.close()


def replicated(tmp_path: Path, clock: Clock, rounds: int, steps: int, seed: int,
               **open_kw: int) -> tuple[Volume, Volume, dict[int, bytes]]:
    """A primary and its replica (each with a window), ``rounds`` of ``steps`` writes and
    a FLUSH shipped as one batch each: (primary, replica, image at each FLUSH point by
    the primary's clock)."""
    make(tmp_path / "a")
    make(tmp_path / "b", replica=True)
    p = Volume.open(tmp_path / "a", "v1", **open_kw)  # type: ignore[arg-type]
    r = Volume.open(tmp_path / "b", "v1", **open_kw)  # type: ignore[arg-type]
    r.set_consistent(True)
    model = Model(p, seed)
    shipped = 0
    images = {}
    for _ in range(rounds):
        for _ in range(steps):
            model.step()
        p.flush()
        images[[q for q in points(p.info.path, 0, False) if q.flush][-1].t] = bytes(model.img)
        clock.tick(0.7)
        recs = [(int(h.op), int(h.flags), h.offset, h.length, bytes(d))
                for h, d in p.journal.records(shipped + 1)]  # type: ignore[union-attr]
        r.apply_batch(shipped + 1, p.last_seq, recs)
        shipped = p.last_seq
    return p, r, images


def test_a_replica_has_the_same_points_with_the_primarys_clock(tmp_path: Path,
                                                               clock: Clock) -> None:
    p, r, images = replicated(tmp_path, clock, 6, 5, 11)
    ppts = [(q.t, q.flush) for q in points(p.info.path, 0, False)]
    rpts = points(r.info.path, 0, True)
    assert [(q.t, q.flush) for q in rpts] == ppts
    for q in rpts:
        if q.flush and q.seq >= (r.cdp.floor or 0):  # type: ignore[union-attr]
            assert read_point(r, f"seq-{q.seq}") == images[q.t]
    p.close()
    r.close()


class Crash(BaseException):
    """Raised where kill -9 lands (BaseException: nothing on the way catches it)."""


@contextlib.contextmanager
def crash_at_change(n: int) -> Iterator[None]:
    """Raise Crash at the ``n``-th store change of any volume, inside the block."""
    real = Volume._change
    calls = [0]

    def dying(self: Volume, *a: object, **kw: object) -> int:
        if calls[0] >= n:
            raise Crash
        calls[0] += 1
        return real(self, *a, **kw)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Volume, "_change", dying)
        yield


@pytest.mark.parametrize("crash_after", [None, 0, 3])
def test_restore_to_a_point_keeps_the_state_before_and_survives_a_crash(
        tmp_path: Path, clock: Clock, crash_after: int | None) -> None:
    make(tmp_path)
    vol = Volume.open(tmp_path, "v1", segment_bytes=1 * MiB)
    model = Model(vol, 13)
    for _ in range(30):
        model.step()
    vol.flush()
    seq = [p for p in points(vol.info.path, 1, False) if p.flush][-1].seq
    want = bytes(model.img)
    clock.tick(2)
    for _ in range(40):
        model.step()
    vol.grow(SIZE + 1 * MiB)
    model.img += bytes(1 * MiB)
    vol.write(b"\x77" * 8192, SIZE)
    model.img[SIZE:SIZE + 8192] = b"\x77" * 8192
    vol.flush()
    before = bytes(model.img)
    if crash_after is not None:
        with crash_at_change(crash_after), pytest.raises(Crash):
            cdp_mod.restore(vol, f"seq-{seq}", "pre-restore")
        crash(vol)
        vol = Volume.open(tmp_path, "v1")  # finishes the restore
        assert not cdp_mod.pending_restore(vol.info.path)
    else:
        r = cdp_mod.restore(vol, f"seq-{seq}", "pre-restore")
        assert r["seq"] == seq and r["bytes_written"] > 0
    live = bytearray(vol.size)
    vol.read_into(live, 0)
    assert bytes(live[:SIZE]) == want[:SIZE]
    assert bytes(live[SIZE:]) == bytes(1 * MiB)  # space grown since the point: zeros
    snap = bytearray(vol.size)
    vol.snapshot_view("pre-restore").read_into(snap, 0)
    assert bytes(snap) == before
    vol.close()


def test_connections_to_one_point_share_its_overlay(tmp_path: Path, clock: Clock) -> None:
    make(tmp_path)
    vol = Volume.open(tmp_path, "v1")
    model = Model(vol, 17)
    for _ in range(20):
        model.step()
    vol.flush()
    seq = [p for p in points(vol.info.path, 1, False) if p.flush][-1].seq
    want = bytes(model.img)
    a = open_point(vol, f"seq-{seq}")
    b = open_point(vol, f"seq-{seq}")  # a second connection (multi-conn): no new scan
    assert b.overlay is a.overlay
    a.close()
    for _ in range(20):
        model.step()
    buf = bytearray(b.size)
    b.read_into(buf, 0)
    assert bytes(buf) == want
    b.close()
    assert vol.cdp is not None and vol.cdp.built == {} and vol.cdp.pins == {}
    with pytest.raises(OSError, match="no longer held"):
        b.read_into(buf, 0)
    vol.close()
