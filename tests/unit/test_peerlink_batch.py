"""Batch building: coalescing never changes what a batch leaves on the volume, batches are
contiguous prefixes of the write sequence, MARKs are barriers, and the bounds hold.

The model is a bytearray volume: applying each journal record in order must give the same
bytes as applying the built batches, and after every batch (and at every MARK inside one)
the image must equal the records applied up to that seq (DESIGN.md §3: a prefix).
"""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from blockstore.journal import Journal
from blockstore.record import Flag, Op, RecordHeader
from peerlink.batch import (
    BATCH_OVERHEAD,
    RECORD_OVERHEAD,
    BatchBuilder,
    check_batch,
    payload_bytes,
)
from peerlink.errors import PeerlinkError, PeerProtocolError, SequenceGap
from peerlink.messages import Batch, Record, decode

VOL = 512

Rec = tuple[RecordHeader, bytes]


def apply_batch_to(buf: bytearray, batch: Batch) -> None:
    """Apply a batch to an in-memory volume image (the model tests compare against)."""
    for r in batch.records:
        if r.offset + r.length > len(buf):
            raise ValueError(f"{r.op.name} at {r.offset}+{r.length} passes the end ({len(buf)})")
        if r.op is Op.WRITE:
            buf[r.offset:r.offset + r.length] = r.data
        elif r.op in (Op.TRIM, Op.ZERO):
            buf[r.offset:r.offset + r.length] = bytes(r.length)



def rec(seq: int, op: Op, offset: int = 0, length: int = 0, data: bytes = b"",
        flags: int = 0) -> Rec:
    """A journal record as Journal.records() yields it."""
    return RecordHeader(seq, op, Flag(flags), 0, offset, length, len(data), crc32c(data)), data


def apply_record(buf: bytearray, hdr: RecordHeader, payload: bytes) -> None:
    if hdr.op is Op.WRITE:
        buf[hdr.offset:hdr.offset + hdr.length] = payload
    elif hdr.op in (Op.TRIM, Op.ZERO):
        buf[hdr.offset:hdr.offset + hdr.length] = bytes(hdr.length)


def W(seq: int, offset: int, data: bytes) -> Rec:
    return rec(seq, Op.WRITE, offset, len(data), data)


@st.composite
def journals(draw: st.DrawFn) -> list[Rec]:
    """Random writes, trims, zeros and marks on a VOL-byte volume, seqs from 1."""
    out: list[Rec] = []
    for seq in range(1, draw(st.integers(1, 40)) + 1):
        kind = draw(st.sampled_from("WWWWTZM"))
        offset = draw(st.integers(0, VOL - 1))
        length = draw(st.integers(0, min(96, VOL - offset)))
        if kind == "W":
            # Distinct bytes per record, so a wrongly kept stale piece shows.
            data = bytes((seq * 7 + i) % 251 + 1 for i in range(length))
            out.append(W(seq, offset, data))
        elif kind == "M":
            out.append(rec(seq, Op.MARK, data=struct.pack("<Q", seq)))
        else:
            out.append(rec(seq, Op.TRIM if kind == "T" else Op.ZERO, offset, length,
                           flags=draw(st.sampled_from([0, int(Flag.MAY_TRIM)]))))
    return out


def replay(records: list[Rec], through: int) -> bytearray:
    buf = bytearray(b"\xee" * VOL)
    for hdr, payload in records:
        if hdr.seq <= through:
            apply_record(buf, hdr, payload)
    return buf


def build_all(records: list[Rec], max_bytes: int, max_records: int) -> list[tuple[Batch, int]]:
    """Feed everything, building whenever the builder is full; return (batch, estimate)."""
    b = BatchBuilder(max_bytes, max_records, volume="v1")
    out = []
    for hdr, payload in records:
        if not b.add(hdr, payload):
            out.append((b.size, b.build()))
            assert b.add(hdr, payload), "an empty builder takes any record"
    out.append((b.size, b.build()))
    return [(batch, size) for size, batch in out]


def check_marks_are_barriers(batch: Batch, records: list[Rec]) -> None:
    """At each MARK inside the batch, the image equals the journal through that MARK."""
    buf = replay(records, batch.first_seq - 1)
    for r in batch.records:
        if r.op is Op.MARK:
            (seq,) = struct.unpack("<Q", r.data)
            assert buf == replay(records, seq), f"state at MARK {seq}"
        apply_batch_to(buf, Batch(batch.volume, 1, 1, (r,)))


# -- the coalescing property -----------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(records=journals())
def test_one_batch_equals_applying_every_record(records: list[Rec]) -> None:
    (batch, _), = build_all(records, 1 << 30, 1 << 30)
    assert (batch.first_seq, batch.last_seq) == (1, len(records))
    buf = bytearray(b"\xee" * VOL)
    apply_batch_to(buf, batch)
    assert buf == replay(records, len(records))
    assert payload_bytes(batch.records) <= sum(len(p) for _, p in records)
    check_marks_are_barriers(batch, records)
    assert decode(batch.encode()) == batch


@settings(max_examples=400, deadline=None)
@given(records=journals(), max_bytes=st.integers(1, 700), max_records=st.integers(1, 8))
def test_small_batches_are_contiguous_prefixes_within_bounds(
        records: list[Rec], max_bytes: int, max_records: int) -> None:
    built = build_all(records, max_bytes, max_records)
    buf = bytearray(b"\xee" * VOL)
    expect = 1
    for batch, size in built:
        assert batch.first_seq == expect
        expect = batch.last_seq + 1
        apply_batch_to(buf, batch)
        assert buf == replay(records, batch.last_seq)  # a prefix after every batch
        check_marks_are_barriers(batch, records)
        assert len(batch.encode()) <= size
        assert len(batch.records) <= max_records
        assert size <= max_bytes or len(batch.records) <= 1
    assert expect == len(records) + 1


# -- coalescing, case by case ----------------------------------------------------------------


def one_batch(*records: Rec) -> tuple[Record, ...]:
    b = BatchBuilder(1 << 20, 1000, volume="v1")
    for hdr, payload in records:
        assert b.add(hdr, payload)
    batch = b.build()
    assert (batch.first_seq, batch.last_seq) == (records[0][0].seq, records[-1][0].seq)
    return batch.records


def test_full_overwrite_is_dropped() -> None:
    assert one_batch(W(1, 0, b"AAAA"), W(2, 0, b"BBBB")) == (Record(Op.WRITE, 0, 0, 4, b"BBBB"),)
    assert one_batch(W(1, 0, b"AA"), W(2, 4, b"CC"), rec(3, Op.TRIM, 0, 8)) == (
        Record(Op.TRIM, 0, 0, 8, b""),)


def test_partial_overlaps_keep_head_and_tail() -> None:
    assert one_batch(W(1, 0, b"AAAAAAAA"), W(2, 2, b"BBBB")) == (
        Record(Op.WRITE, 0, 0, 2, b"AA"), Record(Op.WRITE, 0, 6, 2, b"AA"),
        Record(Op.WRITE, 0, 2, 4, b"BBBB"))
    assert one_batch(W(1, 0, b"AAAA"), W(2, 4, b"CCCC"), W(3, 2, b"BBBB")) == (
        Record(Op.WRITE, 0, 0, 2, b"AA"), Record(Op.WRITE, 0, 6, 2, b"CC"),
        Record(Op.WRITE, 0, 2, 4, b"BBBB"))


def test_zero_keeps_its_flags_when_trimmed() -> None:
    may = int(Flag.MAY_TRIM)
    assert one_batch(rec(1, Op.ZERO, 0, 10, flags=may), W(2, 5, b"xy")) == (
        Record(Op.ZERO, may, 0, 5, b""), Record(Op.ZERO, may, 7, 3, b""),
        Record(Op.WRITE, 0, 5, 2, b"xy"))


def test_mark_is_a_barrier() -> None:
    mark = rec(2, Op.MARK, data=b"\x81\xa5event\xa4snap")
    assert one_batch(W(1, 0, b"AAAA"), mark, W(3, 0, b"BBBB")) == (
        Record(Op.WRITE, 0, 0, 4, b"AAAA"), Record(Op.MARK, 0, 0, 0, mark[1]),
        Record(Op.WRITE, 0, 0, 4, b"BBBB"))


def test_zero_length_records_are_covered_but_not_sent() -> None:
    assert one_batch(W(1, 0, b""), rec(2, Op.TRIM, 8, 0), W(3, 0, b"A")) == (
        Record(Op.WRITE, 0, 0, 1, b"A"),)


# -- bounds and sequence ---------------------------------------------------------------------


def test_records_are_counted_after_coalescing() -> None:
    b = BatchBuilder(1 << 20, 2, volume="v1")
    assert b.add(*W(1, 0, b"AAAA"))
    assert b.add(*W(2, 8, b"BBBB"))
    assert len(b) == 2
    before = (b.size, len(b), b.next_seq)
    assert not b.add(*W(3, 16, b"CCCC"))  # a third record: full
    assert (b.size, len(b), b.next_seq) == before  # a refused record changes nothing
    assert not b.add(*W(3, 1, b"C"))  # would split the first record into three
    assert b.add(*W(3, 0, b"CCCC"))  # an overwrite keeps the count: taken
    assert b.build().records == (Record(Op.WRITE, 0, 8, 4, b"BBBB"),
                                 Record(Op.WRITE, 0, 0, 4, b"CCCC"))


def test_bytes_bound_and_estimate() -> None:
    envelope = BATCH_OVERHEAD + len(b"v1")
    b = BatchBuilder(envelope + 2 * (RECORD_OVERHEAD + 100), 100, volume="v1")
    assert b.size == envelope
    assert b.add(*W(1, 0, b"a" * 100))
    assert b.add(*W(2, 100, b"b" * 100))
    assert b.size == b.max_bytes
    assert not b.add(*W(3, 200, b"c"))
    assert b.add(*W(3, 0, b"c" * 100))  # replaces 100 bytes with 100: fits
    size = b.size
    assert len(b.build().encode()) <= size


def test_an_empty_builder_takes_any_record() -> None:
    b = BatchBuilder(10, 1, volume="v1")
    assert b.empty
    assert b.add(*W(1, 0, b"x" * 1000))
    assert not b.add(*W(2, 0, b"y"))
    batch = b.build()
    assert (batch.first_seq, batch.last_seq, len(batch.records)) == (1, 1, 1)
    assert b.empty
    assert b.add(*W(2, 0, b"y"))


def test_build_resets_and_keeps_the_sequence() -> None:
    b = BatchBuilder(1 << 20, 100, volume="v1", next_seq=41)
    with pytest.raises(SequenceGap) as ei:
        b.add(*W(40, 0, b"a"))
    assert str(ei.value) == (
        "record seq 40 where 41 was expected (a batch covers contiguous sequence numbers)")
    assert b.add(*W(41, 0, b"a"))
    assert b.add(*W(42, 0, b"b"))
    first = b.build()
    assert (first.first_seq, first.last_seq) == (41, 42)
    with pytest.raises(SequenceGap, match=r"^record seq 44 where 43 was expected "):
        b.add(*W(44, 0, b"c"))
    assert b.add(*W(43, 0, b"c"))
    assert (b.build().first_seq, b.next_seq) == (43, 44)


def test_local_misuse() -> None:
    assert issubclass(SequenceGap, PeerlinkError)
    assert issubclass(SequenceGap, ValueError)
    assert not issubclass(SequenceGap, PeerProtocolError)
    b = BatchBuilder(100, 10, volume="v1")
    with pytest.raises(ValueError, match=r"^build\(\) of an empty batch$"):
        b.build()
    bad = RecordHeader(1, Op.WRITE, Flag.NONE, 0, 0, 4, 4, 0)
    with pytest.raises(ValueError, match=r"^record seq 1: WRITE of length 4 with 3 payload bytes$"):
        b.add(bad, b"abc")
    with pytest.raises(ValueError, match=r"^max_bytes must be >= 1, got 0$"):
        BatchBuilder(0, 10, volume="v1")
    with pytest.raises(ValueError, match=r"^max_records must be >= 1, got 0$"):
        BatchBuilder(10, 0, volume="v1")
    with pytest.raises(ValueError, match=r"^WRITE at 510\+4 passes the end \(512\)$"):
        apply_batch_to(bytearray(512), Batch("v1", 1, 1, (Record(Op.WRITE, 0, 510, 4, b"abcd"),)))


# -- from a real journal ---------------------------------------------------------------------


def test_batches_from_a_real_journal_across_segments(tmp_path: Path) -> None:
    jid = uuid.uuid4().bytes
    Journal.create(tmp_path / "j", jid)
    j = Journal(tmp_path / "j", jid, segment_bytes=4096)
    j.open()
    try:
        for i in range(200):
            off = (i * 37) % (VOL - 64)
            if i % 17 == 5:
                j.append(Op.ZERO, Flag.MAY_TRIM, off, 40)
            elif i % 50 == 25:
                j.append(Op.MARK, 0, 0, 0, struct.pack("<Q", i + 1))
            else:
                j.append(Op.WRITE, 0, off, 64, bytes([i % 250 + 1]) * 64)
        j.sync()
        assert len(j.segments) > 2
        records = list(j.records(1))
    finally:
        j.close()
    assert [h.seq for h, _ in records] == list(range(1, 201))
    built = build_all(records, 1024, 16)
    assert len(built) >= 3
    buf = bytearray(b"\xee" * VOL)
    for batch, _ in built:
        got = decode(batch.encode())  # through the wire codec
        assert got == batch
        assert isinstance(got, Batch)
        apply_batch_to(buf, got)
        assert buf == replay(records, batch.last_seq)
    assert built[-1][0].last_seq == 200


# -- receiver checks -------------------------------------------------------------------------


def test_check_batch() -> None:
    batch = Batch("v1", 10, 12, (Record(Op.WRITE, 0, 508, 4, b"abcd"),))
    check_batch(batch, volume="v1", volume_size=512, expect_first_seq=10)
    with pytest.raises(PeerProtocolError) as ei:
        check_batch(batch, volume="v2", volume_size=512, expect_first_seq=10)
    assert str(ei.value) == "batch for volume 'v1' on the stream of volume 'v2'"
    with pytest.raises(PeerProtocolError) as ei:
        check_batch(batch, volume="v1", volume_size=512, expect_first_seq=9)
    assert str(ei.value) == "batch starts at seq 10 where 9 was expected (a gap)"
    with pytest.raises(PeerProtocolError) as ei:
        check_batch(batch, volume="v1", volume_size=512, expect_first_seq=11)
    assert str(ei.value) == "batch starts at seq 10 where 11 was expected (a replay)"
    with pytest.raises(PeerProtocolError) as ei:
        check_batch(batch, volume="v1", volume_size=511, expect_first_seq=10)
    assert str(ei.value) == (
        "batch 10-12 record 0: WRITE of 4 bytes at 508 passes the volume end (511)")
