"""Node-wide state files that processes below the gateway read too: the epoch of
``<data_dir>/node-state.json`` (the daemon writes it: gateway/nodestate.py) and
``<data_dir>/run/outdated.json``, the peers the daemon has had the cluster's witness
record as outdated (gateway/replication.py; the nbdkit plugin's sync gate and peerlink's
senders may then degrade them when they stall)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from .errors import FormatError
from .meta import read_json, write_json
from .modes import make_dir

KIND = "node-state"
VERSION = 2
FILE = "node-state.json"


def load(data_dir: Path) -> dict[str, Any] | None:
    """node-state.json as version 2 (a version 1 file read as one with no vote cast);
    None when the node never ran failover."""
    path = data_dir / FILE
    if not path.exists():
        return None
    try:
        return read_json(path, KIND, VERSION)
    except FormatError:
        old = read_json(path, KIND, 1)  # migrated on the next save
        return {**old, "version": VERSION}


def node_epoch(data_dir: Path) -> int:
    """The failover epoch this node knows (0 before any promotion)."""
    st = load(data_dir)
    return int(st["epoch"]) if st else 0


class EpochFloor:
    """The epoch of the primary this node follows, for peerlink's receiver to fence a
    deposed primary's batches with: node-state.json's epoch (raised by the node core
    only once a primary of that epoch exists: heard, or holding the etcd key), read
    again only when the file changed (one stat per batch)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / FILE
        self.seen: tuple[int, int, int] | None = None
        self.epoch = 0

    def current(self) -> int:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return self.epoch  # no failover core (yet): nothing newer is known
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self.seen:
            try:
                self.epoch = max(self.epoch, node_epoch(self.path.parent))
                self.seen = key
            except (OSError, FormatError):
                pass  # replaced under us: read it next time
        return self.epoch


OUTDATED_NAME: Final = "outdated.json"
OUTDATED_KIND: Final = "outdated"
OUTDATED_VERSION: Final = 1


def outdated_path(data_dir: Path) -> Path:
    return data_dir / "run" / OUTDATED_NAME


def write_outdated(data_dir: Path, epoch: int, peers: list[str] | set[str]) -> None:
    """Record (atomically) that the witness holds ``peers`` as outdated at ``epoch``:
    peerlink may then degrade them when they stall (they cannot be promoted)."""
    path = outdated_path(data_dir)
    make_dir(path.parent, parents=True, exist_ok=True)
    write_json(path, {"kind": OUTDATED_KIND, "version": OUTDATED_VERSION, "epoch": epoch,
                      "peers": sorted(set(peers))})


def read_outdated(data_dir: Path) -> set[str]:
    """The peers this node may degrade: those of ``outdated.json``, unless it was written
    in an epoch older than this node's (a failover since: it speaks of another primary's
    peers).  No file: none."""
    path = outdated_path(data_dir)
    try:
        rec = read_json(path, OUTDATED_KIND, OUTDATED_VERSION)
    except FileNotFoundError:
        return set()
    epoch, peers = rec.get("epoch"), rec.get("peers")
    if type(epoch) is not int or not isinstance(peers, list):
        raise FormatError(f"{path}: expected an integer epoch and a list of peers")
    if epoch < node_epoch(data_dir):
        return set()
    return {str(p) for p in peers}
