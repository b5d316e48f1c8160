"""`nbdgw daemon`: one per node; runs and supervises what the node's role needs.

- primary: nbdkit serving the node's own volumes (``NbdServer``), and the node's peerlink
  process (``nbdgw replicate``: senders, the sync gate, receivers for any replicas);
- secondary and dr: the peerlink process (receivers; with cascade, the DR sender).

A child that exits unexpectedly is restarted with bounded exponential backoff (logged,
with its exit status); one that keeps running for ``STABLE_AFTER`` seconds resets the
backoff.  SIGTERM/SIGINT become a stop event (never exit inside a handler): nbdkit stops
first (no client writes while the links drain), then peerlink, each closing its volumes
cleanly.  The failover state machine, iSCSI bridge and snapshot scheduler plug in here.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from .config import NodeConfig, Role
from .errors import GatewayError
from .replication import plan
from .serve import NbdServer, precheck_volumes

log = structlog.get_logger(component="daemon")

MIN_BACKOFF: Final = 0.5
MAX_BACKOFF: Final = 30.0
STABLE_AFTER: Final = 30.0
STOP_TIMEOUT: Final = 30.0


@dataclass
class Child:
    """One supervised process: how to start it, stop it and tell that it exited."""

    name: str
    start: Callable[[], None]
    stop: Callable[[], int]
    poll: Callable[[], int | None]
    started_at: float = 0.0
    backoff: float = MIN_BACKOFF
    restart_at: float | None = None
    restarts: int = 0


class PeerlinkProcess:
    """`nbdgw -c CONFIG replicate` as a child process."""

    def __init__(self, config_path: Path | None, log_format: str) -> None:
        self.argv = [sys.executable, "-m", "gateway.cli"]
        if config_path is not None:
            self.argv += ["-c", str(config_path)]
        self.argv += ["--log-format", log_format, "replicate"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, cwd="/")

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("peerlink_kill", reason=f"no exit {STOP_TIMEOUT:g} s after SIGTERM")
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Daemon:
    def __init__(self, cfg: NodeConfig, config_path: Path | None,
                 log_format: str = "json") -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.children: list[Child] = []
        if cfg.role is Role.PRIMARY:
            pre = precheck_volumes(cfg, None)
            for name, err in pre.failed.items():
                log.error("volume_not_served", volume=name, error=err)
            if pre.served:
                nbd = NbdServer(cfg, pre.served)

                def start_nbd() -> None:
                    nbd.start()
                    nbd.wait_ready()

                self.children.append(Child(
                    "nbdkit", start_nbd, nbd.stop,
                    lambda: None if nbd.proc is None else nbd.proc.poll()))
        p = plan(cfg)
        if p.senders or p.receivers:
            pl = PeerlinkProcess(config_path, log_format)
            self.children.append(Child("peerlink", pl.start, pl.stop, pl.poll))
        if not self.children:
            raise GatewayError(f"nothing to run on node {cfg.name} (role {cfg.role.value}): "
                               f"no volume in {cfg.data_dir} to serve or replicate")

    def _start(self, c: Child) -> None:
        try:
            c.start()
        except (GatewayError, OSError) as e:
            log.error("child_start_failed", child=c.name, error=str(e))
            self._schedule(c)
            return
        c.started_at = time.monotonic()
        c.restart_at = None
        log.info("child_started", child=c.name, restarts=c.restarts)

    def _schedule(self, c: Child) -> None:
        c.restart_at = time.monotonic() + c.backoff
        log.warning("child_restart_scheduled", child=c.name, delay_s=c.backoff)
        c.backoff = min(c.backoff * 2, MAX_BACKOFF)

    def run(self) -> int:
        def on_signal(signum: int, _frame: Any) -> None:
            self.stop_event.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        log.info("daemon_starting", node=self.cfg.name, role=self.cfg.role.value,
                 children=[c.name for c in self.children])
        # peerlink first: the sync gate should be up before nbdkit takes writes.
        for c in sorted(self.children, key=lambda c: c.name != "peerlink"):
            self._start(c)
        while not self.stop_event.wait(0.2):
            now = time.monotonic()
            for c in self.children:
                if c.restart_at is not None:
                    if now >= c.restart_at:
                        c.restarts += 1
                        self._start(c)
                    continue
                rc = c.poll()
                if rc is None:
                    if now - c.started_at > STABLE_AFTER:
                        c.backoff = MIN_BACKOFF
                    continue
                log.error("child_exited", child=c.name, status=rc,
                          ran_s=round(now - c.started_at, 1))
                c.stop()  # reap, clean up sockets
                self._schedule(c)
        log.info("daemon_stopping")
        for c in sorted(self.children, key=lambda c: c.name == "peerlink"):
            rc = c.stop()
            log.info("child_stopped", child=c.name, status=rc)
        return 0
