"""Peerlink frame codec (pure: bytes in, bytes out; no sockets, files or asyncio).

Every message travels in one frame: a 16-byte header and a body (one msgpack message,
optionally zstd-compressed)::

    magic b"NGPL" | version u8 | flags u8 | reserved u16 | body_len u32 | crc32c u32

Little-endian.  ``flags`` bit 0 says the body is a zstd frame; the other bits and
``reserved`` must be 0.  ``body_len`` counts the body as sent.  ``crc32c`` is CRC32C of
header bytes 0..12 followed by the body as sent, so a flipped flag or length is caught
as well as a flipped body byte, and it is checked before any decompression.

A decoder starts with the limits for a peer that has not authenticated yet when asked
(``compressed=False`` and a small ``max_body``: the shell's pre-authentication limits) and
``allow()`` raises them once the peer has proved itself.

``FrameDecoder`` follows h11: ``feed()`` bytes as they arrive, then call
``next_frame()`` until it returns ``NEED_DATA``.  It buffers in a bytearray with a read
offset, so decoding a stream costs O(n) whatever the chunk sizes.
"""

from __future__ import annotations

import enum
import struct
import threading
from typing import Final, Literal, NamedTuple

import zstandard
from crc32c import crc32c

from .errors import PeerProtocolError

MAGIC: Final = b"NGPL"
VERSION: Final = 1
FLAG_ZSTD: Final = 0x01
HEADER: Final = struct.Struct("<4sBBHII")
HEADER_SIZE: Final = HEADER.size  # 16
_CRC_COVERS: Final = 12  # header bytes covered by the CRC (all but the CRC itself)

# A batch carries at most one journal record larger than its byte budget, and a journal
# record's payload is at most 64 MiB (blockstore.record.MAX_PAYLOAD); 1 MiB of slack
# covers the msgpack envelope and per-record overhead of such a batch.
DEFAULT_MAX_BODY: Final = 64 * 1024 * 1024 + 1024 * 1024
# Before a peer has authenticated, a frame body is at most this many bytes and never
# compressed: enough for the largest honest handshake message (messages.py bounds every
# list in them; tests/unit/test_peerlink_frames.py builds the largest), and nothing more
# is buffered, decompressed or decoded for a stranger.
PREAUTH_MAX_BODY: Final = 16 * 1024
DEFAULT_LEVEL: Final = 3
MIN_LEVEL: Final = -7  # zstd's fast levels, for links faster than the CPU
MAX_LEVEL: Final = 22
# Bodies shorter than this are sent as they are (Ack, Ping...): not worth a zstd frame.
MIN_COMPRESS: Final = 128


class NeedData(enum.Enum):
    """The type of ``NEED_DATA``: ``next_frame()`` needs more bytes to go on."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """A compressor per level and thread (they are not thread-safe; contexts are costly)."""
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cctx


def _level(compress: bool | int) -> int:
    """0 for no compression, else the zstd level ``compress`` asks for."""
    if compress is True:
        return DEFAULT_LEVEL
    if compress is False or compress == 0:
        return 0
    if not MIN_LEVEL <= compress <= MAX_LEVEL:
        raise ValueError(
            f"compression level must be between {MIN_LEVEL} and {MAX_LEVEL}, got {compress}")
    return compress


def encode_frame(body: bytes | memoryview, compress: bool | int = False, *,
                 max_body: int = DEFAULT_MAX_BODY) -> list[bytes | memoryview]:
    """Return the buffers of one frame (header, body) for ``writelines``.

    ``compress`` is False/0 (never), True (level 3) or a zstd level.  The compressed body
    is sent only when it pays: the body is at least ``MIN_COMPRESS`` bytes and
    compression saves at least 1/32 of it, since the receiver pays to decompress.
    """
    if len(body) > max_body:
        raise ValueError(f"frame body of {len(body)} bytes exceeds the maximum of {max_body}")
    level = _level(compress)
    flags = 0
    wire: bytes | memoryview = body
    if level and len(body) >= MIN_COMPRESS:
        packed = _compressor(level).compress(body)
        if len(packed) * 32 <= len(body) * 31:
            wire, flags = packed, FLAG_ZSTD
    head = HEADER.pack(MAGIC, VERSION, flags, 0, len(wire), 0)[:_CRC_COVERS]
    crc = crc32c(wire, crc32c(head))
    return [head + struct.pack("<I", crc), wire]


class FrameDecoder:
    """Streaming frame decoder: ``feed()`` bytes, then ``next_frame()`` until NEED_DATA.

    Raises ``PeerProtocolError`` as soon as the bytes at hand prove the stream bad (a
    wrong magic is reported from its first byte, a bad header before its body arrives).
    The connection must then be closed: the decoder keeps raising the same error.
    """

    def __init__(self, max_body: int = DEFAULT_MAX_BODY, *, compressed: bool = True) -> None:
        self.max_body = 0
        self.compressed = compressed
        self.allow(max_body, compressed)
        self._buf = bytearray()
        self._pos = 0  # start of the first unconsumed byte in _buf
        self._head: tuple[int, int, int] | None = None  # (flags, body_len, crc) once parsed
        self._error: PeerProtocolError | None = None
        self._dctx = zstandard.ZstdDecompressor()

    def allow(self, max_body: int, compressed: bool) -> None:
        """Set the limits for the frames whose header is not parsed yet: the largest body
        and whether a compressed body is accepted (a peer that authenticated)."""
        if max_body < 1:
            raise ValueError(f"max_body must be >= 1, got {max_body}")
        self.max_body, self.compressed = max_body, compressed

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame (a partial frame at EOF)."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        self._buf += data

    def next_frame(self) -> bytes | Literal[NeedData.NEED_DATA]:
        """Return the next frame's body (decompressed), or NEED_DATA."""
        raw = self.next_raw()
        if raw is NEED_DATA:
            return raw
        return self.unpack(raw)

    def next_raw(self) -> RawFrame | Literal[NeedData.NEED_DATA]:
        """Return the next frame as sent (its checksum checked, its declared size
        within the limit), or NEED_DATA; ``unpack()`` makes it a body.  The shell
        unpacks a large frame on a worker thread (``unpack_body``)."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except PeerProtocolError as e:
            self._error = e
            raise

    def unpack(self, raw: RawFrame) -> bytes:
        """The body of ``raw`` (decompressed with this decoder's context)."""
        if not raw.compressed:
            return raw.wire
        try:
            return _decompress(self._dctx, raw)
        except PeerProtocolError as e:
            self._error = e
            raise

    def _next(self) -> RawFrame | Literal[NeedData.NEED_DATA]:
        avail = len(self._buf) - self._pos
        if self._head is None:
            if avail < HEADER_SIZE:
                # Fail fast on a stranger (an HTTP or NBD client on our port).
                got = bytes(self._buf[self._pos:self._pos + min(avail, len(MAGIC))])
                if not MAGIC.startswith(got):
                    raise PeerProtocolError(f"not a peerlink frame (bad magic {got!r})")
                return NEED_DATA
            self._head = self._parse_header()
        flags, body_len, crc = self._head
        if avail < HEADER_SIZE + body_len:
            return NEED_DATA
        start = self._pos + HEADER_SIZE
        end = start + body_len
        with memoryview(self._buf) as mv:
            if crc32c(mv[start:end], crc32c(mv[self._pos:self._pos + _CRC_COVERS])) != crc:
                raise PeerProtocolError(
                    f"frame checksum mismatch (crc32c of {body_len}-byte body)")
            body = bytes(mv[start:end])
        self._consume(end)
        if not flags & FLAG_ZSTD:
            return RawFrame(body, False, len(body))
        return RawFrame(body, True, self._declared(body))

    def _parse_header(self) -> tuple[int, int, int]:
        magic, version, flags, reserved, body_len, crc = HEADER.unpack_from(self._buf, self._pos)
        if magic != MAGIC:
            raise PeerProtocolError(f"not a peerlink frame (bad magic {magic!r})")
        if version != VERSION:
            raise PeerProtocolError(
                f"unsupported frame version {version} (this node speaks frame version "
                f"{VERSION})")
        if flags & ~FLAG_ZSTD:
            raise PeerProtocolError(f"reserved frame flag bits set (flags 0x{flags:02x})")
        if flags & FLAG_ZSTD and not self.compressed:
            raise PeerProtocolError(
                "compressed frame before the peer authenticated (refused undecompressed)")
        if reserved:
            raise PeerProtocolError(f"reserved frame header field set (0x{reserved:04x})")
        if body_len > self.max_body:
            raise PeerProtocolError(
                f"frame body of {body_len} bytes exceeds the maximum of {self.max_body}")
        return flags, body_len, crc

    def _consume(self, end: int) -> None:
        """Mark bytes up to ``end`` consumed; compact so the buffer never grows without
        bound, copying each byte at most once more (amortised O(n))."""
        self._head = None
        if end == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif end > len(self._buf) // 2:
            del self._buf[:end]
            self._pos = 0
        else:
            self._pos = end

    def _declared(self, body: bytes) -> int:
        """The decompressed size a zstd body declares, refusing before any allocation a
        size over the maximum and an undeclared one (a bomb could hide behind it)."""
        try:
            size = zstandard.frame_content_size(body)
        except zstandard.ZstdError as e:
            raise PeerProtocolError(f"frame body decompression failed ({e})") from None
        if size == -1:
            raise PeerProtocolError(
                "compressed frame body does not declare its decompressed size")
        if size > self.max_body:
            raise PeerProtocolError(
                f"compressed frame body would decompress to {size} bytes, over the maximum "
                f"of {self.max_body}")
        return int(size)


class RawFrame(NamedTuple):
    """One frame as received: ``wire`` its body as sent, ``size`` the body's size once
    unpacked (declared by the zstd frame, checked against the limit)."""

    wire: bytes
    compressed: bool
    size: int


def _decompress(dctx: zstandard.ZstdDecompressor, raw: RawFrame) -> bytes:
    try:
        # With a declared size, zstd allocates exactly that and fails on any mismatch;
        # trailing bytes after the zstd frame fail too.
        return dctx.decompress(raw.wire, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise PeerProtocolError(f"frame body decompression failed ({e})") from None


def unpack_body(raw: RawFrame) -> bytes:
    """``FrameDecoder.unpack`` for any thread (a decompression context per thread)."""
    if not raw.compressed:
        return raw.wire
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return _decompress(dctx, raw)
