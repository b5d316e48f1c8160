"""The write journal on real files: rotation, reading back, torn tails, corruption, release.

Segments are kept tiny (4096 bytes) so that a handful of 1000-byte records rotate:
a segment holds its 48-byte header plus three 1044-byte records.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from blockstore import journal as journal_mod
from blockstore.errors import FormatError, JournalCorrupt
from blockstore.journal import Journal, ScanResult, segment_name
from blockstore.record import REC_HEADER_SIZE, SEG_HEADER_SIZE, Op, encode_header

JID = bytes(range(16))
SEG = 4096
PLEN = 1000
REC = REC_HEADER_SIZE + PLEN  # 1044: three per 4096-byte segment
PER_SEG = 3


def payload(seq: int) -> bytes:
    """Distinct, recognisable data for record ``seq``."""
    return bytes([seq % 251]) * PLEN


def open_journal(d: Path, on_rotate: Callable[[], None] | None = None) -> Journal:
    j = Journal(d, JID, volume=7, segment_bytes=SEG, on_rotate=on_rotate)
    j.open()
    return j


@pytest.fixture
def jdir(tmp_path: Path) -> Path:
    d = tmp_path / "journal"
    Journal.create(d, JID)
    return d


def fill(j: Journal, n: int) -> list[int]:
    """Append ``n`` WRITE records; return their seqs."""
    return [j.append(Op.WRITE, 0, 4096 * j.next_seq, PLEN, payload(j.next_seq))
            for _ in range(n)]


def seg_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".jnl"))


def corrupt(path: Path, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


def corrupt_message(seg: str, off: int, reason: str) -> str:
    return (f"journal corrupt in segment {seg} at offset {off}: {reason}; refusing to serve "
            "this volume (inspect it, then run 'nbdgw volume repair' to cut the journal there)")


# -- create, append, read back -------------------------------------------------------

def test_create_makes_one_empty_segment(jdir: Path) -> None:
    assert seg_files(jdir) == [segment_name(1)] == ["seg-0000000000000001.jnl"]
    assert (jdir / segment_name(1)).stat().st_size == SEG_HEADER_SIZE
    j = Journal(jdir, JID)
    assert j.open() == ScanResult(first_seq=1, last_seq=0, torn_bytes=0)
    assert (j.next_seq, j.last_seq, j.pos) == (1, 0, SEG_HEADER_SIZE)
    assert list(j.records(1)) == []
    j.close()


def test_create_refuses_existing_directory(jdir: Path) -> None:
    with pytest.raises(FileExistsError):
        Journal.create(jdir, JID)


def test_append_records_round_trip_across_rotation(jdir: Path) -> None:
    rotations: list[int] = []
    j = Journal(jdir, JID, volume=7, segment_bytes=SEG)
    j.on_rotate = lambda: rotations.append(j.last_seq)
    j.open()
    seqs = fill(j, 10)
    assert seqs == list(range(1, 11))
    # 3 records per segment: rotations before records 4, 7 and 10.
    assert rotations == [3, 6, 9]
    assert seg_files(jdir) == [segment_name(s) for s in (1, 4, 7, 10)]
    for s in (1, 4, 7):
        assert (jdir / segment_name(s)).stat().st_size == SEG_HEADER_SIZE + PER_SEG * REC
    assert j.pos == SEG_HEADER_SIZE + REC
    got = list(j.records(1))
    assert [h.seq for h, _ in got] == seqs
    for h, data in got:
        assert (h.op, h.volume, h.offset, h.length) == (Op.WRITE, 7, 4096 * h.seq, PLEN)
        assert data == payload(h.seq)
    assert j.retained_bytes() == 3 * (SEG_HEADER_SIZE + PER_SEG * REC) + SEG_HEADER_SIZE + REC
    j.close()

    # Reopening finds the same journal and continues the sequence.
    j2 = open_journal(jdir)
    assert (j2.segments[0].first_seq, j2.last_seq, j2.pos) == (1, 10, SEG_HEADER_SIZE + REC)
    assert j2.append(Op.TRIM, 0, 0, 4096) == 11
    assert [h.seq for h, _ in j2.records(1)] == list(range(1, 12))
    j2.close()


def test_on_rotate_runs_before_the_new_segment_exists(jdir: Path) -> None:
    """The volume checkpoints in on_rotate: it must see the old segment still active."""
    seen: list[list[str]] = []
    j = open_journal(jdir, on_rotate=lambda: seen.append(seg_files(jdir)))
    fill(j, 4)
    assert seen == [[segment_name(1)]]
    j.close()


def test_record_larger_than_segment_gets_its_own_segment(jdir: Path) -> None:
    j = open_journal(jdir)
    big = b"B" * (2 * SEG)
    assert j.append(Op.WRITE, 0, 0, len(big), big) == 1  # first record: no rotation
    assert j.append(Op.WRITE, 0, 0, len(big), big) == 2  # rotates first
    assert seg_files(jdir) == [segment_name(1), segment_name(2)]
    assert [d for _, d in j.records(1)] == [big, big]
    j.close()


@pytest.mark.parametrize("from_seq", [1, 2, 3, 4, 5, 8, 10, 11, 12])
def test_records_from_seq_starts_at_that_record(jdir: Path, from_seq: int) -> None:
    j = open_journal(jdir)
    fill(j, 11)
    got = [(h.seq, d) for h, d in j.records(from_seq)]
    assert got == [(s, payload(s)) for s in range(from_seq, 12)]
    j.close()


def test_records_works_on_an_unopened_journal(jdir: Path) -> None:
    j = open_journal(jdir)
    fill(j, 5)
    j.close()
    reader = Journal(jdir, JID)
    assert [h.seq for h, _ in reader.records(2)] == [2, 3, 4, 5]


def test_mark_and_range_records_read_back(jdir: Path) -> None:
    j = open_journal(jdir)
    j.append(Op.ZERO, 2, 4096, 8192)
    j.append(Op.MARK, 0, 0, 0, b"\x81\xa1a\x01")
    got = list(j.records(1))
    assert [(h.op, h.flags, h.offset, h.length, d) for h, d in got] == [
        (Op.ZERO, 2, 4096, 8192, b""), (Op.MARK, 0, 0, 0, b"\x81\xa1a\x01")]
    j.close()


# -- torn tails ----------------------------------------------------------------------

@pytest.mark.parametrize("cut", [1, REC_HEADER_SIZE - 1, REC_HEADER_SIZE, REC_HEADER_SIZE + 1,
                                 REC - 1])
def test_torn_tail_mid_record_is_cut(jdir: Path, cut: int) -> None:
    j = open_journal(jdir)
    fill(j, 5)  # seg 4 holds records 4 and 5
    j.close()
    active = jdir / segment_name(4)
    good_end = SEG_HEADER_SIZE + REC  # end of record 4
    os.truncate(active, good_end + cut)
    j2 = Journal(jdir, JID, segment_bytes=SEG)
    assert j2.open() == ScanResult(first_seq=1, last_seq=4, torn_bytes=cut)
    assert active.stat().st_size == good_end
    assert j2.pos == good_end
    assert j2.append(Op.WRITE, 0, 0, PLEN, b"n" * PLEN) == 5
    assert [(h.seq, d[:1]) for h, d in j2.records(4)] == [(4, payload(4)[:1]), (5, b"n")]
    j2.close()


@pytest.mark.parametrize("garbage", [b"\x00" * 100, b"\xff" * 7, bytes(range(256)) * 3,
                                     b"NJR1" + b"\x00" * 60])
def test_garbage_after_last_record_is_cut(jdir: Path, garbage: bytes) -> None:
    j = open_journal(jdir)
    fill(j, 2)
    j.close()
    active = jdir / segment_name(1)
    size = active.stat().st_size
    with open(active, "ab") as f:
        f.write(garbage)
    j2 = open_journal(jdir)
    assert (j2.last_seq, j2.pos) == (2, size)
    assert active.stat().st_size == size
    j2.close()


def test_damaged_last_record_is_a_torn_tail(jdir: Path) -> None:
    """A bad record with nothing valid after it cannot be told from a torn append."""
    j = open_journal(jdir)
    fill(j, 2)
    j.close()
    active = jdir / segment_name(1)
    corrupt(active, SEG_HEADER_SIZE + REC + REC_HEADER_SIZE + 10)  # payload of record 2
    j2 = Journal(jdir, JID)
    assert j2.open() == ScanResult(1, 1, REC)
    j2.close()


def test_torn_segment_header_of_active_segment_is_corruption(jdir: Path) -> None:
    j = open_journal(jdir)
    fill(j, 4)
    j.close()
    os.truncate(jdir / segment_name(4), 20)
    with pytest.raises(JournalCorrupt) as ei:
        Journal(jdir, JID).open()
    assert (ei.value.segment, ei.value.offset) == (segment_name(4), 0)
    assert ei.value.reason == "short segment header (20 of 48 bytes)"


# -- corruption ----------------------------------------------------------------------

@pytest.mark.parametrize(("rec", "delta", "reason"), [
    (1, 0, "bad record magic 0x31524ab1"),  # "N" ^ 0xff
    (1, 20, "record header checksum mismatch"),
    (1, REC_HEADER_SIZE + 500, "record data checksum mismatch"),
    (0, REC_HEADER_SIZE, "record data checksum mismatch"),
])
def test_corruption_in_the_middle_raises_with_segment_and_offset(
        jdir: Path, rec: int, delta: int, reason: str) -> None:
    j = open_journal(jdir)
    fill(j, 3)  # all in segment 1
    j.close()
    off = SEG_HEADER_SIZE + rec * REC
    corrupt(jdir / segment_name(1), off + delta)
    with pytest.raises(JournalCorrupt) as ei:
        Journal(jdir, JID).open()
    e = ei.value
    assert (e.segment, e.offset, e.reason) == (segment_name(1), off, reason)
    assert str(e) == corrupt_message(segment_name(1), off, reason)
    assert isinstance(e, FormatError)


def test_out_of_sequence_record_in_active_segment(jdir: Path) -> None:
    """A record whose seq is not the next one is corruption, not a replayable record."""
    j = open_journal(jdir)
    fill(j, 3)
    j.close()
    seg = jdir / segment_name(1)
    data = seg.read_bytes()
    r1 = data[SEG_HEADER_SIZE:SEG_HEADER_SIZE + REC]
    # Record 1 copied over record 2: a valid header with the wrong seq, then record 3.
    seg.write_bytes(data[:SEG_HEADER_SIZE + REC] + r1 + data[SEG_HEADER_SIZE + 2 * REC:])
    with pytest.raises(JournalCorrupt) as ei:
        Journal(jdir, JID).open()
    assert (ei.value.offset, ei.value.reason) == (
        SEG_HEADER_SIZE + REC, "record seq 1 where 2 was expected")


def test_corruption_in_sealed_segment_detected_by_records(jdir: Path) -> None:
    j = open_journal(jdir)
    fill(j, 7)  # segments 1, 4, 7
    j.close()
    off = SEG_HEADER_SIZE + 1 * REC  # record 5, in sealed segment 4
    corrupt(jdir / segment_name(4), off + REC_HEADER_SIZE + 1)
    j2 = open_journal(jdir)  # open checks only sealed segments' headers
    assert j2.last_seq == 7
    seen: list[int] = []

    def read_all() -> None:
        for h, _ in j2.records(1):
            seen.append(h.seq)

    with pytest.raises(JournalCorrupt) as ei:
        read_all()
    assert seen == [1, 2, 3, 4]
    assert (ei.value.segment, ei.value.offset, ei.value.reason) == (
        segment_name(4), off, "record data checksum mismatch")
    # Reading from after the bad segment does not touch it.
    assert [h.seq for h, _ in j2.records(7)] == [7]
    j2.close()


def test_bad_header_of_sealed_segment_refused_on_open(jdir: Path) -> None:
    j = open_journal(jdir)
    fill(j, 4)
    j.close()
    corrupt(jdir / segment_name(1), 0)
    with pytest.raises(JournalCorrupt) as ei:
        Journal(jdir, JID).open()
    assert (ei.value.segment, ei.value.offset) == (segment_name(1), 0)
    assert ei.value.reason.startswith("bad segment magic b")


def test_segment_of_another_journal_refused(jdir: Path) -> None:
    j = open_journal(jdir)
    fill(j, 1)
    j.close()
    with pytest.raises(JournalCorrupt) as ei:
        Journal(jdir, bytes(16)).open()
    assert ei.value.reason == "segment belongs to another journal"


def test_segment_renamed_disagrees_with_header(jdir: Path) -> None:
    j = open_journal(jdir)
    fill(j, 4)
    j.close()
    os.rename(jdir / segment_name(4), jdir / segment_name(5))
    with pytest.raises(JournalCorrupt) as ei:
        Journal(jdir, JID).open()
    assert (ei.value.segment, ei.value.reason) == (
        segment_name(5), "segment header and file name disagree")


def test_no_segment_files(tmp_path: Path) -> None:
    (tmp_path / "j").mkdir()
    with pytest.raises(FormatError) as ei:
        Journal(tmp_path / "j", JID).open()
    assert str(ei.value) == f"journal {tmp_path / 'j'}: no segment files"


def test_sequence_gap_missing_segment(jdir: Path) -> None:
    j = open_journal(jdir)
    fill(j, 8)  # segments 1, 4, 7
    j.close()
    os.unlink(jdir / segment_name(4))
    j2 = open_journal(jdir)
    with pytest.raises(JournalCorrupt) as ei:
        list(j2.records(1))
    assert (ei.value.segment, ei.value.offset, ei.value.reason) == (
        segment_name(1), SEG_HEADER_SIZE + 3 * REC, "segment ends at seq 3, next begins at 7")
    j2.close()


def test_sequence_gap_short_sealed_segment(jdir: Path) -> None:
    j = open_journal(jdir)
    fill(j, 5)
    j.close()
    os.truncate(jdir / segment_name(1), SEG_HEADER_SIZE + 2 * REC)  # record 3 lost
    j2 = open_journal(jdir)
    with pytest.raises(JournalCorrupt) as ei:
        list(j2.records(1))
    assert (ei.value.segment, ei.value.offset, ei.value.reason) == (
        segment_name(1), SEG_HEADER_SIZE + 2 * REC, "segment ends at seq 2, next begins at 4")
    j2.close()


# -- release and trim ----------------------------------------------------------------

def test_release_through_deletes_only_fully_released_sealed_segments(jdir: Path) -> None:
    j = open_journal(jdir)
    fill(j, 10)  # segments 1(1-3) 4(4-6) 7(7-9) 10(10)
    sealed = SEG_HEADER_SIZE + PER_SEG * REC
    assert j.release_through(2) == 0
    assert j.release_through(5) == sealed  # seg 1 only: seg 4 still holds 6
    assert seg_files(jdir) == [segment_name(s) for s in (4, 7, 10)]
    assert j.release_through(9) == 2 * sealed
    assert seg_files(jdir) == [segment_name(10)]
    # The active segment is never deleted, whatever is asked.
    assert j.release_through(10**9) == 0
    assert seg_files(jdir) == [segment_name(10)]
    assert [h.seq for h, _ in j.records(1)] == [10]
    assert j.append(Op.TRIM, 0, 0, 4096) == 11
    j.close()
    j2 = open_journal(jdir)
    assert (j2.segments[0].first_seq, j2.last_seq) == (10, 11)
    j2.close()


def test_failed_append_keeps_nothing(jdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = open_journal(jdir)
    fill(j, 1)
    pos = j.pos

    def enospc(fd: int, bufs: list[bytes], off: int) -> int:
        os.pwrite(fd, b"partial garbage", off)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_mod.os, "pwritev", enospc)
    with pytest.raises(OSError, match=r"No space left on device$") as ei:
        j.append(Op.WRITE, 0, 0, PLEN, b"z" * PLEN)
    assert ei.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert (j.pos, j.next_seq) == (pos, 2)
    assert (jdir / segment_name(1)).stat().st_size == pos
    assert j.append(Op.TRIM, 0, 0, 4096) == 2
    j.close()


def test_short_append_is_an_error_and_cut(jdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = open_journal(jdir)
    pos = j.pos
    real = os.pwritev

    def half(fd: int, bufs: list[bytes], off: int) -> int:
        return real(fd, [bufs[0]], off)  # only the first 8 bytes land

    monkeypatch.setattr(journal_mod.os, "pwritev", half)
    with pytest.raises(OSError, match=r"short journal append") as ei:
        j.append(Op.WRITE, 0, 0, PLEN, b"z" * PLEN)
    assert ei.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert (j.pos, j.next_seq) == (pos, 1)
    assert (jdir / segment_name(1)).stat().st_size == pos
    j.close()


def test_torn_write_whose_data_contains_a_journal_record_is_still_a_torn_tail(
        jdir: Path) -> None:
    """Volume data may itself contain journal bytes (a backup of a segment, a nested
    nbdgw, a VM image): a record torn mid-payload must be cut, not called corruption
    because a valid-looking record header sits inside its own (partial) payload."""
    j = open_journal(jdir)
    fill(j, 1)
    start = j.pos
    inner = encode_header(1000, Op.TRIM, 0, 0, 0, 4096, 0, 0)  # a well-formed record
    data = b"d" * 100 + inner + b"e" * (PLEN - 100 - len(inner))
    j.append(Op.WRITE, 0, 0, PLEN, data)
    j.close()
    # Power loss part way through record 2's payload, after the embedded header.
    os.truncate(jdir / segment_name(1), start + REC_HEADER_SIZE + 100 + len(inner) + 10)
    j2 = Journal(jdir, JID)
    assert j2.open() == ScanResult(1, 1, REC_HEADER_SIZE + 100 + len(inner) + 10)
    j2.close()


def test_retained_bytes_while_a_segment_is_released_elsewhere(jdir: Path) -> None:
    """The checkpoint thread may release (unlink or recycle) a sealed segment while the
    request path sums the journal: the vanished segment counts as nothing, no error."""
    j = open_journal(jdir)
    fill(j, 12)
    assert len(j.segments) > 2
    before = j.retained_bytes()
    gone = j.segments[0].path
    size = gone.stat().st_size
    gone.unlink()  # as release would, without the list knowing yet
    assert j.retained_bytes() == before - size
    j.close()
