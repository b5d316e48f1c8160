"""Snapshots are journal records: a primary fanned out to a secondary and a DR replica
(real peerlink sender and receiver processes) takes snapshots and deletes one while a
writer runs; both replicas end with the same snapshots, bit for bit, and a receiver
killed with -9 in the middle still gets them all."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from blockstore.volume import Volume
from tests.conftest import run_nbdgw
from tests.integration.peerenv import Env, Writer


def snapshots_by_hash(data_dir: Path) -> dict[str, str]:
    vol = Volume.open(data_dir, "v1")
    try:
        out = {}
        for r in vol.snapshot_list():
            buf = bytearray(vol.size)
            vol.snapshot_view(r["name"]).read_into(buf, 0)
            out[r["name"]] = hashlib.sha256(buf).hexdigest()
        out["(live)"] = vol.checksum()
        return out
    finally:
        vol.close()


def acked(e: Env, peer: str) -> int:
    path = e.primary / f"volumes/v1/peers/{peer}.json"
    return int(json.loads(path.read_text())["acked_seq"]) if path.exists() else -1


def test_snapshots_reach_secondary_and_dr_identical(env: Env, tmp_path: Path
                                                     ) -> None:
    dr = tmp_path / "dr"
    dr.mkdir()
    run_nbdgw("volume", "create", "v1", "--size", "64M", "--replica", "--data-dir", str(dr))
    rx_dc = env.receiver(node="dc")
    rx_dr = env.receiver(data_dir=dr, node="dr")
    env.sender(rx_dc.port, peer="dc")
    env.sender(rx_dr.port, peer="dr")
    w = Writer(env.served, seed=66, pause=0.001)
    w.start()
    dd = str(env.primary)
    try:
        for i in range(6):
            w.halt.wait(0.3)
            run_nbdgw("snapshot", "create", "v1", "--name", f"s{i}", "--data-dir", dd)
            if i == 3:
                rx_dr.kill9()  # DR goes away mid-stream and comes back
                rx_dr = env.receiver(rx_dr.port, data_dir=dr, node="dr")
        run_nbdgw("snapshot", "delete", "v1", "s2", "--data-dir", dd)
    finally:
        w.stop()
    last = env.last_seq()
    for peer in ("dc", "dr"):
        _wait(env, peer, last)
    for p in env.procs:
        if p.proc.poll() is None:
            assert p.stop() == 0
    env.served.stop()
    primary = snapshots_by_hash(env.primary)
    assert sorted(primary) == ["(live)", "s0", "s1", "s3", "s4", "s5"]
    assert snapshots_by_hash(env.replica) == primary
    assert snapshots_by_hash(dr) == primary
    rows: list[dict[str, Any]] = json.loads(run_nbdgw(
        "snapshot", "list", "v1", "--json", "--data-dir", str(dr)).stdout)
    assert [r["name"] for r in rows] == ["s0", "s1", "s3", "s4", "s5"]


def _wait(e: Env, peer: str, last: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while acked(e, peer) != last:
        assert time.monotonic() < deadline, f"{peer} acked {acked(e, peer)} of {last}"
        time.sleep(0.05)
