"""The peerlink exception hierarchy.

A peer's fault (a bad frame, a wrong version, a failed proof, an unexpected message) is a
``PeerProtocolError``: the connection that carried it is closed and nothing from it is
applied.  Local misuse (a bad argument, a journal that skips a sequence number) is a
different class, so a bug on this node is never mistaken for a misbehaving peer.
"""

from __future__ import annotations


class PeerlinkError(Exception):
    """Base class of every error raised by peerlink."""


class PeerProtocolError(PeerlinkError):
    """The peer sent something this node must not accept; close the connection."""


class PeerAuthError(PeerProtocolError):
    """The peer could not prove knowledge of the shared secret."""


class Fenced(PeerProtocolError):
    """A Batch carries an epoch older than the one this node follows: its sender was
    deposed (another node became primary since); nothing of it is applied."""


class PeerRefused(PeerlinkError):
    """The peer sent ``Refuse``: it will not replicate with this node, and says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"peer refused: {reason}")


class SequenceGap(PeerlinkError, ValueError):
    """Local misuse: records fed to a batch builder skip or repeat a sequence number."""
