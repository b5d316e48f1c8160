"""Failover on etcd in the lab (`nbdgw lab up --coordinator etcd`): three sites and a
three-member etcd cluster, each member in a network namespace of its own, started and
stopped by the test.  As a client sees it through the service address: a power cut of
the primary, a primary cut off from etcd (but not from its client), one etcd member
lost, etcd's quorum lost.  The sites' lease TTL is 3 s (gateway/labetcd.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.labetcd import LEASE_TTL, leader
from tests.conftest import NBDGW, run_nbdgw
from tests.integration.conftest import (
    check_blocks,
    client,
    failover_state,
    in_ns,
    lab_cmd,
    node,
    node_dir,
    one_primary,
    states,
    switchover,
    up,
    wait_states,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (netns)")

LEASE_SPAN = LEASE_TTL * 0.95 - 0.5  # the sites' write lease after a keepalive (etcdcore)

# Writes 4 KiB blocks 0, 1, 2, ... each stamped with its number, flushing after every 4
# (at most ~800 blocks a second: the 64 MiB volume lasts 20 s); prints "flushed N T" (T:
# time.time() once the flush was acknowledged) or "error T MSG".  The end of the volume
# is an error of its own ("end of volume"), never taken for a fence.
WRITER = r"""
import struct, sys, time, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
blocks = h.get_size() // 4096
i = 0
try:
    while i < blocks:
        h.pwrite(struct.pack("<Q", i) * 512, i * 4096)
        i += 1
        if i % 4 == 0:
            h.flush()
            print(f"flushed {i} {time.time()}", flush=True)
            time.sleep(0.005)
    print(f"end of volume {time.time()}", flush=True)
except nbd.Error as e:
    print(f"error {time.time()} {e}", flush=True)
"""


def writer(lab: dict[str, Any]) -> subprocess.Popen[str]:
    w = client(lab, WRITER, f"nbd://{lab['service_address']}:10809/v1")
    assert w.stdout is not None
    line = w.stdout.readline()
    assert line.startswith("flushed "), line + (w.stderr.read() if w.stderr else "")
    return w


def last_flush(w: subprocess.Popen[str], timeout: float) -> tuple[int, float, str]:
    """Read the writer until it stops (an error or its end): (blocks flushed, the time
    of the last acknowledged flush, the error line)."""
    assert w.stdout is not None
    flushed, at, err = 0, 0.0, ""
    deadline = time.monotonic() + timeout
    for line in w.stdout:
        if line.startswith("flushed "):
            _, n, t = line.split()
            flushed, at = int(n), float(t)
        elif line.startswith(("error ", "end of volume")):
            err = line.strip()
            break
        assert time.monotonic() < deadline, "the writer never stopped"
    w.kill()
    w.wait(10)
    assert not err.startswith("end of volume"), "the writer ran out of volume, not of lease"
    return flushed, at, err


def event_time(lab_dir: Path, name: str, event: str) -> float | None:
    """Wall time of the first ``event`` in the site's daemon log (None: not logged)."""
    for line in (lab_dir / name / "daemon.log").read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == event:
            return datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
    return None


def etcd_rules(lab: dict[str, Any], action: str) -> list[list[str]]:
    rules = []
    for m in lab["etcd"]["members"]:
        rules += [["iptables", action, "INPUT", "-s", m["address"], "-j", "DROP"],
                  ["iptables", action, "OUTPUT", "-d", m["address"], "-j", "DROP"]]
    return rules


def fleet(lab: dict[str, Any], name: str = "dc") -> dict[str, Any]:
    n = node(lab, name)
    out = subprocess.run(["ip", "netns", "exec", n["netns"], NBDGW,
                          "-c", n["config"], "fleet", "status", "--json"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def test_power_cut_of_the_primary_the_secondary_takes_the_key_and_serves(
        lab_dir: Path) -> None:
    """Sync secondary; every write acknowledged before the power cut is read back from
    the new primary through the service address within 5 s."""
    lab = up(lab_dir.parent, "--coordinator", "etcd", "--mode", "sync")
    assert fleet(lab)["groups"][0]["primary"]["node"] == "main"
    w = writer(lab)
    time.sleep(1.0)
    t0 = float(json.loads(lab_cmd("kill", "main", "--dir", str(lab_dir)))["at"])
    flushed, _, _ = last_flush(w, 30)
    result = check_blocks(lab, flushed, t0)
    print(f"etcd failover: first read {result['first_read_s']} s after the power cut "
          f"({flushed} blocks checked)")
    assert result["bad"] == [], result
    # etcd's share: the lease expires TTL after the last keepalive etcd processed, its
    # lessor checks every 0.5 s, dc reads every 0.25 s.
    taken = event_time(lab_dir, "dc", "elected")
    serving = event_time(lab_dir, "dc", "serving")
    assert taken is not None and serving is not None
    print(f"  dc took the key {taken - t0:.2f} s after the cut, served {serving - t0:.2f} s")
    assert taken - t0 <= LEASE_TTL + 0.5 + 0.25 + 0.5, taken - t0
    # Target 5 s (3.4 to 4.7 s on the 2-core development host, 6.0 s once while other
    # engineers' tests loaded it): slack for the promotion and nbdkit's start on a loaded
    # host, which are not etcd's share (checked just above).
    assert result["first_read_s"] <= 8.0, result
    wait_states(lab, {"dc": "primary"}, 5)
    g = fleet(lab)["groups"][0]
    assert g["primary"]["node"] == "dc" and g["primary"]["epoch"] == 1, g
    lab_cmd("start", "main", "--dir", str(lab_dir))
    wait_states(lab, {"main": "standby"}, 30)  # the key is dc's: it rejoins
    assert one_primary(lab) == "dc"


def test_a_primary_cut_off_from_etcd_stops_acknowledging_before_the_other_is_granted(
        lab_dir: Path) -> None:
    """main loses etcd but not its client nor its peers: the client's writes fail (the
    write lease ran out) before dc takes the key; never both."""
    lab = up(lab_dir.parent, "--coordinator", "etcd")
    w = writer(lab)
    time.sleep(1.0)
    t_cut = time.time()
    for rule in etcd_rules(lab, "-I"):
        in_ns(lab, "main", *rule)
    try:
        flushed, last_ack, err = last_flush(w, 30)
        assert err, "the writer never saw an error"
        wait_states(lab, {"dc": "primary"}, 15)
        taken = event_time(lab_dir, "dc", "elected")
        assert taken is not None
        print(f"last write acknowledged by main {last_ack - t_cut:.2f} s after the cut; "
              f"dc took the key {taken - t_cut:.2f} s after; client saw: {err[:80]}")
        assert last_ack < taken, (last_ack, taken)
        assert last_ack - t_cut <= LEASE_SPAN + 0.5
        assert states(lab)["main"] in ("fenced", "stale", "standby"), states(lab)
    finally:
        for rule in etcd_rules(lab, "-D"):
            in_ns(lab, "main", *rule)
    wait_states(lab, {"main": "standby"}, 30)
    assert one_primary(lab) == "dc"
    result = check_blocks(lab, flushed, time.time())
    assert result["bad"] == [], result


def test_one_etcd_member_lost_changes_nothing(lab_dir: Path) -> None:
    """The member that leads is killed: an election, keepalives wait for it, and the
    write lease outlasts it (the clients see nothing)."""
    lab = up(lab_dir.parent, "--coordinator", "etcd")
    w = writer(lab)
    epoch = failover_state(lab, "main")["epoch"]
    members = lab["etcd"]["members"]
    url = leader(members[0]["netns"], lab["etcd"]["endpoints"])
    assert url is not None
    lost = next(m["name"] for m in members if m["address"] in url)
    lab_cmd("kill", lost, "--dir", str(lab_dir))
    time.sleep(8.0)
    assert w.poll() is None, "the writer stopped: " + (w.stdout.read()[-300:]
                                                        if w.stdout else "")
    w.kill()
    assert states(lab) == {"main": "primary", "dc": "standby", "dr": "witness"}, states(lab)
    assert failover_state(lab, "main")["epoch"] == epoch
    log = (lab_dir / "main" / "daemon.log").read_text()
    assert '"fenced"' not in log
    lab_cmd("start", lost, "--dir", str(lab_dir))
    assert one_primary(lab) == "main"
    # An operator's DR promotion goes through the take transaction: refused while the
    # key is held, --force or not.
    p = run_nbdgw("-c", node(lab, "dr")["config"], "promote", "--site", "dr", "--force",
                  check=False)
    assert p.returncode != 0 and "main holds the key" in p.stderr, p.stderr
    assert one_primary(lab) == "main"


def test_etcd_quorum_lost_no_promotion_the_primary_serves_until_its_lease_then_fences(
        lab_dir: Path) -> None:
    """Two of three members down: no promotion anywhere; main serves until its write
    lease would expire (LEASE_SPAN after its last answered keepalive), then fences; with
    the quorum back, main serves again on its own epoch."""
    lab = up(lab_dir.parent, "--coordinator", "etcd")
    w = writer(lab)
    time.sleep(1.0)
    lab_cmd("kill", "etcd2", "--dir", str(lab_dir))
    t_lost = float(json.loads(lab_cmd("kill", "etcd3", "--dir", str(lab_dir)))["at"])
    flushed, last_ack, err = last_flush(w, 30)
    assert err, "the writer never saw an error"
    print(f"quorum lost: last write acknowledged {last_ack - t_lost:.2f} s after; "
          f"client saw: {err[:80]}")
    # The lease span after the last keepalive answered before the quorum went; a leader
    # left alone renews until it steps down (an election timeout, 0.5 s in the lab).
    assert last_ack - t_lost <= LEASE_SPAN + 0.5 + 0.5, last_ack - t_lost
    wait_states(lab, {"main": "fenced"}, 10)
    time.sleep(6.0)
    st = states(lab)
    assert st["dc"] == "standby" and st["dr"] == "witness", st  # no promotion
    assert failover_state(lab, "dc").get("epoch") == 0
    lab_cmd("start", "etcd2", "--dir", str(lab_dir))
    wait_states(lab, {"main": "primary"}, 30)
    assert failover_state(lab, "main")["epoch"] == 0
    assert states(lab)["dc"] == "standby"
    result = check_blocks(lab, flushed, time.time())
    assert result["bad"] == [], result
    assert (node_dir(lab, "main") / "run").is_dir()


def test_switchover_hands_the_key_over_by_transaction_and_back(lab_dir: Path) -> None:
    """Planned: main drains, fences, deletes its key and names dc in one transaction; dc
    takes the key (epoch 1) and serves every acknowledged write; then back to main."""
    lab = up(lab_dir.parent, "--coordinator", "etcd", "--mode", "sync")
    w = writer(lab)
    time.sleep(1.0)
    out = switchover(lab, "main", "dc")
    assert "dc" in out
    flushed, _, _ = last_flush(w, 30)  # its connection died with main's nbdkit
    wait_states(lab, {"dc": "primary", "main": "standby"}, 20)
    g = fleet(lab, "main")["groups"][0]
    assert g["primary"]["node"] == "dc" and g["primary"]["epoch"] == 1, g
    assert g["handover"] is None, g
    assert check_blocks(lab, flushed, time.time())["bad"] == []
    switchover(lab, "dc", "main")
    wait_states(lab, {"main": "primary", "dc": "standby"}, 20)
    g = fleet(lab)["groups"][0]
    assert g["primary"]["node"] == "main" and g["primary"]["epoch"] == 2, g
    assert check_blocks(lab, flushed, time.time())["bad"] == []


def test_lab_refuses_what_etcd_cannot_run_with_one_clear_line(tmp_path: Path) -> None:
    for extra, msg in (
            (["--witness"], "--coordinator etcd: not with --witness (etcd decides, a witness "
                            "has nothing to do) nor --dns"),
            (["--subnet", "192.0.2.0/29"], "--subnet with --coordinator etcd: expected an "
             "IPv4 network of at least 16 addresses (/28), got 192.0.2.0/29")):
        p = run_nbdgw("lab", "up", "--dir", str(tmp_path / "x"), "--coordinator", "etcd",
                      *extra, check=False)
        assert p.returncode == 1
        assert p.stderr.strip().splitlines() == [f"nbdgw: error: {msg}"], p.stderr
        assert not (tmp_path / "x" / "lab.json").exists()
