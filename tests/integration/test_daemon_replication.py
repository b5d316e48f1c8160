"""`nbdgw daemon` on three nodes from their configs (loopback, one port each): fan-out and
cascade replication, sync mode with its degrade timeout, status per peer."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import NBDGW, free_port, run_nbdgw

SITES = (("main", "primary"), ("dc", "secondary"), ("dr", "dr"))
SIZE = 64 << 20




class Node:
    def __init__(self, root: Path, name: str, role: str, port: int) -> None:
        self.name, self.role, self.port = name, role, port
        self.dir = root / name
        self.data = self.dir / "data"
        self.config = self.dir / "nbdgw.yaml"
        self.sock = self.dir / "nbd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def write_config(self, nodes: list[Node], topology: str, modes: dict[str, str],
                     secret: Path, sync_timeout: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "version": 1,
            "node": {"name": self.name, "data_dir": str(self.data), "role": self.role},
            "nbd": {"listen": [f"unix:{self.sock}"]},
            "peerlink": {"listen": f"127.0.0.1:{self.port}", "topology": topology,
                         "secret_file": str(secret)},
            # Failover is tested in the lab (one address per site); here the three nodes
            # share 127.0.0.1, so heartbeats (one port per node) are off.
            "failover": {"auto": False},
            # Sync is the main-site pair's: each names the other sync (DR nobody).
            "peers": [{"name": n.name, "role": n.role, "address": "127.0.0.1", "port": n.port,
                       "mode": (modes.get(n.name) or modes.get(self.name) or "async")
                       if {n.role, self.role} <= {"primary", "secondary"} else "async",
                       "sync_timeout": sync_timeout}
                      for n in nodes if n is not self],
        }
        self.config.write_text(yaml.safe_dump(cfg))

    def nbdgw(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_nbdgw("-c", str(self.config), *args, check=check)

    def start(self) -> None:
        log = self.dir / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([NBDGW, "-c", str(self.config), "--log-format", "json",
                                          "daemon"], stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if sig == signal.SIGKILL:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"{self.name}: daemon did not stop on SIGTERM") from None
        self.proc = None

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs)

    def status(self) -> dict[str, Any]:
        return json.loads(self.nbdgw("status", "--json").stdout)

    def checksum(self, volume: str = "v1") -> str:
        return self.nbdgw("volume", "checksum", volume).stdout.split()[0]


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Any]:
    made: list[Node] = []

    def make(topology: str = "fanout", modes: dict[str, str] | None = None,
             sync_timeout: float = 2.0) -> list[Node]:
        secret = tmp_path / "peer.secret"
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)  # config check refuses a secret others can read
        nodes = [Node(tmp_path, n, r, free_port()) for n, r in SITES]
        for n in nodes:
            n.write_config(nodes, topology, modes or {}, secret, sync_timeout)
            n.nbdgw("volume", "create", "v1", "--size", str(SIZE),
                    *(["--replica"] if n.role != "primary" else []))
        made.extend(nodes)
        return nodes

    yield make
    for n in made:
        if n.proc is not None:
            with __import__("contextlib").suppress(Exception):
                n.stop(signal.SIGKILL)


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def connect(node: Node) -> Any:
    import nbd

    deadline = time.monotonic() + 30
    while True:
        h = nbd.NBD()
        try:
            h.connect_uri(f"nbd+unix:///v1?socket={node.sock}")
            return h
        except nbd.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def peer_state(node: Node, peer: str) -> dict[str, Any]:
    for v in node.status()["volumes"]:
        for p in v["peers"]:
            if p["name"] == peer:
                return p  # type: ignore[no-any-return]
    return {}


def in_sync(primary: Node, peer: str) -> bool:
    p = peer_state(primary, peer)
    return bool(p) and p["lag_records"] == 0 and p["state"] in ("in sync", "streaming")


def write_pattern(h: Any, n: int, seed: int) -> None:
    for i in range(n):
        h.pwrite(bytes([(seed + i) % 251]) * 65536, (i * 65536 * 7) % SIZE)
    h.flush()


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
