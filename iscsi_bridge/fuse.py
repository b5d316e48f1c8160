"""nbdfuse mounts: one NBD export as one file that tgtd can open.

Each export gets ``<run_dir>/mnt/<export>/`` with the single file ``disk`` in it.
nbdfuse runs as our child with a pid file; ``-o auto_unmount`` makes the kernel mount
go away if nbdfuse dies, so a crashed mount never blocks a fresh one at the same path.
tgtd opens the file with O_DIRECT (bsoflags=direct): no page cache sits between the
iSCSI initiator and the NBD export, so reads always see what NBD clients wrote, and a
SCSI SYNCHRONIZE CACHE or FUA write becomes fdatasync -> FUSE fsync -> NBD FLUSH.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
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
CONNECTIONS = 1
FILE_NAME = "disk"


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

    def __init__(self, export: str, mount_dir: Path, uri: str, read_only: bool) -> None:
        self.export = export
        self.dir = mount_dir
        self.uri = uri
        self.read_only = read_only
        self.file = mount_dir / FILE_NAME
        self.pid_file = mount_dir.parent / f"{mount_dir.name}.pid"
        self.log_file = mount_dir.parent / f"{mount_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def pid(self) -> int | None:
        return live_pid(self.proc, self.pid_file, "nbdfuse")

    def healthy(self) -> bool:
        """nbdfuse alive, mounted, and the file answers stat (a dead FUSE gives ENOTCONN)."""
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
        argv = ["nbdfuse", "-C", str(CONNECTIONS), "-P", str(self.pid_file),
                "-o", "auto_unmount", *(["-r"] if self.read_only else []),
                str(self.file), self.uri]
        log.info("nbdfuse_starting", export=self.export, argv=argv)
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
                raise FuseError(f"nbdfuse for {self.export} exited with status "
                                f"{self.proc.returncode}: {_tail(self.log_file)}")
            if self.pid_file.exists() and self.healthy():
                log.info("nbdfuse_started", export=self.export, pid=self.proc.pid)
                return
            time.sleep(0.05)
        self.stop()
        raise FuseError(f"nbdfuse for {self.export} was not ready within {timeout} s")

    def stop(self, timeout: float = 15) -> None:
        """Unmount (nbdfuse then exits by itself); kill it if it does not."""
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
                log.error("nbdfuse_kill", export=self.export, pid=pid)
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
