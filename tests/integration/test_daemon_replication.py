"""`nbdgw daemon` on three nodes from their configs (loopback, one port each): fan-out and
cascade replication, sync mode with its degrade timeout, status per peer."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from tests.integration.cluster import (
    SIZE,
    connect,
    in_sync,
    peer_state,
    wait_for,
    write_pattern,
)


def test_fanout_from_config(make_cluster: Any) -> None:
    main, dc, dr = make_cluster("fanout")
    for n in (dc, dr, main):
        n.start()
    h = connect(main)
    write_pattern(h, 200, 1)
    h.shutdown()
    wait_for(lambda: in_sync(main, "dc") and in_sync(main, "dr"), 60, "both peers in sync")
    for n in (main, dc, dr):
        n.stop()
    assert main.checksum() == dc.checksum() == dr.checksum()
    st = peer_state(main, "dc")
    assert st["mode"] == "async" and st["acked_seq"] > 0


def test_cascade_primary_to_secondary_to_dr(make_cluster: Any) -> None:
    main, dc, dr = make_cluster("cascade")
    for n in (dc, dr, main):
        n.start()
    h = connect(main)
    write_pattern(h, 300, 7)
    h.shutdown()
    wait_for(lambda: in_sync(main, "dc"), 60, "dc in sync with main")
    wait_for(lambda: in_sync(dc, "dr"), 60, "dr in sync with dc")
    # The primary never talks to DR under cascade: it has no record of it.
    assert peer_state(main, "dr") == {}
    for n in (main, dc, dr):
        n.stop()
    assert main.checksum() == dc.checksum() == dr.checksum()


def test_sync_peer_flush_waits_then_degrades_and_recovers(make_cluster: Any) -> None:
    main, dc, dr = make_cluster("fanout", modes={"dc": "sync"}, sync_timeout=2.0)
    for n in (dc, dr, main):
        n.start()
    h = connect(main)
    write_pattern(h, 20, 3)  # sync: the flush returned, so dc has it durable
    st = peer_state(main, "dc")
    assert st["mode"] == "sync" and st["state"] in ("streaming", "in sync")
    assert st["acked_seq"] >= main.status()["volumes"][0]["journal_last_seq"]

    dc.stop(signal.SIGKILL)  # the sync peer is gone
    t0 = time.monotonic()
    # Every write waits up to sync_timeout for dc; with failover.auto off (no failover
    # core to outdate it) it then degrades on its own and the write completes.
    h.pwrite(b"x" * 4096, 0)
    h.flush()
    waited = time.monotonic() - t0
    assert 1.0 <= waited < 10.0, waited
    wait_for(lambda: peer_state(main, "dc").get("state") == "degraded", 10, "dc degraded")
    assert "sync_degraded" in main.log_text()
    t0 = time.monotonic()
    h.pwrite(b"y" * 4096, 4096)
    h.flush()  # degraded: no wait
    assert time.monotonic() - t0 < 1.0

    dc.start()
    wait_for(lambda: peer_state(main, "dc").get("state") in ("streaming", "in sync")
             and peer_state(main, "dc").get("lag_records") == 0, 60, "dc back in sync")
    wait_for(lambda: "sync_resumed" in main.log_text(), 10, "sync_resumed logged")
    write_pattern(h, 10, 9)
    st = peer_state(main, "dc")
    assert st["acked_seq"] >= main.status()["volumes"][0]["journal_last_seq"]
    h.shutdown()
    for n in (main, dc, dr):
        n.stop()
    assert main.checksum() == dc.checksum()


def test_cascade_survives_power_cut_of_the_secondary(make_cluster: Any) -> None:
    """A writer runs throughout; the middle of the cascade loses power twice.  Both
    replicas end identical to the primary."""
    import threading

    main, dc, dr = make_cluster("cascade")
    for n in (dc, dr, main):
        n.start()
    h = connect(main)
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        i = 0
        try:
            while not done.is_set():
                h.pwrite(os.urandom(4096) * 4, (i * 16384 * 13) % SIZE)
                if i % 50 == 0:
                    h.flush()
                i += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(2):
            time.sleep(2.0)
            dc.stop(signal.SIGKILL)
            time.sleep(1.0)
            dc.start()
        time.sleep(2.0)
    finally:
        done.set()
        t.join(30)
    assert not errors
    h.flush()
    h.shutdown()
    wait_for(lambda: in_sync(main, "dc"), 90, "dc in sync with main")
    wait_for(lambda: in_sync(dc, "dr"), 90, "dr in sync with dc")
    for n in (main, dc, dr):
        n.stop()
    assert main.checksum() == dc.checksum() == dr.checksum()


def test_verify_finds_and_repairs_silent_corruption_under_writes(make_cluster: Any) -> None:
    import threading

    main, dc, dr = make_cluster("fanout")
    for n in (dc, dr, main):
        n.start()
    h = connect(main)
    write_pattern(h, 100, 5)
    wait_for(lambda: in_sync(main, "dc"), 60, "dc in sync")

    # A writer keeps going during every verify: no false alarm, nothing missed.
    done = threading.Event()

    def writer() -> None:
        i = 0
        while not done.is_set():
            h.pwrite(os.urandom(8192), ((i * 7919) % 1000) * 8192)
            i += 1
            if i % 20 == 0:
                h.flush()

    t = threading.Thread(target=writer)
    t.start()
    try:
        clean = json.loads(main.nbdgw("verify", "v1", "--peer", "dc", "--json").stdout)
        assert clean["differing"] == [] and clean["extents"] == SIZE >> 20

        # Silent corruption on the replica's disk (bit rot, a bad controller).
        dc.stop()
        with open(dc.data / "volumes" / "v1" / "store", "r+b") as f:
            f.seek((40 << 20) + 12345)
            old = f.read(1)
            f.seek((40 << 20) + 12345)
            f.write(bytes([old[0] ^ 0xFF]))
        dc.start()
        wait_for(lambda: peer_state(main, "dc").get("state") in ("streaming", "in sync"), 60,
                 "dc streaming again")
        p = main.nbdgw("verify", "v1", "--peer", "dc", check=False)
        assert p.returncode == 0, p.stderr
        assert "64 extents of 1.0 MiB compared" in p.stdout or "extents of" in p.stdout
        assert f"  differs: bytes {40 << 20}..{(41 << 20) - 1}" in p.stdout
        assert "  resynced 1 extent(s); the replica now matches" in p.stdout
        again = json.loads(main.nbdgw("verify", "v1", "--peer", "dc", "--json").stdout)
        assert again["differing"] == []
    finally:
        done.set()
        t.join(30)
    h.flush()
    h.shutdown()
    bad = main.nbdgw("verify", "v1", "--peer", "nobody", check=False)
    assert bad.returncode == 1
    assert ("verify v1 against nobody: this node does not ship volume v1 to peer nobody "
            "(it ships: v1->dc, v1->dr)") in bad.stderr
    wait_for(lambda: in_sync(main, "dc"), 60, "dc in sync")
    for n in (main, dc, dr):
        n.stop()
    assert main.checksum() == dc.checksum()
