"""`nbdgw lab`: three sites in network namespaces, v1 fanned out from main to dc and dr.

A client in the lab's client namespace writes random data over NBD (libnbd, TCP to the
service address across the lab's bridge), then reads the whole export back and hashes
it.  "Caught up" means: both peers' persisted acks (``peers/<peer>.json`` on the primary)
equal the primary journal's last complete seq (``peerlink.sender.journal_bounds``, the
same reader the sender uses for its handshake), on two polls in a row.  After
``lab down`` (SIGTERM: every volume closes cleanly), ``nbdgw volume checksum`` of the
three sites must equal each other and the client's own hash.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockstore.journal import journal_bounds
from tests.conftest import NBDGW, run_nbdgw
from tests.integration.conftest import lab_cmd, node_dir, run_cmd

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (netns)")

SIZE = "64M"

# Runs in the client netns: random writes until max_writes, the deadline, or (with
# "interactive") a line on stdin; a flush and a "progress N" line every 32 writes; then
# reads the whole export and prints "done N SHA256".
WRITER = r"""
import hashlib, os, random, select, sys, time
import nbd
uri, seed, max_writes, seconds, interactive = sys.argv[1:6]
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
rng = random.Random(int(seed))
deadline = time.monotonic() + float(seconds)
n = 0
while n < int(max_writes) and time.monotonic() < deadline:
    length = rng.choice((4096, 16384, 65536))
    h.pwrite(os.urandom(length), rng.randrange(0, (size - length) // 4096 + 1) * 4096)
    n += 1
    if n % 32 == 0:
        h.flush()
        print(f"progress {n}", flush=True)
        if interactive == "1" and select.select([sys.stdin], [], [], 0)[0]:
            break
h.flush()
digest = hashlib.sha256()
for off in range(0, size, 1 << 20):
    digest.update(h.pread(min(1 << 20, size - off), off))
h.shutdown()
print(f"done {n} {digest.hexdigest()}", flush=True)
"""


class Writer:
    """The writer process in the client namespace, its output lines in a queue."""

    def __init__(self, lab: dict[str, Any], seed: int, max_writes: int,
                 interactive: bool) -> None:
        uri = f"nbd://{lab['service_address']}:10809/v1"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab["client_netns"], sys.executable, "-c", WRITER, uri,
             str(seed), str(max_writes), "30", "1" if interactive else "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.progress = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("")  # EOF

    def next_line(self, timeout: float = 30) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"writer said nothing for {timeout} s") from None
        if not line:
            self.proc.wait(10)
            assert self.proc.stderr is not None
            raise AssertionError(f"writer exited ({self.proc.returncode}): "
                                 f"{self.proc.stderr.read()}")
        if line.startswith("progress "):
            self.progress = int(line.split()[1])
        return line

    def wait_progress(self, at_least: int) -> None:
        while self.progress < at_least:
            self.next_line()

    def finish(self, stop: bool = False) -> tuple[int, str]:
        """(writes done, SHA-256 of the export read back) once the writer ends."""
        if stop:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        while True:
            line = self.next_line()
            if line.startswith("done "):
                _, n, digest = line.split()
                assert self.proc.wait(10) == 0
                return int(n), digest

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A lab up in tmp_path/lab; `lab down` afterwards, even when the test failed."""
    lab_dir = tmp_path / "lab"
    up = run_nbdgw("lab", "up", "--dir", str(lab_dir), "--size", SIZE, check=False,
                   timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        info = json.loads(up.stdout)
        yield info
    finally:
        down = run_nbdgw("lab", "down", "--dir", str(lab_dir), check=False, timeout=90)
        state = json.loads((lab_dir / "lab.json").read_text())
        left = run_cmd(["ip", "netns", "list"])
        assert f"nbdgw-{state['id']}-" not in left, left
        assert down.returncode == 0, down.stderr


def acked(lab: dict[str, Any], peer: str) -> int:
    path = node_dir(lab, "main") / "volumes/v1/peers" / f"{peer}.json"
    try:
        return int(json.loads(path.read_text())["acked_seq"])
    except (FileNotFoundError, ValueError):  # not yet written, or being replaced
        return -1


def wait_caught_up(lab: dict[str, Any], timeout: float = 30) -> int:
    """Poll until both peers' acks equal the primary journal's end twice in a row."""
    journal = node_dir(lab, "main") / "volumes/v1/journal"
    deadline = time.monotonic() + timeout
    steady = 0
    while steady < 2:
        last = journal_bounds(journal)[1]
        acks = {p: acked(lab, p) for p in ("dc", "dr")}
        steady = steady + 1 if all(a == last for a in acks.values()) else 0
        if time.monotonic() > deadline:
            raise AssertionError(f"acks {acks}, primary journal ends at {last}, "
                                 f"after {timeout} s")
        time.sleep(0.1)
    return last


def checksums_after_down(lab: dict[str, Any]) -> dict[str, str]:
    down = run_nbdgw("lab", "down", "--dir", lab["dir"])
    assert json.loads(down.stdout)["removed_netns"] != []
    assert "left in" in down.stderr
    return {n["name"]: run_nbdgw("volume", "checksum", "v1", "--data-dir",
                                 n["data_dir"]).stdout.split()[0] for n in lab["nodes"]}


def test_lab_up_write_replicate_checksums(lab: dict[str, Any]) -> None:
    assert lab["volumes"] == ["v1"]
    assert [(n["name"], n["role"]) for n in lab["nodes"]] == [
        ("main", "primary"), ("dc", "secondary"), ("dr", "dr")]
    assert lab["nodes"][0]["address"] == "192.0.2.1"
    assert lab["service_address"] == "192.0.2.5"  # held by the primary, moved on failover
    netns = run_cmd(["ip", "netns", "list"])
    for ns in [n["netns"] for n in lab["nodes"]] + [lab["client_netns"]]:
        assert ns.startswith(f"nbdgw-{lab['id']}-") and ns in netns
    for n in lab["nodes"]:
        assert run_nbdgw("config", "check", n["config"]).returncode == 0
    # the service is reachable from the client namespace only through the lab's bridge
    host_addrs = run_cmd(["ip", "-brief", "addr"])
    assert " 192.0.2.1/" not in host_addrs and " 192.0.2.5/" not in host_addrs

    writer = Writer(lab, seed=1, max_writes=320, interactive=False)
    try:
        writes, digest = writer.finish()
    finally:
        writer.kill()
    assert writes == 320
    last = wait_caught_up(lab)
    assert last >= writes
    sums = checksums_after_down(lab)
    assert sums == {"main": digest, "dc": digest, "dr": digest}


def test_lab_kill_and_start_a_replica_while_writing(lab: dict[str, Any]) -> None:
    writer = Writer(lab, seed=2, max_writes=100_000, interactive=True)
    try:
        writer.wait_progress(64)
        killed = json.loads(lab_cmd("kill", "dc", "--dir", lab["dir"]))
        assert (killed["node"], killed["killed"]) == ("dc", ["daemon"])
        dc_ns = lab["nodes"][1]["netns"]
        assert run_cmd(["ip", "netns", "pids", dc_ns]).split() == []
        at_kill = writer.progress
        writer.wait_progress(at_kill + 64)  # the primary keeps serving while dc is down
        started = json.loads(lab_cmd("start", "dc", "--dir", lab["dir"]))
        assert list(started["started"]) == ["daemon"]
        writer.wait_progress(writer.progress + 64)
        writes, digest = writer.finish(stop=True)
    finally:
        writer.kill()
    assert writes >= at_kill + 128
    last = wait_caught_up(lab)
    assert last >= writes
    sums = checksums_after_down(lab)
    assert sums == {"main": digest, "dc": digest, "dr": digest}


def test_lab_errors_are_one_clear_line(tmp_path: Path) -> None:
    missing = run_nbdgw("lab", "down", "--dir", str(tmp_path / "nolab"), check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"nbdgw: error: no lab in {tmp_path / 'nolab'} ({tmp_path / 'nolab' / 'lab.json'} "
        f"not found; create one with 'nbdgw lab up --dir {tmp_path / 'nolab'}')"]
    bad = run_nbdgw("lab", "up", "--dir", str(tmp_path / "x"), "--subnet", "2001:db8::/64",
                    check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "nbdgw: error: --subnet: expected an IPv4 network of at least 8 addresses (/29), "
        "got 2001:db8::/64"]
    nonroot = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", NBDGW, "lab", "up",
         "--dir", str(tmp_path / "y")], capture_output=True, text=True, timeout=60,
        check=False)
    assert nonroot.returncode == 1, nonroot.stderr
    assert nonroot.stderr.strip().splitlines() == [
        "nbdgw: error: nbdgw lab needs root (it creates network namespaces); run it as root"]
