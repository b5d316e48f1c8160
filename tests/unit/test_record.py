"""The journal record and segment-header codec: round trips and every FormatError branch.

The codec is the one piece both the plugin and peerlink trust to tell good bytes from
bad, so each refusal is checked with its exact message.
"""

from __future__ import annotations

import struct

import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from blockstore.errors import FormatError
from blockstore.record import (
    MAX_PAYLOAD,
    REC_HEADER,
    REC_HEADER_SIZE,
    REC_MAGIC,
    SEG_HEADER,
    SEG_HEADER_SIZE,
    SEG_MAGIC,
    SEG_VERSION,
    Flag,
    Op,
    RecordHeader,
    SegmentHeader,
    check_payload,
    decode_header,
    decode_segment_header,
    encode_header,
    encode_record,
    encode_segment_header,
)

U8 = st.integers(0, 0xFF)
U32 = st.integers(0, 0xFFFF_FFFF)
U64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
JID = b"0123456789abcdef"


def joined(bufs: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def seg_header_with(magic: bytes = SEG_MAGIC, version: int = SEG_VERSION,
                    jid: bytes = JID, first_seq: int = 1, created: int = 7) -> bytes:
    """A segment header with a *valid* CRC over arbitrary (possibly wrong) fields."""
    body = SEG_HEADER.pack(magic, version, 0, jid, first_seq, created, 0)[:-4]
    return body + struct.pack("<I", crc32c(body))


# -- sizes and constants -------------------------------------------------------------

def test_fixed_sizes() -> None:
    """The on-disk sizes are part of the format: a change here breaks old journals."""
    assert REC_HEADER_SIZE == 44
    assert SEG_HEADER_SIZE == 48
    assert struct.pack("<I", REC_MAGIC) == b"NJR1"
    assert MAX_PAYLOAD == 64 * 1024 * 1024


# -- record round trips --------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(seq=U64, flags=st.sampled_from([0, 1, 2, 3]), volume=U32, offset=U64,
       payload=st.binary(min_size=1, max_size=4096))
def test_write_record_round_trip(seq: int, flags: int, volume: int, offset: int,
                                 payload: bytes) -> None:
    bufs = encode_record(seq, Op.WRITE, flags, volume, offset, len(payload), payload)
    data = joined(bufs)
    assert len(data) == REC_HEADER_SIZE + len(payload)
    hdr = decode_header(data)
    assert hdr == RecordHeader(seq, Op.WRITE, Flag(flags), volume, offset, len(payload),
                               len(payload), crc32c(payload))
    assert hdr.op is Op.WRITE
    check_payload(hdr, data[REC_HEADER_SIZE:])


@settings(max_examples=200, deadline=None)
@given(seq=U64, op=st.sampled_from([Op.TRIM, Op.ZERO]), flags=U8, volume=U32,
       offset=U64, length=U32)
def test_range_record_round_trip(*, seq: int, op: Op, flags: int, volume: int, offset: int,
                                 length: int) -> None:
    bufs = encode_record(seq, op, flags, volume, offset, length)
    assert len(bufs) == 1, "TRIM/ZERO records are a header only"
    hdr = decode_header(bufs[0])
    assert hdr == RecordHeader(seq, op, Flag(flags), volume, offset, length, 0, crc32c(b""))
    check_payload(hdr, b"")


@settings(max_examples=100, deadline=None)
@given(seq=U64, payload=st.binary(max_size=512))
def test_mark_record_round_trip(seq: int, payload: bytes) -> None:
    data = joined(encode_record(seq, Op.MARK, 0, 0, 0, 0, payload))
    hdr = decode_header(data)
    assert (hdr.seq, hdr.op, hdr.length, hdr.payload_len) == (seq, Op.MARK, 0, len(payload))
    check_payload(hdr, data[REC_HEADER_SIZE:])


def test_decode_accepts_memoryview_and_ignores_trailing_bytes() -> None:
    data = joined(encode_record(5, Op.WRITE, 0, 1, 4096, 3, b"abc")) + b"next record"
    hdr = decode_header(memoryview(data))
    assert hdr.seq == 5
    check_payload(hdr, memoryview(data)[REC_HEADER_SIZE:REC_HEADER_SIZE + 3])


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(min_size=1, max_size=64), bit=st.integers(0, REC_HEADER_SIZE * 8 - 1))
def test_any_single_bit_flip_in_header_is_refused(payload: bytes, bit: int) -> None:
    """CRC32C (and the magic) catch every single-bit error in the 44 header bytes."""
    data = bytearray(joined(encode_record(9, Op.WRITE, 0, 3, 8192, len(payload), payload)))
    data[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FormatError, match=r"^(bad record magic|record header checksum)"):
        decode_header(bytes(data))


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(min_size=1, max_size=256), data=st.data())
def test_any_single_bit_flip_in_payload_is_refused(payload: bytes, data: st.DataObject) -> None:
    rec = joined(encode_record(9, Op.WRITE, 0, 3, 0, len(payload), payload))
    hdr = decode_header(rec)
    bit = data.draw(st.integers(0, len(payload) * 8 - 1))
    bad = bytearray(payload)
    bad[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FormatError, match=r"^record data checksum mismatch$"):
        check_payload(hdr, bytes(bad))


# -- record refusals, exact messages -------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 43])
def test_short_record_header(n: int) -> None:
    data = joined(encode_record(1, Op.TRIM, 0, 0, 0, 4096))[:n]
    with pytest.raises(FormatError) as ei:
        decode_header(data)
    assert str(ei.value) == f"short record header ({n} of 44 bytes)"


def test_bad_record_magic() -> None:
    data = b"\xef\xbe\xad\xde" + encode_header(1, Op.TRIM, 0, 0, 0, 4096, 0, 0)[4:]
    with pytest.raises(FormatError) as ei:
        decode_header(data)
    assert str(ei.value) == "bad record magic 0xdeadbeef"


def test_record_header_checksum_mismatch() -> None:
    data = bytearray(encode_header(1, Op.TRIM, 0, 0, 0, 4096, 0, 0))
    data[30] ^= 0x01  # a bit of the offset field
    with pytest.raises(FormatError) as ei:
        decode_header(bytes(data))
    assert str(ei.value) == "record header checksum mismatch"


def test_record_header_crc_field_itself_damaged() -> None:
    data = bytearray(encode_header(1, Op.TRIM, 0, 0, 0, 4096, 0, 0))
    data[4] ^= 0x80
    with pytest.raises(FormatError) as ei:
        decode_header(bytes(data))
    assert str(ei.value) == "record header checksum mismatch"


@pytest.mark.parametrize("op", [0, 5, 255])
def test_unknown_record_op(op: int) -> None:
    with pytest.raises(FormatError) as ei:
        decode_header(encode_header(1, op, 0, 0, 0, 0, 0, 0))
    assert str(ei.value) == f"unknown record op {op}"


def test_payload_length_over_limit() -> None:
    plen = MAX_PAYLOAD + 1
    with pytest.raises(FormatError) as ei:
        decode_header(encode_header(1, Op.WRITE, 0, 0, 0, plen, plen, 0))
    assert str(ei.value) == f"record payload length {plen} exceeds {MAX_PAYLOAD}"


def test_payload_length_at_limit_is_accepted() -> None:
    hdr = decode_header(encode_header(1, Op.WRITE, 0, 0, 0, MAX_PAYLOAD, MAX_PAYLOAD, 0))
    assert hdr.payload_len == MAX_PAYLOAD


@pytest.mark.parametrize(("plen", "length"), [(4096, 8192), (8192, 4096), (0, 512)])
def test_write_payload_not_equal_length(plen: int, length: int) -> None:
    with pytest.raises(FormatError) as ei:
        decode_header(encode_header(1, Op.WRITE, 0, 0, 0, length, plen, 0))
    assert str(ei.value) == f"WRITE record payload {plen} != length {length}"


@pytest.mark.parametrize("op", [Op.TRIM, Op.ZERO])
def test_range_op_with_payload(op: Op) -> None:
    with pytest.raises(FormatError) as ei:
        decode_header(encode_header(1, op, 0, 0, 0, 4096, 1, crc32c(b"x")))
    assert str(ei.value) == f"{op.name} record carries a payload"


def test_short_payload() -> None:
    hdr = decode_header(joined(encode_record(1, Op.WRITE, 0, 0, 0, 10, b"0123456789")))
    with pytest.raises(FormatError) as ei:
        check_payload(hdr, b"01234")
    assert str(ei.value) == "short record payload (5 of 10 bytes)"


def test_payload_crc_mismatch() -> None:
    hdr = decode_header(joined(encode_record(1, Op.WRITE, 0, 0, 0, 10, b"0123456789")))
    with pytest.raises(FormatError) as ei:
        check_payload(hdr, b"0123456788")
    assert str(ei.value) == "record data checksum mismatch"


def test_encode_header_packs_fields_in_documented_order() -> None:
    raw = encode_header(0x1122, Op.ZERO, Flag.FUA | Flag.MAY_TRIM, 7, 0x5000, 0x1000, 0, 0xAB)
    fields = REC_HEADER.unpack(raw)
    assert fields[0] == REC_MAGIC
    assert fields[1] == crc32c(raw[8:44])
    assert fields[2:] == (0x1122, 3, 3, 0, 7, 0x5000, 0x1000, 0, 0xAB)


# -- segment headers -----------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(jid=st.binary(min_size=16, max_size=16), first_seq=U64, created=U64)
def test_segment_header_round_trip(jid: bytes, first_seq: int, created: int) -> None:
    raw = encode_segment_header(jid, first_seq, created)
    assert len(raw) == SEG_HEADER_SIZE
    assert raw[:8] == SEG_MAGIC
    assert decode_segment_header(raw) == SegmentHeader(SEG_VERSION, jid, first_seq, created)


@pytest.mark.parametrize("n", [0, 15, 47])
def test_short_segment_header(n: int) -> None:
    with pytest.raises(FormatError) as ei:
        decode_segment_header(encode_segment_header(JID, 1, 0)[:n])
    assert str(ei.value) == f"short segment header ({n} of 48 bytes)"


def test_bad_segment_magic() -> None:
    with pytest.raises(FormatError) as ei:
        decode_segment_header(seg_header_with(magic=b"NOTAJNL!"))
    assert str(ei.value) == "bad segment magic b'NOTAJNL!'"


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_bad_segment_version(version: int) -> None:
    with pytest.raises(FormatError) as ei:
        decode_segment_header(seg_header_with(version=version))
    assert str(ei.value) == f"unsupported segment format version {version} (this is 1)"


@pytest.mark.parametrize("byte", [10, 12, 20, 30, 40, 44, 47])
def test_segment_header_checksum_mismatch(byte: int) -> None:
    raw = bytearray(encode_segment_header(JID, 77, 123))
    raw[byte] ^= 0x04
    with pytest.raises(FormatError) as ei:
        decode_segment_header(bytes(raw))
    assert str(ei.value) == "segment header checksum mismatch"


@pytest.mark.parametrize("jid", [b"", b"short", bytes(17)])
def test_segment_header_needs_16_byte_journal_id(jid: bytes) -> None:
    with pytest.raises(ValueError, match=r"^journal_id must be 16 bytes$"):
        encode_segment_header(jid, 1, 0)
