"""What an operator asked of each peer link: ``<data_dir>/peer-admin.json``.

``active`` (the default), ``paused`` (the link stays up, nothing is shipped: the
journal buffers, and past its cap the peer falls back to a dirty-extent resync, as for
a slow link) or ``disconnected`` (no session; the sender does not reconnect until
``connect``).  Kept on disk so that it survives restarts of peerlink and the daemon;
`nbdgw peer pause|resume|disconnect|connect` writes it and tells a running peerlink.
A paused or disconnected *sync* peer stalls the writes that wait for it for its
``sync_timeout``; then it is outdated (it cannot take over until it has caught up) and
writes go on without it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

from blockstore.errors import FormatError
from blockstore.meta import read_json, write_json

FILE: Final = "peer-admin.json"
KIND: Final = "peer-admin"
VERSION: Final = 1
STATES: Final = ("active", "paused", "disconnected")
ACTIONS: Final = {"pause": "paused", "resume": "active", "disconnect": "disconnected",
                  "connect": "active"}


def read(data_dir: Path) -> dict[str, str]:
    """peer -> its admin state (peers not listed are active)."""
    path = data_dir / FILE
    if not path.exists():
        return {}
    rec = read_json(path, KIND, VERSION)
    peers = rec.get("peers")
    if not isinstance(peers, dict):
        raise FormatError(f"{path}: expected a map of peers")
    out = {}
    for peer, entry in peers.items():
        state = entry.get("state") if isinstance(entry, dict) else None
        if state not in STATES:
            raise FormatError(f"{path}: peer {peer}: state {state!r} is not one of "
                              f"{', '.join(STATES)}")
        out[str(peer)] = str(state)
    return out


def state_of(data_dir: Path, peer: str) -> str:
    try:
        return read(data_dir).get(peer, "active")
    except (FormatError, OSError):
        return "active"  # an unreadable file must not stop replication; status shows it


def apply(data_dir: Path, peer: str, action: str) -> str:
    """Record ``action`` (pause, resume, disconnect, connect) for ``peer``; return the
    new state."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r} (expected {', '.join(ACTIONS)})")
    state = ACTIONS[action]
    peers: dict[str, dict[str, object]]
    try:
        peers = {p: {"state": s} for p, s in read(data_dir).items()}
    except FormatError:
        peers = {}
    if state == "active":
        peers.pop(peer, None)
    else:
        peers[peer] = {"state": state, "since": time.time()}
    write_json(data_dir / FILE, {"kind": KIND, "version": VERSION, "peers": peers})
    return state
