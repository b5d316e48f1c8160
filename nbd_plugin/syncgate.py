"""The plugin's side of sync replication: after a FLUSH (or a FUA write) is durable
locally, ask the node's peerlink process (gateway/replication.py, the sync gate) to
confirm that every synchronous peer holds the volume's journal through that seq.

The answer waits for the peers' acks; a peer silent for its ``sync_timeout`` degrades to
async in peerlink and the answer comes without it.  If peerlink itself cannot be reached
(not started yet, restarting), the gate waits up to ``timeout`` for it, once; after that
it is *down*: requests complete at local durability (async) and each later request tries
one quick reconnect, so sync resumes as soon as peerlink is back.  Both transitions are
logged.  nbdkit serializes requests (SERIALIZE_ALL_REQUESTS), so one connection suffices.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import structlog

log = structlog.get_logger(component="nbd_plugin")

RECONNECT_POLL = 0.05


class SyncGate:
    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.rfile: object | None = None
        self.down_since: float | None = None
        self.degraded: frozenset[str] = frozenset()

    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.path))
        except OSError:
            s.close()
            raise
        # The server answers within the peers' sync_timeout; allow it that plus margin.
        s.settimeout(self.timeout + 5.0)
        self.sock = s
        self.rfile = s.makefile("rb")

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.rfile = None

    def _ask(self, volume: str, seq: int) -> dict[str, object]:
        if self.sock is None:
            self._connect()
        assert self.sock is not None and self.rfile is not None
        self.sock.sendall(json.dumps({"volume": volume, "seq": seq}).encode() + b"\n")
        line = self.rfile.readline()  # type: ignore[attr-defined]
        if not line:
            raise ConnectionResetError("sync gate closed the connection")
        reply: dict[str, object] = json.loads(line)
        return reply

    def wait(self, volume: str, seq: int) -> bool:
        """True when every sync peer has ``seq`` durably; False when the write is
        acknowledged without one (degraded peer, or peerlink unreachable)."""
        deadline = time.monotonic() + (self.timeout if self.down_since is None else 0.0)
        while True:
            try:
                reply = self._ask(volume, seq)
                break
            except (OSError, ValueError) as e:
                self._close()
                if time.monotonic() >= deadline:
                    if self.down_since is None:
                        self.down_since = time.time()
                        log.error("sync_gate_unreachable", path=str(self.path),
                                  error=str(e), note="FLUSH/FUA complete at local "
                                  "durability until peerlink answers again")
                    return False
                time.sleep(RECONNECT_POLL)
        if self.down_since is not None:
            log.warning("sync_gate_back", down_s=round(time.time() - self.down_since, 1))
            self.down_since = None
        degraded = frozenset(str(p) for p in reply.get("degraded", []))  # type: ignore[attr-defined]
        if degraded != self.degraded:
            log.warning("sync_peers_changed", degraded=sorted(degraded))
            self.degraded = degraded
        return bool(reply.get("ok"))

    def close(self) -> None:
        self._close()
