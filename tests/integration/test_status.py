"""`nbdgw status` on a primary with a real replication link: in sync, then the lag while
the replica is away (records and bytes: the data-loss window), on both ends."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import run_nbdgw
from tests.integration.peerenv import Env

MiB = 1 << 20


def status(data_dir: Path) -> dict:
    return json.loads(run_nbdgw("status", "--json", "--data-dir", str(data_dir)).stdout)


def test_status_in_sync_then_lagging(env: Env) -> None:
    fresh = status(env.primary)
    assert fresh["version"] == 1
    (v,) = fresh["volumes"]
    assert (v["name"], v["role"], v["in_use"], v["peers"]) == ("v1", "primary", True, [])
    text = run_nbdgw("status", "--data-dir", str(env.primary)).stdout
    assert "  no peer has connected yet" in text

    rx = env.receiver()
    tx = env.sender(rx.port)
    h = env.served.connect("v1")
    h.pwrite(os.urandom(4 * MiB), 0)
    h.flush()
    last = env.wait_caught_up()
    (v,) = status(env.primary)["volumes"]
    (p,) = v["peers"]
    assert v["journal_last_seq"] == last
    assert (p["name"], p["acked_seq"], p["lag_records"], p["lag_bytes"], p["state"]) == (
        "r1", last, 0, 0, "in sync")

    assert rx.stop() == 0  # the replica goes away; the primary keeps taking writes
    chunks = [os.urandom(256 * 1024) for _ in range(4)]
    for i, c in enumerate(chunks):
        h.pwrite(c, (8 << 20) + i * len(c))
    h.flush()
    (v,) = status(env.primary)["volumes"]
    (p,) = v["peers"]
    assert p["lag_records"] == v["journal_last_seq"] - last >= 4
    assert p["lag_bytes"] >= sum(len(c) for c in chunks)
    # The sender runs but its peer is gone: the link is down, the lag grows in seconds.
    assert p["state"] == "disconnected" and p["sender"] == "running" and p["mode"] == "async"
    assert p["lag_seconds"] is not None and p["lag_seconds"] >= 0
    text = run_nbdgw("status", "--data-dir", str(env.primary)).stdout
    assert (f"  peer r1 (async): disconnected, acked seq {last}, "
            f"lag {p['lag_records']} records") in text
    assert tx.stop() == 0
    (p,) = status(env.primary)["volumes"][0]["peers"]
    assert (p["state"], p["sender"]) == ("disconnected", "stopped")

    (rv,) = status(env.replica)["volumes"]
    assert (rv["role"], rv["inconsistent"], rv["upstream_seq"]) == ("replica", False, last)


def test_primary_and_replica_agree_once_idle(env: Env) -> None:
    """The replica shows its source, link state and applied seq (before: only the seq of
    its last state save, 191 against the primary's acked 306), equal to what the primary
    shows as acknowledged; and no clients (a replica is not served)."""
    import time

    rx = env.receiver()
    tx = env.sender(rx.port)
    h = env.served.connect("v1")
    for i in range(50):
        h.pwrite(os.urandom(64 * 1024), i * 64 * 1024)
    h.flush()
    last = env.wait_caught_up()
    deadline = time.monotonic() + 10
    while True:  # the receiver's live file is rewritten every second
        (rv,) = status(env.replica)["volumes"]
        u = rv["upstream"]
        if u["receiver"] == "running" and u["applied_seq"] == last:
            break
        assert time.monotonic() < deadline, u
        time.sleep(0.2)
    (pv,) = status(env.primary)["volumes"]
    (p,) = pv["peers"]
    assert p["acked_seq"] == u["applied_seq"] == u["received_seq"] == last
    assert (u["state"], u["lag_records"], u["source"]) == ("streaming", 0, "p1")
    assert rv["clients"] == {"nbd": 0, "iscsi": 0} and pv["upstream"] is None
    text = run_nbdgw("status", "--data-dir", str(env.replica)).stdout
    assert f"applied upstream seq {last}, from p1 (streaming, received {last}, lag 0 " \
        "records)" in text
    assert tx.stop() == 0
    assert rx.stop() == 0
    (rv,) = status(env.replica)["volumes"]
    assert (rv["upstream"]["state"], rv["upstream"]["receiver"]) == ("stopped", "stopped")
