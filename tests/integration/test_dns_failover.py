"""Failover by DNS across subnets (`nbdgw lab up --dns`): the client lives in another
subnet behind a router namespace and finds the primary only by name, through a real
BIND server that the sites update with RFC 2136 + TSIG.  A power cut of the primary
moves the name to the new primary (confirmed by the server before it says `serving`),
the client follows it within TTL + failover time and finds its data; the old primary,
booted again, does not withdraw its successor's record; a switchover moves the name
back."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    addr,
    converge,
    events,
    lab_cmd,
    run_client,
    switchover,
    up,
    wait_states,
)

pytestmark = pytest.mark.root

# Resolve the name (no cache in the client: each try asks the server), connect by name,
# check the blocks written so far, write block ``n``; until ``deadline`` seconds.
CLIENT = r"""
import json, socket, struct, sys, time
import nbd
name, want, n, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
t0 = time.monotonic(); err = ""; seen = None
while time.monotonic() - t0 < limit:
    try:
        seen = socket.gethostbyname(name)
    except OSError as e:
        err = f"resolve: {e}"; time.sleep(0.2); continue
    if want and seen != want:
        err = f"{name} is {seen}"; time.sleep(0.2); continue
    h = nbd.NBD()
    try:
        h.connect_uri(f"nbd://{name}:10809/v1")
        bad = [i for i in range(n) if h.pread(4096, i * 4096) != struct.pack("<Q", i) * 512]
        h.pwrite(struct.pack("<Q", n) * 512, n * 4096)
        h.flush()
        h.shutdown()
        print(json.dumps({"address": seen, "bad": bad, "seconds": time.monotonic() - t0}))
        sys.exit(0)
    except nbd.Error as e:
        err = f"nbd: {e}"; time.sleep(0.2)
print(json.dumps({"address": seen, "error": err, "seconds": time.monotonic() - t0}))
"""


def write_through_name(lab: dict[str, Any], want: str, n: int, limit: float = 60
                       ) -> dict[str, Any]:
    out = run_client(lab, CLIENT, lab["dns"]["name"], want, str(n), str(limit),
                     timeout=limit + 30)
    assert "error" not in out, out
    assert out["bad"] == [], out
    return out


def test_clients_follow_the_name_across_subnets(tmp_path: Path, lab_dir: Path) -> None:
    lab = up(tmp_path, "--dns")
    assert lab["dns"]["client_subnet"] == "198.51.100.0/24"
    assert not lab["client_address"].startswith("192.0.2.")  # routed, not on the bridge
    # Blocks 0..3 written by name while main serves.
    for i in range(4):
        assert write_through_name(lab, addr(lab, "main"), i)["address"] == addr(lab, "main")
    converge(lab)

    lab_cmd("kill", "main", "--dir", str(lab_dir))
    t0 = time.monotonic()
    out = write_through_name(lab, addr(lab, "dc"), 4)
    took = time.monotonic() - t0
    # Failover (heartbeat timeout + promotion) plus the TTL bound what a client sees.
    assert took < 30 + lab["dns"]["ttl"], out
    published = [e for e in events(lab_dir, "dc", "service_name_published")]
    serving = [e for e in events(lab_dir, "dc", "serving")]
    assert published and serving and serving[-1].get("name") == "db.nbdgw.lab."
    assert published[-1]["timestamp"] <= serving[-1]["timestamp"]  # confirmed first

    # The old primary boots again: it serves nothing and must not withdraw dc's record.
    lab_cmd("start", "main", "--dir", str(lab_dir))
    wait_states(lab, {"dc": "primary"}, 30)
    assert write_through_name(lab, addr(lab, "dc"), 5, limit=10)["address"] == addr(lab, "dc")
    assert [e for e in events(lab_dir, "main", "service_name_not_ours")], \
        "main's boot did not check the record"
    assert not [e for e in events(lab_dir, "main", "service_name_withdrawn")]
    print(json.dumps({"client_failover_s": round(took, 2)}))


def test_a_switchover_moves_the_name_and_the_old_holder_withdraws_nothing_of_the_new(
        tmp_path: Path, lab_dir: Path) -> None:
    lab = up(tmp_path, "--dns")
    write_through_name(lab, addr(lab, "main"), 0)
    converge(lab)
    switchover(lab, "main", "dc")
    wait_states(lab, {"dc": "primary"}, 60)
    assert write_through_name(lab, addr(lab, "dc"), 1)["address"] == addr(lab, "dc")
    # main gave the name up (or found dc's already there); dc holds it now.
    assert events(lab_dir, "main", "service_name_withdrawn") or events(
        lab_dir, "main", "service_name_not_ours")
    switchover(lab, "dc", "main")
    wait_states(lab, {"main": "primary"}, 60)
    assert write_through_name(lab, addr(lab, "main"), 2)["address"] == addr(lab, "main")


def test_the_name_server_dead_across_a_power_cut(tmp_path: Path, lab_dir: Path) -> None:
    """Two faults at once: the name server is down when the primary loses power.  dc is
    elected and serves NBD at its own address, but says `serving` only once the name is
    confirmed: it keeps trying the dead server, and when the server comes back (with the
    old primary's record still in its zone) the name moves and clients follow it."""
    lab = up(tmp_path, "--dns")
    for i in range(2):
        write_through_name(lab, addr(lab, "main"), i)
    converge(lab)

    lab_cmd("kill", "dns", "--dir", str(lab_dir))
    lab_cmd("kill", "main", "--dir", str(lab_dir))
    wait_states(lab, {"dc": "primary"}, 30)
    deadline = time.monotonic() + 30
    while not events(lab_dir, "dc", "service_name_failed"):
        assert time.monotonic() < deadline, "dc never tried to publish the name"
        time.sleep(0.2)
    time.sleep(2 * lab["dns"]["ttl"])  # time enough to have said `serving` wrongly
    assert not [e for e in events(lab_dir, "dc", "serving") if e.get("name")], \
        "dc said serving under a name the server never confirmed"

    lab_cmd("start", "dns", "--dir", str(lab_dir))
    t0 = time.monotonic()
    out = write_through_name(lab, addr(lab, "dc"), 2)
    assert out["address"] == addr(lab, "dc")
    assert time.monotonic() - t0 < 30 + lab["dns"]["ttl"], out
    published = events(lab_dir, "dc", "service_name_published")
    serving = [e for e in events(lab_dir, "dc", "serving") if e.get("name")]
    assert published and serving, (published, serving)
    assert published[-1]["timestamp"] <= serving[-1]["timestamp"]
