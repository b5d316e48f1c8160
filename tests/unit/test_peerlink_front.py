"""The route preamble of a node's shared peerlink port (peerlink/front.py) against hostile
input: it names a group or is refused at the first byte that cannot belong to one, and
the parser never asks for a byte past the newline (those are the group's)."""

from __future__ import annotations

import pytest

from peerlink.front import MAX_GROUP, PREFIX, PreambleError, PreambleParser, preamble


def parse(data: bytes) -> str | None:
    """Feed ``data`` as a front reads it: never more than ``want()`` at a time."""
    p = PreambleParser()
    i = 0
    while i < len(data):
        n = p.want()
        got = p.feed(data[i:i + n])
        i += n
        if got is not None:
            assert i == len(data), "the parser asked for bytes past the newline"
            return got
    return None


def test_a_preamble_names_its_group() -> None:
    assert preamble("g1") == b"NBDGW-GROUP g1\n"
    assert parse(preamble("g1")) == "g1"
    longest = "a" + "-9" * 15 + "z"
    assert len(longest) == MAX_GROUP
    assert parse(preamble(longest)) == longest


def test_byte_by_byte_and_partial() -> None:
    p = PreambleParser()
    data = preamble("site-7")
    for b in data[:-1]:
        assert p.feed(bytes([b])) is None
    assert p.feed(b"\n") == "site-7"


def test_the_parser_never_reads_past_the_newline() -> None:
    """What follows the preamble (a TLS ClientHello, a peerlink frame) is the group's:
    after the prefix the parser wants one byte at a time."""
    p = PreambleParser()
    assert p.want() == len(PREFIX)
    p.feed(PREFIX[:5])
    assert p.want() == len(PREFIX) - 5
    p.feed(PREFIX[5:])
    assert p.want() == 1
    with pytest.raises(ValueError, match="fed 2 bytes, 1 wanted"):
        p.feed(b"g\n")


@pytest.mark.parametrize(("data", "message"), [
    (b"GET / HTTP/1.1\r\n", r"not a route preamble \(starts b'G'\)"),
    (b"\x16\x03\x01\x02\x00", r"not a route preamble \(starts b'\\x16'\)"),  # TLS hello
    (b"NGPL\x01\x00", r"not a route preamble \(starts b'NG'\)"),  # a peerlink frame
    (b"NBDGW-GROUP\n", r"not a route preamble"),
    (b"nbdgw-group g1\n", r"not a route preamble"),
    (b"NBDGW-GROUP \n", r"bad group name b''"),
    (b"NBDGW-GROUP G1\n", r"bad group name b'G1'"),
    (b"NBDGW-GROUP -g\n", r"bad group name b'-g'"),
    (b"NBDGW-GROUP g1\r\n", r"bad group name b'g1\\r'"),
    (b"NBDGW-GROUP g\x00\n", r"bad group name"),
    (b"NBDGW-GROUP g\xc3\xa9\n", r"bad group name"),
    (b"NBDGW-GROUP ../g1\n", r"bad group name"),
    (b"NBDGW-GROUP " + b"a" * (MAX_GROUP + 1), rf"group name over {MAX_GROUP} bytes"),
])
def test_hostile_input_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(PreambleError, match=message):
        parse(data)


def test_an_endless_name_is_refused_at_its_bound() -> None:
    """A peer that streams name bytes forever is refused after MAX_GROUP + 1 of them:
    nothing grows without bound."""
    p = PreambleParser()
    p.feed(PREFIX)
    for _ in range(MAX_GROUP):
        assert p.feed(b"a") is None
    with pytest.raises(PreambleError, match="over"):
        p.feed(b"a")
    assert len(p.buf) == len(PREFIX) + MAX_GROUP + 1


def test_a_sender_cannot_route_a_name_the_front_refuses() -> None:
    with pytest.raises(ValueError, match="cannot be routed"):
        preamble("G1")
