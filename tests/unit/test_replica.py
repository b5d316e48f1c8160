"""Replica mode of a volume: batches applied atomically, redo through the last commit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import pytest

from blockstore.errors import InvalidArgument
from blockstore.marks import COMMIT_EVENT
from blockstore.record import Op
from blockstore.volume import Volume, create_volume

SIZE = 16 << 20


def crash(vol: Volume) -> None:
    """kill -9 as far as this process can: drop the files without a clean close."""
    if vol.checkpointer is not None:
        vol.checkpointer.stop()
    vol._close_files()
    vol.lock.release()


def read(vol: Volume, off: int, n: int) -> bytes:
    buf = bytearray(n)
    vol.read_into(buf, off)
    return bytes(buf)


@pytest.fixture
def replica(tmp_path: Path) -> Path:
    create_volume(tmp_path, "r1", SIZE, replica=True)
    return tmp_path


def test_new_replica_is_inconsistent_until_told(replica: Path) -> None:
    vol = Volume.open(replica, "r1")
    assert (vol.replica, vol.inconsistent, vol.upstream_seq) == (True, True, 0)
    vol.set_consistent(True)
    vol.close()
    state = json.loads((replica / "volumes/r1/state.json").read_text())
    assert (state["replica"], state["inconsistent"]) == (True, False)


def test_apply_batch_writes_store_and_journal_with_commit(replica: Path) -> None:
    vol = Volume.open(replica, "r1")
    a, b = os.urandom(8192), os.urandom(4096)
    assert vol.apply_batch(1, 5, [(Op.WRITE, 0, 0, 8192, a), (Op.WRITE, 0, 1 << 20, 4096, b),
                                  (Op.TRIM, 0, 4096, 4096, b"")]) == 5
    assert read(vol, 0, 8192) == a[:4096] + bytes(4096)
    assert read(vol, 1 << 20, 4096) == b
    assert vol.upstream_seq == 5
    assert vol.journal is not None
    recs = list(vol.journal.records(1))
    assert [h.op for h, _ in recs] == [Op.WRITE, Op.WRITE, Op.TRIM, Op.MARK]
    body = msgpack.unpackb(recs[-1][1])
    assert (body["event"], body["first_seq"], body["last_seq"]) == (COMMIT_EVENT, 1, 5)
    vol.close()
    again = Volume.open(replica, "r1")
    assert again.upstream_seq == 5, "a clean reopen keeps the applied upstream seq"
    again.close()


@pytest.mark.parametrize(("first", "last"), [(2, 3), (1, 0)])
def test_batch_out_of_sequence_is_refused(replica: Path, first: int, last: int) -> None:
    vol = Volume.open(replica, "r1")
    with pytest.raises(InvalidArgument) as ei:
        vol.apply_batch(first, last, [])
    assert str(ei.value) == (f"volume r1: batch {first}..{last} does not follow applied seq 0")
    vol.close()


def test_a_primary_refuses_batches(tmp_path: Path) -> None:
    create_volume(tmp_path, "p1", SIZE)
    vol = Volume.open(tmp_path, "p1")
    with pytest.raises(InvalidArgument, match=r"^volume p1 is not a replica$"):
        vol.apply_batch(1, 1, [])
    vol.close()


def test_torn_batch_before_its_commit_is_cut_and_never_applied(replica: Path) -> None:
    vol = Volume.open(replica, "r1")
    first = os.urandom(4096)
    vol.apply_batch(1, 1, [(Op.WRITE, 0, 0, 4096, first)])
    assert vol.journal is not None
    # Crash while appending the next batch: two records journaled, no commit MARK.
    vol.journal.append(Op.WRITE, 0, 0, 4096, b"\xaa" * 4096)
    vol.journal.append(Op.WRITE, 0, 8192, 4096, b"\xbb" * 4096)
    crash(vol)
    again = Volume.open(replica, "r1")
    assert again.recovery.unclean
    assert again.upstream_seq == 1
    assert read(again, 0, 4096) == first, "the uncommitted batch did not reach the store"
    assert read(again, 8192, 4096) == bytes(4096)
    assert again.journal is not None
    ops = [h.op for h, _ in again.journal.records(1)]
    assert ops == [Op.WRITE, Op.MARK, Op.MARK], "cut after the commit; then recovery's MARK"
    # The stream resumes at 2 and is applied normally.
    nxt = os.urandom(4096)
    again.apply_batch(2, 3, [(Op.WRITE, 0, 0, 4096, nxt)])
    assert read(again, 0, 4096) == nxt
    again.close()


def test_committed_batch_interrupted_before_the_store_is_redone(replica: Path) -> None:
    vol = Volume.open(replica, "r1")
    data = os.urandom(4096)
    assert vol.journal is not None and vol.store is not None
    # Everything of apply_batch up to the commit, but the store write never happens.
    vol.journal.append(Op.WRITE, 0, 12288, 4096, data)
    vol.mark({"event": COMMIT_EVENT, "first_seq": 1, "last_seq": 1})
    vol.journal.sync()
    crash(vol)
    again = Volume.open(replica, "r1")
    assert again.upstream_seq == 1
    assert read(again, 12288, 4096) == data
    again.close()


def test_commit_spanning_a_segment_rotation(replica: Path) -> None:
    vol = Volume.open(replica, "r1", segment_bytes=64 * 1024)
    payloads = [os.urandom(4096) for _ in range(40)]
    vol.apply_batch(1, 40, [(Op.WRITE, 0, i * 4096, 4096, p) for i, p in enumerate(payloads)])
    assert vol.journal is not None
    for i in range(40):  # a second batch torn across segments
        vol.journal.append(Op.WRITE, 0, i * 4096, 4096, b"\x11" * 4096)
    segs_before = len(vol.journal.segments)
    crash(vol)
    again = Volume.open(replica, "r1", segment_bytes=64 * 1024)
    assert again.journal is not None
    assert len(again.journal.segments) < segs_before, "segments of the torn batch removed"
    assert [read(again, i * 4096, 4096) for i in range(40)] == payloads
    assert again.upstream_seq == 40
    state = json.loads((replica / "volumes/r1/state.json").read_text())
    assert state["checkpoint_seq"] == 42, "redo point: the commit (41) and recovery's MARK"
    again.close()


def test_resync_writes_extents_then_stands_at_the_given_seq(replica: Path) -> None:
    vol = Volume.open(replica, "r1")
    vol.apply_batch(1, 1, [(Op.WRITE, 0, 0, 4096, b"\x01" * 4096)])
    vol.set_consistent(True)
    data = os.urandom(8192)
    with pytest.raises(InvalidArgument, match=r"^volume r1: extent data outside a resync$"):
        vol.write_extent(0, 8192, data)
    vol.begin_resync()
    assert vol.inconsistent
    vol.write_extent(1 << 20, 8192, data)
    vol.write_extent(0, 4096, b"")  # a hole on the primary: zeros here
    with pytest.raises(InvalidArgument, match=r"^extent at 0: 3 bytes for 4096$"):
        vol.write_extent(0, 4096, b"abc")
    vol.end_resync(41)
    assert vol.upstream_seq == 41
    assert read(vol, 0, 4096) == bytes(4096)
    assert read(vol, 1 << 20, 8192) == data
    vol.apply_batch(42, 42, [(Op.WRITE, 0, 4096, 4096, b"\x02" * 4096)])
    vol.set_consistent(True)
    vol.close()
    state = json.loads((replica / "volumes/r1/state.json").read_text())
    assert (state["upstream_seq"], state["inconsistent"]) == (42, False)


def test_committed_batch_whose_store_write_fails_keeps_the_volume_unclean(
        replica: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = Volume.open(replica, "r1")
    data = os.urandom(4096)
    assert vol.store is not None

    def eio(*_args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(vol.store, "apply", eio)
    with pytest.raises(OSError, match="Input/output error"):
        vol.apply_batch(1, 1, [(Op.WRITE, 0, 0, 4096, data)])
    monkeypatch.undo()
    vol.close()
    state = json.loads((replica / "volumes/r1/state.json").read_text())
    assert state["clean"] is False, "only redo can finish a committed batch"
    again = Volume.open(replica, "r1")
    assert again.recovery.unclean
    assert again.upstream_seq == 1
    assert read(again, 0, 4096) == data, "redo applied the committed batch"
    again.close()


def test_apply_batches_commits_each_batch_with_one_fdatasync(replica: Path) -> None:
    """Group commit: batches that queued up are journaled each with its own commit MARK
    and made durable by one fdatasync; the store gets all of them."""
    vol = Volume.open(replica, "r1")
    assert vol.journal is not None
    syncs: list[int] = []
    real_sync = vol.journal.sync
    vol.journal.sync = lambda: (syncs.append(1), real_sync())[1]  # type: ignore[method-assign]
    data = [os.urandom(4096) for _ in range(3)]
    assert vol.apply_batches([(1, 1, [(Op.WRITE, 0, 0, 4096, data[0])], {"gen": 7}),
                              (2, 3, [(Op.WRITE, 0, 4096, 4096, data[1]),
                                      (Op.WRITE, 0, 8192, 4096, data[2])], None)]) == 3
    assert syncs == [1]
    assert vol.upstream_seq == 3
    assert [read(vol, i * 4096, 4096) for i in range(3)] == data
    marks = [msgpack.unpackb(p) for h, p in vol.journal.records(1) if h.op == Op.MARK]
    assert [(m["first_seq"], m["last_seq"], m.get("gen")) for m in marks] == [
        (1, 1, 7), (2, 3, None)]
    # A gap inside a group refuses the whole group before anything is journaled.
    last = vol.journal.last_seq
    with pytest.raises(InvalidArgument) as ei:
        vol.apply_batches([(4, 4, [(Op.WRITE, 0, 0, 4096, data[0])], None),
                           (6, 6, [], None)])
    assert str(ei.value) == "volume r1: batch 6..6 does not follow applied seq 4"
    assert vol.journal.last_seq == last and vol.upstream_seq == 3
    vol.close()
