"""The objects behind the nbdkit callbacks: one Server per nbdkit process.

Built in ``config_complete`` from the plugin parameters.  Every volume is opened once
and shared by all connections, so a FLUSH on any connection makes the writes of every
connection durable (which is what makes multi-conn safe to advertise).
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from blockstore.cdp import is_point_name
from blockstore.clone import Clone, CloneInfo, find_clone, list_clones
from blockstore.errors import BlockstoreError, InvalidArgument
from blockstore.journal import DEFAULT_SEGMENT_BYTES, sync_delays_for_tests
from blockstore.snapshot import FollowedSnapshotView, SnapshotFollower, SnapshotView, read_index
from blockstore.store import Store
from blockstore.volume import (
    DEFAULT_AL_SLOTS,
    DEFAULT_JOURNAL_MAX_BYTES,
    Volume,
    VolumeInfo,
    find_volume,
    is_replica,
    list_volumes,
    parse_size,
    validate_name,
)

from . import iostats
from .control import ControlServer
from .fusefile import Attachment
from .handle import READER_NICE, Handle, yield_to_receiver
from .lease import Lease
from .points import (
    close_point,
    is_point_export,
    open_point_export,
    open_point_handle,
    open_replica_current,
    open_replica_point,
    open_replica_point_export,
    point_exports,
    replica_point_exports,
)
from .syncgate import SyncGate

log = structlog.get_logger(component="nbd_plugin")

__all__ = ["READER_NICE", "Params", "PluginError", "Server"]


# A test hook (tests/integration/test_isolation.py): journal syncs made slower.
_TEST_SYNC_DELAY = sync_delays_for_tests(os.environ.get("NBDGW_TEST_SYNC_DELAY", ""))


class PluginError(Exception):
    """Bad plugin parameters, or no volume could be opened."""


@dataclass
class Params:
    """The plugin's key=value parameters, as nbdkit passes them to ``config``."""

    data_dir: Path | None = None
    volumes: list[str] = field(default_factory=list)
    readonly: set[str] = field(default_factory=set)
    al_slots: int = DEFAULT_AL_SLOTS
    journal_max_bytes: int = DEFAULT_JOURNAL_MAX_BYTES
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    all_readonly: bool = False
    sync_socket: Path | None = None
    sync_timeout: float = 5.0
    sync_auto_degrade: bool = True  # no failover core: complete locally if peerlink is gone
    sync_peers: tuple[str, ...] = ()  # the sync peers (to read their outdating)
    lease: Path | None = None
    default_export: str = ""  # the volume a client that names none gets ("": refused)
    # A secondary's or DR node's nbdkit (the daemon's, for readers): no volume of its own
    # is opened, even one promoted or left primary here; replicas' snapshots, points and
    # current image read-only, and clones, are served.
    replicas_only: bool = False

    KEYS = ("data_dir", "volume", "readonly", "al_slots", "journal_max_bytes", "segment_bytes",
            "all_readonly", "sync_socket", "sync_timeout", "sync_auto_degrade", "sync_peers",
            "lease", "default_export", "replicas_only")

    def set(self, key: str, value: str) -> None:
        try:
            if key == "volume":
                self.volumes.append(validate_name(value))
            elif key == "readonly":
                self.readonly.add(validate_name(value))
            elif key in _SCALARS:
                setattr(self, key, _SCALARS[key](value))
            else:
                raise PluginError(
                    f"unknown parameter {key!r} (known: {', '.join(self.KEYS)})"
                )
        except (ValueError, InvalidArgument) as e:
            raise PluginError(f"bad value for {key}: {e}") from None


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError("expected integer >= 1")
    return n


def _positive_float(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise ValueError("expected a number > 0")
    return x


def _boolean(value: str) -> bool:
    return value.lower() in ("1", "true", "yes", "on")


_SCALARS: dict[str, Callable[[str], object]] = {
    "data_dir": Path,
    "al_slots": _positive_int,
    "journal_max_bytes": parse_size,
    "segment_bytes": parse_size,
    "all_readonly": _boolean,
    "sync_socket": Path,
    "sync_timeout": _positive_float,
    "sync_auto_degrade": _boolean,
    "sync_peers": lambda v: tuple(validate_name(p) for p in v.split(",") if p),
    "lease": Path,
    "default_export": validate_name,
    "replicas_only": _boolean,
}


class ReplicaSnapshotView(FollowedSnapshotView):
    """A replica's snapshot as nbdkit serves it: read at a lower CPU priority, so
    that a reader never slows the receiver applying the primary's writes."""

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        yield_to_receiver()
        super().read_into(buf, offset)

    def extents(self, offset: int, count: int) -> list[tuple[int, int, bool]]:
        yield_to_receiver()
        return super().extents(offset, count)


_REPLICA = ("volume {name} is a replica: it is written by peerlink and cannot be served "
            "writable until promoted (read-only: {name}@SNAPSHOT, and {name} as of its "
            "last applied batch with a CDP window)")
_NOT_PRIMARY = ("volume {name} is not served by this node: it is not the primary here "
                "(this node serves its replicas' snapshots, points and clones)")


def served_names(served: list[tuple[str, Volume]]) -> set[str]:
    return {n for n, _v in served}


class Server:
    """Opens (and recovers) every configured volume; hands out connection handles."""

    def __init__(self, params: Params) -> None:
        if params.data_dir is None:
            raise PluginError("missing required parameter data_dir")
        self.params = params
        self.volumes: dict[str, Volume] = {}
        # Guards the sets below (volumes, handles in use, FUSE mounts), never I/O: each
        # request takes its own volume's Volume.request_lock (DESIGN.md §9).
        self.lock = threading.Lock()
        self.snapshot_handles: dict[str, int] = {}  # "VOLUME@SNAP" -> open handles
        self.failed: dict[str, str] = {}
        self.gate = (SyncGate(params.sync_socket, params.sync_timeout,
                              auto_degrade=params.sync_auto_degrade,
                              peers=params.sync_peers, data_dir=params.data_dir)
                     if params.sync_socket is not None and not params.all_readonly
                     else None)
        self.lease = Lease(params.lease) if params.lease is not None else None
        # No volume named: serve every primary volume of data_dir, also those created
        # while this process runs (opened when first asked for or listed).
        self.discover = not params.volumes
        # Adding and withdrawing volumes, opening clones and replica followers (not I/O).
        # Reentrant: a clone of a replica snapshot opens its base (a follower) under it.
        self.members = threading.RLock()
        self.in_use: dict[str, int] = {}  # volume -> open handles (NBD and FUSE)
        self.fuse: list[Attachment] = []  # exports mounted for the bridge (fusefile.py)
        # Replicas: their receiver holds them; their snapshots are read here through a
        # SnapshotFollower each (blockstore/snapshot.py), one lock per replica.
        self.followers: dict[str, tuple[SnapshotFollower, threading.Lock]] = {}
        # Clones (blockstore/clone.py) open now: name -> (clone, its base's handle, the
        # handles open on it).  The base handle pins the snapshot while the clone is served.
        self.clones: dict[str, tuple[Clone, Handle, int]] = {}
        self.replica_names = {n for n in params.volumes if self._replica(n)}
        self.control = ControlServer(self.volumes, self._snapshot_in_use,
                                     self.attach_fuse,
                                     lambda: sorted(a.export for a in list(self.fuse)),
                                     self.withdraw)
        # Replicas are written by peerlink only: their snapshots are served read-only
        # (REPLICA@SNAP), the replica itself only once promoted.
        names = [n for n in params.volumes if n not in self.replica_names] or (
            [] if params.volumes else self._primaries())
        for name in names:
            self._add(name, quiet=False)
        if not (self.volumes or self.discover or self.replica_names or params.replicas_only):
            detail = "; ".join(f"{n}: {m}" for n, m in self.failed.items())
            raise PluginError("no volume can be served" + (f" ({detail})" if detail else ""))
        self.control.start()
        for info in self._replicas():  # the iSCSI bridge mounts their snapshots through it
            self.control.add_replica(info.name, info.path)

    def _primaries(self) -> list[str]:
        assert self.params.data_dir is not None
        if self.params.replicas_only:
            return []
        return [v.name for v in list_volumes(self.params.data_dir) if not is_replica(v)]

    def _replica(self, name: str) -> VolumeInfo | None:
        """Volume ``name``'s info when it is a replica on this node (else None)."""
        assert self.params.data_dir is not None
        try:
            info = find_volume(self.params.data_dir, name)
        except (BlockstoreError, OSError):
            return None
        return info if is_replica(info) else None

    def _followed(self, name: str) -> VolumeInfo | None:
        """Replica ``name``'s info when this process serves its snapshots, points and
        current image (named, or any replica with no volume named), else None."""
        if not (self.discover or name in self.replica_names):
            return None
        return self._replica(name)

    def _replicas(self) -> list[VolumeInfo]:
        """The replicas whose snapshots this process serves: those named, or with no
        volume named, every replica in data_dir."""
        assert self.params.data_dir is not None
        if not self.discover:
            return [i for n in sorted(self.replica_names) if (i := self._replica(n))]
        return [v for v in list_volumes(self.params.data_dir) if is_replica(v)]

    def _add(self, name: str, quiet: bool = True) -> Volume | None:
        """Open volume ``name`` and serve it from now on (None when it cannot be)."""
        p = self.params
        assert p.data_dir is not None
        with self.members:
            if name in self.volumes:
                return self.volumes[name]
            ro = p.all_readonly or name in p.readonly
            try:
                if self._replica(name):  # held by its receiver: do not even try
                    raise InvalidArgument(_REPLICA.format(name=name))
                if p.replicas_only:
                    raise InvalidArgument(_NOT_PRIMARY.format(name=name))
                vol = Volume.open(p.data_dir, name, readonly=ro, al_slots=p.al_slots,
                                  journal_max_bytes=p.journal_max_bytes,
                                  segment_bytes=p.segment_bytes)
                if vol.replica:
                    vol.close()
                    raise InvalidArgument(_REPLICA.format(name=name))
            except (BlockstoreError, OSError) as e:
                if self.failed.get(name) != str(e):
                    log.error("volume_not_served", volume=name, error=str(e))
                    if not quiet:
                        print(f"nbdgw: volume {name} not served: {e}", file=sys.stderr,
                              flush=True)
                self.failed[name] = str(e)
                return None
            self.failed.pop(name, None)
            if vol.journal is not None and name in _TEST_SYNC_DELAY:
                vol.journal.sync_delay = _TEST_SYNC_DELAY[name]
            r = vol.recovery
            if r.unclean:
                log.warning("volume_recovered", volume=name, replayed=r.replayed,
                            torn_bytes=r.torn_bytes, hot_extents=r.hot_extents,
                            last_seq=r.last_seq)
            with self.lock:
                self.volumes[name] = vol
            if quiet:
                self.control.add(name, vol)
                log.info("volume_added", volume=name, size=vol.size)
            return vol

    def withdraw(self, name: str) -> str | None:
        """Stop serving volume ``name`` (`nbdgw volume delete` of a served volume): the
        refusal when clients still use it, else None once it is closed."""
        with self.members:
            vol = self.volumes.get(name)
            if vol is None:
                return None
            with self.lock:
                n = self.in_use.get(name, 0) + sum(
                    c for e, c in self.snapshot_handles.items() if e.startswith(name + "@"))
                if n:
                    return (f"volume {name} is in use by {n} client{'s' if n > 1 else ''} "
                            "(NBD or iSCSI): disconnect them first")
                del self.volumes[name]
            self.control.remove(name)
            try:
                vol.close()
            except (BlockstoreError, OSError) as e:
                log.error("volume_close_failed", volume=name, error=str(e))
            log.info("volume_withdrawn", volume=name)
            return None

    def _exists(self, name: str) -> bool:
        assert self.params.data_dir is not None
        try:
            validate_name(name)
        except InvalidArgument:
            return False
        return (self.params.data_dir / "volumes" / name / "volume.json").exists()

    def _discover(self) -> None:
        if self.discover:
            for name in self._primaries():
                if name not in self.volumes:
                    self._add(name)
            for info in self._replicas():
                self.control.add_replica(info.name, info.path)

    def list_exports(self) -> list[tuple[str, str]]:
        out = []
        self._discover()
        with self.lock:
            served = list(self.volumes.items())
        for n, v in served:
            out.append((n, f"nbdgw volume {n} ({v.size} bytes)"))
            with v.request_lock:
                snaps = v.snapshot_list()
            out += [(f"{n}@{r['name']}", f"nbdgw snapshot {r['name']} of volume {n}, "
                     "read-only") for r in snaps]
            out += point_exports(v)
        assert self.params.data_dir is not None
        out += [(c.name, f"nbdgw clone {c.name} of {c.volume}@{c.snapshot}, writable")
                for c in list_clones(self.params.data_dir)]
        for info in self._replicas():
            if info.name in served_names(served):
                continue  # promoted since: served above
            out += replica_point_exports(info)
            try:
                _shift, index = read_index(info.path / "snapshots" / "index")
            except FileNotFoundError:
                continue
            except (BlockstoreError, OSError) as e:
                log.error("replica_snapshots_unreadable", volume=info.name, error=str(e))
                continue
            out += [(f"{info.name}@{index.snaps[i].name}",
                     f"nbdgw snapshot {index.snaps[i].name} of replica {info.name}, "
                     "read-only") for i in index.order]
        return out

    def default_export(self) -> str:
        # A client that names no export gets nbd.default_export if the config names
        # one; otherwise its open is refused (never silently the first volume, writable).
        return self.params.default_export

    def open(self, name: str, readonly: bool) -> Handle:
        if "@" in name:
            vol = self.volumes.get(name.partition("@")[0])
            if vol is None and self._replica_point(name):  # a replica's (points.py)
                return open_replica_point_export(self._replica_info(name), name)
            if is_point_export(vol, name.partition("@")[2]):  # CDP (nbd_plugin/points.py)
                h = open_point_export(vol, name)
                volume = name.partition("@")[0]
                with self.lock:  # a client of its volume: withdraw waits for it
                    self.in_use[volume] = self.in_use.get(volume, 0) + 1
                return h
            return self._open_snapshot(name)
        name = name or self.params.default_export  # nbdkit passes the client's own name
        if not name:
            exports = ", ".join(sorted(self.volumes)) or "none"
            raise FileNotFoundError(f"name the volume to connect to (nbd://HOST/VOLUME); "
                                    f"exports: {exports}")
        vol = self.volumes.get(name)
        if vol is None and (replica := self._followed(name)) is not None:
            return open_replica_current(replica)  # as of its last batch, read-only
        if vol is None and self.discover and self._exists(name):
            vol = self._add(name)  # created (or promoted) after this process started
        if vol is None and self.params.data_dir is not None:
            clone = find_clone(self.params.data_dir, name) if self._valid(name) else None
            if clone is not None:
                return self._open_clone(clone, readonly)
        if vol is None:
            if name in self.replica_names:
                raise FileNotFoundError(_REPLICA.format(name=name))
            if name in self.failed:
                raise FileNotFoundError(f"volume {name} is not served: {self.failed[name]}")
            raise FileNotFoundError(f"no export named {name!r}")
        with self.lock:
            self.in_use[name] = self.in_use.get(name, 0) + 1
        return Handle(vol, readonly or vol.readonly, self.gate, self.lease)

    def _replica_info(self, export: str) -> VolumeInfo:
        info = self._replica(export.partition("@")[0])
        assert info is not None
        return info

    def _replica_point(self, export: str) -> bool:
        """Whether ``export`` names a CDP point of a replica this process serves the
        snapshots of (a snapshot of the same name wins)."""
        volume, _, point = export.partition("@")
        if not is_point_name(point):
            return False
        info = self._followed(volume)
        if info is None:
            return False
        try:
            _shift, index = read_index(info.path / "snapshots" / "index")
        except FileNotFoundError:
            return True
        return point not in index.by_name

    def _open_snapshot(self, export: str) -> Handle:
        volume, _, snap = export.partition("@")
        vol = self.volumes.get(volume)
        if vol is None:
            if self._followed(volume) is not None:
                return self._open_replica_snapshot(volume, snap, export)
            raise FileNotFoundError(f"no export named {export!r} (volume {volume} is not "
                                    "served here)")
        with vol.request_lock:
            try:
                view = vol.snapshot_view(snap)
            except BlockstoreError as e:
                raise FileNotFoundError(f"no export named {export!r}: {e}") from None
        with self.lock:
            self.snapshot_handles[export] = self.snapshot_handles.get(export, 0) + 1
        return Handle(view, True, lock=vol.request_lock)

    @staticmethod
    def _valid(name: str) -> bool:
        try:
            validate_name(name)
        except InvalidArgument:
            return False
        return True

    def _open_clone(self, info: CloneInfo, readonly: bool) -> Handle:
        """A writable clone of a snapshot (this node's volume's, or a replica's): its
        writes in its own file, the rest read from the snapshot, under the snapshot's
        lock (blockstore/clone.py)."""
        with self.members:
            got = self.clones.get(info.name)
            if got is None:
                base = f"{info.volume}@{info.snapshot}"
                try:
                    base_h = (self._open_point_base(info) if info.is_point
                              else self._open_snapshot(base))
                except FileNotFoundError as e:
                    raise FileNotFoundError(f"clone {info.name}: its base {base} cannot be "
                                            f"read: {e}") from None
                try:
                    clone = Clone(info, base_h.vol)
                except BaseException:
                    self.close_handle(base_h)
                    raise
                got = (clone, base_h, 0)
                log.info("clone_opened", clone=info.name, base=base)
            clone, base_h, n = got
            self.clones[info.name] = (clone, base_h, n + 1)
        return Handle(clone, readonly, lock=base_h.lock)

    def _open_point_base(self, info: CloneInfo) -> Handle:
        """The CDP point a clone reads (its pinned seq): a view of this process's
        volume, or of a replica another process writes (points.py)."""
        vol = self.volumes.get(info.volume)
        if vol is not None:
            h = open_point_handle(vol, f"seq-{info.point_seq}")
            with self.lock:  # a client of its volume: withdraw waits for it
                self.in_use[info.volume] = self.in_use.get(info.volume, 0) + 1
            return h
        replica = self._replica(info.volume)
        if replica is None:
            raise FileNotFoundError(f"volume {info.volume} is not served here")
        return open_replica_point(replica, f"seq-{info.point_seq}")

    def _close_clone(self, name: str) -> None:
        with self.members:
            got = self.clones.get(name)
            if got is None:
                return
            clone, base_h, n = got
            if n > 1:
                self.clones[name] = (clone, base_h, n - 1)
                return
            del self.clones[name]
        with base_h.lock:
            clone.close()
        self.close_handle(base_h)

    def _open_replica_snapshot(self, volume: str, snap: str, export: str) -> Handle:
        """A replica's snapshot, read while its receiver goes on writing the replica
        (blockstore/snapshot.py SnapshotFollower has the protocol)."""
        with self.members:
            got = self.followers.get(volume)
            if got is not None and got[0].gone:  # deleted, perhaps created again since
                self.followers.pop(volume)
                with got[1]:  # its views fail from now on, before any read (ESHUTDOWN)
                    got[0].store.close()
                    got[0].close()
                got = None
            if got is None:
                assert self.params.data_dir is not None
                info = find_volume(self.params.data_dir, volume)
                if not (info.path / "snapshots" / "index").exists():
                    raise FileNotFoundError(f"no export named {export!r}: replica {volume} "
                                            "has no snapshots")
                store = Store(str(info.path / "store"), info.size, readonly=True,
                              noatime=True)
                try:
                    got = (SnapshotFollower(info.path / "snapshots", store, volume),
                           threading.Lock())
                except BaseException:
                    store.close()
                    raise
                self.followers[volume] = got
        follower, lock = got
        with lock:
            try:
                view = ReplicaSnapshotView(follower, snap)
            except BlockstoreError as e:
                raise FileNotFoundError(f"no export named {export!r}: {e}") from None
        with self.lock:
            self.snapshot_handles[export] = self.snapshot_handles.get(export, 0) + 1
        log.info("replica_snapshot_opened", export=export)
        return Handle(view, True, lock=lock)

    def close_handle(self, h: Handle) -> None:
        if close_point(h):
            volume = h.vol.name.partition("@")[0]
            with self.lock:
                self.in_use[volume] = max(0, self.in_use.get(volume, 1) - 1)
            return
        if isinstance(h.vol, Clone):
            self._close_clone(h.vol.name)
            return
        if not isinstance(h.vol, SnapshotView):
            with self.lock:
                self.in_use[h.vol.name] = max(0, self.in_use.get(h.vol.name, 1) - 1)
            return
        if isinstance(h.vol, SnapshotView):
            with self.lock:
                left = self.snapshot_handles.get(h.vol.name, 0) - 1
                if left > 0:
                    self.snapshot_handles[h.vol.name] = left
                else:
                    self.snapshot_handles.pop(h.vol.name, None)

    def _snapshot_in_use(self, volume: str, snap: str) -> str | None:
        """Why snapshot ``snap`` of ``volume`` cannot be deleted now (called locked)."""
        n = self.snapshot_handles.get(f"{volume}@{snap}", 0)
        if n:
            return (f"snapshot {snap} of volume {volume} is exported to {n} client"
                    f"{'s' if n > 1 else ''} ({volume}@{snap}): disconnect them first")
        return None

    def attach_fuse(self, export: str, fd: int, read_only: bool) -> None:
        """Serve the bridge's FUSE mount of ``export`` (its /dev/fuse descriptor ``fd``,
        now ours) from this process: nbd_plugin/fusefile.py."""
        try:
            h = self.open(export, read_only)
            if h.readonly and not read_only:
                self.close_handle(h)
                raise PermissionError(errno.EROFS, f"export {export} is read-only here")
        except BaseException:
            os.close(fd)
            raise
        h.io = iostats.opened(h.vol.name)

        def ended(a: Attachment) -> None:
            iostats.closed(h.vol.name, h.io)
            self.close_handle(h)
            with self.lock:
                if a in self.fuse:
                    self.fuse.remove(a)

        with self.lock:  # before ended() can run: it takes the lock
            self.fuse.append(Attachment(export, h, fd, ended))

    def close(self) -> None:
        control = getattr(self, "control", None)
        if control is not None:
            control.stop()
        with self.lock:
            mounts = list(getattr(self, "fuse", ()))
        for a in mounts:  # no FUSE request touches a volume after this
            a.close()
        if self.gate is not None:
            self.gate.close()
        for name, vol in self.volumes.items():
            try:
                vol.close()
            except (BlockstoreError, OSError) as e:
                log.error("volume_close_failed", volume=name, error=str(e))
        self.volumes.clear()
        for follower, _lock in getattr(self, "followers", {}).values():
            follower.store.close()
            follower.close()
