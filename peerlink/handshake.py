"""What both ends of a peerlink handshake share (PROTOCOL.md): a generation history on the
wire and back, a replica's own history, and the check of the message expected next."""

from __future__ import annotations

from typing import Any

from blockstore.generations import History, load_history
from blockstore.meta import read_json
from blockstore.peers import UPSTREAM_FILE, UPSTREAM_KIND, UPSTREAM_VERSION
from blockstore.volume import VolumeInfo

from .errors import PeerProtocolError, PeerRefused
from .messages import Message, Refuse


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
