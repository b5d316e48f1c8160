"""Failover that cannot be fooled, shown in the three-site lab.

- Heartbeats captured on the lab's bridge and played again after a power cut of the
  primary (from another address, and with the dead primary's own address) delay
  nothing; forged and garbage datagrams are counted and change nothing.
- The fork schedule: a switchover main -> dc, dc power-cut as soon as it serves, then
  main too, then both back: one primary, three identical copies, nobody refused for
  good, and every write flushed before the schedule began intact.
- An isolated primary's clients see their connection reset within failover.timeout +
  1 s, and a client reconnecting writes at once on the new primary.
- iSCSI at the service address: the same target, serial number, device identifiers and
  data after a power cut of the primary and after a switchover back.
- ext4 through a reconnecting client (qemu-nbd's NBD driver with reconnect-delay):
  every file whose fsync returned survives a power cut and a switchover; e2fsck clean.

Times are printed (``-s``) so that a run doubles as a measurement.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    TIMEOUT,
    addr,
    client,
    failover_state,
    lab_cmd,
    states,
    up,
    uri,
    wait_states,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (netns)")

HEARTBEAT_PORT = 7790

# Runs in the bridge's namespace: an AF_PACKET socket on br0 (promiscuous, so that the
# bridge hands up the frames it forwards between ports) prints "DST HEX" for every UDP
# datagram from argv[1] to port argv[2], until killed.
CAPTURE = r"""
import socket, struct, sys
src, port = sys.argv[1], int(sys.argv[2])
ETH_P_IP, SOL_PACKET, PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC = 0x0800, 263, 1, 1
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
s.bind(("br0", ETH_P_IP))
s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP,
             struct.pack("iHH8s", socket.if_nametoindex("br0"), PACKET_MR_PROMISC, 0, b""))
print("capturing", flush=True)
while True:
    ip = s.recv(65535)[14:]
    ihl = (ip[0] & 15) * 4
    if ip[9] != 17 or socket.inet_ntoa(ip[12:16]) != src:
        continue
    if struct.unpack("!H", ip[ihl + 2:ihl + 4])[0] != port:
        continue
    print(socket.inet_ntoa(ip[16:20]), ip[ihl + 8:].hex(), flush=True)
"""

# Runs in the client's namespace: sends datagrams to UDP port 7790 of each target, either
# from this namespace's own address or with a forged source address (a raw socket
# building the IPv4 and UDP headers; the kernel fills in the IP checksum and id).
# ``send(payload, target, spoof)`` is the shared part of REPLAY and FORGE.
SENDER = r"""
import json, os, socket, struct, sys, time
PORT = 7790
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
def send(payload, target, spoof=None):
    if spoof is None:
        udp.sendto(payload, (target, PORT))
        return
    u = struct.pack("!HHHH", PORT, PORT, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(u), 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(spoof), socket.inet_aton(target))
    raw.sendto(ip + u, (target, 0))
"""

# argv: file of captured "DST HEX" lines, seconds, spoofed source, targets...  Plays the
# capture again and again, each datagram to every target twice: from this address and
# from the spoofed one.  Prints what it sent per target and way.
REPLAY = SENDER + r"""
path, seconds, spoof, targets = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4:]
beats = [bytes.fromhex(line.split()[1]) for line in open(path) if line.strip()]
sent = {"address": 0, "spoofed": 0}
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    for b in beats:
        for t in targets:
            send(b, t); sent["address"] += 1
            send(b, t, spoof); sent["spoofed"] += 1
        time.sleep(0.005)
        if time.monotonic() >= deadline:
            break
print(json.dumps({"per_target": {k: v // len(targets) for k, v in sent.items()},
                  "distinct": len(set(beats))}))
"""

# argv: count, then NODE=ADDRESS pairs.  Sends, to every listed node, ``count`` of each:
# beats sealed with a wrong secret in the name of another node from that node's own
# address (a primary on epoch 9, a candidate for epoch 9), the magic followed by random
# bytes, random bytes, a 3-byte and a 5000-byte datagram.
FORGE = SENDER + r"""
import secrets
from gateway.heartbeat import MAGIC, derive_key, seal
from gateway.nodecore import BeatBody
n, sites = int(sys.argv[1]), dict(a.split("=") for a in sys.argv[2:])
key = derive_key(b"not the lab's secret\n")
boot = secrets.token_bytes(16)
sent = {"mac": 0, "magic": 0, "size": 0}
for i in range(1, n + 1):
    for me, target in sites.items():
        other = next(s for s in sites if s != me)
        primary = BeatBody(state="primary", epoch=9, primary=other, vote_epoch=9,
                           vote_for=other, serving=True, consistent=True, data_epoch=9)
        campaign = BeatBody(state="standby", epoch=0, primary=None, vote_epoch=9,
                            vote_for=other, serving=False, consistent=True, campaign=9,
                            data_epoch=9)
        for body in (primary, campaign):
            send(seal(key, other, boot, 1000 + i, body), target, sites[other])
        send(MAGIC + os.urandom(200), target, sites[other])
        sent["mac"] += 3
        send(b"\x00" + os.urandom(99), target); sent["magic"] += 1
        send(b"NGH", target); send(os.urandom(5000), target); sent["size"] += 2
        time.sleep(0.002)
print(json.dumps({k: v // len(sites) for k, v in sent.items()}))  # to each site
"""

# argv: URI, t0 (a time.time() stamp), block.  Connects and writes one 4 KiB block with a
# flush, retrying until that succeeds; prints the seconds from t0 to the acknowledgement.
FIRST_WRITE = r"""
import sys, time, nbd
uri, t0, block = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 60
while True:
    try:
        h = nbd.NBD(); h.connect_uri(uri)
        h.pwrite(b"w" * 4096, block * 4096); h.flush()
        break
    except nbd.Error as e:
        if time.monotonic() > deadline:
            sys.exit(f"no write acknowledged within 60 s: {e}")
        time.sleep(0.02)
print(round(time.time() - t0, 3))
"""


def wait_for(what: str, pred: Callable[[], bool], timeout: float, every: float = 0.1,
             seen: Callable[[], Any] = lambda: None) -> None:
    """Poll ``pred`` until true; on time-out, fail saying what ``seen`` shows."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s ({seen()})")
        time.sleep(every)


def live_states(lab: dict[str, Any]) -> dict[str, str]:
    """Each site's published state, or "down" when its daemon stopped publishing (a site
    power-cut keeps the last failover.json it wrote)."""
    out = {}
    for n in ("main", "dc", "dr"):
        st = failover_state(lab, n)
        fresh = time.time() - float(st.get("updated", 0)) < 3.0
        out[n] = str(st.get("state")) if fresh else "down"
    return out


def the_primary(lab: dict[str, Any]) -> str:
    """The one live site in state primary (fails unless exactly one)."""
    st = live_states(lab)
    prim = [n for n, s in st.items() if s == "primary"]
    assert len(prim) == 1, st
    return prim[0]


def rejected(lab: dict[str, Any], name: str) -> dict[str, int]:
    return dict(failover_state(lab, name).get("beats_rejected", {}))


def transitions(lab_dir: Path, name: str) -> int:
    return (lab_dir / name / "daemon.log").read_text().count('"failover_transition"')


class Capture:
    """CAPTURE running in the bridge's namespace; the datagrams it saw, in order."""

    def __init__(self, lab: dict[str, Any], src: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab["bridge_netns"], sys.executable, "-c", CAPTURE, src,
             str(HEARTBEAT_PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        started: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(started,), daemon=True)
        self.thread.start()
        try:
            assert started.get(timeout=10) == "capturing"
        except queue.Empty:
            raise AssertionError("the capture did not start") from None

    def _read(self, started: queue.Queue[str]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("capturing"):
                started.put("capturing")
            else:
                self.lines.append(line.strip())

    def stop(self) -> list[str]:
        self.proc.kill()
        self.proc.wait(10)
        self.thread.join(10)
        return list(self.lines)


class Measure:
    """From a power cut at ``t0`` (time.time()): when ``who`` published state primary, and
    when a client's first write through the service address was acknowledged."""

    def __init__(self, lab: dict[str, Any], who: str, t0: float, block: int) -> None:
        self.lab, self.who, self.t0 = lab, who, t0
        self.writer = client(lab, FIRST_WRITE, uri(lab), str(t0), str(block))
        self.state_s: float | None = None
        deadline = time.monotonic() + 60
        while self.state_s is None and time.monotonic() < deadline:
            if failover_state(lab, who).get("state") == "primary":
                self.state_s = round(time.time() - t0, 3)
            time.sleep(0.02)

    def result(self) -> tuple[float, float]:
        out, err = self.writer.communicate(timeout=90)
        assert self.writer.returncode == 0, err
        assert self.state_s is not None, f"{self.who} never published state primary"
        return self.state_s, float(out)


def test_replayed_and_forged_heartbeats_change_and_delay_nothing(lab_dir: Path) -> None:
    lab = up(lab_dir.parent)
    sites = {n: addr(lab, n) for n in ("main", "dc", "dr")}
    assert states(lab) == {"main": "primary", "dc": "standby", "dr": "witness"}

    # Forged and garbage datagrams, at every site, in the steady state: counted, no effect.
    before = {n: transitions(lab_dir, n) for n in sites}
    forge = client(lab, FORGE, "20", *(f"{n}={a}" for n, a in sites.items()))
    out, err = forge.communicate(timeout=60)
    assert forge.returncode == 0, err
    sent = json.loads(out)

    def all_counted(name: str) -> bool:
        got = rejected(lab, name)
        return all(got.get(k, 0) >= 0.9 * v for k, v in sent.items())

    wait_for("forged beats counted", lambda: all(all_counted(n) for n in sites), 10,
             seen=lambda: {"sent": sent, **{n: rejected(lab, n) for n in sites}})
    for n in sites:
        got = rejected(lab, n)
        assert all(got.get(k, 0) <= v for k, v in sent.items()), (n, got, sent)
        assert set(got) <= {"mac", "magic", "size"}, (n, got)
    print(f"forged: sent to each site {sent}; dc counted {rejected(lab, 'dc')}")
    time.sleep(1.0)
    assert states(lab) == {"main": "primary", "dc": "standby", "dr": "witness"}
    assert {n: failover_state(lab, n)["epoch"] for n in sites} == dict.fromkeys(sites, 0)
    assert {n: transitions(lab_dir, n) for n in sites} == before

    # Capture main's beats on the bridge, then power-cut main and play them again.
    cap = Capture(lab, sites["main"])
    time.sleep(3.0)
    captured = cap.stop()
    assert len(captured) >= 12, captured  # ~4 a second to each of dc and dr
    beats = lab_dir.parent / "captured-beats.txt"
    beats.write_text("\n".join(captured) + "\n")
    replay = client(lab, REPLAY, str(beats), "10", sites["main"], sites["dc"], sites["dr"])
    t0 = float(json.loads(lab_cmd("kill", "main", "--dir", str(lab_dir)))["at"])
    with_replay = Measure(lab, "dc", t0, 1).result()
    out, err = replay.communicate(timeout=60)
    assert replay.returncode == 0, err
    replayed = json.loads(out)
    wait_for("replays counted", lambda: rejected(lab, "dc").get("replay", 0)
             >= 0.9 * replayed["per_target"]["spoofed"], 5)
    dc_rejected = rejected(lab, "dc")
    print(f"replayed {replayed}; dc counted {dc_rejected}, dr {rejected(lab, 'dr')}")
    assert dc_rejected.get("address", 0) >= 0.9 * replayed["per_target"]["address"]
    assert dc_rejected.get("replay", 0) >= 0.9 * replayed["per_target"]["spoofed"]
    for name in ("dc", "dr"):
        assert '"reason": "replay"' in (lab_dir / name / "daemon.log").read_text()
    assert the_primary(lab) == "dc"

    # The same fault without a replay: main back (a replica of dc), then dc power-cut.
    lab_cmd("start", "main", "--dir", str(lab_dir))
    wait_states(lab, {"main": "standby"}, 30)
    wait_for("main consistent", lambda: failover_state(lab, "main").get("consistent") is True,
             60)
    time.sleep(2 * TIMEOUT)  # steady beats from the rejoined node
    t0 = float(json.loads(lab_cmd("kill", "dc", "--dir", str(lab_dir)))["at"])
    without = Measure(lab, "main", t0, 2).result()
    print(f"power cut -> state primary, first write acknowledged: with the replay "
          f"{with_replay} s (main -> dc), without {without} s (dc -> main)")
    assert with_replay[0] <= without[0] + 1.0, (with_replay, without)
    assert with_replay[1] <= without[1] + 1.0, (with_replay, without)
    assert with_replay[1] < 15 and without[1] < 15  # target 5 s; slack for a loaded host
    assert the_primary(lab) == "main"
