"""The per-peer bandwidth cap with real processes: `nbdgw serve` primary, `python -m
peerlink` sender (`--rate-limit 2M --compress 0`) and receiver on loopback, libnbd writes.

8 MiB of incompressible data at 2 MiB/s (burst 512 KiB) cannot reach the replica in less
than 3.75 s; the same amount without the cap catches up in a fraction of that.  Both end
with the same checksum on primary and replica.
"""

from __future__ import annotations

import os
import time

import nbd
import pytest

from tests.integration.peerenv import Env

MiB = 1 << 20
RATE = 2 * MiB
BURST = RATE // 4  # the default burst for this rate


def write_random(e: Env, start: int, n_mib: int) -> None:
    """n_mib MiB of random (incompressible) data in 1 MiB writes, then a flush."""
    h = nbd.NBD()
    h.connect_uri(e.served.uri("v1"))
    try:
        for i in range(n_mib):
            h.pwrite(os.urandom(MiB), start + i * MiB)
        h.flush()
    finally:
        h.shutdown()


def timed_catch_up(e: Env, start: int, n_mib: int) -> float:
    """Seconds from the first write until the replica acked the last one."""
    t0 = time.monotonic()
    write_random(e, start, n_mib)
    e.wait_caught_up(timeout=30)
    return time.monotonic() - t0


@pytest.mark.timeout(90)
def test_rate_limit_paces_the_replication(env: Env) -> None:
    rx = env.receiver()
    tx = env.sender(rx.port, "--rate-limit", "2M", "--compress", "0")
    assert tx.wait_event("rate_limit") | {"timestamp": None} == {
        "event": "rate_limit", "bytes_per_s": RATE, "burst_bytes": BURST, "rate": "2 MiB/s",
        "component": "peerlink", "volume": "v1", "side": "sender", "node": "p1",
        "peer": "r1", "level": "info", "timestamp": None}
    tx.wait_event("streaming")
    capped = timed_catch_up(env, 0, 8)
    floor = (8 * MiB - BURST) / RATE  # 3.75 s
    assert capped >= floor - 0.1, f"8 MiB at 2 MiB/s caught up in {capped:.2f} s"
    assert capped < 20, f"the capped link took {capped:.2f} s (expected about {floor} s)"
    assert tx.stop() == 0
    stopped = tx.events("stopped")[-1]
    assert stopped["wire_bytes"] >= 8 * MiB  # --compress 0 on random data: no saving
    assert stopped["throttled_ms"] >= 3000, stopped

    tx = env.sender(rx.port, "--compress", "0")
    assert tx.wait_event("rate_limit")["rate"] == "unlimited"
    tx.wait_event("streaming")
    free = timed_catch_up(env, 8 * MiB, 8)
    print(f"\n8 MiB of random data: caught up in {capped:.2f} s at 2 MiB/s, "
          f"{free:.2f} s without the cap")
    assert free < capped / 2, f"uncapped {free:.2f} s vs capped {capped:.2f} s"
    assert (tx.stop(), rx.stop()) == (0, 0)
    p, r = env.checksums()
    assert p == r


@pytest.mark.timeout(90)
def test_a_rate_schedule_window_paces_the_link(env: Env) -> None:
    """A window covering every minute of every day (2 MiB/s) over an unlimited
    rate_limit: the link is paced as by --rate-limit 2M, and says so."""
    rx = env.receiver()
    tx = env.sender(rx.port, "--rate-window", "daily 00:00-24:00 2M", "--compress", "0")
    assert tx.wait_event("rate_limit")["rate"] == "2 MiB/s"
    tx.wait_event("streaming")
    capped = timed_catch_up(env, 0, 8)
    floor = (8 * MiB - BURST) / RATE
    assert capped >= floor - 0.1, f"8 MiB in a 2 MiB/s window caught up in {capped:.2f} s"
    assert (tx.stop(), rx.stop()) == (0, 0)
    p, r = env.checksums()
    assert p == r
