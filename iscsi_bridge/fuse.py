"""FUSE mounts: one NBD export as one file that tgtd can open.

Each export gets ``<run_dir>/mnt/<export>/`` with the single file ``disk`` in it, served
by one process, our child with a pid file: ``nbdgw-fuse`` (iscsi_bridge/fused.py, the
default: it lets the kernel pass tgtd's writes through in parallel) or ``nbdfuse``
(iscsi.fuse: nbdfuse; FUSE then serialises the writes).  A mount whose server died is
unmounted (``fusermount3 -u -z``) before a fresh one starts at the same path; nbdfuse's
``-o auto_unmount`` does that by itself.
tgtd opens the file with O_DIRECT (bsoflags=direct): no page cache sits between the
iSCSI initiator and the NBD export, so reads always see what NBD clients wrote, and a
SCSI SYNCHRONIZE CACHE or FUA write becomes fdatasync -> FUSE fsync -> NBD FLUSH.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import structlog

from gateway.errors import CommandError
from gateway.proc import run

from .errors import FuseError
from .tgt import live_pid

log = structlog.get_logger(component="iscsi")

#: One NBD connection per mount: the nbdgw plugin serialises requests, and FUSE takes
#: the inode lock for every write, so more connections only add thread hand-offs.
CONNECTIONS = 1  # nbdfuse: more changed nothing measurable (its writes are serialised)
FILE_NAME = "disk"
SERVERS = {"nbdgw": "nbdgw-fuse", "nbdfuse": "nbdfuse"}  # iscsi.fuse -> process name


def mounted(path: Path) -> bool:
    """True if ``path`` is a FUSE mount point (from /proc/self/mountinfo)."""
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                return True
    return False


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


class FuseMount:
    """The nbdfuse process that shows export ``export`` as ``<dir>/disk``."""

    def __init__(self, export: str, mount_dir: Path, uri: str, read_only: bool,
                 server: str = "nbdgw") -> None:
        if server not in SERVERS:
            raise FuseError(f"unknown FUSE server {server!r} ({' or '.join(SERVERS)})")
        self.server = server
        self.comm = SERVERS[server]
        self.export = export
        self.dir = mount_dir
        self.uri = uri
        self.read_only = read_only
        self.file = mount_dir / FILE_NAME
        self.pid_file = mount_dir.parent / f"{mount_dir.name}.pid"
        self.log_file = mount_dir.parent / f"{mount_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def pid(self) -> int | None:
        return live_pid(self.proc, self.pid_file, self.comm)

    def healthy(self) -> bool:
        """Server alive, mounted, and the file answers stat (a dead FUSE gives ENOTCONN)."""
        if self.pid() is None or not mounted(self.dir):
            return False
        try:
            return self.file.stat().st_size > 0
        except OSError:
            return False

    def start(self, timeout: float = 15) -> None:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self.stop()
        self.dir.mkdir(exist_ok=True)
        self.pid_file.unlink(missing_ok=True)
        ro = ["-r"] if self.read_only else []
        if self.server == "nbdgw":
            argv = [sys.executable, "-m", "iscsi_bridge.fused", "-P", str(self.pid_file),
                    "--file", FILE_NAME, *ro, str(self.dir), self.uri]
        else:
            argv = ["nbdfuse", "-C", str(CONNECTIONS), "-P", str(self.pid_file),
                    "-o", "auto_unmount", *ro, str(self.file), self.uri]
        log.info("fuse_starting", export=self.export, server=self.comm, argv=argv)
        with open(self.log_file, "ab") as logf:
            try:
                self.proc = subprocess.Popen(argv, stdout=logf, stderr=logf,
                                             stdin=subprocess.DEVNULL, cwd="/",
                                             start_new_session=True)
            except FileNotFoundError:
                raise FuseError("nbdfuse: command not found (apt-get install "
                                "libnbd-bin fuse3)") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FuseError(f"{self.comm} for {self.export} exited with status "
                                f"{self.proc.returncode}: {_tail(self.log_file)}")
            if self.pid_file.exists() and self.healthy():
                log.info("fuse_started", export=self.export, server=self.comm,
                         pid=self.proc.pid)
                return
            time.sleep(0.05)
        self.stop()
        raise FuseError(f"{self.comm} for {self.export} was not ready within {timeout} s")

    def stop(self, timeout: float = 15) -> None:
        """Unmount (the server then exits by itself); kill it if it does not."""
        pid = self.pid()
        if mounted(self.dir):
            try:
                run(["fusermount3", "-u", "-z", str(self.dir)], timeout=timeout)
            except CommandError as e:
                log.warning("fusermount_failed", export=self.export, error=str(e))
        if pid is not None:
            deadline = time.monotonic() + timeout
            while self.pid() is not None and time.monotonic() < deadline:
                if self.proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(0.05)
                else:
                    time.sleep(0.05)
            if self.pid() is not None:
                log.error("fuse_kill", export=self.export, server=self.comm, pid=pid)
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self.proc = None
        self.pid_file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"
