"""The iSCSI test environment: a Bridge in front of one `nbdgw serve`, on its own portal
port and tgtd control port (``IscsiEnv``; the ``iscsi`` fixture is in conftest.py), and
the helpers the iSCSI tests share."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from iscsi_bridge import Bridge, Export
from iscsi_bridge.fuse import mounted
from iscsi_bridge.names import DISK_LUN
from iscsi_bridge.settings import IscsiConfig
from tests.conftest import NBDGW, Served, free_port, need

BASE = "iqn.2026-11.com.example:nbdgw"


def free_control_port() -> int:
    """A tgtd control port (1..32767) no tgtd on this host uses: no socket file for it."""
    for _ in range(1000):
        n = random.randint(20000, 32767)  # noqa: S311 - not a secret
        if not Path(f"/var/run/tgtd/socket.{n}").exists():
            return n
    raise AssertionError("no free tgtd control port")


def sh(*argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), capture_output=True, text=True, errors="replace",
                       timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p


def wait_target(url: str, daemon: subprocess.Popen[bytes], log: Path, timeout: float = 90
                ) -> None:
    """Until the daemon's tgtd answers an INQUIRY at ``url`` (its log on failure)."""
    deadline = time.monotonic() + timeout
    while sh("iscsi-inq", url, check=False).returncode != 0:
        assert daemon.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.3)


@contextlib.contextmanager
def daemon(cfg: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`nbdgw daemon` on ``cfg`` (its output in ``log``); stopped with SIGTERM, which it
    must obey with status 0."""
    with log.open("wb") as out:
        proc = subprocess.Popen([NBDGW, "-c", str(cfg), "--log-format", "json", "daemon"],
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log.read_text()[-4000:]


def written_over_iscsi_reads_back_over_nbd(url: str, nbd_uri: str, tmp: Path) -> None:
    """1 MiB written to the LUN at ``url`` is what NBD reads at ``nbd_uri``."""
    import nbd

    written = write_pattern(url, tmp)
    h = nbd.NBD()
    h.connect_uri(nbd_uri)
    assert h.pread(1 << 20, 0) == written
    h.shutdown()


def write_pattern(url: str, tmp: Path) -> bytes:
    """1 MiB of a pattern written to the LUN at ``url`` by qemu-img; returns the bytes."""
    pattern = tmp / "pattern"
    pattern.write_bytes(bytes(range(256)) * 4096)
    sh("qemu-img", "dd", "-f", "raw", "-O", "raw", f"if={pattern}", f"of={url}", "bs=1M",
       "count=1", timeout=120)
    return pattern.read_bytes()


class IscsiEnv:
    """A Bridge in front of one `nbdgw serve`, on its own port and control port."""

    def __init__(self, tmp: Path, served: Served, exports: list[Export],
                 nbd_uri: Callable[[str], str] | None = None, route: str | None = None,
                 **kw: Any) -> None:
        for tool in ("tgtd", "iscsi-inq", "qemu iscsi driver", "fusermount3"):
            need(tool)
        self.port = free_port()
        self.cfg = IscsiConfig(enabled=True, portal_host="127.0.0.1", portal_port=self.port,
                               iqn=BASE, control_port=free_control_port(),
                               run_dir=tmp / f"iscsi-{self.port}",
                               **kw)
        self.served = served
        self.exports = exports
        self.bridge = Bridge(self.cfg, nbd_uri or served.uri, route, served.data_dir)

    def reconcile(self, exports: list[Export] | None = None) -> Any:
        return self.bridge.reconcile(self.exports if exports is None else exports)

    def url(self, export: str = "v1", chap: tuple[str, str] | None = None,
            target: tuple[str, str] | None = None) -> str:
        auth = f"{chap[0]}%{chap[1]}@" if chap else ""
        iqn = f"{BASE}:{export.replace('@', ':')}"
        url = f"iscsi://{auth}127.0.0.1:{self.port}/{iqn}/{DISK_LUN}"
        if target:
            url += f"?target_user={target[0]}&target_password={target[1]}"
        return url

    def inq(self, *args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
        return sh("iscsi-inq", *args, url or self.url(), timeout=30, check=False)

    def cleanup(self) -> None:
        try:
            self.bridge.stop()
        finally:  # whatever survived a failed stop: kill it, unmount it
            run_dir = self.cfg.run_dir
            for pid_file in [run_dir / "tgtd.pid", *run_dir.glob("mnt/*.pid")]:
                with contextlib.suppress(OSError, ValueError):
                    pid = int(pid_file.read_text().split()[0])
                    if Path(f"/proc/{pid}/comm").read_text().strip() != "nbdkit":
                        os.kill(pid, signal.SIGKILL)  # nbdkit is the serve fixture's
            for d in run_dir.glob("mnt/*"):
                if d.is_dir() and mounted(d):
                    sh("fusermount3", "-u", "-z", str(d), check=False)
