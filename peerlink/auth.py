"""HMAC-SHA256 challenge-response on a shared secret (pure functions).

Each side puts a fresh random nonce in its first message (the sender's ``Intro``, the
receiver's ``Challenge``).  Each then proves knowledge of the
secret with an HMAC over the whole handshake transcript: protocol version, both node
names, both nonces, and a label saying which side is proving (the data sender or the
receiver).  So a proof is good for one connection only (the other side's nonce is fresh),
cannot be replayed on another, and cannot be reflected back to the side that made it (the
label differs).  A session routed through a node's shared port (front.py) also covers
the group it is for (``realm``): a proof made for one group fails in another's receiver.
Comparison is constant-time.

What it does not do: protect the stream after the handshake from an active
man-in-the-middle (frames carry a CRC, not a MAC).  Use TLS where that matters.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import struct
from typing import Final, NamedTuple

from .errors import PeerAuthError

NONCE_SIZE: Final = 32
PROOF_SIZE: Final = hashlib.sha256().digest_size  # 32
MIN_SECRET: Final = 16
_DOMAIN: Final = b"nbdgw peerlink auth v1\0"


class Prover(enum.Enum):
    """Which side of a connection a proof comes from."""

    SENDER = b"sender"  # the side that ships the journal (it connects)
    RECEIVER = b"receiver"  # the replica side (it accepts)


class Transcript(NamedTuple):
    """What both sides know after Intro and Challenge; both proofs cover all of it."""

    proto_version: int
    sender: str
    receiver: str
    sender_nonce: bytes
    receiver_nonce: bytes
    # The volume group the session is for, when it came through a node's shared port
    # (front.py): the receiver's own group, so a connection routed to another group's
    # receiver fails its proof.  Empty: the transcript is the one before groups.
    realm: str = ""


def make_nonce() -> bytes:
    """A fresh random nonce for this side's Intro or Challenge."""
    return secrets.token_bytes(NONCE_SIZE)


def _field(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b  # length-prefixed: no two transcripts collide


def proof(secret: bytes, prover: Prover, t: Transcript) -> bytes:
    """Return the 32-byte proof that ``prover`` knows ``secret`` for this handshake."""
    if len(secret) < MIN_SECRET:
        raise ValueError(f"shared secret must be at least {MIN_SECRET} bytes, got {len(secret)}")
    for name, nonce in (("sender_nonce", t.sender_nonce), ("receiver_nonce", t.receiver_nonce)):
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"{name} must be {NONCE_SIZE} bytes, got {len(nonce)}")
    msg = b"".join((
        _DOMAIN, _field(prover.value), struct.pack("<I", t.proto_version),
        _field(t.sender.encode()), _field(t.receiver.encode()),
        _field(t.sender_nonce), _field(t.receiver_nonce),
        b"realm\0" + _field(t.realm.encode()) if t.realm else b"",
    ))
    return hmac.new(secret, msg, hashlib.sha256).digest()


def verify(secret: bytes, prover: Prover, t: Transcript, presented: bytes) -> None:
    """Raise PeerAuthError unless ``presented`` is ``prover``'s proof for ``t``."""
    if not hmac.compare_digest(proof(secret, prover, t), presented):
        peer = t.sender if prover is Prover.SENDER else t.receiver
        raise PeerAuthError(
            f"peer authentication failed: the {prover.value.decode()} proof from {peer!r} "
            "does not match (wrong shared secret, or a proof made for another handshake)")
