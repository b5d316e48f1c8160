"""Fuzzing the decoders a peer's bytes reach (issue 20): the peerlink frame decoder (with
the limits before and after authentication), the message decoder, and the heartbeat
decoder.  Every input must end in a value or the package's protocol error
(``PeerProtocolError``, ``BadBeat``), within bounded time (hypothesis' deadline) and
bounded memory (tracemalloc's peak, in proportion to the input).

The default run is a few seconds; ``-m slow`` runs the same properties 50 times longer.
Failing examples found are kept as ``@example`` regression cases.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.heartbeat import MAC_SIZE, MAGIC, BadBeat, body_from_wire, unseal
from peerlink.errors import PeerProtocolError
from peerlink.frames import (
    DEFAULT_MAX_BODY,
    NEED_DATA,
    PREAUTH_MAX_BODY,
    FrameDecoder,
    encode_frame,
)
from peerlink.messages import Hello, Message, decode

QUICK = settings(max_examples=150, deadline=timedelta(seconds=2),
                 suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=7500, deadline=timedelta(seconds=2),
                suppress_health_check=[HealthCheck.too_slow])
KEY = b"k" * 32


def bounded(fn: Callable[[], Any], input_len: int, allowance: int, warm: bool = True) -> Any:
    """Run ``fn``; its peak Python allocation must stay under 64 x the input plus
    ``allowance`` (a decoded container costs a pointer per element, not more).  ``warm``:
    run it once untraced first, so that what a first call caches (seen once in the long
    run: 1.9 MB on a first call, not again) is not counted against the input."""
    if warm:
        with contextlib.suppress(Exception):
            fn()
    tracemalloc.start()
    try:
        return fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak <= 64 * input_len + allowance, (peak, input_len)


# -- inputs ------------------------------------------------------------------------------------

JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
              st.text(max_size=8), st.binary(max_size=40)),
    lambda kids: st.one_of(st.lists(kids, max_size=6),
                           st.dictionaries(st.text(max_size=4), kids, max_size=3)),
    max_leaves=30)

HELLO = Hello(2, "dc1", "v1", "0b7e3a52-8f3c-4c4e-9a51-2f1d0c6a9e10", 1 << 30, "primary",
              (), 7, bytes(32))


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Message bodies: random bytes, msgpack junk under any type code, or a real message
    with some bytes flipped."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=256))
    if kind == 1:
        return bytes(msgpack.packb([draw(st.integers(0, 16)),
                                    *draw(st.lists(JUNK, max_size=14))]))
    body = bytearray(HELLO.encode())
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(body) - 1))
        body[i] = draw(st.integers(0, 255))
    return bytes(body)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Frame streams: valid frames (compressed or not), damaged, cut or with junk between."""
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        body = draw(bodies())
        frame = bytearray(b"".join(bytes(b) for b in encode_frame(
            body, draw(st.sampled_from([False, True, 19])))))
        for _ in range(draw(st.integers(0, 2))):
            i = draw(st.integers(0, len(frame) - 1))
            frame[i] = draw(st.integers(0, 255))
        out += bytes(frame[:draw(st.integers(1, len(frame)))])
    return out + draw(st.binary(max_size=32))


# -- the frame decoder ---------------------------------------------------------------------------


def frames_property(data: bytes, cuts: list[int], preauth: bool) -> None:
    limit = PREAUTH_MAX_BODY if preauth else DEFAULT_MAX_BODY
    d = FrameDecoder(limit, compressed=not preauth)

    def run() -> None:
        pos = 0
        failed: PeerProtocolError | None = None
        for n in [*cuts, len(data)]:
            d.feed(data[pos:pos + n])
            pos += n
            try:
                while (body := d.next_frame()) is not NEED_DATA:
                    assert len(body) <= limit
                    with contextlib.suppress(PeerProtocolError):
                        decode(body)
            except PeerProtocolError as e:
                failed = e
                break
            assert d.buffered <= len(data)
        if failed is not None:
            with pytest.raises(PeerProtocolError):  # a failed decoder stays failed
                d.next_frame()

    bounded(run, len(data), 2 << 20, warm=False)  # the decoder is consumed


@QUICK
@given(data=streams(), cuts=st.lists(st.integers(1, 64), max_size=8), preauth=st.booleans())
@example(data=b"NGPL\x01\x01\x00\x00\xff\xff\x00\x00", cuts=[], preauth=True)  # 64 KiB zstd
def test_frame_decoder_ends_in_frames_or_a_protocol_error(data: bytes, cuts: list[int],
                                                          preauth: bool) -> None:
    frames_property(data, cuts, preauth)


@pytest.mark.slow
@LONG
@given(data=streams(), cuts=st.lists(st.integers(1, 64), max_size=8), preauth=st.booleans())
def test_frame_decoder_long(data: bytes, cuts: list[int], preauth: bool) -> None:
    frames_property(data, cuts, preauth)


# -- the message decoder -----------------------------------------------------------------------


def decode_property(body: bytes) -> Message | None:
    try:
        msg = bounded(lambda: decode(body), len(body), 1 << 20)
    except PeerProtocolError:
        return None
    assert decode(msg.encode()) == msg  # what was accepted is exactly a message
    return msg  # type: ignore[no-any-return]


@QUICK
@given(body=bodies())
@example(body=msgpack.packb([8, "v1", 16, [0] * 100_000]))  # a list past the field bound
@example(body=b"\x92\x07\xdd\x00\x03\xa9\x80" + bytes(600))  # declares 240 K, holds 600
@example(body=msgpack.packb([1, 2, "a", "v", "0b7e3a52-8f3c-4c4e-9a51-2f1d0c6a9e10", 1,
                             "dr", [], 1, bytes(32), False, [16, [1] * 5000]]))
def test_message_decoder_ends_in_a_message_or_a_protocol_error(body: bytes) -> None:
    decode_property(body)


@pytest.mark.slow
@LONG
@given(body=bodies())
def test_message_decoder_long(body: bytes) -> None:
    decode_property(body)


# -- the heartbeat decoder ---------------------------------------------------------------------


def sealed(payload: bytes) -> bytes:
    """A datagram with a valid MAC around ``payload``: the fuzzed bytes reach the body
    decoder (what a peer holding the key could send)."""
    head = MAGIC + payload
    return head + hmac.new(KEY, head, hashlib.sha256).digest()[:MAC_SIZE]


@st.composite
def beats(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=128))
    if kind == 3:
        return sealed(draw(st.binary(max_size=128)))
    fields = [2, draw(st.one_of(st.text(max_size=8), JUNK)),
              draw(st.one_of(st.binary(min_size=16, max_size=16), JUNK)),
              draw(st.one_of(st.integers(0, 2**63), JUNK)),
              draw(st.one_of(st.dictionaries(st.sampled_from(
                  ["st", "e", "p", "ve", "vf", "sv", "c", "ca", "de", "pc", "pv", "sd", "o",
                   "h", "d", "ec", "se", "sy"]), JUNK, max_size=18), JUNK))]
    if kind == 2:
        fields = draw(st.lists(JUNK, max_size=6))
    return sealed(bytes(msgpack.packb(fields)))


def beat_property(data: bytes) -> None:
    reason = None
    try:
        bounded(lambda: unseal(KEY, data), len(data), 1 << 20)
    except BadBeat as e:
        reason = e.reason
    assert reason in (None, "size", "magic", "mac", "malformed", "version")


@QUICK
@given(data=beats())
# Found by this test: a map with an array for a key raised TypeError out of unseal().
@example(data=sealed(b"\x81\x91\x01\x01"))
@example(data=sealed(msgpack.packb([2, "a", bytes(16), 1, {"ec": {"x": [b"", 0, 0, 0]}}])))
def test_heartbeat_decoder_ends_in_a_beat_or_bad_beat(data: bytes) -> None:
    beat_property(data)


@QUICK
@given(body=JUNK)
def test_heartbeat_body_decoder_ends_in_a_body_or_bad_beat(body: Any) -> None:
    with pytest.raises(BadBeat) if not isinstance(body, dict) else _maybe(BadBeat):
        body_from_wire(body)


class _maybe:
    """Like pytest.raises, but the call may also succeed."""

    def __init__(self, exc: type[BaseException]) -> None:
        self.exc = exc

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, *_: Any) -> bool:
        return et is not None and issubclass(et, self.exc)


@pytest.mark.slow
@LONG
@given(data=beats())
def test_heartbeat_decoder_long(data: bytes) -> None:
    beat_property(data)
