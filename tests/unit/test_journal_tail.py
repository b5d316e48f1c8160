"""JournalTail: following a journal another process appends to (the replication view)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from blockstore.errors import JournalCorrupt, JournalGap
from blockstore.journal import Journal, JournalTail, segment_name
from blockstore.record import REC_HEADER_SIZE, SEG_HEADER_SIZE, Op

JID = uuid.UUID(int=7).bytes


def make(tmp_path: Path, segment_bytes: int = 1 << 20) -> Journal:
    d = tmp_path / "journal"
    Journal.create(d, JID)
    j = Journal(d, JID, segment_bytes=segment_bytes)
    j.open()
    return j


def payload(i: int, n: int = 1000) -> bytes:
    return bytes([i % 251]) * n


def seqs(recs: list) -> list[int]:
    return [h.seq for h, _ in recs]


def test_follows_appends(tmp_path: Path) -> None:
    j = make(tmp_path)
    t = JournalTail(j.dir, JID)
    assert t.read(1) == []
    for i in range(5):
        j.append(Op.WRITE, 0, i * 4096, 1000, payload(i))
    got = t.read(1)
    assert seqs(got) == [1, 2, 3, 4, 5]
    assert [p for _, p in got] == [payload(i) for i in range(5)]
    assert t.read(6) == []
    j.append(Op.TRIM, 0, 0, 4096)
    got = t.read(6)
    assert [(h.seq, h.op) for h, _ in got] == [(6, Op.TRIM)]
    assert seqs(t.read(3)) == [3, 4, 5, 6], "a re-read from an earlier seq seeks back"
    t.close()
    j.close()


def test_across_segment_rotation(tmp_path: Path) -> None:
    j = make(tmp_path, segment_bytes=8192)
    t = JournalTail(j.dir, JID)
    seen: list[int] = []
    for i in range(40):
        j.append(Op.WRITE, 0, 0, 1000, payload(i))
        if i % 7 == 0:
            seen += seqs(t.read(len(seen) + 1))
    seen += seqs(t.read(len(seen) + 1))
    assert len(j.segments) > 3
    assert seen == list(range(1, 41))
    assert seqs(t.read(17)) == list(range(17, 41)), "seek into a middle segment"
    t.close()
    j.close()


def test_max_bytes_bounds_one_read(tmp_path: Path) -> None:
    j = make(tmp_path)
    for i in range(10):
        j.append(Op.WRITE, 0, 0, 1000, payload(i))
    t = JournalTail(j.dir, JID)
    first = t.read(1, max_bytes=3 * (REC_HEADER_SIZE + 1000))
    assert seqs(first) == [1, 2, 3]
    assert seqs(t.read(4, max_bytes=1)) == [4], "at least one record per read"
    t.close()
    j.close()


def test_incomplete_tail_is_not_yet_written(tmp_path: Path) -> None:
    j = make(tmp_path)
    j.append(Op.WRITE, 0, 0, 1000, payload(1))
    path = j.dir / segment_name(1)
    full = path.read_bytes()
    j.append(Op.WRITE, 0, 0, 1000, payload(2))
    rec2 = path.read_bytes()[len(full):]
    j.close()
    with open(path, "r+b") as f:  # an append caught half way
        f.truncate(len(full) + 600)
    t = JournalTail(path.parent, JID)
    assert seqs(t.read(1)) == [1]
    assert t.read(2) == []
    assert t.read(2) == [], "still waiting, not corruption"
    with open(path, "r+b") as f:
        f.seek(len(full))
        f.write(rec2)
    got = t.read(2)
    assert seqs(got) == [2]
    assert got[0][1] == payload(2)
    t.close()


def test_released_records_raise_gap(tmp_path: Path) -> None:
    j = make(tmp_path, segment_bytes=8192)
    for i in range(30):
        j.append(Op.WRITE, 0, 0, 1000, payload(i))
    second = j.segments[1].first_seq
    j.release_through(second - 1)
    t = JournalTail(j.dir, JID)
    with pytest.raises(JournalGap) as ei:
        t.read(1)
    assert str(ei.value) == (f"journal records from seq 1 were released "
                             f"(oldest retained is seq {second})")
    assert seqs(t.read(second))[0] == second
    t.close()
    j.close()


def test_bad_record_in_sealed_segment_is_corruption(tmp_path: Path) -> None:
    j = make(tmp_path, segment_bytes=8192)
    for i in range(20):
        j.append(Op.WRITE, 0, 0, 1000, payload(i))
    j.close()
    first = j.dir / segment_name(1)
    off = SEG_HEADER_SIZE + (REC_HEADER_SIZE + 1000) + REC_HEADER_SIZE + 10  # record 2 data
    with open(first, "r+b") as f:
        f.seek(off)
        f.write(b"\xff")
    t = JournalTail(j.dir, JID)
    with pytest.raises(JournalCorrupt) as ei:
        t.read(1)
    assert ei.value.segment == segment_name(1)
    assert ei.value.offset == SEG_HEADER_SIZE + REC_HEADER_SIZE + 1000
    assert ei.value.reason == "record data checksum mismatch"
    t.close()


def test_bad_record_that_stays_bad_with_valid_ones_after_is_corruption(tmp_path: Path) -> None:
    j = make(tmp_path)
    for i in range(5):
        j.append(Op.WRITE, 0, 0, 1000, payload(i))
    j.close()
    path = j.dir / segment_name(1)
    off = SEG_HEADER_SIZE + 2 * (REC_HEADER_SIZE + 1000)  # record 3's header
    with open(path, "r+b") as f:
        f.seek(off + 12)
        f.write(b"\x00\x01")
    t = JournalTail(j.dir, JID)
    t.STUCK_SECONDS = 0.0
    # The first sight of a bad tail record may be an append in progress: no error yet.
    assert seqs(t.read(1)) == [1, 2]
    with pytest.raises(JournalCorrupt) as ei:
        t.read(3)
    assert (ei.value.segment, ei.value.offset) == (segment_name(1), off)
    t.close()


def test_reads_while_another_process_writes(tmp_path: Path) -> None:
    """A real second process appends while this one follows: nothing lost, no dup."""
    j = make(tmp_path, segment_bytes=64 * 1024)
    j.close()
    pid = os.fork()
    if pid == 0:  # the writer
        try:
            w = Journal(tmp_path / "journal", JID, segment_bytes=64 * 1024)
            w.open()
            for i in range(2000):
                w.append(Op.WRITE, 0, i, 700, payload(i, 700))
            w.close()
        finally:
            os._exit(0)
    t = JournalTail(tmp_path / "journal", JID)
    got: list[int] = []
    for _ in range(200000):
        recs = t.read(len(got) + 1)
        for h, p in recs:
            assert p == payload(h.seq - 1, 700)
        got += seqs(recs)
        if len(got) == 2000:
            break
    os.waitpid(pid, 0)
    got += seqs(t.read(len(got) + 1)) if len(got) < 2000 else []
    assert got == list(range(1, 2001))
    t.close()


def test_read_through_a_known_record_does_not_probe_the_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync waiter's step reads through the record it waits for and stops there: no
    record past it, and no look for newer segments (the listing that made a third of a
    small step's cost), also across a rotation."""
    j = make(tmp_path, segment_bytes=8192)
    t = JournalTail(j.dir, JID)
    for i in range(3):
        j.append(Op.WRITE, 0, 0, 1000, payload(i))
    assert seqs(t.read(1, through=2)) == [1, 2]
    listed: list[int] = []
    real = t._segments
    monkeypatch.setattr(t, "_segments", lambda: listed.append(1) or real())
    assert seqs(t.read(3, through=3)) == [3]
    assert listed == [], "read through a written record listed the segments"
    assert t.read(4, through=3) == []
    assert listed == []
    for i in range(3, 20):  # rotates: the records waited for are in a later segment
        j.append(Op.WRITE, 0, 0, 1000, payload(i))
    assert seqs(t.read(4, through=20)) == list(range(4, 21))
    assert seqs(t.read(21)) == [], "without through the end is probed as before"
    t.close()
    j.close()
