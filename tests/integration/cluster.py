"""Three real `nbdgw daemon` nodes from their configs on loopback (one port each): what the
daemon replication, grow and peer administration tests run on (the fixture
``make_cluster`` is in conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import NBDGW, run_nbdgw

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
