"""Consistency-group restore (DESIGN.md §7a "Consistency groups"): several volumes of
one data directory rolled back to their last FLUSH point at or before one instant, all
or nothing across a crash wherever it lands — before the group's intent (none changes),
inside any member's writes, between members (every one is finished by its next open)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

import blockstore.cdp as cdp_mod
from blockstore.cdp import CdpError, points, restore_group
from blockstore.volume import Volume

from .test_cdp import Clock, Crash, Model, crash, crash_at_change, make
from .test_cdp import clock as test_cdp_clock

MiB = 1 << 20
NAMES = ("data", "log", "idx")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """test_cdp's clock: seconds move when told."""
    return test_cdp_clock.__wrapped__(monkeypatch)  # type: ignore[attr-defined, no-any-return]


def image(vol: Volume) -> bytes:
    buf = bytearray(vol.size)
    vol.read_into(buf, 0)
    return bytes(buf)


def group(tmp_path: Path, clock: Clock) -> tuple[list[Volume], int, dict[str, bytes],
                                                 dict[str, bytes]]:
    """Three volumes written, flushed, then written again after the instant T: (the
    volumes, T, their images at T, their images now)."""
    vols = []
    for n in NAMES:
        make(tmp_path, name=n)
        vols.append(Volume.open(tmp_path, n, segment_bytes=1 * MiB))
    models = [Model(v, i) for i, v in enumerate(vols)]
    for _ in range(25):
        for m in models:
            m.step()
    for v in vols:
        v.flush()
    at = clock.time_ns()
    then = {v.name: bytes(m.img) for v, m in zip(vols, models, strict=True)}
    clock.tick(2)
    for _ in range(25):
        for m in models:
            m.step()
        clock.tick(0.1)
    for v in vols:
        v.flush()
    now = {v.name: bytes(m.img) for v, m in zip(vols, models, strict=True)}
    assert all(then[n] != now[n] for n in NAMES)
    return vols, at, then, now


def check(tmp_path: Path, vols: list[Volume], want: dict[str, bytes],
          before: dict[str, bytes] | None) -> None:
    for v in vols:
        assert image(v) == want[v.name], v.name
        if before is not None:
            snap = bytearray(v.size)
            v.snapshot_view("before").read_into(snap, 0)
            assert bytes(snap) == before[v.name], v.name
        else:
            assert v.snaps is None or "before" not in v.snaps.index.by_name
    groups = tmp_path / cdp_mod.GROUPS_DIR
    assert not groups.is_dir() or not list(groups.iterdir())  # the intent is gone


def test_a_group_restores_every_volume_to_its_point_at_the_instant(tmp_path: Path,
                                                                   clock: Clock) -> None:
    vols, at, then, now = group(tmp_path, clock)
    rows = restore_group(vols, at, "at-T", "before")
    for v, r in zip(vols, rows, strict=True):
        flushes = [p for p in points(v.info.path, 0, False) if p.flush and p.t <= at]
        assert r["seq"] == flushes[-1].seq and r["bytes_written"] > 0
    check(tmp_path, vols, then, now)
    for v in vols:
        v.close()


def test_a_group_is_checked_whole_before_anything_changes(tmp_path: Path,
                                                          clock: Clock) -> None:
    vols, _at, _then, now = group(tmp_path, clock)
    vols[2].snapshot_create("before")  # the name is taken on the last one
    with pytest.raises(Exception, match="before"):
        restore_group(vols, clock.time_ns(), "now", "before")
    with pytest.raises(CdpError, match="no consistency point"):
        restore_group(vols, 1, "long ago", "other")
    for v in vols:
        assert image(v) == now[v.name]
        assert not cdp_mod.pending_restore(v.info.path)
        v.close()


# Where kill -9 lands: the n-th store change of the restore (the members write in turn,
# so a large n is in the second or third member); None: before the group's intent.
@pytest.mark.parametrize("crash_after", [None, 0, 5, 30, 60])
def test_a_group_restore_cut_by_a_crash_is_all_or_nothing(
        tmp_path: Path, clock: Clock, crash_after: int | None) -> None:
    vols, at, then, now = group(tmp_path, clock)
    with contextlib.ExitStack() as stack:
        if crash_after is None:
            def dying_intent(*_a: object, **_k: object) -> None:
                raise Crash
            stack.enter_context(pytest.MonkeyPatch.context()).setattr(
                cdp_mod, "write_json", dying_intent)
        else:
            stack.enter_context(crash_at_change(crash_after))
        with pytest.raises(Crash):
            restore_group(vols, at, "at-T", "before")
    # Committed (the intent is durable: the last member at least is pending), or begun
    # for none.
    pending = [cdp_mod.pending_restore(v.info.path) for v in vols]
    assert pending[-1] if crash_after is not None else not any(pending)
    for v in vols:
        crash(v)
    # Reopened one at a time, in reverse order: each open finishes its own part.
    vols = [Volume.open(tmp_path, n) for n in reversed(NAMES)][::-1]
    check(tmp_path, vols, now if crash_after is None else then,
          None if crash_after is None else now)
    for v in vols:
        v.close()
