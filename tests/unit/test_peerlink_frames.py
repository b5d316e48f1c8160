"""Peerlink frame and message codecs: round trips under any split of the byte stream, and
every refusal with its exact message (a peer's fault must say precisely what was wrong).
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time
import uuid
from dataclasses import replace
from typing import Any

import msgpack
import pytest
import zstandard
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from blockstore.record import Op
from peerlink.errors import PeerlinkError, PeerProtocolError
from peerlink.frames import (
    DEFAULT_MAX_BODY,
    FLAG_ZSTD,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MIN_COMPRESS,
    NEED_DATA,
    PREAUTH_MAX_BODY,
    VERSION,
    FrameDecoder,
    encode_frame,
)
from peerlink.link import is_compressed
from peerlink.messages import (
    MAX_BATCH_RECORDS,
    MAX_CHANGED,
    MAX_EXTENT_SHIFT,
    MAX_GENERATIONS,
    MAX_NAME,
    MAX_REASON,
    MAX_RESYNC_EXTENTS,
    PROTO_VERSION,
    ROLES,
    Ack,
    Batch,
    Challenge,
    ExtentData,
    Generation,
    Hello,
    HelloOk,
    Intro,
    Message,
    Ping,
    Pong,
    Proof,
    Record,
    Refuse,
    ResyncDone,
    ResyncExtents,
    check_hello,
    check_resume,
    decode,
)

# -- helpers ---------------------------------------------------------------------------------


def wire(body: bytes, compress: bool | int = False) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(body, compress))


def raw_frame(body: bytes, *, magic: bytes = MAGIC, version: int = VERSION, flags: int = 0,
              reserved: int = 0, body_len: int | None = None, crc: int | None = None) -> bytes:
    """A frame with any header field forced (the CRC is right unless given)."""
    n = len(body) if body_len is None else body_len
    head = HEADER.pack(magic, version, flags, reserved, n, 0)[:12]
    if crc is None:
        crc = crc32c(body, crc32c(head))
    return head + struct.pack("<I", crc) + body


def decode_all(data: bytes, max_body: int = DEFAULT_MAX_BODY) -> list[bytes]:
    d = FrameDecoder(max_body)
    d.feed(data)
    out = []
    while (f := d.next_frame()) is not NEED_DATA:
        out.append(f)
    assert d.buffered == 0
    return out


def refusal(data: bytes, max_body: int = DEFAULT_MAX_BODY) -> str:
    with pytest.raises(PeerProtocolError) as ei:
        decode_all(data, max_body)
    return str(ei.value)


# -- frames: layout and round trips ----------------------------------------------------------


def test_header_layout_is_exact() -> None:
    bufs = encode_frame(b"abc")
    assert bufs[1] == b"abc"
    head = bytes(bufs[0])
    assert len(head) == HEADER_SIZE == 16
    assert head[:12] == b"NGPL" + bytes([1, 0]) + b"\0\0" + struct.pack("<I", 3)
    # The CRC covers header bytes 0..12 and the body, so header damage is caught too.
    assert head[12:] == struct.pack("<I", crc32c(b"abc", crc32c(head[:12])))


def test_compression_only_when_it_pays() -> None:
    zeros = bytes(8192)
    bufs = encode_frame(zeros, True)
    assert bytes(bufs[0])[5] == FLAG_ZSTD
    assert len(bufs[1]) < 100
    assert decode_all(wire(zeros, True)) == [zeros]
    noise = os.urandom(8192)  # incompressible: sent as it is
    bufs = encode_frame(noise, 19)
    assert bytes(bufs[0])[5] == 0
    assert bufs[1] == noise
    small = bytes(MIN_COMPRESS - 1)  # too small to bother
    assert bytes(encode_frame(small, True)[0])[5] == 0
    assert bytes(encode_frame(bytes(MIN_COMPRESS), True)[0])[5] == FLAG_ZSTD
    assert bytes(encode_frame(zeros, False)[0])[5] == 0
    assert bytes(encode_frame(zeros, 0)[0])[5] == 0
    assert bytes(encode_frame(zeros, -5)[0])[5] == FLAG_ZSTD


BODIES = st.lists(
    st.one_of(st.binary(max_size=600), st.binary(max_size=40).map(lambda b: b * 50)),
    min_size=1, max_size=6)
LEVELS = st.sampled_from([False, True, 1, -3, 9])


@settings(max_examples=150, deadline=None)
@given(bodies=BODIES, levels=st.lists(LEVELS, min_size=6, max_size=6), data=st.data())
def test_round_trip_under_any_split(bodies: list[bytes], levels: list[bool | int],
                                    data: st.DataObject) -> None:
    stream = b"".join(wire(b, lvl) for b, lvl in zip(bodies, levels, strict=False))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    d = FrameDecoder()
    got: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        d.feed(stream[prev:cut])
        prev = cut
        while (f := d.next_frame()) is not NEED_DATA:
            got.append(f)
    assert got == bodies
    assert d.buffered == 0


def test_one_byte_feeds() -> None:
    bodies = [b"", b"x" * 1000, os.urandom(300), bytes(5000)]
    stream = b"".join(wire(b, True) for b in bodies)
    d = FrameDecoder()
    got = []
    for i in range(len(stream)):
        d.feed(stream[i:i + 1])
        while (f := d.next_frame()) is not NEED_DATA:
            got.append(f)
        assert d.buffered == (i + 1) - sum(len(wire(b, True)) for b in got)
    assert got == bodies


def test_buffering_is_linear() -> None:
    """A 256 KiB frame fed one byte at a time, and 50k frames in one chunk: quadratic
    re-slicing of a growing buffer would take minutes here, not a fraction of a second."""
    body = os.urandom(256 * 1024)
    stream = wire(body)
    d = FrameDecoder()
    t0 = time.monotonic()
    for i in range(len(stream)):
        d.feed(stream[i:i + 1])
        f = d.next_frame()
    assert f == body
    many = wire(b"ack") * 50_000 + wire(b"tail")[:7]
    d.feed(many)
    n = 0
    while d.next_frame() is not NEED_DATA:
        n += 1
    assert n == 50_000
    assert d.buffered == 7
    assert time.monotonic() - t0 < 10


def test_max_body_is_inclusive() -> None:
    assert decode_all(wire(b"x" * 100), max_body=100) == [b"x" * 100]


# -- frames: every refusal -------------------------------------------------------------------


def test_bad_magic() -> None:
    assert refusal(b"GET / HTTP/1.1\r\n") == "not a peerlink frame (bad magic b'GET ')"
    assert refusal(raw_frame(b"abc", magic=b"NGPX")) == "not a peerlink frame (bad magic b'NGPX')"


def test_bad_magic_is_reported_from_the_first_wrong_byte() -> None:
    d = FrameDecoder()
    d.feed(b"NG")
    assert d.next_frame() is NEED_DATA
    d.feed(b"X")
    with pytest.raises(PeerProtocolError, match=r"^not a peerlink frame \(bad magic b'NGX'\)$"):
        d.next_frame()


def test_unsupported_version_names_both() -> None:
    assert refusal(raw_frame(b"abc", version=2)) == (
        "unsupported frame version 2 (this node speaks frame version 1)")


def test_reserved_bits() -> None:
    assert refusal(raw_frame(b"abc", flags=0x82)) == "reserved frame flag bits set (flags 0x82)"
    assert refusal(raw_frame(b"abc", reserved=1)) == "reserved frame header field set (0x0001)"


def test_body_over_max_is_refused_before_the_body_arrives() -> None:
    d = FrameDecoder(max_body=100)
    d.feed(raw_frame(b"", body_len=101))  # the header alone
    with pytest.raises(PeerProtocolError) as ei:
        d.next_frame()
    assert str(ei.value) == "frame body of 101 bytes exceeds the maximum of 100"


def test_checksum_mismatch() -> None:
    good = wire(b"hello")
    bad = good[:-1] + bytes([good[-1] ^ 1])
    assert refusal(bad) == "frame checksum mismatch (crc32c of 5-byte body)"
    assert refusal(raw_frame(b"hello", crc=0)) == "frame checksum mismatch (crc32c of 5-byte body)"


def test_header_damage_is_caught_by_the_checksum() -> None:
    good = bytearray(wire(b"x" * 200, True))
    assert good[5] == FLAG_ZSTD
    good[5] = 0  # the body would reach msgpack as raw zstd bytes if the CRC let it by
    assert refusal(bytes(good)) == "frame checksum mismatch (crc32c of 18-byte body)"


def test_decompression_failures() -> None:
    assert refusal(raw_frame(b"not zstd at all", flags=FLAG_ZSTD)) == (
        "frame body decompression failed (error when determining content size)")
    packed = zstandard.ZstdCompressor().compress(b"y" * 1000)
    assert refusal(raw_frame(packed[:-3], flags=FLAG_ZSTD)) == (
        "frame body decompression failed (decompression error: did not decompress full "
        "frame)")
    assert refusal(raw_frame(packed + b"junk", flags=FLAG_ZSTD)) == (
        "frame body decompression failed (compressed input contains 4 bytes of unused "
        "data, which is disallowed)")
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"y" * 1000)
    assert refusal(raw_frame(unsized, flags=FLAG_ZSTD)) == (
        "compressed frame body does not declare its decompressed size")


def test_zstd_bomb_is_refused_before_decompressing() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(2 << 20))
    assert len(bomb) < 1024  # small on the wire, within max_body
    assert refusal(raw_frame(bomb, flags=FLAG_ZSTD), max_body=1 << 20) == (
        "compressed frame body would decompress to 2097152 bytes, over the maximum of "
        "1048576")


def test_decoder_stays_failed() -> None:
    d = FrameDecoder()
    d.feed(raw_frame(b"abc", version=9) + wire(b"fine"))
    with pytest.raises(PeerProtocolError) as first:
        d.next_frame()
    with pytest.raises(PeerProtocolError) as again:
        d.next_frame()
    assert again.value is first.value


def test_local_misuse_is_not_a_peer_error() -> None:
    with pytest.raises(ValueError, match=r"^frame body of 11 bytes exceeds the maximum of 10$"):
        encode_frame(b"x" * 11, max_body=10)
    with pytest.raises(ValueError, match=r"^compression level must be between -7 and 22, got 23$"):
        encode_frame(b"x", 23)
    with pytest.raises(ValueError, match=r"^max_body must be >= 1, got 0$"):
        FrameDecoder(0)
    assert not issubclass(PeerProtocolError, ValueError)
    assert issubclass(PeerProtocolError, PeerlinkError)


# -- messages: round trips -------------------------------------------------------------------

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
NAMES = st.text(min_size=1, max_size=20)
DATA_OPS = st.sampled_from([Op.TRIM, Op.ZERO])


@st.composite
def records(draw: st.DrawFn) -> Record:
    op = draw(st.sampled_from(list(Op)))
    if op is Op.WRITE:
        data = draw(st.binary(max_size=64))
        return Record(op, draw(st.integers(0, 255)), draw(U64), len(data), data)
    if op is Op.MARK:
        return Record(op, 0, 0, 0, draw(st.binary(max_size=32)))
    return Record(op, draw(st.integers(0, 255)), draw(U64), draw(U32), b"")


@st.composite
def extent_data(draw: st.DrawFn) -> ExtentData:
    data = draw(st.binary(max_size=64))
    length = len(data) if data else draw(st.integers(1, 2**32 - 1))
    return ExtentData(draw(NAMES), draw(U64), length, data)


MESSAGES: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, U32, NAMES, NAMES, st.uuids().map(str), U64, st.sampled_from(ROLES),
              st.lists(st.tuples(U64, U64), max_size=4, unique_by=lambda x: x[0]).map(
                  lambda gs: tuple(Generation(g, s) for g, s in gs)),
              U64, st.binary(min_size=32, max_size=32)),
    st.lists(st.tuples(U64, U64, U64), max_size=4, unique_by=lambda x: x[0]).flatmap(
        lambda gs: st.builds(
            Hello, U32, NAMES, NAMES, st.uuids().map(str), U64, st.sampled_from(ROLES),
            st.just(tuple(Generation(g, s) for g, s, _ in gs)), U64,
            st.binary(min_size=32, max_size=32), st.booleans(), st.none(),
            st.just(tuple(e for _, _, e in gs)))),
    st.builds(HelloOk, NAMES, st.integers(1, 2**64 - 1),
              st.sampled_from([b"", bytes(range(32))])),
    st.builds(Refuse, st.text(max_size=200)),
    st.builds(lambda v, f, n, rs: Batch(v, f, f + n, tuple(rs)),
              NAMES, st.integers(1, 2**40), st.integers(0, 1000), st.lists(records(), max_size=8)),
    st.builds(Ack, NAMES, U64),
    st.builds(Ping, U64),
    st.builds(Pong, U64),
    st.builds(ResyncExtents, NAMES, st.integers(12, 40),
              st.sets(U64, max_size=10).map(lambda s: tuple(sorted(s)))),
    extent_data(),
    st.builds(ResyncDone, NAMES, U64),
    st.builds(Intro, U32, NAMES, NAMES, st.binary(min_size=32, max_size=32)),
)


@settings(max_examples=300, deadline=None)
@given(msg=MESSAGES, compress=LEVELS)
def test_message_round_trip_through_frames(msg: Message, compress: bool | int) -> None:
    assert decode_all(wire(msg.encode(), compress)) == [msg.encode()]
    assert decode(msg.encode()) == msg


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=64))
def test_garbage_is_always_a_peer_error(body: bytes) -> None:
    """Any bytes: a PeerProtocolError, or a message that survives re-encoding."""
    try:
        msg = decode(body)
    except PeerProtocolError:
        return
    assert decode(msg.encode()) == msg


JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
              st.text(max_size=8), st.binary(max_size=8)),
    lambda kids: st.one_of(st.lists(kids, max_size=5),
                           st.dictionaries(st.text(max_size=4), kids, max_size=3)),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(code=st.integers(0, 12), fields=st.lists(JUNK, max_size=10))
def test_well_formed_junk_is_always_a_peer_error(code: int, fields: list[Any]) -> None:
    """Any msgpack values: a PeerProtocolError, or a message that survives re-encoding."""
    try:
        msg = decode(msgpack.packb([code, *fields]))
    except PeerProtocolError:
        return
    assert decode(msg.encode()) == msg


# -- messages: every refusal -----------------------------------------------------------------

NONCE = bytes(32)
UUID = "0b7e3a52-8f3c-4c4e-9a51-2f1d0c6a9e10"
HELLO = Hello(PROTO_VERSION, "dc1", "v1", UUID, 64 << 20, "primary",
              (Generation(7, 1), Generation(9, 100)), 123, NONCE)
HELLO_FIELDS: list[Any] = [PROTO_VERSION, "dc1", "v1", UUID, 64 << 20, "primary",
                           [[7, 1], [9, 100]], 123, NONCE]


def why(*items: Any) -> str:
    with pytest.raises(PeerProtocolError) as ei:
        decode(msgpack.packb(list(items)))
    return str(ei.value)


def hello_with(i: int, v: Any) -> str:
    f = list(HELLO_FIELDS)
    f[i] = v
    return why(1, *f)


def test_hello_decodes_and_ignores_appended_fields() -> None:
    assert decode(msgpack.packb([1, *HELLO_FIELDS])) == HELLO
    assert decode(msgpack.packb([1, *HELLO_FIELDS, "a v2 field", {"x": 1}])) == HELLO
    assert decode(HELLO.encode()) == HELLO
    adopting = replace(HELLO, adopts=True)
    assert decode(adopting.encode()) == adopting
    changed = replace(HELLO, changed=(16, (3, 9, 4000)))
    assert decode(changed.encode()) == changed
    assert decode_refusal(msgpack.packb([1, *HELLO_FIELDS, False, [16]])) == (
        "Hello.changed: expected [extent_shift, extents], got 1 items")
    assert decode_refusal(msgpack.packb([1, *HELLO_FIELDS, False, [3, []]])) == (
        "Hello.changed.extent_shift: expected integer between 12 and 40, got 3")


def test_hello_epochs_round_trip_and_older_layouts_still_decode() -> None:
    """``epochs`` (the failover epoch of each generation) is appended after ``changed``:
    a Hello without it (9 or 11 fields, what older nodes send) decodes with None."""
    with_epochs = replace(HELLO, epochs=(0, 2))
    assert decode(with_epochs.encode()) == with_epochs
    assert msgpack.unpackb(with_epochs.encode())[12] == [0, 2]
    assert decode(msgpack.packb([1, *HELLO_FIELDS])).epochs is None
    assert decode(msgpack.packb([1, *HELLO_FIELDS, True, None])) == replace(HELLO, adopts=True)
    assert decode(msgpack.packb([1, *HELLO_FIELDS, False, None, [0, 2], "v3 field"])) == \
        with_epochs
    # Bounded like the generations list: exactly one epoch per generation.
    assert decode_refusal(msgpack.packb([1, *HELLO_FIELDS, False, None, [1, 2, 3]])) == (
        "Hello.epochs: 3 epochs for 2 generations")
    assert decode_refusal(msgpack.packb([1, *HELLO_FIELDS, False, None, [1, -1]])) == (
        "Hello.epochs[1]: expected unsigned 64-bit integer, got -1")


def test_envelope_refusals() -> None:
    assert decode_refusal(b"\xc1") == "message body is not valid msgpack (FormatError)"
    assert decode_refusal(msgpack.packb([6, 1]) + b"\0") == (
        "message body is not valid msgpack (unpack(b) received extra data.)")
    assert decode_refusal(b"\x92\x06") == (
        "message body is not valid msgpack (Unpack failed: incomplete input)")
    assert decode_refusal(b"\xa2\xff\xfe") == (
        "message body is not valid msgpack ('utf-8' codec can't decode byte 0xff in "
        "position 0: invalid start byte)")
    assert decode_refusal(msgpack.packb({"t": 1})) == "message: expected non-empty array, got dict"
    assert why() == "message: expected non-empty array, got list"
    assert why("ping") == "message type: expected unsigned 8-bit integer, got 'ping'"
    assert why(99) == "unknown message type 99"
    assert why(0) == "unknown message type 0"
    assert why(6) == "Ping: expected 1 fields, got 0"
    assert why(6, 1, 2) == "Ping: expected 1 fields, got 2"
    assert why(1, *HELLO_FIELDS[:8]) == "Hello: expected 9 fields, got 8"


def decode_refusal(body: bytes) -> str:
    with pytest.raises(PeerProtocolError) as ei:
        decode(body)
    return str(ei.value)


def test_hello_field_refusals() -> None:
    assert hello_with(0, "1") == "Hello.proto_version: expected unsigned 32-bit integer, got '1'"
    assert hello_with(1, "") == (
        "Hello.node: expected non-empty string of at most 255 characters, got ''")
    assert hello_with(2, "v" * 256) == (
        "Hello.volume: expected non-empty string of at most 255 characters, got a "
        "256-character string")
    assert hello_with(3, UUID.upper()) == (
        "Hello.volume_uuid: expected canonical UUID string, got "
        "'0B7E3A52-8F3C-4C4E-9A51-2F1D0C6A9E10'")
    assert hello_with(3, "nope") == "Hello.volume_uuid: expected canonical UUID string, got 'nope'"
    assert hello_with(3, 5) == "Hello.volume_uuid: expected string, got 5"
    assert hello_with(4, -1) == "Hello.volume_size: expected unsigned 64-bit integer, got -1"
    assert hello_with(0, 2**32) == (
        "Hello.proto_version: expected unsigned 32-bit integer, got 4294967296")
    assert hello_with(5, "boss") == "Hello.role: expected primary or secondary or dr, got 'boss'"
    assert hello_with(6, {}) == "Hello.generations: expected array, got dict"
    assert hello_with(6, [[1, 2, 3]]) == (
        "Hello.generations[0]: expected [gen_id, start_seq], got 3 items")
    assert hello_with(6, [[1, 2], ["x", 3]]) == (
        "Hello.generations[1].gen_id: expected unsigned 64-bit integer, got 'x'")
    assert hello_with(6, [[1, 50], [7, 49], [1, 60]]) == (
        "Hello.generations[2].gen_id: 0000000000000001 appears twice (a history never "
        "repeats a generation)")
    assert hello_with(7, True) == (
        "Hello.last_applied_seq: expected unsigned 64-bit integer, got bool")
    assert hello_with(7, 1.5) == (
        "Hello.last_applied_seq: expected unsigned 64-bit integer, got float")
    assert hello_with(8, bytes(31)) == "Hello.auth_nonce: expected 32 bytes, got 31 bytes"
    assert hello_with(8, "x" * 32) == (
        "Hello.auth_nonce: expected 32 bytes, got 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'")


def test_other_field_refusals() -> None:
    assert why(2, "dc2", 0, b"") == (
        "HelloOk.resume_from_seq: expected unsigned 64-bit integer >= 1, got 0")
    assert why(2, "dc2", 1, bytes(5)) == (
        "HelloOk.auth_proof: expected 0 bytes or 32 bytes, got 5 bytes")
    assert why(3, None) == "Refuse.reason: expected string, got NoneType"
    assert why(5, "v1", -1) == "Ack.durable_seq: expected unsigned 64-bit integer, got -1"
    assert why(5, 7, 1) == (
        "Ack.volume: expected non-empty string of at most 255 characters, got 7")
    assert why(7, "t") == "Pong.t: expected unsigned 64-bit integer, got 't'"
    assert why(8, "v1", 11, []) == (
        "ResyncExtents.extent_shift: expected integer between 12 and 40, got 11")
    assert why(8, "v1", 22, [1, 5, 5]) == (
        "ResyncExtents.extents[2]: 5 does not follow 5 (extents must be strictly ascending)")
    assert why(8, "v1", 22, [1, -5]) == (
        "ResyncExtents.extents[1]: expected unsigned 64-bit integer, got -5")
    assert why(9, "v1", 0, 4, b"abc") == (
        "ExtentData.data: 3 bytes for length 4 (empty means zeros)")
    assert why(9, "v1", 0, 0, b"") == (
        "ExtentData.length: expected unsigned 32-bit integer >= 1, got 0")
    assert why(10, "v1", "x") == "ResyncDone.seq: expected unsigned 64-bit integer, got 'x'"


def test_batch_refusals() -> None:
    assert why(4, "v1", 5, 4, []) == "Batch.last_seq: 4 is below first_seq 5"
    assert why(4, "v1", 0, 4, []) == "Batch.first_seq: expected unsigned 64-bit integer >= 1, got 0"
    assert why(4, "v1", 1, 1, {}) == "Batch.records: expected array, got dict"
    assert why(4, "v1", 1, 1, [[1, 0, 0, 1]]) == (
        "Batch.records[0]: expected [op, flags, offset, length, data], got 4 items")
    assert why(4, "v1", 1, 1, [[1, 0, 0, 1, b"a"], [9, 0, 0, 1, b""]]) == (
        "Batch.records[1].op: expected WRITE, TRIM, ZERO or MARK, got 9")
    assert why(4, "v1", 1, 1, [[2, 256, 0, 1, b""]]) == (
        "Batch.records[0].flags: expected unsigned 8-bit integer, got 256")
    assert why(4, "v1", 1, 1, [[2, 0, 0, 2**32, b""]]) == (
        "Batch.records[0].length: expected unsigned 32-bit integer, got 4294967296")
    assert why(4, "v1", 1, 1, [[1, 0, 0, 2, "ab"]]) == (
        "Batch.records[0].data: expected bytes, got 'ab'")
    assert why(4, "v1", 1, 1, [[1, 0, 0, 2, b"abc"]]) == (
        "Batch.records[0].data: WRITE of length 2 carries 3 bytes")
    assert why(4, "v1", 1, 1, [[3, 0, 0, 2, b"ab"]]) == (
        "Batch.records[0].data: ZERO carries 2 bytes")
    assert why(4, "v1", 1, 1, [[4, 0, 512, 0, b"m"]]) == (
        "Batch.records[0]: MARK with offset 512 and length 0")


# -- handshake decisions ---------------------------------------------------------------------


def replica(**kw: Any) -> Hello:
    base = Hello(PROTO_VERSION, "dc2", "v1", UUID, 64 << 20, "secondary", (Generation(7, 1),),
                 100, bytes(range(32)))
    return dataclasses.replace(base, **kw)


def test_check_hello_accepts_a_matching_peer() -> None:
    assert check_hello(HELLO, replica()) is None
    assert check_hello(replica(), HELLO) is None
    assert check_hello(replica(), replica(node="dr1", role="dr")) is None  # cascade


def test_version_mismatch_from_a_newer_peer_is_refused_naming_both() -> None:
    """A v3 Hello (with an appended field) is readable here, and refused cleanly."""
    v3 = decode(msgpack.packb([1, 3, *HELLO_FIELDS[1:], "v3 extra"]))
    assert isinstance(v3, Hello)
    assert check_hello(replica(), v3) == Refuse(
        "protocol version mismatch: peer 'dc1' speaks version 3, this node ('dc2') speaks "
        "version 2")


def test_check_hello_refusals() -> None:
    r = check_hello(HELLO, replica(node="dc1"))
    assert r == Refuse("peer uses this node's own name 'dc1' (a loop, or a copied config)")
    other = str(uuid.UUID(int=1))
    assert check_hello(HELLO, replica(volume_uuid=other)) == Refuse(
        f"volume 'v1': uuid mismatch (this node {UUID}, peer 'dc2' {other}): a different "
        "volume")
    assert check_hello(HELLO, replica(volume_size=32 << 20)) == Refuse(
        "volume 'v1': size mismatch (this node 67108864 bytes, peer 'dc2' 33554432 bytes)")
    assert check_hello(HELLO, replica(role="primary")) == Refuse(
        "volume 'v1': both 'dc1' and 'dc2' are primary (split brain); refusing to replicate "
        "either way")


def test_check_resume() -> None:
    assert check_resume(100, 101) is None
    assert check_resume(100, 500) is None  # after a resync of what lies between
    assert check_resume(0, 1) is None
    assert check_resume(100, 100) == Refuse(
        "resume from seq 100 would re-apply records this replica already has (applied "
        "through seq 100)")


# -- before authentication: small frames, none compressed; bounded lists everywhere ----------


def test_before_authentication_frames_are_small_and_never_compressed() -> None:
    d = FrameDecoder(PREAUTH_MAX_BODY, compressed=False)
    bomb = encode_frame(msgpack.packb([1, [0] * 100_000]), 19)
    assert is_compressed(bomb)
    d.feed(bytes(bomb[0]))  # the header alone is refused: nothing is read further
    with pytest.raises(PeerProtocolError, match=r"^compressed frame before the peer "
                       r"authenticated \(refused undecompressed\)$"):
        d.next_frame()
    d = FrameDecoder(PREAUTH_MAX_BODY, compressed=False)
    d.feed(bytes(encode_frame(bytes(PREAUTH_MAX_BODY + 1))[0]))
    with pytest.raises(PeerProtocolError, match=r"^frame body of 16385 bytes exceeds the "
                       r"maximum of 16384$"):
        d.next_frame()
    d = FrameDecoder(PREAUTH_MAX_BODY, compressed=False)
    big = encode_frame(bytes(1 << 20), 3)
    d.allow(DEFAULT_MAX_BODY, compressed=True)  # the peer authenticated
    d.feed(b"".join(bytes(b) for b in big))
    assert d.next_frame() == bytes(1 << 20)


def test_the_largest_honest_handshake_messages_fit_before_authentication() -> None:
    """Names of 255 four-byte characters, MAX_GENERATIONS generations with 64-bit ids,
    seqs and epochs, MAX_CHANGED 64-bit extents: the largest Hello an honest node
    sends; a Refuse of MAX_REASON four-byte characters."""
    name = "\U0001f600" * MAX_NAME
    top = 2**64 - 1
    hello = Hello(PROTO_VERSION, name, name, UUID, top, "secondary",
                  tuple(Generation(top - i, top) for i in range(MAX_GENERATIONS)), top,
                  bytes(32), True, (MAX_EXTENT_SHIFT, tuple(range(top - MAX_CHANGED, top))),
                  (top,) * MAX_GENERATIONS)
    assert decode(hello.encode()) == hello
    sizes = {type(m).__name__: len(m.encode()) for m in (
        hello, HelloOk(name, top, bytes(32)), Challenge(PROTO_VERSION, bytes(32)),
        Proof(bytes(32)), Refuse("\U0001f600" * MAX_REASON),
        Intro(PROTO_VERSION, name, name, bytes(32)))}
    assert max(sizes.values()) <= PREAUTH_MAX_BODY, sizes
    assert sizes["Hello"] > PREAUTH_MAX_BODY * 3 // 4  # the bound is not loose either


def test_every_list_is_bounded() -> None:
    gens = [[i, 1] for i in range(MAX_GENERATIONS + 1)]
    assert hello_with(6, gens) == (
        f"Hello.generations: {MAX_GENERATIONS + 1} items, over the maximum of "
        f"{MAX_GENERATIONS}")
    assert decode_refusal(msgpack.packb(
        [1, *HELLO_FIELDS, False, [16, [0] * (MAX_CHANGED + 1)]])) == (
        f"Hello.changed.extents: {MAX_CHANGED + 1} items, over the maximum of {MAX_CHANGED}")
    assert decode_refusal(msgpack.packb([4, "v1", 1, 1, [[3, 0, 0, 0, b""]] * (
        MAX_BATCH_RECORDS + 1)])) == (
        f"Batch.records: {MAX_BATCH_RECORDS + 1} items, over the maximum of "
        f"{MAX_BATCH_RECORDS}")
    assert decode_refusal(msgpack.packb([12, "v1", 1, 1, [0] * 4097])) == (
        "VerifyResult.differing: 4097 items, over the maximum of 4096")
    assert decode_refusal(msgpack.packb([3, "x" * (MAX_REASON + 1)])) == (
        f"Refuse.reason: expected at most {MAX_REASON} characters, got a "
        f"{MAX_REASON + 1}-character string")
    # Past what any field allows, msgpack refuses before building the list at all.
    assert decode_refusal(msgpack.packb([8, "v1", 16, [0] * (MAX_RESYNC_EXTENTS + 9)])) \
        .startswith("message body is not valid msgpack")


def test_an_intro_names_its_bad_field_and_takes_later_fields() -> None:
    """The sender's first message: a short nonce is refused by name; a field appended by
    a later version is ignored (its layout only grows, like Hello's)."""
    body = msgpack.packb([15, PROTO_VERSION, "dc1", "v1", bytes(31)], use_bin_type=True)
    with pytest.raises(PeerProtocolError, match=r"^Intro.auth_nonce: "):
        decode(body)
    later = msgpack.packb([15, PROTO_VERSION + 1, "dc1", "v1", bytes(32), "more"],
                          use_bin_type=True)
    assert decode(later) == Intro(PROTO_VERSION + 1, "dc1", "v1", bytes(32))
