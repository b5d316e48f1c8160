"""What both ends of a peerlink handshake share (PROTOCOL.md): a generation history on the
wire and back, a replica's own history, and the check of the message expected next."""

from __future__ import annotations

from typing import Any

from blockstore.generations import Generation as BGeneration
from blockstore.generations import History, load_history
from blockstore.meta import read_json
from blockstore.peers import UPSTREAM_FILE, UPSTREAM_KIND, UPSTREAM_VERSION
from blockstore.volume import VolumeInfo

from .errors import PeerProtocolError, PeerRefused
from .messages import Generation, Message, Refuse


def expect(msg: Message, cls: type[Any], where: str) -> None:
    """Raise PeerRefused for a Refuse, PeerProtocolError for anything but ``cls``."""
    if isinstance(msg, Refuse):
        raise PeerRefused(msg.reason)
    if not isinstance(msg, cls):
        raise PeerProtocolError(
            f"expected {cls.__name__} {where}, got {type(msg).__name__}")


def replica_history(info: VolumeInfo) -> History:
    """A replica's history as its receiver sees it, for a reader in the same process
    (a cascading sender): the upstream binding gives the logical uuid."""
    path = info.path / UPSTREAM_FILE
    up = (str(read_json(path, UPSTREAM_KIND, UPSTREAM_VERSION)["upstream_uuid"])
          if path.exists() else None)
    return load_history(info.path, info.uuid, up)


def wire_generations(history: History) -> tuple[Generation, ...]:
    return tuple(Generation(g.gen_id, g.start_seq) for g in history.generations)


def wire_epochs(history: History) -> tuple[int, ...]:
    return tuple(g.epoch for g in history.generations)


def from_wire(gens: tuple[Generation, ...], epochs: tuple[int, ...] | None
              ) -> tuple[BGeneration, ...]:
    """A peer's history from its Hello (epoch 0 where an older peer sent none)."""
    eps = epochs if epochs is not None else (0,) * len(gens)
    return tuple(BGeneration(g.gen_id, g.start_seq, e) for g, e in zip(gens, eps, strict=True))
