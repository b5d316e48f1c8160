"""Three real `nbdgw daemon` nodes from their configs on loopback (one port each): what the
daemon replication, grow and peer administration tests run on (the fixture
``make_cluster`` is in conftest.py), and what the readable replica tests share: a
primary written to and snapshotted (``with_s1``), a steady ``Writer``, libnbd handles on
a node's exports and their hashes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from blockstore.snapshot import read_index
from tests.conftest import NBDGW, run_nbdgw

SITES = (("main", "primary"), ("dc", "secondary"), ("dr", "dr"))
SIZE = 64 << 20
MiB = 1 << 20


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


# -- readable replicas (tests/integration/test_replica_serve.py, test_replica_iscsi.py) --


def uri(node: Node, export: str) -> str:
    return f"nbd+unix:///{export}?socket={node.sock}"


def opened(node: Node, export: str, timeout: float = 30) -> Any:
    """A libnbd handle on ``export`` of ``node``'s NBD socket, once it answers."""
    import nbd

    deadline = time.monotonic() + timeout
    while True:
        h = nbd.NBD()
        try:
            h.connect_uri(uri(node, export))
            return h
        except nbd.Error as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{export} on {node.name}: {e}") from None
            time.sleep(0.1)


def hashes(h: Any) -> list[bytes]:
    return [hashlib.blake2b(h.pread(MiB, o)).digest() for o in range(0, SIZE, MiB)]


def hashes_of(node: Node, export: str) -> list[bytes]:
    h = opened(node, export)
    try:
        return hashes(h)
    finally:
        h.shutdown()


def snapshot_names(data: Path) -> list[str]:
    """The snapshots of volume v1 in data dir ``data``, oldest first."""
    path = data / "volumes/v1/snapshots/index"
    if not path.exists():
        return []
    _shift, index = read_index(path)
    return [index.snaps[i].name for i in index.order]


def snapshots(node: Node) -> list[str]:
    return snapshot_names(node.data)


def with_s1(main: Node, replicas: tuple[Node, ...], blocks: int, seed: int) -> None:
    """The started primary ``main``: ``blocks`` of pattern ``seed`` written to v1, then
    its snapshot s1 taken and waited for on each of the started ``replicas``."""
    h = connect(main)
    write_pattern(h, blocks, seed)
    h.shutdown()
    main.nbdgw("snapshot", "create", "v1", "--name", "s1")
    wait_for(lambda: all("s1" in snapshots(n) for n in replicas), 60,
             "s1 on " + ", ".join(n.name for n in replicas))


class Writer(threading.Thread):
    """Writes ``blocks`` to the primary each round until stopped (a pause between rounds
    of ``pause`` s): the replicas keep receiving meanwhile."""

    def __init__(self, node: Node, blocks: int, seed: int, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.h = connect(node)
        self.blocks, self.seed, self.pause = blocks, seed, pause
        self.stop_flag = threading.Event()
        self.rounds = 0

    def run(self) -> None:
        while not self.stop_flag.is_set() and self.rounds < 10_000:
            write_pattern(self.h, self.blocks, self.seed + self.rounds)
            self.rounds += 1
            if self.pause:
                self.stop_flag.wait(self.pause)

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(60)
        self.h.shutdown()
