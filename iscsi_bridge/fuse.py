"""FUSE mounts: one export as one file that tgtd can open.

Each export gets ``<run_dir>/mnt/<export>/`` with the single file ``disk`` in it, served
by one of (iscsi.fuse):

- ``nbdkit`` (the default): the nbdkit process that serves the volume.  The bridge
  mounts (mount(2), as root) and hands the /dev/fuse descriptor over the volume's
  control socket; nbdkit answers the requests on the volume itself, under the same
  lock, lease, journal and sync gate as NBD requests (nbd_plugin/fusefile.py).  No NBD
  round trip: the fastest route.  Needs the volume served by a local `nbdgw serve`.
- ``nbdgw``: ``nbdgw-fuse`` (iscsi_bridge/fused.py), our child process, a client of the
  NBD URI: the same protocol code over libnbd, for an NBD server that is not local.
- ``nbdfuse`` (libnbd's): FUSE then serialises the writes (see fused.py).

All three let the pid file name the serving process.  A mount whose server died is
unmounted before a fresh one starts at the same path; nbdfuse's ``-o auto_unmount`` does
that by itself.  Unmounting detaches the mount and ends its FUSE connection
(umount2 MNT_FORCE | MNT_DETACH): a lazy unmount alone leaves the connection, and so
the server, alive while any mount namespace made since the mount holds a copy of it.
tgtd opens the file with O_DIRECT (bsoflags=direct): no page cache sits between the
iSCSI initiator and the NBD export, so reads always see what NBD clients wrote, and a
SCSI SYNCHRONIZE CACHE or FUA write becomes fdatasync -> FUSE fsync -> NBD FLUSH.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from pathlib import Path

import structlog

from blockstore.modes import make_dir
from nbdgw_common.control_socket import ControlError, request
from nbdgw_common.errors import CommandError
from nbdgw_common.proc import run
from nbdgw_common.supervise import ChildProcess, NotReady, pid_from_file

from . import fused
from .errors import FuseError

log = structlog.get_logger(component="iscsi")

#: One NBD connection per mount: the nbdgw plugin serialises requests, and FUSE takes
#: the inode lock for every write, so more connections only add thread hand-offs.
CONNECTIONS = 1  # nbdfuse: more changed nothing measurable (its writes are serialised)
FILE_NAME = "disk"
SERVERS = {"nbdkit": "nbdkit", "nbdgw": "nbdgw-fuse",  # iscsi.fuse -> process name
           "nbdfuse": "nbdfuse"}


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
    """The FUSE mount that shows export ``export`` as ``<dir>/disk``.  ``source`` is
    the NBD URI (nbdgw, nbdfuse) or the volume's directory (nbdkit: its control socket).
    """

    def __init__(self, export: str, mount_dir: Path, source: str, read_only: bool,
                 server: str = "nbdkit") -> None:
        if server not in SERVERS:
            raise FuseError(f"unknown FUSE server {server!r} ({' or '.join(SERVERS)})")
        self.server = server
        self.comm = SERVERS[server]
        self.export = export
        self.dir = mount_dir
        self.source = source
        self.read_only = read_only
        self.file = mount_dir / FILE_NAME
        self.pid_file = mount_dir.parent / f"{mount_dir.name}.pid"
        self.log_file = mount_dir.parent / f"{mount_dir.name}.log"
        ro = ["-r"] if read_only else []
        if server == "nbdgw":
            argv = [sys.executable, "-m", "iscsi_bridge.fused", "-P", str(self.pid_file),
                    "--file", FILE_NAME, *ro, str(self.dir), source]
        else:
            argv = ["nbdfuse", "-C", str(CONNECTIONS), "-P", str(self.pid_file),
                    "-o", "auto_unmount", "-o", "default_permissions", *ro,
                    str(self.file), source]
        #: our child, the FUSE server (none for nbdkit: it runs already, and serves)
        self.child = None if server == "nbdkit" else ChildProcess(
            argv, name=self.comm, log_file=self.log_file, new_session=True,
            pid_file=self.pid_file,
            not_found=FuseError("nbdfuse: command not found (apt-get install libnbd-bin fuse3)"))

    def pid(self) -> int | None:
        if self.child is None:
            return pid_from_file(self.pid_file, self.comm)
        return self.child.pid

    def healthy(self) -> bool:
        """Server alive, mounted, and the file answers stat (a dead FUSE gives ENOTCONN)."""
        if self.pid() is None or not mounted(self.dir):
            return False
        try:
            return self.file.stat().st_size > 0
        except OSError:
            return False

    def start(self, timeout: float = 15) -> None:
        make_dir(self.dir.parent, parents=True, exist_ok=True)  # <run_dir>/mnt: 0700
        self.stop()
        make_dir(self.dir, exist_ok=True)
        self.pid_file.unlink(missing_ok=True)
        if self.child is None:
            self._start_in_nbdkit(timeout)
            return
        if self.child.alive:  # it outlived SIGKILL (stuck in the kernel): no second one
            raise FuseError(f"{self.comm} for {self.export} (pid {self.child.pid}) is still "
                            "running after SIGKILL")
        log.info("fuse_starting", export=self.export, server=self.comm, argv=self.child.argv)
        self.child.start()
        try:
            self.child.wait_ready(lambda: self.pid_file.exists() and self.healthy(), timeout)
        except NotReady as e:
            if e.status is not None:
                raise FuseError(f"{self.comm} for {self.export} exited with status "
                                f"{e.status}: {e.tail}") from None
            self.stop()
            raise FuseError(f"{self.comm} for {self.export} was not ready within {timeout} s"
                            ) from None
        log.info("fuse_started", export=self.export, server=self.comm, pid=self.child.pid)

    def _start_in_nbdkit(self, timeout: float) -> None:
        """Mount, and hand the connection to the nbdkit serving the volume."""
        fd = -1
        try:
            fd = fused.open_and_mount(self.dir, self.read_only)
            reply = request(Path(self.source), {"op": "fuse", "export": self.export,
                                                "read_only": self.read_only},
                            timeout=timeout, fds=(fd,))
        except BaseException as e:
            if fd >= 0:
                os.close(fd)  # first: the unserved mount then fails at once, not hangs
                fused.unmount(self.dir)
            with contextlib.suppress(OSError):
                self.dir.rmdir()
            if not isinstance(e, ControlError):
                raise
            hint = ("" if "over FUSE" in str(e) else  # nbdkit's own refusal says it all
                    " (iscsi.fuse nbdkit needs the volume served by `nbdgw serve` on "
                    "this host, with the same data_dir)")
            raise FuseError(f"nbdkit cannot serve {self.export} over FUSE: {e}{hint}"
                            ) from None
        os.close(fd)  # nbdkit holds the connection now: it ends with nbdkit
        fused.write_pid_file(self.pid_file, reply["pid"])
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                self.stop()
                raise FuseError(f"nbdkit did not answer on the FUSE mount of {self.export} "
                                f"within {timeout} s")
            time.sleep(0.02)
        log.info("fuse_started", export=self.export, server=self.comm, pid=reply["pid"])

    def _wait_released(self, timeout: float) -> None:
        """Until nbdkit has let go of the export (its workers saw the unmount and the
        handle is closed): a snapshot withdrawn can then be deleted at once."""
        if not self.source:
            return  # a stray mount: which volume serves it is not known
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = request(Path(self.source), {"op": "stats"}, timeout=timeout)
            except ControlError:
                return  # nbdkit gone: nothing holds the export
            if self.export not in reply.get("fuse_mounts", ()):
                return
            if time.monotonic() > deadline:
                log.warning("fuse_not_released", export=self.export, timeout_s=timeout,
                            note="something still holds the unmounted file open")
                return
            time.sleep(0.02)

    def _unmount(self, timeout: float) -> None:
        """Detach the mount and end its FUSE connection (fused.unmount with force: the
        connection would otherwise outlive the detach in any mount namespace made while
        it was mounted, and the server with it).  Called once nothing here uses the file
        (its target deleted, or its server dead).  Not root: ``fusermount3 -u -z``."""
        err = fused.unmount(self.dir, force=True)
        if err == 0:
            return
        if err != errno.EPERM:
            log.warning("fuse_force_unmount_failed", export=self.export,
                        error=os.strerror(err))
        try:
            run(["fusermount3", "-u", "-z", str(self.dir)], timeout=timeout)
        except CommandError as e:
            log.warning("fusermount_failed", export=self.export, error=str(e))

    def stop(self, timeout: float = 15) -> None:
        """Unmount (the server then exits by itself); kill it if it does not.  nbdkit
        serving the mount is never killed: unmounting ends its attachment."""
        pid = self.pid()
        if mounted(self.dir):
            self._unmount(timeout)
        if self.child is None:
            if pid is not None:
                self._wait_released(timeout)
        else:  # unmounted, it exits by itself (or is reaped, if it had)
            self.child.stop(timeout, sig=None, on_kill=lambda: log.error(
                "fuse_kill", export=self.export, server=self.comm, pid=pid))
        self.pid_file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()

