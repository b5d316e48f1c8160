"""Failover that cannot be fooled, shown in the three-site lab.

- Heartbeats captured on the lab's bridge and played again after a power cut of the
  primary (from another address, and with the dead primary's own address) delay
  nothing; forged and garbage datagrams are counted and change nothing.
- The fork schedule: a switchover main -> dc, dc power-cut as soon as it serves, then
  main too, then both back: one primary, three identical copies, nobody refused for
  good, and every write flushed before the schedule began intact.
- An isolated primary's clients see their connection reset within failover.timeout +
  1 s, and a client reconnecting writes at once on the new primary.
- A switchover whose primary is isolated during its drain fails as soon as that primary
  fences, saying it lost its primary role (not, 30 s later, "nothing changed").
- The stamped writer the lab tests use gives each NBD call CALL_S and reconnects after
  one not answered (a connection gone silent without a reset), checked without a lab.
- iSCSI at the service address: the same target, serial number, device identifiers and
  data after a power cut of the primary and after a switchover back.
- ext4 through a reconnecting client (qemu-nbd's NBD driver with reconnect-delay):
  every file whose fsync returned survives a power cut and a switchover; e2fsck clean.

Times are printed (``-s``) so that a run doubles as a measurement.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import nbd
import pytest

from tests.conftest import need
from tests.integration.conftest import (
    TIMEOUT,
    addr,
    check_blocks,
    checksum,
    client,
    converge,
    failover_state,
    in_ns,
    lab_cmd,
    loop_device,
    mounted,
    nbdfuse,
    node,
    node_dir,
    run,
    states,
    switchover,
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


def time_failover(lab: dict[str, Any], who: str, t0: float, block: int
                  ) -> tuple[float, float]:
    """Seconds from a power cut at ``t0`` (time.time()) until ``who`` published state
    primary, and until a client's first write (and flush) through the service address
    was acknowledged."""
    writer = client(lab, FIRST_WRITE, uri(lab), str(t0), str(block))
    wait_for(f"{who} primary", lambda: failover_state(lab, who).get("state") == "primary",
             60, every=0.02, seen=lambda: live_states(lab))
    state_s = round(time.time() - t0, 3)
    out, err = writer.communicate(timeout=90)
    assert writer.returncode == 0, err
    return state_s, float(out)


def test_replayed_and_forged_heartbeats_change_and_delay_nothing(lab_dir: Path) -> None:
    """Forged beats (another secret) and garbage are counted and change nothing; main's
    beats captured on the bridge and replayed towards dc and dr after main's power cut,
    from the client's address and spoofed from main's own, are counted as ``address``
    and ``replay`` and do not delay dc's promotion: compared with the same fault without
    a replay later in the test (dc power-cut once main is back as its replica)."""
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
    with_replay = time_failover(lab, "dc", t0, 1)
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
    without = time_failover(lab, "main", t0, 2)
    print(f"power cut -> state primary, first write acknowledged: with the replay "
          f"{with_replay} s (main -> dc), without {without} s (dc -> main)")
    assert with_replay[0] <= without[0] + 1.0, (with_replay, without)
    assert with_replay[1] <= without[1] + 1.0, (with_replay, without)
    assert with_replay[1] < 15 and without[1] < 15  # target 5 s; slack for a loaded host
    assert the_primary(lab) == "main"


# argv: URI.  Writes 4 KiB blocks in a loop (a flush every 8), says "writing" after 64,
# and records, as time.time() stamps: the last acknowledgement, error replies from a live
# server, the moment the connection died (reset or closed: not a hang), then reconnects
# and records when it connected again, its first write acknowledged there (with a flush)
# and any error after that.  Prints one JSON line.
ISOLATED_CLIENT = r"""
import json, sys, time, nbd
uri = sys.argv[1]
h = nbd.NBD(); h.connect_uri(uri)
r = {"error_replies": [], "after_reconnect": [], "longest_write_s": 0.0}
i = 0; deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    t = time.time()
    try:
        h.pwrite(b"i" * 4096, (i % 4096) * 4096)
        if i % 8 == 7:
            h.flush()
        r["last_ack"] = time.time()
        r["longest_write_s"] = max(r["longest_write_s"], round(r["last_ack"] - t, 3))
    except nbd.Error as e:
        if h.aio_is_dead() or h.aio_is_closed():
            r["dead"] = time.time(); r["dead_error"] = str(e); break
        r["error_replies"].append([round(time.time(), 3), str(e)])
        time.sleep(0.01)
    i += 1
    if i == 64:
        print("writing", flush=True)
else:
    sys.exit("the connection neither failed nor was reset within 60 s")
while True:
    try:
        h = nbd.NBD(); h.connect_uri(uri); r["reconnected"] = time.time(); break
    except nbd.Error:
        if time.monotonic() > deadline:
            sys.exit("could not reconnect within 60 s")
        time.sleep(0.02)
for j in range(64):
    try:
        h.pwrite(b"j" * 4096, j * 4096); h.flush()
        r.setdefault("first_ack_after", time.time())
    except nbd.Error as e:
        r["after_reconnect"].append(str(e))
print(json.dumps(r))
"""


def test_isolated_primary_resets_its_clients_and_the_new_primary_takes_writes_at_once(
        lab_dir: Path) -> None:
    """main loses both peers (iptables in its namespace; the client still reaches it): the
    writing client's connection errors and is reset, not left hanging, within
    failover.timeout + 1 s; reconnected, its writes are acknowledged by dc at once."""
    lab = up(lab_dir.parent)
    writer = client(lab, ISOLATED_CLIENT, uri(lab))
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "writing"
    cut = [[chain, flag, addr(lab, peer), "-j", "DROP"]
           for peer in ("dc", "dr") for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d"))]
    t0 = time.time()
    for rule in cut:
        in_ns(lab, "main", "iptables", "-I", *rule)
    try:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        r = json.loads(out)
        rel = {k: round(r[k] - t0, 2) for k in ("last_ack", "dead", "reconnected",
                                                "first_ack_after") if k in r}
        print(f"isolated primary, seconds after the cut: {rel}; error replies "
              f"{[(round(t - t0, 2), e) for t, e in r['error_replies']][:3]}; "
              f"connection ended with {r['dead_error']!r}")
        wait_for("dc primary", lambda: live_states(lab)["dc"] == "primary", 15,
                 seen=lambda: live_states(lab))
        assert live_states(lab)["main"] == "fenced"
    finally:
        for rule in cut:
            in_ns(lab, "main", "iptables", "-D", *rule)
    # Reset (not a hang) within failover.timeout + 1 s of the isolation.
    assert rel["dead"] <= 2.0 + 1.0, rel
    # On the new primary: the first write is acknowledged, none refused (its lease is
    # valid before it takes the address), and at once.
    assert r["after_reconnect"] == [], r
    assert rel["first_ack_after"] - rel["reconnected"] < 1.0, rel
    wait_states(lab, {"main": "standby"}, 30)  # it hears dc's newer epoch: rejoins
    assert the_primary(lab) == "dc"


# argv: URI, seconds, call_s.  Writes 4 KiB blocks 0, 1, 2, ... (each stamped with its
# number, 10 ms apart), a flush after every 4, printing "flushed N T" (blocks < N durable,
# T its time.time()).  When the connection dies it reconnects (a connect given up after
# 3 s, the address may be nobody's) and writes again from the last flushed block: what was
# not flushed on the old server is not counted.  Every call (write, flush) is given call_s
# seconds: one not answered by then (a connection gone silent without a reset) is
# abandoned with its connection, said in a "stuck ..." line, and the writer reconnects as
# when the connection dies (qemu-nbd's reconnect would): a flush not answered is not
# counted.  Stops at a line on stdin or at the deadline; prints one JSON line.
CALL_S = 10.0  # FORK_WRITER's bound on one NBD call: above any stall the product promises
FORK_WRITER = r"""
import json, select, struct, sys, time, nbd
uri, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
call_s = float(sys.argv[3])
class Stuck(Exception):
    pass
def connect():
    while time.monotonic() < deadline:
        h = nbd.NBD()
        try:
            h.aio_connect_uri(uri)
            give_up = time.monotonic() + 3
            while not h.aio_is_ready() and not h.aio_is_dead() and time.monotonic() < give_up:
                h.poll(100)
            if h.aio_is_ready():
                return h
        except nbd.Error:
            pass
        del h  # closes the handle
        time.sleep(0.05)
    return None
def call(h, what, cookie):
    # nbd.Error if the command failed or the connection died; Stuck after call_s.
    give_up = time.monotonic() + call_s
    while not h.aio_command_completed(cookie):
        if time.monotonic() >= give_up:
            raise Stuck(f"{what} not answered within {call_s:g} s")
        h.poll(100)
h = connect(); i = flushed = reconnects = timeouts = 0; refused = []; stuck = []
while h is not None and i < 12000 and not select.select([sys.stdin], [], [], 0)[0]:
    try:
        call(h, f"write of block {i}", h.aio_pwrite(struct.pack("<Q", i) * 512, i * 4096))
        i += 1
        if i % 4 == 0:
            call(h, f"flush after block {i - 1}", h.aio_flush()); flushed = i
            print(f"flushed {i} {time.time():.3f}", flush=True)
        time.sleep(0.01)
    except Stuck as e:
        i = flushed; timeouts += 1; reconnects += 1
        stuck.append(f"{time.time():.3f} {e}")
        print(f"stuck {stuck[-1]}: reconnecting (last flushed {flushed})", flush=True)
        del h  # the connection goes with it, unanswered calls and all
        h = connect()
    except nbd.Error as e:
        i = flushed
        if h.aio_is_dead() or h.aio_is_closed():
            reconnects += 1; h = connect()
        else:
            refused.append(str(e)[:120]); time.sleep(0.1)
print(json.dumps({"flushed": flushed, "reconnects": reconnects, "refused": refused[:5],
                  "nrefused": len(refused), "timeouts": timeouts, "stuck": stuck[:5],
                  "connected": h is not None}))
"""


class Stamped:
    """FORK_WRITER in the client namespace (or, without a lab, here, writing to
    ``target``); its "flushed" lines, read on a thread, and its "stuck" lines (a call
    not answered within ``call_s``, after which it reconnected)."""

    def __init__(self, lab: dict[str, Any] | None, seconds: float, target: str = "",
                 call_s: float = CALL_S) -> None:
        args = (target or uri(lab or {}), str(seconds), str(call_s))
        self.proc = (client(lab, FORK_WRITER, *args, stdin=subprocess.PIPE)
                     if lab is not None else
                     subprocess.Popen([sys.executable, "-c", FORK_WRITER, *args],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        self.flushed: list[tuple[int, float]] = []
        self.stuck: list[str] = []
        self.last = ""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("flushed "):
                _, n, t = line.split()
                self.flushed.append((int(n), float(t)))
            elif line.startswith("stuck "):
                self.stuck.append(line.strip())
            else:
                self.last = line

    def flushed_before(self, t: float) -> int:
        return max((n for n, at in self.flushed if at < t), default=0)

    def wait_flushed(self, n: int, timeout: float) -> None:
        wait_for(f"{n} blocks flushed", lambda: self.flushed_before(time.time()) >= n,
                 timeout, seen=lambda: self.flushed[-1:])

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        if self.proc.poll() is None:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        self.proc.wait(60)
        self.thread.join(10)
        assert self.proc.returncode == 0, self.proc.stderr.read() if self.proc.stderr else ""
        return json.loads(self.last)  # type: ignore[no-any-return]


class BlackHole:
    """A TCP proxy in front of the unix socket ``target`` whose ``swallow()`` makes every
    connection open at that moment go silent for good: bytes either way are dropped,
    nothing is closed or reset (a route dropped mid-stream, a server gone without a
    trace).  Connections made afterwards are forwarded."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.generation = 0  # connections of an older generation are swallowed
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                down, _ = self.listener.accept()
                up = socket.socket(socket.AF_UNIX)
                up.connect(str(self.target))
                self.socks += [down, up]
                gen = self.generation
                for a, b in ((down, up), (up, down)):
                    threading.Thread(target=self._pipe, args=(a, b, gen), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, gen: int) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if gen == self.generation:
                    dst.sendall(data)

    def swallow(self) -> None:
        self.generation += 1

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            s.close()


def test_the_stamped_writer_reconnects_after_a_call_that_is_never_answered(
        tmp_path: Path) -> None:
    """The writer of the lab tests gives each NBD call CALL_S (here 2 s): a connection
    that goes silent without a reset (lab schedule seed 77 once left it with no flush for
    60 s after the heal) is dropped and made again, as qemu-nbd's reconnect would, and
    said so; a flush not answered is not counted, and every flush answered reads back."""
    sock = tmp_path / "nbd.sock"
    srv = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "memory",
                            "64M"])
    hole = writer = None
    try:
        wait_for("nbdkit listening", sock.exists, 10)
        hole = BlackHole(sock)
        writer = Stamped(None, 120, f"nbd://127.0.0.1:{hole.port}", call_s=2.0)
        writer.wait_flushed(32, 20)
        hole.swallow()
        t0 = time.time()
        mark = writer.flushed_before(t0)
        writer.wait_flushed(mark + 32, 2.0 + 8)  # before: no flush ever again
        result = writer.stop()
        print(f"writer: {result}; {writer.stuck}")
        assert result["timeouts"] >= 1 and result["reconnects"] >= 1, result
        assert writer.stuck and "not answered within 2 s: reconnecting" in writer.stuck[0]
        flushed = max(n for n, _ in writer.flushed)
        h = nbd.NBD()
        h.connect_unix(str(sock))
        bad = [i for i in range(flushed) if h.pread(8, i * 4096) != struct.pack("<Q", i)]
        assert bad == [], bad[:10]
    finally:
        if writer is not None and writer.proc.poll() is None:
            writer.proc.kill()
        if hole is not None:
            hole.close()
        srv.kill()
        srv.wait(10)


def log_sizes(lab_dir: Path) -> dict[str, int]:
    return {n: (lab_dir / n / "daemon.log").stat().st_size for n in ("main", "dc", "dr")}


def logs_since(lab_dir: Path, offsets: dict[str, int]) -> dict[str, str]:
    out = {}
    for n, off in offsets.items():
        with (lab_dir / n / "daemon.log").open("rb") as f:
            f.seek(off)
            out[n] = f.read().decode(errors="replace")
    return out


def settled(lab: dict[str, Any], steady: float, timeout: float) -> dict[str, str]:
    """Wait until the live states have not changed for ``steady`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = live_states(lab), time.monotonic()
    while time.monotonic() - since < steady:
        if time.monotonic() > deadline:
            raise AssertionError(f"states still changing after {timeout:g} s: {last}")
        time.sleep(0.1)
        now = live_states(lab)
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_a_switchover_whose_primary_is_isolated_in_its_drain_fails_at_once(
        lab_dir: Path) -> None:
    """Found by the lab schedules: main, cut off from both peers while a switchover's
    drain waited for dc, fenced itself and dc took over, but the drain waited out its
    timeout and then said "nothing changed, client I/O resumed".  Now the switchover
    fails as soon as main fences, saying so; the cluster goes on without it."""
    from tests.integration.test_rejoin import peerlink_pid

    lab = up(lab_dir.parent)
    writer = Stamped(lab, 240)
    frozen = peerlink_pid(lab, "dc")
    cut = [[chain, flag, addr(lab, peer), "-j", "DROP"]
           for peer in ("dc", "dr") for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d"))]
    try:
        writer.wait_flushed(32, 30)
        os.kill(frozen, signal.SIGSTOP)  # dc cannot catch up: the drain waits
        writer.wait_flushed(writer.flushed_before(time.time()) + 16, 30)
        switch = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "-c", str(node(lab, "main")["config"]),
             "switchover", "--to", "dc", "--timeout", "30"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert switch.poll() is None, switch.communicate()
        t0 = time.monotonic()
        for rule in cut:
            in_ns(lab, "main", "iptables", "-I", *rule)
        out, err = switch.communicate(timeout=60)
        took = time.monotonic() - t0
        os.kill(frozen, signal.SIGCONT)
        print(f"switchover cut off in its drain: answered {took:.2f} s after the isolation "
              f"(rc {switch.returncode}): {err.strip()}")
        assert switch.returncode == 1, (out, err)
        assert "switchover: switchover to dc failed: node main lost its primary role " \
               "during the drain (this primary lost the majority of the sites" in err, err
        assert "client I/O is not resumed here" in err and "nothing changed" not in err, err
        assert took <= TIMEOUT + 2.0, took  # fenced within the timeout; was 30 s
        wait_for("dc primary", lambda: live_states(lab)["dc"] == "primary", 30,
                 seen=lambda: live_states(lab))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
        for rule in cut:
            in_ns(lab, "main", "iptables", "-D", *rule)
    wait_states(lab, {"main": "standby", "dc": "primary"}, 60)
    mark = writer.flushed_before(time.time())
    writer.wait_flushed(mark + 16, 60)  # the client writes on dc
    print(f"client: {writer.stop()}")


def test_fork_schedule_switchover_then_both_main_site_nodes_power_cut(lab_dir: Path) -> None:
    """The issue's schedule: switchover main -> dc, dc power-cut as soon as it serves,
    then (once the cluster settled) main too, then both back.  One primary, three
    identical copies, no history refused for good, within a bounded time; every block
    flushed before the switchover began is intact (async lab: what dc acknowledged in
    its short reign may be lost, and is kept in a diverged snapshot)."""
    lab = up(lab_dir.parent)
    writer = Stamped(lab, 240)
    try:
        writer.wait_flushed(64, 30)
        t_first_fault = time.time()
        switch = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "-c", str(node(lab, "main")["config"]),
             "switchover", "--to", "dc"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        wait_for("dc serves", lambda: failover_state(lab, "dc").get("state") == "primary", 30,
                 every=0.01, seen=lambda: live_states(lab))
        lab_cmd("kill", "dc", "--dir", str(lab_dir))
        t_dc_cut = time.time()
        out, err = switch.communicate(timeout=120)
        after_dc = settled(lab, steady=3 * TIMEOUT, timeout=60)
        print(f"switchover: {out.strip() or err.strip()}; dc power-cut "
              f"{t_dc_cut - t_first_fault:.2f} s after it began; then settled on {after_dc}")
        lab_cmd("kill", "main", "--dir", str(lab_dir))
        time.sleep(TIMEOUT)
        t_back = time.time()
        lab_cmd("start", "main", "--dir", str(lab_dir))
        lab_cmd("start", "dc", "--dir", str(lab_dir))
        wait_for("one primary, the others following",
                 lambda: sorted(live_states(lab).values()) == ["primary", "standby",
                                                               "witness"],
                 90, seen=lambda: live_states(lab))
        primary = the_primary(lab)
        mark = writer.flushed_before(time.time())
        writer.wait_flushed(mark + 32, 60)  # the client writes again, on the new primary
    finally:
        result = writer.stop()
    print(f"both back: {primary} serves {time.time() - t_back:.1f} s after the restarts; "
          f"client: {result}")
    digest = converge(lab, 90)
    offsets = log_sizes(lab_dir)
    time.sleep(2 * TIMEOUT)
    assert live_states(lab) == {**{n: "standby" for n in ("main", "dc") if n != primary},
                                primary: "primary", "dr": "witness"}
    for name, text in logs_since(lab_dir, offsets).items():
        assert "unrelated" not in text, (name, [x for x in text.splitlines()
                                                if "unrelated" in x][:3])
    for n in ("main", "dc", "dr"):
        refusals = list((node_dir(lab, n) / "volumes" / "v1" / "peers").glob("*.refused.json"))
        assert refusals == [], (n, [p.read_text() for p in refusals])
    assert checksum(lab, primary) == digest
    intact = writer.flushed_before(t_first_fault)
    got = check_blocks(lab, intact, time.time())
    assert got["bad"] == [], got
    print(f"{intact} blocks flushed before the switchover: intact; replicas {digest[:16]}")


def in_client(lab: dict[str, Any], *argv: str, timeout: float = 60
              ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ip", "netns", "exec", lab["client_netns"], *argv],
                          capture_output=True, timeout=timeout, check=False)


def iscsi_url(lab: dict[str, Any]) -> str:
    i = lab["iscsi"]
    return f"iscsi://{i['portal']}/{i['iqn']}:v1/1"


def wait_iscsi(lab: dict[str, Any], timeout: float = 30) -> float:
    """Seconds until the target at the service address answers an INQUIRY."""
    t0 = time.monotonic()
    wait_for("iSCSI target answers", lambda: in_client(
        lab, "iscsi-inq", iscsi_url(lab), timeout=30).returncode == 0, timeout, every=0.2,
        seen=lambda: live_states(lab))
    return round(time.monotonic() - t0, 2)


def iscsi_identity(lab: dict[str, Any]) -> dict[str, bytes]:
    """What an initiator identifies the disk by: discovery (target IQN and portal), the
    standard INQUIRY, VPD 0x80 (serial number) and 0x83 (T10 and NAA designators, raw as
    iscsi-inq prints them), and the capacity."""
    url = iscsi_url(lab)
    out = {}
    for key, argv in (("discovery", ["iscsi-ls", f"iscsi://{lab['iscsi']['portal']}"]),
                      ("inquiry", ["iscsi-inq", url]),
                      ("vpd 0x80", ["iscsi-inq", "-e", "1", "-c", "128", url]),
                      ("vpd 0x83", ["iscsi-inq", "-e", "1", "-c", "131", url]),
                      ("capacity", ["iscsi-readcapacity16", url])):
        p = in_client(lab, *argv)
        assert p.returncode == 0, (argv, p.stderr)
        out[key] = p.stdout
    return out


def iscsi_read(lab: dict[str, Any], tmp: Path, mib: int) -> bytes:
    """The first ``mib`` MiB of v1, read over iSCSI through the service address."""
    out = tmp / "iscsi-read.img"
    out.unlink(missing_ok=True)
    p = in_client(lab, "qemu-img", "dd", "-f", "raw", "-O", "raw", f"if={iscsi_url(lab)}",
                  f"of={out}", "bs=1M", f"count={mib}", timeout=120)
    assert p.returncode == 0, p.stderr
    return out.read_bytes()


def test_iscsi_identity_and_data_survive_a_power_cut_and_a_switchover(lab_dir: Path) -> None:
    from iscsi_bridge.names import DISK_LUN, scsi_sn

    for tool in ("tgtd", "iscsi-inq", "qemu-img", "qemu iscsi driver"):
        need(tool)
    lab = up(lab_dir.parent, "--iscsi")
    tmp = lab_dir.parent
    target = f"{lab['iscsi']['iqn']}:v1"
    first = iscsi_identity(lab)
    assert f"Target:{target} Portal:{lab['iscsi']['portal']}".encode() in first["discovery"]
    assert scsi_sn(target, DISK_LUN).encode() in first["vpd 0x80"], first["vpd 0x80"]
    assert b"Total size:67108864" in first["capacity"]
    a = os.urandom(4 << 20)
    (tmp / "a.img").write_bytes(a)
    p = in_client(lab, "qemu-img", "dd", "-f", "raw", "-O", "raw", f"if={tmp / 'a.img'}",
                  f"of={iscsi_url(lab)}", "bs=1M", "count=4", timeout=120)
    assert p.returncode == 0, p.stderr
    converge(lab)  # async lab: every site has it before the power cut

    t0 = float(json.loads(lab_cmd("kill", "main", "--dir", str(lab_dir)))["at"])
    _, nbd_back = time_failover(lab, "dc", t0, 8192)
    wait_iscsi(lab)
    after_cut = round(time.time() - t0, 2)
    # The bridge follows nbdkit at once (it used to wait for its next reconcile, 5 s).
    assert after_cut - nbd_back < 2.0, (after_cut, nbd_back)
    assert iscsi_identity(lab) == first
    assert iscsi_read(lab, tmp, 4) == a
    p = in_client(lab, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 8M 2M", iscsi_url(lab))
    assert p.returncode == 0 and b"Pattern" not in p.stdout, p.stdout + p.stderr

    lab_cmd("start", "main", "--dir", str(lab_dir))
    wait_states(lab, {"main": "standby"}, 30)
    wait_for("main consistent", lambda: failover_state(lab, "main").get("consistent") is True,
             60)
    switchover(lab, "dc", "main")
    t1 = time.time()
    wait_for("main primary", lambda: live_states(lab)["main"] == "primary", 20,
             seen=lambda: live_states(lab))
    wait_iscsi(lab)
    after_switch = round(time.time() - t1, 2)
    assert iscsi_identity(lab) == first
    data = iscsi_read(lab, tmp, 16)
    assert data[:4 << 20] == a
    assert data[8 << 20:10 << 20] == b"\x5a" * (2 << 20)
    assert data[4 << 20:8 << 20] == bytes(4 << 20)
    print(f"iSCSI target back {after_cut} s after the power cut (NBD {nbd_back} s) and "
          f"{after_switch} s after the switchover home; identity and data unchanged")
    converge(lab)
    assert the_primary(lab) == "main"


class Workload:
    """Files written into ``root`` one after another (4 KiB to 256 KiB of random data),
    each fsynced and then its directory: a file's SHA-256 is recorded, with the time,
    only once both fsyncs returned.  Stops at the first error (recorded)."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)  # noqa: S311 - test data, not a secret
        self.done: list[tuple[str, str, float]] = []
        self.error: str | None = None
        self.stopping = threading.Event()
        root.mkdir()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        d = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while not self.stopping.is_set():
                data = self.rng.randbytes(self.rng.choice((4096, 12345, 65536, 262144)))
                name = f"f{len(self.done):05d}"
                try:
                    with (self.root / name).open("wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.fsync(d)
                except OSError as e:
                    self.error = f"{name}: {e}"
                    return
                self.done.append((name, hashlib.sha256(data).hexdigest(), time.time()))
                time.sleep(0.02)
        finally:
            os.close(d)

    def wait_more(self, n: int, timeout: float) -> float:
        """Until ``n`` more files are durable; returns when the first of them was."""
        start = len(self.done)
        wait_for(f"{n} more files fsynced", lambda: len(self.done) >= start + n
                 or self.error is not None, timeout, seen=lambda: (len(self.done), start))
        assert self.error is None, self.error
        return self.done[start][2]

    def stop(self, timeout: float = 60) -> None:
        self.stopping.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the workload is stuck in a write or an fsync"
        assert self.error is None, self.error


@contextmanager
def reconnecting_client(lab: dict[str, Any], sock: Path) -> Iterator[str]:
    """qemu-nbd in the client namespace: its NBD block driver connected to v1 at the
    service address with reconnect-delay (requests wait for a new connection, and the
    ones in flight are sent again), exported on a unix socket for this host; yields
    that socket's NBD URI."""
    opts = (f"driver=nbd,server.type=inet,server.host={lab['service_address']},"
            f"server.port=10809,export=v1,reconnect-delay=60")
    log = sock.with_suffix(".log")
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", lab["client_netns"], "qemu-nbd", "--image-opts", opts,
             "-k", str(sock), "-x", "v1", "--persistent", "--shared=4", "--cache=none"],
            stdout=out, stderr=out)
    try:
        wait_for("qemu-nbd listens", lambda: sock.exists() or proc.poll() is not None, 30)
        assert proc.poll() is None, log.read_text()
        yield f"nbd+unix:///v1?socket={sock}"
    finally:
        proc.kill()
        proc.wait(30)


@contextmanager
def propagating(path: Path) -> Iterator[Path]:
    """``path`` as a shared mount (a bind mount onto itself).  `nbdgw lab start` runs a
    site under `ip netns exec`, which gives it a copy of this host's mounts (then made
    slaves): on this host's private mounts the copies of our FUSE and ext4 mounts kept
    the file system mounted read-write in the restarted daemon's namespace after we
    unmounted it here ("Can't mount, would change RO state", then I/O errors at lab
    down).  Under a shared mount our unmounts propagate to those copies."""
    path.mkdir()
    run(["mount", "--bind", str(path), str(path)])
    try:
        run(["mount", "--make-rshared", str(path)])
        yield path
    finally:
        run(["umount", "-l", str(path)], check=False)


def test_ext4_through_a_reconnecting_client_keeps_every_fsynced_file(lab_dir: Path) -> None:
    """ext4 on nbdfuse -> qemu-nbd (reconnect-delay) -> the service address, in a sync
    lab: a workload of fsynced files goes on through a power cut of the primary and a
    switchover back; every file whose fsync returned reads back bit for bit, and the
    file system is clean."""
    if not (os.path.exists("/dev/fuse") and os.path.exists("/dev/loop-control")):
        pytest.skip("needs /dev/fuse and loop devices")
    for tool in ("qemu-nbd", "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck"):
        need(tool)
    lab = up(lab_dir.parent, "--mode", "sync")  # async loses the last fsynced files: tried
    stalls = {}
    with ExitStack() as stack:
        tmp = stack.enter_context(propagating(lab_dir.parent / "fs"))
        nbd_uri = stack.enter_context(reconnecting_client(lab, tmp / "qemu-nbd.sock"))
        image = stack.enter_context(nbdfuse(tmp / "fuse", nbd_uri))
        dev = stack.enter_context(loop_device(image))
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
        with mounted(dev, tmp / "mnt") as mnt:
            work = Workload(mnt / "files", seed=5)
            try:
                work.wait_more(16, 60)
                t_cut = float(json.loads(lab_cmd("kill", "main", "--dir", str(lab_dir)))["at"])
                stalls["power cut"] = round(work.wait_more(16, 90) - t_cut, 2)
                assert live_states(lab)["dc"] == "primary", live_states(lab)
                lab_cmd("start", "main", "--dir", str(lab_dir))
                wait_states(lab, {"main": "standby"}, 30)
                wait_for("main consistent",
                         lambda: failover_state(lab, "main").get("consistent") is True, 60)
                work.wait_more(8, 60)
                t_sw = time.time()
                switchover(lab, "dc", "main")
                stalls["switchover"] = round(work.wait_more(16, 90) - t_sw, 2)
                assert the_primary(lab) == "main"
            finally:
                work.stop()
        fsck = run(["e2fsck", "-fn", dev], check=False)
        assert fsck.returncode == 0, f"e2fsck -fn: {fsck.stdout}\n{fsck.stderr}"
        with mounted(dev, tmp / "mnt", "ro") as mnt:
            got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                   for p in (mnt / "files").iterdir()}
    want = {name: digest for name, digest, _ in work.done}
    print(f"{len(want)} files fsynced; first file durable after the fault: {stalls} s")
    lost = sorted(n for n in want if n not in got)
    wrong = sorted(n for n in want if n in got and got[n] != want[n])
    assert (lost, wrong) == ([], []), (lost[:5], wrong[:5])
    converge(lab)  # and the three sites hold the same bytes
