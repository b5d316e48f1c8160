"""CDP point exports (``VOLUME@seq-N``, ``VOLUME@2026-12-02T10:15:03Z``): read-only views
of a volume as of a point of its history (blockstore/cdp.py, DESIGN.md "CDP"), of a
volume this process serves or of a replica its receiver writes in another process; and
``REPLICA`` itself, as of its last committed batch (``open_replica_current``).

A point is served only once `nbdgw cdp export` named it (the volume's cdp/exports.json),
and a snapshot of the same name wins.  Each connection opens its own view: it pins the
base it reads, so the history it needs stays until it disconnects."""

from __future__ import annotations

import threading

from blockstore.cdp import (
    LATEST,
    CdpError,
    FollowedPointView,
    PointView,
    is_point_name,
    open_point,
    read_exports,
    read_policy,
)
from blockstore.errors import BlockstoreError
from blockstore.volume import Volume, VolumeInfo

from .handle import Handle, yield_to_receiver


def is_point_export(vol: Volume | None, point: str) -> bool:
    """Whether ``VOLUME@point`` names a CDP point rather than a snapshot."""
    if vol is None or not is_point_name(point):
        return False  # not served here (a replica's snapshots are opened as such)
    return vol.snaps is None or point not in vol.snaps.index.by_name


def _exported(info: VolumeInfo, export: str) -> None:
    if export not in read_exports(info.path):
        raise FileNotFoundError(f"no export named {export!r}: export the point first "
                                f"(nbdgw cdp export {info.name} ...)")


def open_point_handle(vol: Volume, point: str) -> Handle:
    """A read-only handle on point ``point`` (``seq-N`` or an instant) of ``vol``."""
    with vol.request_lock:
        try:
            view = open_point(vol, point)
        except (CdpError, BlockstoreError, OSError) as e:
            raise FileNotFoundError(f"no export named {vol.name}@{point}: {e}") from None
    return Handle(view, True, lock=vol.request_lock)


def open_point_export(vol: Volume | None, export: str) -> Handle:
    """A read-only handle on point export ``export`` of the served volume ``vol``."""
    if vol is None:
        raise FileNotFoundError(f"no export named {export!r} (volume "
                                f"{export.partition('@')[0]} is not served here)")
    _exported(vol.info, export)
    return open_point_handle(vol, export.partition("@")[2])


class ReplicaPointView(FollowedPointView):
    """A replica's point as nbdkit serves it: read at a lower CPU priority, so that a
    reader never slows the receiver applying the primary's writes."""

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        yield_to_receiver()
        super().read_into(buf, offset)


def open_replica_point(info: VolumeInfo, point: str) -> Handle:
    """A read-only handle on point ``point`` of replica ``info`` (its receiver goes on
    applying batches in another process; the view pins the base it reads)."""
    try:
        view = ReplicaPointView(info.path, info.name, info.size, point)
    except (CdpError, BlockstoreError, OSError) as e:
        raise FileNotFoundError(f"no export named {info.name}@{point}: {e}") from None
    return Handle(view, True, lock=threading.Lock())


def open_replica_current(info: VolumeInfo) -> Handle:
    """Export ``REPLICA`` itself: the replica as of its last committed batch when the
    client connects, read-only, that state for the whole connection (a point view at the
    batch's commit MARK).  The live store is never read as it stands: the receiver may be
    halfway through a batch.  Without a CDP window there is no base to read that state
    through, so the open is refused, saying what is served instead."""
    if read_policy(info.path) is None:
        raise FileNotFoundError(
            f"volume {info.name} is a replica: it is served read-only as of its last "
            "applied batch only with a CDP window on this node (cdp: in its config); "
            f"its snapshots are: {info.name}@SNAPSHOT, read-only")
    try:
        view = ReplicaPointView(info.path, info.name, info.size, LATEST)
    except (CdpError, BlockstoreError, OSError) as e:
        raise FileNotFoundError(f"replica {info.name}: {e}") from None
    return Handle(view, True, lock=threading.Lock())


def open_replica_point_export(info: VolumeInfo, export: str) -> Handle:
    _exported(info, export)
    return open_replica_point(info, export.partition("@")[2])


def close_point(h: Handle) -> bool:
    """Close a point handle's view (under its lock); False: not a point."""
    view = h.vol
    if not isinstance(view, PointView | FollowedPointView):
        return False
    with h.lock:
        view.close()
    return True


def point_exports(vol: Volume) -> list[tuple[str, str]]:
    """The point exports of ``vol`` for NBD's export list."""
    if vol.cdp is None:
        return []
    return [(e, f"nbdgw point {e.partition('@')[2]} of volume {vol.name}, read-only")
            for e in read_exports(vol.info.path)]


def replica_point_exports(info: VolumeInfo) -> list[tuple[str, str]]:
    """The point exports of replica ``info`` for NBD's export list."""
    if read_policy(info.path) is None:
        return []
    return [(info.name, f"nbdgw replica {info.name} as of its last applied batch when "
             "opened, read-only")] + [
        (e, f"nbdgw point {e.partition('@')[2]} of replica {info.name}, read-only")
        for e in read_exports(info.path)]
