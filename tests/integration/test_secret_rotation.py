"""Rotating the peer secret in the three-site lab without downtime (SECURITY.md, "Rotating
the peer secret"; issue 20).

A client writes through the service address for the whole rotation while every site
goes through the three steps, one site after the other, each applied with SIGHUP (the
daemon re-reads the heartbeat keys and restarts its peerlink process): (1) the new secret
as ``peerlink.next_secret_file``, (2) swapped, the new one current and the old one next,
(3) next removed.  Throughout, a monitor reads every site's ``run/failover.json``: the
states never change, no beat is rejected and every site hears each of its peers well
within ``failover.timeout``.  At the end: no failover transition, no refused link or
failed authentication in any log, no resync (every link resumed where it was), and the
replicas' checksums equal the primary's.  Last, the monitor is shown to see a wrong
secret: DR given an unrelated one is refused on both its links and its beats.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.lab import log_events, log_size
from tests.integration.conftest import client, converge, failover_state, up, uri

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (netns)")

SITES = ("main", "dc", "dr")
EXPECTED = {"main": "primary", "dc": "standby", "dr": "witness"}
FAILOVER_TIMEOUT = 2.0  # failover.timeout (the default in the lab)
SYNC_TIMEOUT = 5.0  # peers' sync_timeout (the default in the lab)
# Log events that mean a link or a beat was refused, a reload not taken, a failover, or
# a sync peer given up on.
UNEXPECTED = ("auth_failed", "peer_refused_by_us", "refused_by_peer", "heartbeat_rejected",
              "heartbeat_keys_kept", "reload_refused", "failover_transition", "sync_stalled",
              "sync_degraded")

# In the client namespace: stamped 4 KiB writes through the volume, wrapping round, a
# flush and a "flushed N" line every 16 writes, until a line on stdin; then "done N".
WRITER = r"""
import select, struct, sys, time, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
blocks = h.get_size() // 4096
i = 0
try:
    while not select.select([sys.stdin], [], [], 0)[0]:
        h.pwrite(struct.pack("<Q", i) * 512, (i % blocks) * 4096)
        i += 1
        if i % 16 == 0:
            h.flush()
            print(f"flushed {i}", flush=True)
            time.sleep(0.005)  # a steady stream, not a benchmark on a shared host
    h.flush()
    print(f"done {i}", flush=True)
except nbd.Error as e:
    print(f"error {e}", flush=True)
    sys.exit(1)
"""


class Writer:
    """WRITER in the client namespace; ``flushed`` follows its output."""

    def __init__(self, lab: dict[str, Any]) -> None:
        self.proc = client(lab, WRITER, uri(lab), stdin=subprocess.PIPE)
        self.flushed = 0
        self.longest_wait = 0.0  # between two flushes, once the first was seen
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        last = None
        for line in self.proc.stdout:
            self.lines.append(line.strip())
            if line.startswith("flushed "):
                self.flushed = int(line.split()[1])
                now = time.monotonic()
                if last is not None:
                    self.longest_wait = max(self.longest_wait, now - last)
                last = now

    def wait_progress(self, beyond: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.flushed <= beyond:
            assert self.proc.poll() is None, self.lines[-3:]
            assert time.monotonic() < deadline, f"no write flushed in {timeout} s"
            time.sleep(0.05)

    def stop(self) -> list[str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        self.proc.wait(60)
        self.thread.join(10)
        assert self.proc.returncode == 0, (self.lines[-3:], self.proc.stderr.read()
                                           if self.proc.stderr else "")
        return self.lines


class Monitor:
    """Every 0.2 s, what each site's daemon published: anything but the expected
    states, a rejected beat, or a peer not heard for ``FAILOVER_TIMEOUT`` is recorded."""

    def __init__(self, lab: dict[str, Any]) -> None:
        self.lab = lab
        self.problems: list[str] = []
        self.samples = 0
        self.worst_heard = 0.0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.wait(0.2):
            for name in SITES:
                st = failover_state(self.lab, name)
                if not st:
                    continue  # replaced at this instant: read it next time
                self.samples += 1
                if st.get("state") != EXPECTED[name]:
                    self.problems.append(f"{name} is {st.get('state')}")
                if st.get("beats_rejected"):
                    self.problems.append(f"{name} rejected beats: {st['beats_rejected']}")
                for peer in set(SITES) - {name}:
                    heard = (st.get("peers") or {}).get(peer, {}).get("heard_s_ago")
                    if heard is None or heard >= FAILOVER_TIMEOUT:
                        self.problems.append(f"{name} has not heard {peer} for {heard} s")
                    else:
                        self.worst_heard = max(self.worst_heard, heard)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)


def daemon_log(lab_dir: Path, name: str) -> Path:
    return lab_dir / name / "daemon.log"


def events_since(lab_dir: Path, name: str, offset: int, *names: str) -> list[dict[str, Any]]:
    return [e for e in log_events(daemon_log(lab_dir, name), offset)
            if e.get("event") in names]


def wait_event(lab_dir: Path, name: str, offset: int, what: str, match: Any,
               timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any(match(e) for e in log_events(daemon_log(lab_dir, name), offset)):
        assert time.monotonic() < deadline, f"{name}: no {what} within {timeout} s"
        time.sleep(0.1)


def hup_with(lab_dir: Path, name: str, peerlink: dict[str, Any]) -> dict[str, int]:
    """Replace site ``name``'s peerlink secret keys with ``peerlink``, SIGHUP its daemon
    and wait for its ``reloaded``; returns the logs' sizes from before."""
    state = json.loads((lab_dir / "lab.json").read_text())
    node = next(n for n in state["nodes"] if n["name"] == name)
    cfg_path = Path(node["config"])
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["peerlink"] = {k: v for k, v in cfg["peerlink"].items() if "secret" not in k}
    cfg["peerlink"].update(peerlink)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    offsets = {n: log_size(daemon_log(lab_dir, n)) for n in SITES}
    os.kill(next(p for p in node["procs"] if p["name"] == "daemon")["pid"], signal.SIGHUP)
    wait_event(lab_dir, name, offsets[name], "reload", lambda e: e.get("event") == "reloaded")
    return offsets


def reload_site(lab_dir: Path, name: str, peerlink: dict[str, Any]) -> None:
    """``hup_with``, then wait until the primary streams to the site again (to every
    peer, for main: its peerlink process restarted)."""
    offsets = hup_with(lab_dir, name, peerlink)
    changed = events_since(lab_dir, name, offsets[name], "heartbeat_keys_changed")
    assert [e["next_secret"] for e in changed] == ["next_secret_file" in peerlink], changed
    if "next_secret_file" in peerlink:  # the restarted peerlink process says so
        wait_event(lab_dir, name, offsets[name], "peer_secret_rotation",
                   lambda e: e.get("event") == "peer_secret_rotation")
    for peer in ((name,) if name != "main" else ("dc", "dr")):
        wait_event(lab_dir, "main", offsets["main"], f"stream to {peer}",
                   lambda e, p=peer: e.get("event") in ("streaming", "resync")
                   and e.get("side") == "sender" and e.get("peer") == p)


def secret_file(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_rotating_the_peer_secret_keeps_replication_and_heartbeats(lab_dir: Path,
                                                                   mode: str) -> None:
    """``mode``: the main-site pair's (sync: the primary's peerlink restarts hold the
    client's flushes until dc acknowledges again, well within sync_timeout)."""
    lab = up(lab_dir.parent, "--mode", mode)
    state = json.loads((lab_dir / "lab.json").read_text())
    old = {n["name"]: n["secret"] for n in state["nodes"]}
    new_secret = os.urandom(32).hex().encode() + b"\n"
    new = {n: str(secret_file(lab_dir / n / "peer.secret.new", new_secret)) for n in SITES}
    start = {n: log_size(daemon_log(lab_dir, n)) for n in SITES}

    writer = Writer(lab)
    writer.wait_progress(64)
    monitor = Monitor(lab)
    try:
        steps = [
            ("1: the new secret as next", lambda n: {"secret_file": old[n],
                                                      "next_secret_file": new[n]}),
            ("2: swapped", lambda n: {"secret_file": new[n], "next_secret_file": old[n]}),
            ("3: next removed", lambda n: {"secret_file": new[n]}),
        ]
        for step, keys in steps:
            for name in SITES:
                before = writer.flushed
                reload_site(lab_dir, name, keys(name))
                writer.wait_progress(before)  # the client's writes went on
            print(f"step {step}: done on every site, {writer.flushed} writes flushed")
        time.sleep(2 * FAILOVER_TIMEOUT)  # the last step's beats and links, settled
    finally:
        monitor.stop()
    lines = writer.stop()
    assert lines[-1].startswith("done "), lines[-3:]

    assert monitor.problems == [], monitor.problems[:10]
    assert monitor.samples >= 30, monitor.samples  # it watched the whole rotation
    print(f"{monitor.samples} samples, every peer heard within {monitor.worst_heard} s; "
          f"longest wait for a flush {writer.longest_wait:.2f} s")
    assert writer.longest_wait < SYNC_TIMEOUT
    for name in SITES:
        bad = events_since(lab_dir, name, start[name], *UNEXPECTED)
        assert bad == [], (name, bad[:5])
    # Each peerlink restart resumed its links where they were: streaming, never a resync.
    resumed = events_since(lab_dir, "main", start["main"], "streaming", "resync")
    assert {(e["event"], e["peer"]) for e in resumed if e.get("side") == "sender"} == {
        ("streaming", "dc"), ("streaming", "dr")}
    assert {n: failover_state(lab, n)["state"] for n in SITES} == EXPECTED
    converge(lab)  # main's checksum equals dc's and dr's (writes have stopped)

    # The monitor's evidence is worth something: an unrelated secret on DR is refused
    # on its links and its beats, with the others still on the rotated secret.
    stranger = secret_file(lab_dir / "dr" / "peer.secret.stranger",
                           os.urandom(32).hex().encode())
    offsets = hup_with(lab_dir, "dr", {"secret_file": str(stranger)})
    wait_event(lab_dir, "main", offsets["main"], "refusal by dr",
               lambda e: e.get("event") == "refused_by_peer" and e.get("peer") == "dr")
    deadline = time.monotonic() + 10
    while not failover_state(lab, "main").get("beats_rejected", {}).get("mac"):
        assert time.monotonic() < deadline, failover_state(lab, "main")
        time.sleep(0.2)

