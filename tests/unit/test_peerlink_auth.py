"""Handshake authentication: a good proof passes; a wrong secret, a reflected proof, or any
tampered transcript field fails with the exact message; and the whole handshake composes
from the pure pieces (frames, messages, checks, proofs) without a socket.
"""

from __future__ import annotations

from typing import Any

import pytest

from peerlink.auth import (
    MIN_SECRET,
    NONCE_SIZE,
    PROOF_SIZE,
    Prover,
    Transcript,
    make_nonce,
    proof,
    verify,
)
from peerlink.errors import PeerAuthError, PeerProtocolError
from peerlink.frames import NEED_DATA, FrameDecoder, encode_frame
from peerlink.messages import (
    PROTO_VERSION,
    Generation,
    Hello,
    HelloOk,
    Message,
    check_hello,
    check_resume,
    decode,
)

SECRET = b"correct horse battery staple"
T = Transcript(PROTO_VERSION, "dc1", "dc2", b"s" * NONCE_SIZE, b"r" * NONCE_SIZE)
SENDER_FAILED = (
    "peer authentication failed: the sender proof from 'dc1' does not match (wrong shared "
    "secret, or a proof made for another handshake)")
RECEIVER_FAILED = (
    "peer authentication failed: the receiver proof from 'dc2' does not match (wrong shared "
    "secret, or a proof made for another handshake)")


def refusal(secret: bytes, prover: Prover, t: Transcript, presented: bytes) -> str:
    with pytest.raises(PeerAuthError) as ei:
        verify(secret, prover, t, presented)
    return str(ei.value)


def test_good_proofs_verify() -> None:
    for prover in Prover:
        p = proof(SECRET, prover, T)
        assert len(p) == PROOF_SIZE == 32
        assert p == proof(SECRET, prover, T)  # deterministic for one transcript
        verify(SECRET, prover, T, p)
    assert proof(SECRET, Prover.SENDER, T) != proof(SECRET, Prover.RECEIVER, T)


def test_wrong_secret() -> None:
    p = proof(b"not the secret, but long enough", Prover.SENDER, T)
    assert refusal(SECRET, Prover.SENDER, T, p) == SENDER_FAILED


def test_reflected_proof_fails() -> None:
    """The receiver's own proof sent back to it as the sender's does not pass, and the
    other way round."""
    assert refusal(SECRET, Prover.SENDER, T, proof(SECRET, Prover.RECEIVER, T)) == SENDER_FAILED
    assert refusal(SECRET, Prover.RECEIVER, T, proof(SECRET, Prover.SENDER, T)) == (
        RECEIVER_FAILED)


@pytest.mark.parametrize("field", ["proto_version", "sender", "receiver", "sender_nonce",
                                   "receiver_nonce"])
def test_tampered_transcript_fails(field: str) -> None:
    """A proof is bound to every transcript field: another nonce (a replay on a new
    connection), node name or version makes it fail."""
    other: dict[str, Any] = {"proto_version": 2, "sender": "dc9", "receiver": "dr1",
             "sender_nonce": b"S" * NONCE_SIZE, "receiver_nonce": b"R" * NONCE_SIZE}
    tampered = T._replace(**{field: other[field]})
    p = proof(SECRET, Prover.SENDER, tampered)
    assert p != proof(SECRET, Prover.SENDER, T)
    assert refusal(SECRET, Prover.SENDER, T, p) == SENDER_FAILED


def test_fields_are_delimited() -> None:
    """("ab", "c") and ("a", "bc") are different transcripts."""
    a = proof(SECRET, Prover.SENDER, T._replace(sender="ab", receiver="c"))
    b = proof(SECRET, Prover.SENDER, T._replace(sender="a", receiver="bc"))
    assert a != b


def test_malformed_proof_fails() -> None:
    assert refusal(SECRET, Prover.SENDER, T, b"") == SENDER_FAILED
    assert refusal(SECRET, Prover.SENDER, T, proof(SECRET, Prover.SENDER, T)[:31]) == (
        SENDER_FAILED)
    assert issubclass(PeerAuthError, PeerProtocolError)


def test_nonces_are_fresh() -> None:
    nonces = {make_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert {len(n) for n in nonces} == {NONCE_SIZE}


def test_local_misuse() -> None:
    with pytest.raises(ValueError, match=rf"^shared secret must be at least {MIN_SECRET} bytes, "
                                         r"got 15$"):
        proof(b"x" * 15, Prover.SENDER, T)
    with pytest.raises(ValueError, match=r"^receiver_nonce must be 32 bytes, got 3$"):
        proof(SECRET, Prover.SENDER, T._replace(receiver_nonce=b"abc"))


# -- the handshake, composed from the pure pieces --------------------------------------------


class End:
    """One side of an in-memory connection: frames out, frames in, messages decoded."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.peer: End | None = None

    def send(self, msg: Message) -> None:
        assert self.peer is not None
        self.peer.decoder.feed(b"".join(bytes(b) for b in encode_frame(msg.encode(), True)))

    def receive(self) -> Message:
        body = self.decoder.next_frame()
        assert body is not NEED_DATA
        return decode(body)


def hello(node: str, role: str, applied: int) -> Hello:
    return Hello(PROTO_VERSION, node, "v1", "0b7e3a52-8f3c-4c4e-9a51-2f1d0c6a9e10", 1 << 30,
                 role, (Generation(0x1234, 1),), applied, make_nonce())


def run_handshake(sender_secret: bytes, receiver_secret: bytes) -> tuple[int, int]:
    """Sender Hello, receiver Hello, sender HelloOk (+proof), receiver HelloOk (+proof).
    Return the resume seq each side settled on; raise where a side would hang up."""
    s, r = End(), End()
    s.peer, r.peer = r, s
    s_hello, r_hello = hello("dc1", "primary", 900), hello("dc2", "secondary", 640)
    s.send(s_hello)
    got = r.receive()
    assert isinstance(got, Hello)
    assert check_hello(r_hello, got) is None
    r.send(r_hello)
    got = s.receive()
    assert isinstance(got, Hello)
    assert check_hello(s_hello, got) is None
    t = Transcript(PROTO_VERSION, "dc1", "dc2", s_hello.auth_nonce, got.auth_nonce)
    s.send(HelloOk("dc1", got.last_applied_seq + 1, proof(sender_secret, Prover.SENDER, t)))
    ok = r.receive()
    assert isinstance(ok, HelloOk)
    t_r = Transcript(PROTO_VERSION, "dc1", "dc2", s_hello.auth_nonce, r_hello.auth_nonce)
    verify(receiver_secret, Prover.SENDER, t_r, ok.auth_proof)  # before anything is applied
    assert check_resume(r_hello.last_applied_seq, ok.resume_from_seq) is None
    r.send(HelloOk("dc2", ok.resume_from_seq, proof(receiver_secret, Prover.RECEIVER, t_r)))
    back = s.receive()
    assert isinstance(back, HelloOk)
    verify(sender_secret, Prover.RECEIVER, t, back.auth_proof)
    return ok.resume_from_seq, back.resume_from_seq


def test_handshake_resumes_after_the_last_applied_seq() -> None:
    assert run_handshake(SECRET, SECRET) == (641, 641)


def test_handshake_with_a_wrong_secret_fails_at_the_receiver() -> None:
    with pytest.raises(PeerAuthError, match=r"^peer authentication failed: the sender proof "):
        run_handshake(b"an impostor's secret key", SECRET)
