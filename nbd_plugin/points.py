"""CDP point exports (``VOLUME@seq-N``, ``VOLUME@2026-12-02T10:15:03Z``): read-only views
of a served volume as of a point of its history (blockstore/cdp.py, DESIGN.md "CDP").

A point is served only once `nbdgw cdp export` named it (the volume's cdp/exports.json),
and a snapshot of the same name wins.  Each connection opens its own view: it pins the
base it reads, so the history it needs stays until it disconnects."""

from __future__ import annotations

from blockstore.cdp import CdpError, PointView, is_point_name, open_point, read_exports
from blockstore.errors import BlockstoreError
from blockstore.volume import Volume

from .handle import Handle


def is_point_export(vol: Volume | None, point: str) -> bool:
    """Whether ``VOLUME@point`` names a CDP point rather than a snapshot."""
    if vol is None or not is_point_name(point):
        return False  # not served here (a replica's snapshots are opened as such)
    return vol.snaps is None or point not in vol.snaps.index.by_name


def open_point_export(vol: Volume | None, export: str) -> Handle:
    """A read-only handle on point export ``export`` of the served volume ``vol``."""
    if vol is None:
        raise FileNotFoundError(f"no export named {export!r} (volume "
                                f"{export.partition('@')[0]} is not served here)")
    point = export.partition("@")[2]
    if export not in read_exports(vol.info.path):
        raise FileNotFoundError(f"no export named {export!r}: export the point first "
                                f"(nbdgw cdp export {vol.name} ...)")
    with vol.request_lock:
        try:
            view = open_point(vol, point)
        except (CdpError, BlockstoreError, OSError) as e:
            raise FileNotFoundError(f"no export named {export!r}: {e}") from None
    return Handle(view, True, lock=vol.request_lock)


def close_point(h: Handle) -> bool:
    """Close a point handle's view (under its volume's lock); False: not a point."""
    view = h.vol
    if not isinstance(view, PointView):
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
