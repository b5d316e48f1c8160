"""Handshake authentication: a good proof passes; a wrong secret, a reflected proof, or any
tampered transcript field fails with the exact message.  The handshake itself, both ends
against each other, is tested in test_peerlink_session.py.
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
from peerlink.messages import (
    PROTO_VERSION,
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
                                   "receiver_nonce", "realm"])
def test_tampered_transcript_fails(field: str) -> None:
    """A proof is bound to every transcript field: another nonce (a replay on a new
    connection), node name or version makes it fail."""
    other: dict[str, Any] = {"proto_version": T.proto_version + 1, "sender": "dc9",
                             "receiver": "dr1", "sender_nonce": b"S" * NONCE_SIZE,
                             "receiver_nonce": b"R" * NONCE_SIZE, "realm": "g2"}
    tampered = T._replace(**{field: other[field]})
    p = proof(SECRET, Prover.SENDER, tampered)
    assert p != proof(SECRET, Prover.SENDER, T)
    assert refusal(SECRET, Prover.SENDER, T, p) == SENDER_FAILED


def test_a_proof_for_one_group_fails_in_another() -> None:
    """A session routed through a node's shared port (front.py) is proved for a group:
    routed to another group's receiver (a lying preamble), the proof fails; and a
    group-less transcript (a port of the group's own) is the one from before groups."""
    g1, g2 = T._replace(realm="g1"), T._replace(realm="g2")
    assert refusal(SECRET, Prover.SENDER, g2, proof(SECRET, Prover.SENDER, g1)) == (
        SENDER_FAILED)
    assert refusal(SECRET, Prover.SENDER, T, proof(SECRET, Prover.SENDER, g1)) == (
        SENDER_FAILED)
    assert proof(SECRET, Prover.SENDER, T._replace(realm="")) == proof(
        SECRET, Prover.SENDER, Transcript(*T[:5]))


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
