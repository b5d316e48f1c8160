"""The snapshot control path into a running nbdkit process.

A served volume is flock'ed by nbdkit, so `nbdgw snapshot create|delete|rollback` (and
the scheduler) cannot open it: they ask the serving process instead, over a unix socket
``volumes/<V>/control.sock`` (mode 0600) that the plugin serves for each volume.  One JSON
line in, one JSON line out::

    {"op": "create", "volumes": ["db-data", "db-log"], "name": "before-upgrade"}
    {"op": "delete" | "rollback", "volume": "v1", "name": "before-upgrade"}
    {"op": "stats"}  -> {"ok": true, "pid": ..., "exports": nbd_plugin.iostats.snapshot(),
                         "fuse_mounts": [exports whose FUSE mount this process serves],
                         "thread_states": {"pinned": N, "lost": N} (threadstate.py)}
    {"op": "fuse", "export": "v1", "read_only": false}  + a /dev/fuse fd (SCM_RIGHTS)
    {"op": "withdraw"}  (on the volume's own socket: stop serving it, refused while in use)
    {"op": "grow", "volume": "v1", "size": 2147483648}  (new connections see the new size)
    -> {"ok": true, ...} | {"ok": false, "error": "exact message"}

``fuse`` is the iSCSI bridge handing over a FUSE mount it made for an export, to be
served from this process (nbd_plugin/fusefile.py); ``{"ok": true, "pid": ...}``.

Each request runs under the request lock of the volumes it touches (a consistency group:
all of them, taken in name order), the lock every NBD request takes for its volume
operation, so no write lands between the MARKs of a group: the group is one instant of
every volume.
Paths are reached through ``/proc/self/fd/<dirfd>/`` so that the 108-byte limit of unix
socket addresses does not limit where data directories live.  This is the server; the
client (``request``, ``hold``), the socket's name and the line framing are
nbdgw_common/control_socket.py, which the gateway and the iSCSI bridge use.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from blockstore.cdp import restore as cdp_restore
from blockstore.cdp import restore_group as cdp_restore_group
from blockstore.errors import BlockstoreError
from blockstore.snapshot import Snapshot, SnapshotError
from blockstore.volume import Volume
from nbdgw_common import jsonline
from nbdgw_common.control_socket import MAX_REQUEST, SOCKET_NAME, ControlError, recv_line

from . import iostats, threadstate

log = structlog.get_logger(component="snapshot_control")

def default_name(now: float | None = None) -> str:
    """A snapshot name from the time (UTC, to the second)."""
    return "snap-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def create_group(vols: list[Volume], name: str | None) -> list[Snapshot]:
    """Take snapshot ``name`` of every volume in ``vols`` at one instant (the caller
    holds off writes).  All are checked first; if one still fails, those taken are
    deleted again and the error says what happened where."""
    if name is None:
        base = default_name()
        name, n = base, 1
        while any(v.snaps is not None and name in v.snaps.index.by_name for v in vols):
            name, n = f"{base}.{n}", n + 1
    for v in vols:
        v.check_snapshot(name)
    group = uuid.uuid4().hex[:16] if len(vols) > 1 else ""
    done: list[tuple[Volume, Snapshot]] = []
    for v in vols:
        try:
            done.append((v, v.snapshot_create(name, group)))
        except (BlockstoreError, OSError) as e:
            undone = []
            for w, _s in done:
                with contextlib.suppress(BlockstoreError, OSError):
                    w.snapshot_delete(name)
                    undone.append(w.name)
            raise SnapshotError(
                f"snapshot {name} failed on {v.name}: {e}; taken on "
                f"[{', '.join(w.name for w, _ in done)}], deleted again on "
                f"[{', '.join(undone)}]") from None
    return [s for _, s in done]


def snapshot_row(vol: str, s: Snapshot) -> dict[str, Any]:
    return {"volume": vol, "id": s.id, "name": s.name, "time": s.created, "seq": s.mark_seq,
            "group": s.group}


# -- server side (in the nbdkit process) ----------------------------------------------------

class ControlServer:
    """Listens on each served volume's control.sock; runs requests under the request
    locks of the volumes they touch."""

    def __init__(self, volumes: dict[str, Volume],
                 can_delete: Callable[[str, str], str | None],
                 attach_fuse: Callable[[str, int, bool], None] | None = None,
                 fuse_mounts: Callable[[], list[str]] = list,
                 withdraw: Callable[[str], str | None] | None = None) -> None:
        self.volumes = volumes
        self.withdraw = withdraw  # volume -> refusal or None once it is no longer served
        self.can_delete = can_delete  # (volume, snapshot) -> refusal reason or None
        self.attach_fuse = attach_fuse  # (export, /dev/fuse fd, read-only): Server's
        self.fuse_mounts = fuse_mounts  # the exports whose FUSE mounts are served here
        self.stopping = threading.Event()
        self.socks: dict[str, tuple[socket.socket, Path, threading.Thread]] = {}
        self.replicas: set[str] = set()  # sockets of replicas (add_replica)
        self.started = False

    def start(self) -> None:
        self.started = True
        for name, vol in list(self.volumes.items()):
            self.add(name, vol)

    def add(self, name: str, vol: Volume) -> None:
        """Listen on a volume's control socket (a volume served from now on)."""
        if name in self.replicas:  # promoted since: a volume's socket from now on
            self.remove(name)
        self._listen(name, vol.info.path)

    def add_replica(self, name: str, path: Path) -> None:
        """Listen on a replica's control socket (directory ``path``), for the FUSE
        mounts of its snapshots and stats only: its receiver holds the replica."""
        if self.started and name not in self.socks:
            self.replicas.add(name)
            self._listen(name, path)

    def _listen(self, name: str, directory: Path) -> None:
        if not self.started or name in self.socks:
            return
        path = directory / SOCKET_NAME
        s = bind_private(path)
        s.settimeout(0.25)  # here: a stop() right after may close it before the thread runs
        t = threading.Thread(target=self._serve, args=(s, name), daemon=True,
                             name=f"nbdgw-control-{name}")
        self.socks[name] = (s, path, t)
        t.start()

    def remove(self, name: str) -> None:
        """Stop listening for a withdrawn volume (its socket goes; the reply to the
        request that withdrew it is sent by the thread that serves it)."""
        self.replicas.discard(name)
        entry = self.socks.pop(name, None)
        if entry is not None:
            s, path, _ = entry
            s.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def stop(self) -> None:
        self.stopping.set()
        for s, path, t in list(self.socks.values()):
            s.close()
            t.join(5)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.socks.clear()

    def _serve(self, s: socket.socket, volume: str) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = s.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            fds: list[int] = []  # descriptors passed with the request (op fuse)
            with conn:
                try:
                    conn.settimeout(10)
                    first, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 1)
                    req = json.loads(recv_line(conn, first))
                    op = req.get("op") if isinstance(req, dict) else None
                    if op == "hold":
                        self._hold(conn, req)
                        continue
                    if op == "fuse":
                        reply, fds = self._fuse(req, fds), []
                    elif volume in self.replicas and req != {"op": "stats"}:
                        reply = {"ok": False, "error": (
                            f"volume {volume} is a replica here, held by its receiver "
                            "(stop replicating it first)" if op == "withdraw" else
                            f"volume {volume} is a replica here: its snapshots are taken "
                            "and deleted on its primary, and reach it through the journal")}
                    elif op == "withdraw":
                        why = self.withdraw(volume) if self.withdraw is not None else (
                            "this server cannot withdraw volumes")
                        reply = {"ok": why is None, **({"error": why} if why else {})}
                    else:  # stats: counters only; no lock, never waits for an NBD request
                        reply = ({"ok": True, "pid": os.getpid(),
                                  "exports": iostats.snapshot(),
                                  "fuse_mounts": self.fuse_mounts(),
                                  "thread_states": threadstate.stats()}
                                 if req == {"op": "stats"} else self.handle(req))
                except (OSError, ValueError, ControlError) as e:
                    reply = {"ok": False, "error": f"bad control request: {e}"}
                finally:
                    for fd in fds:
                        os.close(fd)
                with contextlib.suppress(OSError):
                    jsonline.send(conn, reply)

    def _fuse(self, req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Serve a FUSE mount of ``req["export"]`` on the descriptor passed with it
        (nbd_plugin/fusefile.py); the descriptor is ours from here on."""
        export, read_only = req.get("export"), req.get("read_only")
        if len(fds) != 1 or not isinstance(export, str) or not isinstance(read_only, bool):
            for fd in fds:
                os.close(fd)
            return {"ok": False, "error": "bad control request: fuse needs export, "
                                          "read_only and one /dev/fuse descriptor"}
        if self.attach_fuse is None:
            os.close(fds[0])
            return {"ok": False, "error": "this process does not serve FUSE mounts"}
        try:
            self.attach_fuse(export, fds[0], read_only)
        except OSError as e:
            return {"ok": False, "error": f"cannot serve {export} over FUSE: "
                                          f"{e.strerror if e.strerror else e}"}
        return {"ok": True, "pid": os.getpid()}

    def _hold(self, conn: socket.socket, req: dict[str, Any]) -> None:
        """Switchover drain: take every volume's request lock (client I/O waits, it does
        not fail), make every volume durable, answer with each volume's journal end,
        then keep the lock until the caller says ``release`` or goes away (or ``max_s``
        passes: a vanished caller never leaves clients stuck).  A caller that hands the
        volumes over kills this process while it holds the lock: the requests waiting
        get no answer and the clients retry on the new primary."""
        max_s = float(req.get("max_s", 60))
        t0 = time.monotonic()
        with locked(list(self.volumes.values())):
            try:
                seqs = {}
                for name, vol in self.volumes.items():
                    vol.sync()
                    seqs[name] = vol.last_seq
                jsonline.send(conn, {"ok": True, "seqs": seqs})
            except OSError as e:
                with contextlib.suppress(OSError):
                    jsonline.send(conn, {"ok": False, "error": f"hold failed: {e}"})
                return
            log.warning("io_held", volumes=sorted(seqs), seqs=seqs)
            conn.settimeout(0.25)
            while time.monotonic() - t0 < max_s and not self.stopping.is_set():
                try:
                    conn.recv(64)  # returns when the caller sends release or closes
                    break
                except TimeoutError:
                    continue
                except OSError:
                    break
            log.warning("io_released", held_s=round(time.monotonic() - t0, 3))

    def group(self, req: dict[str, Any], op: str) -> tuple[list[str], list[Volume]]:
        """The volumes a group request names, all served here."""
        names = req.get("volumes")
        if not isinstance(names, list) or not names:
            raise ControlError(f"{op} needs a list of volumes")
        missing = [n for n in names if n not in self.volumes]
        if missing:
            raise ControlError(
                f"volume {missing[0]} is not served by this process "
                f"(pid {os.getpid()}): a consistency group must be served by "
                "one nbdgw serve")
        return names, [self.volumes[n] for n in names]

    def handle(self, req: Any) -> dict[str, Any]:  # noqa: PLR0911 - one return per op
        """Run one request; never raises for a request that is merely refused."""
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            return {"ok": False, "error": "bad control request: expected an object with op"}
        op = req["op"]
        try:
            if op == "create":
                names, vols = self.group(req, op)
                with locked(vols):
                    snaps = create_group(vols, req.get("name"))
                return {"ok": True, "snapshots": [snapshot_row(n, s) for n, s in
                                                  zip(names, snaps, strict=True)]}
            if op == "cdp-restore" and "volumes" in req:  # a consistency group
                _names, vols = self.group(req, op)
                with locked(vols):
                    rows = cdp_restore_group(vols, int(req["at"]), str(req["point"]),
                                             str(req["name"]))
                return {"ok": True, "volumes": rows}
            vol = self.volumes.get(str(req.get("volume")))
            if vol is None:
                raise ControlError(f"volume {req.get('volume')} is not served here")
            with vol.request_lock:
                if op == "grow":
                    seq = vol.grow(int(req["size"]))
                    return {"ok": True, "size": vol.size, "seq": seq}
                name = str(req.get("name"))
                if op == "delete":
                    why = self.can_delete(vol.name, name)
                    if why is not None:
                        raise ControlError(why)
                    vol.snapshot_delete(name)
                    return {"ok": True}
                if op == "rollback":
                    return {"ok": True, "bytes_written": vol.snapshot_rollback(name)}
                if op == "cdp-restore":  # blockstore/cdp.py: to a point, snapshot first
                    return {"ok": True, **cdp_restore(vol, str(req["point"]), name)}
                raise ControlError(f"unknown control op {op!r}")
        except (ControlError, BlockstoreError) as e:
            return {"ok": False, "error": str(e)}
        except OSError as e:
            log.error("snapshot_control_failed", op=op, error=str(e))
            return {"ok": False, "error": f"{op} failed: {e.strerror or e}"}


@contextlib.contextmanager
def locked(vols: list[Volume]) -> Iterator[None]:
    """The request locks of ``vols``, taken in name order (one order for every caller
    that takes several; an NBD request takes one)."""
    with contextlib.ExitStack() as stack:
        for v in sorted(set(vols), key=lambda v: v.name):
            stack.enter_context(v.request_lock)
        yield


def bind_private(path: Path, backlog: int = 8) -> socket.socket:
    """A unix socket listening at ``path`` (replacing one left there), mode 0600 from the
    moment it exists: only its owner (root) may connect.  Bound through the directory's
    descriptor, so a long data directory path does not exceed sun_path."""
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        short = f"/proc/self/fd/{dfd}/{path.name}"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(short)
        finally:
            os.umask(old)
        s.listen(backlog)
        return s
    finally:
        os.close(dfd)

