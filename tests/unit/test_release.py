"""Journal release that follows the peers, and per-peer dirty sets (DESIGN.md §4), without
nbdkit: a Volume with tiny segments, peers/<peer>.json files written as a sender would."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from blockstore.meta import write_json
from blockstore.peers import (
    DIRTY_HOT,
    DIRTY_RELEASED,
    PEER_KIND,
    PEER_VERSION,
    covers,
    dirty_shift,
    known_peers,
    read_dirty,
    write_dirty,
)
from blockstore.record import REC_HEADER_SIZE, SEG_HEADER_SIZE
from blockstore.volume import (
    Checkpointer,
    Volume,
    VolumeInfo,
    create_volume,
    read_resync,
)

MiB = 1 << 20
SIZE = 16 * MiB
SEG = 64 * 1024  # ~15 records of 4 KiB per segment
CAP = 256 * 1024
BLOCK = 4096
SHIFT = 16  # dirty_shift(16 MiB)


@pytest.fixture
def info(tmp_path: Path) -> VolumeInfo:
    return create_volume(tmp_path, "v1", SIZE)


def set_peer(info: VolumeInfo, peer: str, acked: int, volume_uuid: str | None = None) -> None:
    """What a sender persists after an Ack."""
    (info.path / "peers").mkdir(exist_ok=True)
    write_json(info.path / "peers" / f"{peer}.json", {
        "kind": PEER_KIND, "version": PEER_VERSION, "peer": peer, "volume": "v1",
        "volume_uuid": volume_uuid or info.uuid, "acked_seq": acked, "address": "x:1",
        "updated": time.time()})


def open_vol(info: VolumeInfo, cap: int = CAP) -> Volume:
    return Volume(info, journal_max_bytes=cap, segment_bytes=SEG)


def write_blocks(vol: Volume, blocks: list[int]) -> dict[int, int]:
    """One 4 KiB write per block (in order); return seq -> offset."""
    return {vol.write(bytes([b % 251 + 1]) * BLOCK, b * BLOCK): b * BLOCK for b in blocks}


def settle(vol: Volume) -> None:
    """Let the background checkpoint finish, then checkpoint and release once more."""
    assert vol.checkpointer is not None
    vol.checkpointer.stop()
    vol.checkpoint()


def first_retained(vol: Volume) -> int:
    assert vol.journal is not None
    return vol.journal.segments[0].first_seq


def dirty_union(info: VolumeInfo, peer: str) -> set[int]:
    out: set[int] = set()
    for d in read_dirty(info, peer):
        assert d.extent_shift == SHIFT
        out.update(d.extents)
    return out


def test_dirty_shift_bounds_the_set() -> None:
    assert [dirty_shift(s) for s in (4096, 16 * MiB, 64 << 30, 1 << 40, 1 << 50)] == [
        16, 16, 16, 20, 30]


def test_no_known_peer_keeps_the_cap(info: VolumeInfo) -> None:
    vol = open_vol(info)
    try:
        write_blocks(vol, list(range(200)))
        settle(vol)
        assert vol.journal is not None
        assert first_retained(vol) > 1
        assert vol.journal.retained_bytes() <= CAP
        assert vol.journal.retained_bytes() > CAP - 2 * SEG  # not released below the cap
        assert not (info.path / "peers").exists()
    finally:
        vol.close()


def test_release_follows_the_slowest_peer_below_the_cap(info: VolumeInfo) -> None:
    vol = open_vol(info, cap=64 * MiB)
    try:
        write_blocks(vol, list(range(100)))
        set_peer(info, "fast", vol.last_seq)
        set_peer(info, "slow", 40)
        settle(vol)
        assert vol.journal is not None
        segs = vol.journal.segments
        # The segment holding seq 41 is the oldest kept: everything before it went.
        assert segs[0].first_seq <= 41 < segs[1].first_seq
        assert read_dirty(info, "slow") == [] and read_dirty(info, "fast") == []
        set_peer(info, "slow", 0)  # a peer at 0: nothing more goes, below the cap
        write_blocks(vol, list(range(100, 200)))
        first = first_retained(vol)
        settle(vol)
        assert first_retained(vol) == first
    finally:
        vol.close()


def test_release_never_passes_the_checkpoint(info: VolumeInfo) -> None:
    vol = open_vol(info, cap=0)  # over the cap at once: only the checkpoint holds it back
    try:
        set_peer(info, "p", 0)
        write_blocks(vol, list(range(100)))
        settle(vol)
        vol.checkpoint_seq = 30  # as if the store were durable through 30 only
        write_blocks(vol, list(range(100, 130)))
        assert vol.checkpointer is not None
        vol.checkpointer.stop()
        vol.checkpoint_seq = first_retained(vol) + 20
        vol.release_journal()
        assert vol.journal is not None
        # The segment holding the record after the checkpoint stays.
        assert first_retained(vol) <= vol.checkpoint_seq + 1
    finally:
        vol.close()


def test_past_the_cap_dirty_sets_name_the_released_extents(info: VolumeInfo) -> None:
    """Each write touches its own 64 KiB extent; the lagging peer's sets name exactly
    the extents of the released records after its ack, the caught-up peer gets none."""
    blocks = [i * 16 for i in range(250)]  # 4 KiB in each of 250 64 KiB extents
    vol = open_vol(info)
    try:
        set_peer(info, "slow", 10)
        set_peer(info, "fast", 0)
        seqs = write_blocks(vol, blocks[:40])
        set_peer(info, "fast", vol.last_seq)  # fast caught up, then falls behind again
        seqs.update(write_blocks(vol, blocks[40:]))  # ~1 MiB of journal, cap 256 KiB
        set_peer(info, "fast", vol.last_seq)
        settle(vol)
        first = first_retained(vol)
        assert first > 150, "the journal should have been released past the cap"
        want_slow = {seqs[s] >> SHIFT for s in seqs if 10 < s < first}
        assert dirty_union(info, "slow") == want_slow
        sets = read_dirty(info, "slow")
        assert {d.reason for d in sets} == {DIRTY_RELEASED}
        assert sets[0].from_seq == 11
        assert covers(sets, 10, first) and not covers(sets, 10, first + 1)
        assert not covers(sets, 5, first)  # records 6..10 are not accounted for
        # fast acked 40-ish records while they were retained: only later ones are dirty
        assert dirty_union(info, "fast") <= {seqs[s] >> SHIFT for s in seqs if s > 40}
    finally:
        vol.close()


def test_peer_of_another_incarnation_is_not_known(info: VolumeInfo) -> None:
    set_peer(info, "old", 5, volume_uuid="00000000-0000-4000-8000-000000000000")
    set_peer(info, "new", 7)
    write_dirty(info, "new", reason=DIRTY_RELEASED, from_seq=1, through_seq=3, shift=SHIFT,
                extents=[2, 1])
    assert known_peers(info) == {"new": 7}  # dirty files are not peers either
    [d] = read_dirty(info, "new")
    assert (d.extents, d.from_seq, d.through_seq) == ((1, 2), 1, 3)
    assert read_dirty(info, "old") == []


def test_unreadable_headers_make_every_extent_dirty(info: VolumeInfo) -> None:
    vol = open_vol(info, cap=64 * MiB)
    try:
        set_peer(info, "p", 0)
        write_blocks(vol, list(range(60)))
        settle(vol)
        assert vol.journal is not None
        seg = vol.journal.segments[0].path
        fd = os.open(seg, os.O_RDWR)
        try:  # flip a byte inside the second record's header
            pos = SEG_HEADER_SIZE + REC_HEADER_SIZE + BLOCK + 12
            os.pwrite(fd, bytes([os.pread(fd, 1, pos)[0] ^ 0xFF]), pos)
        finally:
            os.close(fd)
        vol.journal_max_bytes = 0
        vol.release_journal()
        assert dirty_union(info, "p") == set(range(SIZE >> SHIFT))
    finally:
        vol.close()


def crash(vol: Volume) -> None:
    """What kill -9 leaves (as in test_volume.py)."""
    assert vol.checkpointer is not None
    vol.checkpointer.stop()
    vol._close_files()
    vol.lock.release()


def test_unclean_restart_gives_hot_extents_to_every_known_peer(info: VolumeInfo) -> None:
    set_peer(info, "a", 0)
    set_peer(info, "b", 0)
    vol = open_vol(info, cap=64 * MiB)
    vol.write(b"x" * BLOCK, 0)
    vol.write(b"y" * BLOCK, 9 * MiB)
    last = vol.last_seq
    crash(vol)
    vol = open_vol(info, cap=64 * MiB)
    try:
        assert vol.recovery.unclean
        hot = [0, 2]  # 4 MiB activity-log extents
        assert read_resync(info)["extents"] == hot
        for peer in ("a", "b"):
            [d] = read_dirty(info, peer)
            assert (d.reason, d.extent_shift, d.extents, d.through_seq) == (
                DIRTY_HOT, 22, tuple(hot), last)
    finally:
        vol.close()


def checkpoint_times(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When each checkpoint of this test's volumes started (appended as they run)."""
    times: list[float] = []
    real = Volume.checkpoint_through

    def timed(self: Volume, seq: int) -> None:
        times.append(time.monotonic())
        real(self, seq)

    monkeypatch.setattr(Volume, "checkpoint_through", timed)
    return times


def wait_for_first(times: list[float]) -> None:
    """The first checkpoint (asked for at the first rotation) has run, and only it."""
    deadline = time.monotonic() + 2
    while not times and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(times) == 1


def test_pinned_journal_over_half_the_cap_waits_for_the_interval(
        info: VolumeInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records a lagging peer pins stay however often the store is synced: a journal
    that holds more than half its cap because of them is not checkpointed at every
    rotation (only after MIN_INTERVAL, once it has grown by half the cap, or past it)."""
    times = checkpoint_times(monkeypatch)
    vol = open_vol(info, cap=32 * SEG)
    try:
        assert vol.journal is not None and vol.checkpointer is not None
        set_peer(info, "slow", 0)  # pins everything below the cap
        write_blocks(vol, list(range(315)))  # ~20 segments: over half the cap, pinned
        # The first checkpoint runs at the first rotation, the next one after
        # MIN_INTERVAL; from then on the journal is measured from ~20 segments.
        deadline = time.monotonic() + 3 * vol.checkpointer.MIN_INTERVAL
        while len(times) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(times) == 2
        write_blocks(vol, list(range(315, 441)))  # ~8 more rotations, all over half
        assert 16 * SEG < vol.journal.retained_bytes() < 32 * SEG
        time.sleep(0.5)
        assert len(times) == 2  # no checkpoint per rotation
        assert first_retained(vol) == 1  # nothing the peer lacks was released
    finally:
        vol.close()


def test_checkpoint_starts_at_half_the_cap_not_at_it(
        info: VolumeInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal over half its cap is checkpointed without waiting out MIN_INTERVAL, so
    the fdatasync runs while the other half fills (not on the request path at the cap).
    MIN_INTERVAL is made a minute here: the second checkpoint can only come from the
    half-cap rule, however long this disk takes over the first one."""
    monkeypatch.setattr(Checkpointer, "MIN_INTERVAL", 60.0)
    times = checkpoint_times(monkeypatch)
    vol = open_vol(info, cap=8 * SEG)
    try:
        write_blocks(vol, list(range(20)))  # one rotation: the first checkpoint
        wait_for_first(times)
        write_blocks(vol, list(range(20, 100)))  # ~5 more: grown past half the cap, under it
        assert vol.journal is not None and vol.journal.retained_bytes() < 8 * SEG
        deadline = time.monotonic() + 15
        while len(times) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(times) >= 2, "no second checkpoint before MIN_INTERVAL at half the cap"
    finally:
        vol.close()
