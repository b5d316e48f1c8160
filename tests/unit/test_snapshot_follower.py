"""Reading a volume's snapshots from another process while it is written
(blockstore/snapshot.py SnapshotFollower, what a replica's REPLICA@SNAP exports use):
the re-check after a live read, snapshots appearing and deleted, compaction, a record
half appended, redo's fence, and a writer process racing a reader process."""

# The workload's randomness is for coverage (seeded), not secrecy.
# ruff: noqa: S311

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

import blockstore.snapshot as snapshot_mod
from blockstore.snapshot import (
    REDO_FILE,
    FollowedSnapshotView,
    RedoFence,
    SnapshotFollower,
    encode_cow,
)
from blockstore.store import Store
from blockstore.volume import Volume, create_volume, delete_volume

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB
EXT = 64 * KiB


def follower(dd: Path, name: str = "v1") -> SnapshotFollower:
    p = dd / "volumes" / name
    return SnapshotFollower(p / "snapshots", Store(str(p / "store"), SIZE, readonly=True), name)


def read_all(view: FollowedSnapshotView, length: int = SIZE, offset: int = 0) -> bytes:
    buf = bytearray(length)
    view.read_into(buf, offset)
    return bytes(buf)


def pattern(seed: int, n: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def vol(tmp_path: Path) -> Any:
    create_volume(tmp_path, "v1", SIZE)
    v = Volume.open(tmp_path, "v1")
    v.write(pattern(1), 0)
    yield v
    v.close()


def test_a_write_landing_between_plan_and_read_is_caught_by_the_recheck(
        vol: Volume, tmp_path: Path) -> None:
    """The writer preserves and overwrites extents after the reader planned them as live
    and before it read them: only step 3 (the re-check) turns that into S's image."""
    vol.snapshot_create("s")
    f = follower(tmp_path)
    view = FollowedSnapshotView(f, "s")
    real = f.store.pread_into
    hit = []

    def racing_read(buf: bytearray | memoryview, offset: int) -> None:
        if not hit:  # the writer gets in first, once
            hit.append(offset)
            vol.write(pattern(2, 3 * EXT), offset + EXT)
        real(buf, offset)

    f.store.pread_into = racing_read  # type: ignore[method-assign]
    assert read_all(view) == pattern(1)
    assert f.rechecked == 3
    assert read_all(view) == pattern(1)  # now planned from the pre-images at once


def test_block_status_racing_a_trim_is_caught_by_the_recheck(vol: Volume,
                                                             tmp_path: Path) -> None:
    vol.snapshot_create("s")
    f = follower(tmp_path)
    view = FollowedSnapshotView(f, "s")
    real = f.store.extents

    def racing_extents(offset: int, count: int) -> list[tuple[int, int, bool]]:
        vol.trim(offset, count)  # preserved first, then punched: a hole in the store
        return real(offset, count)

    f.store.extents = racing_extents  # type: ignore[method-assign]
    assert view.extents(0, 4 * EXT) == [(0, 4 * EXT, True)]
    assert real(0, 4 * EXT) == [(0, 4 * EXT, False)]
    assert read_all(view, 4 * EXT) == pattern(1)[:4 * EXT]


def test_new_snapshots_deletions_and_compaction_are_followed(vol: Volume,
                                                             tmp_path: Path) -> None:
    vol.snapshot_create("a")
    f = follower(tmp_path)
    a = FollowedSnapshotView(f, "a")
    vol.write(pattern(3, MiB), MiB)
    img_b = bytearray(pattern(1))
    img_b[MiB:2 * MiB] = pattern(3, MiB)
    vol.snapshot_create("b")  # appears after the follower opened
    b = FollowedSnapshotView(f, "b")
    vol.write(pattern(4, 2 * MiB), 0)
    assert read_all(a) == pattern(1)
    assert read_all(b) == bytes(img_b)
    vol.snapshot_delete("b")  # a reads through b's pre-images: they move to a
    assert read_all(a) == pattern(1)
    with pytest.raises(OSError, match="was deleted") as e:
        read_all(b)
    assert e.value.errno == errno.ESHUTDOWN
    loads = f.reloads
    assert vol.snaps is not None
    vol.snaps.compact()  # a new index file renamed over the one the follower reads
    vol.write(pattern(5, MiB), 3 * MiB)
    assert read_all(a) == pattern(1)
    assert f.reloads == loads + 1
    vol.snapshot_create("c")  # appended to the new file
    assert FollowedSnapshotView(f, "c").size == SIZE
    assert f.reloads == loads + 1


def test_a_record_half_appended_is_taken_once_whole(vol: Volume, tmp_path: Path) -> None:
    vol.snapshot_create("s")
    f = follower(tmp_path)
    view = FollowedSnapshotView(f, "s")
    rec = encode_cow(view.snap.id, [(5, snapshot_mod.ZERO_SLOT, 0)])
    assert vol.snaps is not None
    at = vol.snaps.pos
    fd = vol.snaps.index_fd
    os.pwrite(fd, rec[:10], at)
    f.refresh()
    assert 5 not in f.index.snaps[view.snap.id].owned
    assert f.pos == at
    os.pwrite(fd, rec, at)
    f.refresh()
    assert f.index.snaps[view.snap.id].owned[5] == snapshot_mod.ZERO_SLOT
    assert read_all(view, EXT, 5 * EXT) == bytes(EXT)
    os.ftruncate(fd, at)  # not the writer's state: reopen the volume before it notices
    vol.snaps.pos = at
    f.refresh()  # truncated below what it read: reloaded
    assert 5 not in f.index.snaps[view.snap.id].owned


def test_a_read_during_redo_waits_and_one_across_a_redo_is_retried(
        vol: Volume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vol.snapshot_create("s")
    f = follower(tmp_path)
    view = FollowedSnapshotView(f, "s")
    assert vol.snaps is not None
    fence = RedoFence(vol.snaps.dir)
    real = f.store.pread_into
    calls = []

    def read_across_redo(buf: bytearray | memoryview, offset: int) -> None:
        calls.append(offset)
        if len(calls) == 1:  # a whole redo between steps 1 and 3
            fence.begin()
            fence.end()
        real(buf, offset)

    f.store.pread_into = read_across_redo  # type: ignore[method-assign]
    assert read_all(view) == pattern(1)
    assert len(calls) == 2  # read again
    f.store.pread_into = real  # type: ignore[method-assign]
    fence.begin()
    monkeypatch.setattr(snapshot_mod, "REDO_WAIT", 0.2)
    t = time.monotonic()
    with pytest.raises(OSError, match="recovering") as e:
        read_all(view)
    assert e.value.errno == errno.EIO
    assert time.monotonic() - t >= 0.2
    fence.end()
    assert read_all(view) == pattern(1)


def test_redo_on_open_raises_and_lowers_the_fence(tmp_path: Path) -> None:
    create_volume(tmp_path, "v1", SIZE)
    v = Volume.open(tmp_path, "v1")
    v.snapshot_create("s")
    v.write(b"\x01" * 4096, 0)
    assert v.checkpointer is not None
    v.checkpointer.stop()
    v._close_files()  # kill -9
    v.lock.release()
    fence = tmp_path / "volumes" / "v1" / "snapshots" / REDO_FILE
    assert not fence.exists()
    seen = []
    real = RedoFence.begin

    def begin(self: RedoFence) -> None:
        real(self)
        seen.append(self.path.read_bytes())

    RedoFence.begin = begin  # type: ignore[method-assign]
    try:
        v = Volume.open(tmp_path, "v1")
    finally:
        RedoFence.begin = real  # type: ignore[method-assign]
    assert v.recovery.unclean
    assert [s[:1] for s in seen] == [b"R"]
    assert fence.read_bytes()[:1] == b"D"  # lowered, with a token of its own
    assert fence.read_bytes()[2:] != seen[0][2:]
    v.close()


# -- a writer process racing a reader process ------------------------------------------------

def _writer(dd: str, seconds: float, seed: int, ready: Any) -> None:
    """Random writes, snapshots taken and deleted (moves, compaction) for ``seconds``."""
    rng = random.Random(seed)
    v = Volume.open(Path(dd), "v1")
    assert v.snaps is not None
    ready.set()
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        size = rng.choice([4 * KiB, 64 * KiB, 256 * KiB])
        off = rng.randrange(0, (SIZE - size) // 4096 + 1) * 4096
        if rng.random() < 0.1:
            v.trim(off, size)
        else:
            v.write(rng.randbytes(size), off)
        n += 1
        if n % 8 == 0:
            v.snapshot_create(f"t{n}")
        if n % 24 == 0:
            names = [r["name"] for r in v.snapshot_list() if r["name"] not in ("s", "gone")]
            for name in names[:-1]:
                v.snapshot_delete(name)
        if n == 200:
            v.snapshot_delete("gone")
        if n % 100 == 0:
            v.snaps.compact()
    v.close()


def race(tmp_path: Path, seconds: float) -> tuple[int, int, int]:
    """Reads of snapshot s (every byte checked) while a writer process runs; returns
    (reads, extents the re-check caught, index reloads)."""
    create_volume(tmp_path, "v1", SIZE)
    v = Volume.open(tmp_path, "v1")
    v.write(pattern(1), 0)
    v.snapshot_create("s")
    v.write(pattern(6), 0)
    v.snapshot_create("gone")
    v.close()
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    w = ctx.Process(target=_writer, args=(str(tmp_path), seconds, 11, ready))
    w.start()
    try:
        assert ready.wait(30)
        f = follower(tmp_path)
        s = FollowedSnapshotView(f, "s")
        gone = FollowedSnapshotView(f, "gone")
        real = f.store.pread_into

        def slow_read(buf: bytearray | memoryview, offset: int) -> None:
            time.sleep(0.001)  # a reader preempted between its plan and its read
            real(buf, offset)

        f.store.pread_into = slow_read  # type: ignore[method-assign]
        rng = random.Random(12)
        reads = deleted = 0
        want = pattern(1)
        want_gone = pattern(6)
        while w.is_alive():
            off = rng.randrange(0, SIZE // 4096) * 4096
            n = min(rng.choice([4 * KiB, 100 * KiB, MiB, SIZE]), SIZE - off)
            assert read_all(s, n, off) == want[off:off + n], f"read [{off}, +{n})"
            if reads % 8 == 0:  # s has no hole: the writer's trims must not show through
                assert all(alloc for _o, _n, alloc in s.extents(off, n)), (off, n)
            try:  # deleted under the reader: ESHUTDOWN, never other bytes
                got = read_all(gone, n, off)
            except OSError as e:
                if e.errno != errno.ESHUTDOWN:
                    raise
                deleted += 1
            else:
                assert not deleted and got == want_gone[off:off + n]
            reads += 1
        w.join(30)
        assert w.exitcode == 0
        assert read_all(s) == want
        assert deleted
        return reads, f.rechecked, f.reloads
    finally:
        if w.is_alive():
            w.kill()
        w.join(10)


def test_a_writer_process_racing_a_reader_process(tmp_path: Path) -> None:
    reads, rechecked, reloads = race(tmp_path, 4.0)
    print(f"reads {reads}, re-checked extents {rechecked}, index reloads {reloads}")
    assert reads >= 50
    assert reloads >= 2  # compactions were followed


def test_a_volume_deleted_or_created_again_ends_its_readers(tmp_path: Path) -> None:
    create_volume(tmp_path, "v1", SIZE)
    v = Volume.open(tmp_path, "v1")
    v.write(pattern(1), 0)
    v.snapshot_create("s")
    v.close()
    f = follower(tmp_path)
    view = FollowedSnapshotView(f, "s")
    assert read_all(view, MiB) == pattern(1)[:MiB]
    delete_volume(tmp_path, "v1")
    with pytest.raises(OSError, match="was deleted") as e:
        read_all(view, MiB)
    assert e.value.errno == errno.ESHUTDOWN
    f.close()
    f.store.close()

    create_volume(tmp_path, "v1", SIZE)  # a new v1 with a snapshot of the same name
    v = Volume.open(tmp_path, "v1")
    v.write(pattern(1), 0)
    v.snapshot_create("s")
    f = follower(tmp_path)
    view = FollowedSnapshotView(f, "s")
    v.close()
    delete_volume(tmp_path, "v1")
    create_volume(tmp_path, "v1", SIZE)
    v = Volume.open(tmp_path, "v1")
    v.write(pattern(2), 0)
    v.snapshot_create("s")
    v.close()
    with pytest.raises(OSError, match="re-created") as e:
        read_all(view, MiB)
    assert e.value.errno == errno.ESHUTDOWN and f.gone


@pytest.mark.parametrize("fence", [True, False])
def test_redo_rewriting_older_contents_is_never_read_as_the_snapshot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fence: bool) -> None:
    """Redo replays records older than a snapshot's MARK: extent 0 passes through X
    again before it is A, the snapshot's content.  A reader in the middle of that waits
    (and here, where redo waits for it, gives up with EIO); without the fence it would
    read X as the snapshot (shown with the fence disabled)."""
    create_volume(tmp_path, "v1", SIZE)
    v = Volume.open(tmp_path, "v1")
    assert v.checkpointer is not None
    v.checkpointer.stop()  # the redo point stays at 0
    x, a = b"\x0a" * EXT, b"\x0b" * EXT
    v.write(x, 0)
    v.write(a, 0)
    v.snapshot_create("s")
    v._close_files()  # kill -9
    v.lock.release()
    f = follower(tmp_path)
    view = FollowedSnapshotView(f, "s")
    assert read_all(view, EXT) == a
    if not fence:
        monkeypatch.setattr(RedoFence, "begin", lambda self: None)
        monkeypatch.setattr(RedoFence, "end", lambda self: None)
    monkeypatch.setattr(snapshot_mod, "REDO_WAIT", 0.2)
    seen: list[bytes | str] = []
    redo = Volume._redo

    def redo_then_read(self: Volume, hdr: Any, payload: bytes) -> None:
        redo(self, hdr, payload)
        if hdr.seq == 1:  # x is back in the store
            try:
                seen.append(read_all(view, EXT))
            except OSError as e:
                seen.append(str(e))

    monkeypatch.setattr(Volume, "_redo", redo_then_read)
    v = Volume.open(tmp_path, "v1")
    assert v.recovery.replayed >= 3
    v.close()
    if fence:
        assert len(seen) == 1 and "recovering" in str(seen[0])
        assert read_all(view, EXT) == a  # after redo
    else:
        assert seen == [x]  # the hazard the fence exists for
