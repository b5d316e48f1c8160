"""nbdgw-fuse: one NBD export shown as one file, for tgtd (the bridge's FUSE server).

``python -m iscsi_bridge.fused MOUNTDIR URI [--file disk] [-C N] [-r] [-P PIDFILE]``
mounts a FUSE file system at MOUNTDIR holding the single file ``MOUNTDIR/disk`` whose
bytes are the NBD export at URI, and serves it until unmounted or sent SIGTERM/SIGINT.

Why not nbdfuse: Linux serialises direct writes to a FUSE file (the inode lock, taken
exclusively) unless the server's OPEN reply carries ``FOPEN_PARALLEL_DIRECT_WRITES``
(kernel 6.2+), and nbdfuse 1.14 (Debian 12) does not set it.  tgtd's 16 I/O threads then
write one at a time and every 4 KiB write pays the whole round trip alone (measured on
nbdfuse: 6,500 IOPS with one writer at QD1, 3,600 with eight).  This server answers OPEN
with ``FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES``, so the kernel passes writes
through concurrently and the chain (tgtd, FUSE, this server, nbdkit) pipelines.
``FOPEN_DIRECT_IO`` also keeps the page cache out, as before: what NBD clients write is
what tgtd reads.

It speaks the kernel's FUSE protocol on /dev/fuse directly (mount(2) with ``fd=``, so it
runs as root, as tgtd does): INIT, LOOKUP, GETATTR, SETATTR (no size change), OPEN,
READ, WRITE, FSYNC (an NBD FLUSH), FLUSH, RELEASE, FALLOCATE (punch hole = NBD TRIM,
zero range = NBD WRITE_ZEROES), STATFS, OPENDIR/READDIR/RELEASEDIR; everything else is
ENOSYS.  One worker thread per NBD connection (``-C``, default 4): each reads a request
from /dev/fuse, runs it on its own libnbd handle (the GIL is released meanwhile), and
writes the reply.  The export advertises multi-conn, so a FLUSH on any connection
covers the writes completed on all of them.

The protocol itself, ``Server`` over any ``Backend``, is nbdgw_common/fuse_protocol.py:
here libnbd handles; inside nbdkit (the bridge's default, nbd_plugin/fusefile.py) the
volume itself, which takes the NBD round trip and this process out of the path.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import os
import signal
import stat
import sys
import threading
from pathlib import Path

from nbdgw_common.fuse_protocol import MAX_WRITE, Backend, Server
from nbdgw_common.signals import dump_stacks_on, relay_signals

from .errors import FuseError

MS_NOSUID, MS_NODEV, MNT_FORCE, MNT_DETACH = 2, 4, 1, 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def connect(uri: str, n: int, read_only: bool) -> list[Backend]:
    """``n`` connections to the export at ``uri``."""
    import nbd  # libnbd's bindings: only this process kind needs them

    handles: list[Backend] = []
    for _ in range(n):
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
        except nbd.Error as e:
            raise FuseError(f"cannot connect to {uri}: {e}") from None
        if not read_only and h.is_read_only():
            raise FuseError(f"{uri} is read-only (mount with -r)")
        handles.append(h)
    return handles


def mount_options(fd: int) -> str:
    """The FUSE mount's options: the kernel checks the file's mode for every access
    (default_permissions: the disk is 0600 root's), and no allow_other, so that only
    the mount's owner, root (uid and gid 0, as tgtd and the bridge run), may use the
    file system at all: without allow_other the kernel refuses every other uid before
    the mode is even looked at, and root needs no allow_other to use its own mount."""
    return (f"fd={fd},rootmode={stat.S_IFDIR:o},user_id=0,group_id=0,default_permissions,"
            f"max_read={MAX_WRITE}")


def mount(fd: int, target: Path, read_only: bool) -> None:
    opts = mount_options(fd)
    flags = MS_NOSUID | MS_NODEV | (1 if read_only else 0)  # MS_RDONLY = 1
    if _libc.mount(b"nbdgw", os.fsencode(target), b"fuse.nbdgw", flags, opts.encode()) != 0:
        e = ctypes.get_errno()
        raise FuseError(f"mount {target}: {os.strerror(e)}"
                        + (" (nbdgw-fuse mounts with mount(2): run it as root)"
                           if e == errno.EPERM else ""))


def open_and_mount(target: Path, read_only: bool) -> int:
    """A new FUSE connection mounted at ``target``: its /dev/fuse descriptor."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        mount(fd, target, read_only)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_pid_file(path: Path, pid: int) -> None:
    """``path`` names ``pid`` (replaced whole: a reader never sees it half written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)


def unmount(target: Path, force: bool = False) -> int:
    """Detach the mount at ``target`` (umount2 MNT_DETACH): 0, else the errno.

    ``force`` (MNT_FORCE, root only) also ends the FUSE connection at once: the server's
    reads of /dev/fuse fail with ENODEV, whoever still holds the file system.  Without
    it the connection lasts until its last reference goes: an open file, or the copy of
    the mount that any mount namespace made while it existed holds (`ip netns exec`,
    `unshare -m`, a container), which the detach does not reach where / is not a shared
    mount.  Requests still in flight fail (ENOTCONN), as when the server dies."""
    flags = MNT_DETACH | (MNT_FORCE if force else 0)
    if _libc.umount2(os.fsencode(target), flags) != 0:
        return ctypes.get_errno()
    return 0


def set_process_name(name: str) -> None:
    """What /proc/PID/comm says (the bridge recognises its servers by it)."""
    _libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nbdgw-fuse", description=__doc__.split("\n\n")[0])
    p.add_argument("mountdir", type=Path)
    p.add_argument("uri")
    p.add_argument("--file", default="disk", help="name of the file (default disk)")
    p.add_argument("-C", "--connections", type=int, default=4,
                   help="NBD connections, one worker thread each (default 4)")
    p.add_argument("-r", "--readonly", action="store_true")
    p.add_argument("-P", "--pidfile", type=Path)
    a = p.parse_args(argv)
    if not 1 <= a.connections <= 64:
        p.error("--connections must be between 1 and 64")
    set_process_name("nbdgw-fuse")
    dump_stacks_on()
    try:
        srv = Server(connect(a.uri, a.connections, a.readonly), a.file, a.readonly)
        fd = open_and_mount(a.mountdir, a.readonly)
    except (FuseError, OSError) as e:
        print(f"nbdgw-fuse: {e}", file=sys.stderr, flush=True)
        return 1
    stop = threading.Event()
    relay_signals((signal.SIGTERM, signal.SIGINT), lambda _signum: stop.set())
    threads = srv.serve(fd)
    if a.pidfile is not None:
        write_pid_file(a.pidfile, os.getpid())
    while not stop.wait(0.2):
        if srv.stopping.is_set():  # unmounted from outside (fusermount3 -u)
            break
    unmount(a.mountdir)
    for t in threads:
        t.join(5)
    os.close(fd)
    import nbd

    for h in srv.handles:
        with contextlib.suppress(nbd.Error):  # a server already gone: nothing to close
            h.shutdown()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
