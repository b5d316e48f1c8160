"""`nbdgw verify`: ask the node's replication process to compare a volume with a peer's
replica (peerlink.sender.Sender.verify), then wait until the differing extents it found
are resynced (their dirty set settled by the replica's durable acknowledgement)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockstore.peers import DIRTY_VERIFY, read_dirty
from blockstore.volume import find_volume
from nbdgw_common.errors import GatewayError

from .control import ask
from .replication import gate_path

POLL = 0.2


def run_verify(data_dir: Path, volume: str, peer: str, resync: bool,
               timeout: float,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """``progress(done, total)``: extents resynced so far, while waiting for them."""
    info = find_volume(data_dir, volume)
    deadline = time.monotonic() + timeout
    report = ask(gate_path(data_dir), {"op": "verify", "volume": volume, "peer": peer,
                                       "resync": resync}, timeout,
                 who="the replication process", unreachable_hint="is `nbdgw daemon` running?",
                 closed_hint="(it refused the request; see its log)")
    if "error" in report:
        raise GatewayError(f"verify {volume} against {peer}: {report['error']}")
    report["resynced"] = False
    if report.get("resync"):
        total = len(report["differing"])
        while left := sum(len(d.extents) for d in read_dirty(info, peer)
                          if d.reason == DIRTY_VERIFY):
            if progress is not None:
                progress(max(0, total - left), total)
            if time.monotonic() > deadline:
                raise GatewayError(f"verify {volume}: the resync of {len(report['differing'])} "
                                   f"extent(s) to {peer} did not finish in {timeout:g} s "
                                   "(it continues in the background; see nbdgw status)")
            time.sleep(POLL)
        report["resynced"] = True
    return report
