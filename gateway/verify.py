"""`nbdgw verify`: ask the node's replication process to compare a volume with a peer's
replica (peerlink.sender.Sender.verify), then wait until the differing extents it found
are resynced (their dirty set settled by the replica's durable acknowledgement)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from blockstore.peers import DIRTY_VERIFY, read_dirty
from blockstore.volume import find_volume

from .errors import GatewayError
from .replication import gate_path

POLL = 0.2


def _ask(path: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except OSError as e:
            raise GatewayError(f"cannot reach the replication process at {path} "
                               f"({e.strerror or e}): is `nbdgw daemon` running?") from None
        s.sendall(json.dumps(request).encode() + b"\n")
        line = s.makefile("rb").readline()
    except TimeoutError:
        raise GatewayError(f"no answer from the replication process in {timeout:g} s") from None
    finally:
        s.close()
    if not line:
        raise GatewayError("the replication process closed the connection (it refused the "
                           "request; see its log)")
    reply: dict[str, Any] = json.loads(line)
    return reply


def run_verify(data_dir: Path, volume: str, peer: str, resync: bool,
               timeout: float) -> dict[str, Any]:
    info = find_volume(data_dir, volume)
    deadline = time.monotonic() + timeout
    report = _ask(gate_path(data_dir), {"op": "verify", "volume": volume, "peer": peer,
                                        "resync": resync}, timeout)
    if "error" in report:
        raise GatewayError(f"verify {volume} against {peer}: {report['error']}")
    report["resynced"] = False
    if report.get("resync"):
        while any(d.reason == DIRTY_VERIFY for d in read_dirty(info, peer)):
            if time.monotonic() > deadline:
                raise GatewayError(f"verify {volume}: the resync of {len(report['differing'])} "
                                   f"extent(s) to {peer} did not finish in {timeout:g} s "
                                   "(it continues in the background; see nbdgw status)")
            time.sleep(POLL)
        report["resynced"] = True
    return report
