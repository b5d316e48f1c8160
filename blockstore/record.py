"""Journal record and segment-header codec (pure: bytes in, values out).

A journal segment file is a segment header followed by records.  Every record is a
fixed 44-byte header, optionally followed by a payload (the written data, or a msgpack
body for MARK records)::

    magic u32 | hdr_crc u32 | seq u64 | op u8 | flags u8 | reserved u16 | volume u32 |
    offset u64 | length u32 | payload_len u32 | data_crc u32

``hdr_crc`` is CRC32C of bytes 8..44 of the header; ``data_crc`` is CRC32C of the
payload.  ``length`` is the byte range the operation covers on the volume (for WRITE it
equals ``payload_len``; TRIM and ZERO carry no payload).  Little-endian throughout.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from crc32c import crc32c

from .errors import FormatError

REC_MAGIC = 0x3152_4A4E  # b"NJR1" little-endian
REC_HEADER = struct.Struct("<IIQBBHIQIII")
REC_HEADER_SIZE = REC_HEADER.size  # 44
_REC_PREFIX = struct.Struct("<II")  # magic, hdr_crc
_REC_TAIL = struct.Struct("<QBBHIQIII")  # the part covered by hdr_crc

SEG_MAGIC = b"NBDGWJNL"
SEG_VERSION = 1
SEG_HEADER = struct.Struct("<8sHH16sQQI")
SEG_HEADER_SIZE = SEG_HEADER.size  # 48

MAX_PAYLOAD = 64 * 1024 * 1024  # larger than any NBD request nbdkit passes on


class Op(enum.IntEnum):
    """What a record does to the volume."""

    WRITE = 1
    TRIM = 2
    ZERO = 3
    MARK = 4  # control record (recovery, later snapshots); msgpack payload


class Flag(enum.IntFlag):
    """Per-record flags, mirroring the NBD request flags that matter for replay."""

    NONE = 0
    FUA = 1
    MAY_TRIM = 2


class RecordHeader(NamedTuple):
    """A decoded record header."""

    seq: int
    op: Op
    flags: Flag
    volume: int
    offset: int
    length: int
    payload_len: int
    data_crc: int


class SegmentHeader(NamedTuple):
    """A decoded segment header."""

    version: int
    journal_id: bytes
    first_seq: int
    created_ns: int


def encode_header(
    seq: int, op: int, flags: int, volume: int, offset: int, length: int,
    payload_len: int, data_crc: int,
) -> bytes:
    """Return the 44-byte header of one record (packed once: the CRC'd tail, then the
    prefix; the journal writes it and the payload in one pwritev)."""
    tail = _REC_TAIL.pack(seq, op, flags, 0, volume, offset, length, payload_len, data_crc)
    return _REC_PREFIX.pack(REC_MAGIC, crc32c(tail)) + tail


def encode_record(
    seq: int, op: int, flags: int, volume: int, offset: int, length: int,
    payload: bytes | memoryview = b"",
) -> list[bytes | memoryview]:
    """Return the buffers of one record (header, payload) for a vectored write."""
    hdr = encode_header(seq, op, flags, volume, offset, length, len(payload), crc32c(payload))
    return [hdr, payload] if payload else [hdr]


def decode_header(buf: bytes | memoryview) -> RecordHeader:
    """Decode a record header; raise FormatError saying exactly what is wrong."""
    if len(buf) < REC_HEADER_SIZE:
        raise FormatError(f"short record header ({len(buf)} of {REC_HEADER_SIZE} bytes)")
    magic, hcrc, seq, op, flags, _r, vol, off, length, plen, dcrc = REC_HEADER.unpack_from(buf)
    if magic != REC_MAGIC:
        raise FormatError(f"bad record magic 0x{magic:08x}")
    if crc32c(bytes(buf[8:REC_HEADER_SIZE])) != hcrc:
        raise FormatError("record header checksum mismatch")
    try:
        op_e = Op(op)
    except ValueError:
        raise FormatError(f"unknown record op {op}") from None
    if plen > MAX_PAYLOAD:
        raise FormatError(f"record payload length {plen} exceeds {MAX_PAYLOAD}")
    if op_e is Op.WRITE and plen != length:
        raise FormatError(f"WRITE record payload {plen} != length {length}")
    if op_e in (Op.TRIM, Op.ZERO) and plen != 0:
        raise FormatError(f"{op_e.name} record carries a payload")
    return RecordHeader(seq, op_e, Flag(flags), vol, off, length, plen, dcrc)


def check_payload(hdr: RecordHeader, payload: bytes | memoryview) -> None:
    """Raise FormatError if the payload does not match the header's data CRC."""
    if len(payload) != hdr.payload_len:
        raise FormatError(f"short record payload ({len(payload)} of {hdr.payload_len} bytes)")
    if crc32c(payload) != hdr.data_crc:
        raise FormatError("record data checksum mismatch")


def encode_segment_header(journal_id: bytes, first_seq: int, created_ns: int) -> bytes:
    """Return the 48-byte header that starts every segment file."""
    if len(journal_id) != 16:
        raise ValueError("journal_id must be 16 bytes")
    body = SEG_HEADER.pack(SEG_MAGIC, SEG_VERSION, 0, journal_id, first_seq, created_ns, 0)
    return body[:-4] + struct.pack("<I", crc32c(body[:-4]))


def decode_segment_header(buf: bytes | memoryview) -> SegmentHeader:
    """Decode a segment header; raise FormatError on magic, version or checksum."""
    if len(buf) < SEG_HEADER_SIZE:
        raise FormatError(f"short segment header ({len(buf)} of {SEG_HEADER_SIZE} bytes)")
    magic, version, _r, jid, first_seq, created, crc = SEG_HEADER.unpack_from(buf)
    if magic != SEG_MAGIC:
        raise FormatError(f"bad segment magic {magic!r}")
    if version != SEG_VERSION:
        raise FormatError(f"unsupported segment format version {version} (this is {SEG_VERSION})")
    if crc32c(bytes(buf[: SEG_HEADER_SIZE - 4])) != crc:
        raise FormatError("segment header checksum mismatch")
    return SegmentHeader(version, jid, first_seq, created)
