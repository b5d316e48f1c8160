"""A volume: store + journal + activity log + metadata, with crash recovery.

Layout under ``<data_dir>/volumes/<name>/``::

    volume.json   identity and geometry (name, size, uuid, extent size)
    state.json    clean flag, checkpoint sequence (the redo start point)
    store         the data (sparse file)
    journal/      record segments (see journal.py)
    al            activity log of hot extents (see activity_log.py)
    resync.json   extents that must be resent to every peer (after an unclean stop)
    peers/        <peer>.json (the peer's acked seq, written by its sender) and
                  <peer>.dirty-*.json (extents that peer must be resynced; see DirtySet)
    lock          flock()ed by the one process that has the volume open

Write path (DESIGN.md §1): activate the extent in the activity log if it is cold, write
the store, then append the record to the journal.  (Store first: a store write that fails,
say ENOSPC, leaves nothing in the journal, so a journal tailer never ships a change that
did not happen; a journal append that fails after the store took the change marks its
extents for resync.)  FLUSH and FUA make the journal durable
(fdatasync); the store is made durable at checkpoints (segment rotation, clean close),
because an unclean open replays the journal from the last checkpoint (redo).  A kill -9
therefore loses nothing that a write call returned; a power loss loses nothing that was
flushed; and whatever the store may hold beyond the journal lies in the hot extents,
which recovery records in resync.json for the peers.  (Redo may roll such an extent back
to its last journaled content; only writes never acknowledged, or never flushed before a
power loss, are affected, as NBD allows.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import msgpack
import structlog

from nbdgw_common.logs import mark_logged

from .activity_log import DEFAULT_EXTENT_SHIFT, ActivityLog
from .cdp import BASES_DIR, CDP_DIR, Cdp, finish_restore, pending_restore, read_policy
from .clone import clones_of, find_clone
from .diverged import read_diverged
from .errors import (
    BlockstoreError,
    FormatError,
    InvalidArgument,
    NoSpace,
    VolumeExists,
    VolumeInUse,
    VolumeNotFound,
)
from .journal import (
    DEFAULT_SEGMENT_BYTES,
    Journal,
    is_data_op,
    journal_bounds,
    record_headers,
    segment_files,
)
from .marks import (
    COMMIT_EVENT,
    GROW_EVENT,
    SNAP_DELETE_EVENT,
    SNAP_EVENT,
    SNAP_ROLLBACK_EVENT,
    UpstreamBatch,
    grow_size,
)
from .meta import fsync_dir, read_json, write_json
from .modes import create_file, make_dir, tighten_dir, tighten_tree
from .peers import (
    DIRTY_HOT,
    DIRTY_RELEASED,
    dirty_shift,
    extent_range,
    known_peers,
    write_dirty,
)
from .record import REC_HEADER_SIZE, Flag, Op, RecordHeader
from .snapshot import (
    MAX_SNAPSHOTS,
    ROLLBACK_FILE,
    RedoFence,
    Snapshot,
    SnapshotError,
    SnapshotStore,
    SnapshotView,
    list_rows,
    validate_snapshot_name,
)
from .space import SpaceGuard, is_enospc, no_space
from .store import Store, extent_digest

VOLUME_VERSION = 1
STATE_VERSION = 1
RESYNC_VERSION = 1
SIZE_ALIGN = 4096
MAX_SIZE = 1 << 50  # 1 PiB
DEFAULT_AL_SLOTS = 1024  # x 4 MiB extents = 4 GiB hot window
# Extents activated ahead of a sequential stream, with the one it reaches: one activity
# log fdatasync per 1 + AL_AHEAD extents instead of one each (DESIGN.md §1, issue 18).
AL_AHEAD = 3
# How many of the log's most recent entries a stream is looked for in: each stream adds
# 1 + AL_AHEAD at a time, so this finds up to four interleaved (multi-conn) streams.
_STREAM_WINDOW = 4 * (1 + AL_AHEAD)
DEFAULT_JOURNAL_MAX_BYTES = 1 << 30
_log = structlog.get_logger(component="blockstore")
_FUA = int(Flag.FUA)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe volume name, else raise InvalidArgument."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"invalid volume name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def parse_size(text: str | int) -> int:
    """Parse '10G', '512MiB', '4096' (binary units) into bytes, a multiple of 4096."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise InvalidArgument(
                f"invalid size {text!r}: expected a number with an optional unit K, M, G, T or P"
            )
        size = int(m.group(1)) << _UNITS[m.group(2).lower()]
    if size <= 0:
        raise InvalidArgument(f"invalid size {text!r}: must be greater than zero")
    if size % SIZE_ALIGN:
        raise InvalidArgument(f"invalid size {text!r}: must be a multiple of {SIZE_ALIGN} bytes")
    if size > MAX_SIZE:
        raise InvalidArgument(f"invalid size {text!r}: larger than 1 PiB")
    return size


def volumes_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "volumes"


# One upstream batch for a replica: (first_seq, last_seq, records, commit meta); records
# are (op, flags, offset, length, data).


@dataclass(frozen=True)
class VolumeInfo:
    """What volume.json says, plus the path."""

    name: str
    size: int
    uuid: str
    volume_id: int
    extent_shift: int
    created: float
    path: Path

    @classmethod
    def load(cls, path: Path) -> VolumeInfo:
        meta = read_json(path / "volume.json", "volume", VOLUME_VERSION)
        return cls(meta["name"], meta["size"], meta["uuid"], meta["volume_id"],
                   meta["extent_shift"], meta["created"], path)


def largest_file_size(directory: Path, size: int) -> int | None:
    """None if a file of ``size`` bytes fits on the file system of ``directory`` (or of
    its nearest existing parent); else the largest multiple of SIZE_ALIGN that does.

    Tried on an unnamed file (O_TMPFILE, or one unlinked at once), so nothing is left
    behind even by a crash.  Free space is not checked: stores are sparse.  The file
    system's maximum file size is the limit, and only trying tells it: ext4 answers
    PC_FILESIZEBITS 64 but stops at 16 TiB - 4 KiB with 4 KiB blocks."""
    d = Path(directory)
    while not d.is_dir():
        d = d.parent
    try:
        fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        fd, path = tempfile.mkstemp(dir=d, prefix=".size-probe-")
        os.unlink(path)

    def fits(n: int) -> bool:
        try:
            os.ftruncate(fd, n)
        except OSError as e:
            if e.errno in (errno.EFBIG, errno.EINVAL):
                return False
            raise
        return True

    try:
        if fits(size):
            return None
        lo, hi = 0, size // SIZE_ALIGN  # lo fits, hi does not (in SIZE_ALIGN units)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid * SIZE_ALIGN) else (lo, mid)
        return lo * SIZE_ALIGN
    finally:
        os.close(fd)


def _human_size(n: int) -> str:
    """``1P``, ``16T - 4K``: exact, in the units parse_size takes."""
    for shift, unit in ((50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")):
        up = -(-n >> shift) << shift  # n rounded up to the unit
        if n >= 1 << shift and (n % (1 << shift) == 0 or up - n < 1 << 20):
            rest = up - n
            return f"{up >> shift}{unit}" + (f" - {_human_size(rest)}" if rest else "")
    return f"{n}"


def check_size_fits(directory: Path, size: int, consequence: str) -> None:
    """Refuse ``size`` when a file that large cannot exist on ``directory``'s file
    system (InvalidArgument naming the largest that can)."""
    most = largest_file_size(directory, size)
    if most is not None:
        d = Path(directory)
        while not d.is_dir():
            d = d.parent
        raise InvalidArgument(f"invalid size {size} bytes ({_human_size(size)}): files on the "
                              f"file system of {d} can be at most {most} bytes "
                              f"({_human_size(most)}); {consequence}")


def create_volume(data_dir: Path, name: str, size: int, replica: bool = False) -> VolumeInfo:
    """Create an empty volume: sparse store, empty journal, metadata.  Crash-safe:
    the volume is built in a hidden directory and renamed into place last.  A replica
    starts Inconsistent: it cannot be served or promoted until its initial sync ends.
    A size the file system cannot hold is refused before anything is made."""
    validate_name(name)
    vdir = volumes_dir(data_dir)
    check_size_fits(vdir, size, "nothing was created")
    make_dir(data_dir, parents=True, exist_ok=True)
    make_dir(vdir, exist_ok=True)
    final = vdir / name
    if final.exists():
        raise VolumeExists(f"volume {name} already exists in {data_dir}")
    if find_clone(data_dir, name) is not None:
        raise VolumeExists(f"a clone named {name} exists in {data_dir} (clones and volumes "
                           "share the export names)")
    tmp = vdir / f".creating-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_dir(tmp)
    uid = uuid.uuid4()
    meta = {"kind": "volume", "version": VOLUME_VERSION, "name": name, "size": size,
            "uuid": str(uid), "volume_id": int.from_bytes(uid.bytes[:4], "little"),
            "extent_shift": DEFAULT_EXTENT_SHIFT, "created": time.time()}
    fd = create_file(tmp / "store", os.O_RDWR | os.O_EXCL, data=True)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    Journal.create(tmp / "journal", uid.bytes)
    write_json(tmp / "volume.json", meta)
    write_json(tmp / "state.json", {"kind": "state", "version": STATE_VERSION, "clean": True,
                                    "checkpoint_seq": 0, "last_seq": 0, "replica": replica,
                                    "inconsistent": replica, "upstream_seq": 0})
    os.close(create_file(tmp / "lock", os.O_RDONLY))
    fsync_dir(tmp)
    try:
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise VolumeExists(f"volume {name} already exists in {data_dir}") from None
        raise
    fsync_dir(vdir)
    return VolumeInfo.load(final)


def list_volumes(data_dir: Path) -> list[VolumeInfo]:
    vdir = volumes_dir(data_dir)
    if not vdir.is_dir():
        return []
    return [VolumeInfo.load(p) for p in sorted(vdir.iterdir())
            if p.is_dir() and not p.name.startswith(".")]


def find_volume(data_dir: Path, name: str) -> VolumeInfo:
    validate_name(name)
    path = volumes_dir(data_dir) / name
    if not (path / "volume.json").exists():
        raise VolumeNotFound(f"no volume named {name} in {data_dir}")
    return VolumeInfo.load(path)


class VolumeLock:
    """Exclusive flock on the volume's lock file, recording the holder's pid."""

    def __init__(self, info: VolumeInfo) -> None:
        self.path = info.path / "lock"
        self.fd = create_file(self.path, os.O_RDWR)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise VolumeInUse(f"volume {info.name} is in use (held by pid {holder})") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1


def in_use(info: VolumeInfo) -> bool:
    """Whether a process holds the volume's lock, found without taking it: from
    /proc/locks (an flock of the lock file's inode), so that reading a volume's status
    needs no write access (a control.group member runs `nbdgw status`) and never makes
    a concurrent open fail.  Without /proc/locks: a shared flock, at once released."""
    try:
        st = (info.path / "lock").stat()
    except FileNotFoundError:
        return False
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            return any(fields[1] == "FLOCK" and fields[5] == key
                       for fields in (line.split() for line in f)
                       if len(fields) > 5 and fields[1] != "->")
    except OSError:
        pass
    fd = os.open(info.path / "lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def delete_volume(data_dir: Path, name: str) -> None:
    info = find_volume(data_dir, name)
    lock = VolumeLock(info)  # raises VolumeInUse while served
    try:
        doomed = info.path.with_name(f".deleting-{name}-{os.getpid()}")
        os.rename(info.path, doomed)
        fsync_dir(info.path.parent)
    finally:
        lock.release()
    shutil.rmtree(doomed)


def read_resync(info: VolumeInfo) -> dict[str, Any]:
    """The extents every peer must be sent again (resync.json), empty if none."""
    path = info.path / "resync.json"
    if not path.exists():
        return {"kind": "resync", "version": RESYNC_VERSION, "extent_shift": info.extent_shift,
                "extents": [], "full": False, "reasons": []}
    return read_json(path, "resync", RESYNC_VERSION)


def add_resync(info: VolumeInfo, extents: list[int], reason: str, full: bool = False) -> None:
    """Persistently add extents (or the whole volume) to resync.json, with the reason."""
    if not extents and not full:
        return
    cur = read_resync(info)
    cur["extents"] = sorted(set(cur["extents"]) | set(extents))
    cur["full"] = bool(cur["full"]) or full
    cur["reasons"] = [*cur["reasons"], {"reason": reason, "at": time.time()}][-20:]
    write_json(info.path / "resync.json", cur)


def is_replica(info: VolumeInfo) -> bool:
    """Is this volume a replica (written only by peerlink, never served read-write)?"""
    return bool(read_json(info.path / "state.json", "state", STATE_VERSION).get("replica"))


def _sizes(paths: list[Path]) -> int:
    """Total size of files another process may be releasing meanwhile."""
    total = 0
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def volume_status(info: VolumeInfo) -> dict[str, Any]:
    """What an operator wants to see of a volume without opening it."""
    state = read_json(info.path / "state.json", "state", STATE_VERSION)
    jdir = info.path / "journal"
    segs = segment_files(jdir)
    resync = read_resync(info)
    return {
        "name": info.name, "size": info.size, "uuid": info.uuid, "in_use": in_use(info),
        "clean": bool(state["clean"]), "last_seq": _journal_end(jdir, int(state["last_seq"])),
        "role": "replica" if state.get("replica") else "primary",
        "inconsistent": bool(state.get("inconsistent", False)),
        "upstream_seq": int(state.get("upstream_seq", 0)),
        "journal_bytes": _sizes(segs), "journal_segments": len(segs),
        "resync_extents": len(resync["extents"]), "resync_full": bool(resync["full"]),
        "allocated_bytes": (info.path / "store").stat().st_blocks * 512,
        "diverged": read_diverged(info),
    }


def _journal_end(jdir: Path, saved: int) -> int:
    """The last complete record of the journal (state.json's seq is only as new as its
    last save; `nbdgw status` and `volume list` must agree)."""
    try:
        return max(saved, journal_bounds(jdir)[1])
    except (FormatError, OSError):
        return saved


@dataclass(frozen=True)
class RecoveryReport:
    """What opening the volume had to do."""

    unclean: bool
    torn_bytes: int
    replayed: int
    hot_extents: int
    last_seq: int


class FailureLog:
    """The ``write_failed`` events of one volume: a full disk fails every write a client
    retries, so the first failure is logged at once and then at most one every
    LOG_EVERY seconds, each event carrying how many failures were not logged since the
    previous one (``suppressed``) and since the volume was opened (``count``); close()
    logs the ones still unlogged (``write_failures_unlogged``)."""

    LOG_EVERY = 10.0

    def __init__(self, volume: str) -> None:
        self.volume = volume
        self.count = 0
        self.unlogged = 0
        self.logged_at = float("-inf")

    def report(self, op: Op, offset: int, length: int, e: OSError) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at < self.LOG_EVERY:
            self.unlogged += 1
            return
        self.logged_at = now
        where = ({"path": e.path, "needed_bytes": e.needed, "free_bytes": e.free}
                 if isinstance(e, NoSpace) else
                 {"path": e.filename} if e.filename else {})
        _log.warning("write_failed", volume=self.volume, op=op.name.lower(), offset=offset,
                     length=length, error=str(e.strerror or e),
                     errno=errno.errorcode.get(e.errno or 0, str(e.errno)),
                     suppressed=self.unlogged, count=self.count, **where)
        self.unlogged = 0

    def flush(self) -> None:
        if self.unlogged:
            _log.warning("write_failures_unlogged", volume=self.volume,
                         suppressed=self.unlogged, count=self.count)
            self.unlogged = 0



class Checkpointer:
    """The volume's background thread: segment spares, checkpoints, journal release.

    At each journal rotation it prepares the next spare segment at once, and makes the
    store durable and advances the redo point at most every MIN_INTERVAL seconds (sooner
    once the journal has grown by URGENT_FRACTION of its cap since the last checkpoint,
    or is over the cap, since only checkpointed segments can be released).  The store's
    fdatasync after many writes can take a large fraction of a second and forces
    writeback that competes with the clients; none of this runs on the request path.
    Starting at half the cap leaves the other half for the writes that arrive while that
    fdatasync runs: a checkpoint started only at the cap was overtaken under sustained
    1 MiB writes, and the request path then had to checkpoint inline (an 85 ms stall at
    every sixth segment; none at half the cap).  At each rotation it also starts the
    store's writeback (Store.start_writeback), so that fdatasync waits for about one
    segment of dirty pages.  Only this thread writes state.json while the volume is open.
    """

    MIN_INTERVAL = 2.0
    URGENT_FRACTION = 0.5

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.cv = threading.Condition()
        self.want: int | None = None
        self.spare_wanted = False
        self.stopping = False
        self.error: OSError | BlockstoreError | None = None
        self.thread: threading.Thread | None = None
        self.retained_after = 0  # journal bytes the last checkpoint's release left

    def request(self, seq: int) -> None:
        with self.cv:
            self.want = seq
            self.spare_wanted = True
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="nbdgw-checkpoint",
                                               daemon=True)
                self.thread.start()
            self.cv.notify()

    def _urgent(self) -> bool:
        """Over the cap (only a checkpoint lets the release go past it), or grown by
        more than URGENT_FRACTION of the cap since the last checkpoint.  Measured from
        what that checkpoint left, not from zero: records that a lagging peer pins stay
        however often the store is synced, and counting them would checkpoint at every
        rotation (under 4 KiB random writes: a random-writeback fdatasync per segment)."""
        journal = self.vol.journal
        if journal is None:
            return False
        retained = journal.retained_bytes()
        cap = self.vol.journal_cap
        return retained > cap or retained > self.retained_after + cap * self.URGENT_FRACTION

    def _next_job(self, last: float) -> tuple[bool, int | None] | None:
        """(prepare a spare?, checkpoint through seq or None); None: time to exit."""
        with self.cv:
            while True:
                spare, self.spare_wanted = self.spare_wanted, False
                if self.want is not None:
                    wait = last + self.MIN_INTERVAL - time.monotonic()
                    if wait <= 0 or self.stopping or self._urgent():
                        seq, self.want = self.want, None
                        return spare, seq
                    if spare:
                        return True, None
                    self.cv.wait(min(wait, 0.25))
                    continue
                if spare:
                    return True, None
                if self.stopping:
                    return None
                self.cv.wait()

    def _run(self) -> None:
        last = 0.0
        journal = self.vol.journal
        assert journal is not None
        while (job := self._next_job(last)) is not None:
            spare, seq = job
            try:
                if spare:
                    journal.prepare_spare()
                    store = self.vol.store
                    if store is not None:
                        store.start_writeback()
                if seq is None:
                    continue
                last = time.monotonic()
                before = journal.retained_bytes()
                self.vol.checkpoint_through(seq)
                # What this checkpoint left of the journal as it was when it started:
                # records written during its fdatasync are growth, not left over (a
                # slow fdatasync must not push the next checkpoint towards the cap).
                self.retained_after = max(0, before - self.vol.release_journal())
            except (OSError, BlockstoreError) as e:
                # The redo point stays where it was: recovery replays more, loses nothing;
                # without a spare the next rotation creates its segment inline.  Said,
                # not swallowed: a disk that fails here fails the clients' writes soon.
                self.error = e
                _log.error("checkpoint_failed", volume=self.vol.name, error=str(e))

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join()
            self.thread = None


class Volume:
    """An open volume.  Single-threaded: the caller serialises requests, under
    ``request_lock`` when several threads serve it (the nbdkit plugin, DESIGN.md §9).
    The journal's sync (FLUSH) may run outside that lock, alongside a request."""

    def __init__(self, info: VolumeInfo, *, readonly: bool = False,
                 al_slots: int = DEFAULT_AL_SLOTS,
                 journal_max_bytes: int = DEFAULT_JOURNAL_MAX_BYTES,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        self.info = info
        self.name = info.name
        self.size = info.size
        self.shift = info.extent_shift
        self.readonly = readonly
        self.journal_max_bytes = journal_max_bytes
        self.lock = VolumeLock(info)
        self.store: Store | None = None
        self.journal: Journal | None = None
        self.al: ActivityLog | None = None
        self.checkpointer: Checkpointer | None = None
        self.snaps: SnapshotStore | None = None  # opened when the volume has snapshots
        self.cdp: Cdp | None = None  # history kept for CDP (cdp.py), when a policy says so
        self.request_lock = threading.Lock()  # see the class docstring
        self.state_lock = threading.Lock()
        self.release_lock = threading.Lock()  # one journal release at a time
        self.diverged: set[int] = set()  # extents changed but not journaled (see write)
        self.applied_seq = 0  # replica: local seq of the last commit applied to the store
        self.unapplied_commit = False  # replica: a committed batch failed to reach the store
        self.space: SpaceGuard | None = None  # keeps room for state files (space.py)
        self.failures = FailureLog(info.name)
        try:
            self._open(al_slots, segment_bytes)
        except BaseException:
            self._close_files()
            self.lock.release()
            raise

    @classmethod
    def open(cls, data_dir: Path, name: str, **kw: Any) -> Volume:
        return cls(find_volume(data_dir, name), **kw)

    # -- open and recovery -----------------------------------------------------

    def _state_path(self) -> Path:
        return self.info.path / "state.json"

    def _open(self, al_slots: int, segment_bytes: int) -> None:
        p = self.info.path
        state = read_json(self._state_path(), "state", STATE_VERSION)
        self.checkpoint_seq = int(state["checkpoint_seq"])
        # Replica keys (absent in files written before replication existed).
        self.replica = bool(state.get("replica", False))
        self.inconsistent = bool(state.get("inconsistent", False))
        self.upstream_seq = int(state.get("upstream_seq", 0))
        if not self.readonly:
            # A volume from before nbdgw set modes (dirs 0755, segments 0644): made
            # private here, DESIGN.md §10.
            tighten_dir(p.parent.parent)
            tighten_dir(p.parent)
            tighten_tree(p)
            self._finish_grow()
        self.store = Store(str(p / "store"), self.size, readonly=self.readonly)
        self.journal = Journal(p / "journal", uuid.UUID(self.info.uuid).bytes,
                               self.info.volume_id, segment_bytes, on_rotate=self._on_rotate)
        # A torn tail is expected only after an unclean stop; after a clean one it is
        # evidence of tampering or disk trouble, left in place for the operator.
        scan = self.journal.open(cut_torn=not state["clean"] and not self.readonly)
        if (p / "snapshots").is_dir():
            self.snaps = SnapshotStore(p / "snapshots", self.size, readonly=self.readonly)
        policy = read_policy(p)
        if policy is not None and not (self.readonly and not (p / CDP_DIR / BASES_DIR).is_dir()):
            self.cdp = Cdp(p, uuid.UUID(self.info.uuid).bytes, self.size, policy,
                           readonly=self.readonly)
        if self.readonly:
            # Read-only opens (checksums, exports of a stopped volume) change nothing.
            self.recovery = RecoveryReport(not state["clean"], 0, 0, 0, scan.last_seq)
            return
        self.al = ActivityLog(str(p / "al"), al_slots, before_evict=self._make_durable)
        self.space = SpaceGuard(p / "store", self.name)
        if state["clean"]:
            if scan.last_seq != state["last_seq"] or scan.torn_bytes:
                raise FormatError(
                    f"volume {self.name}: closed cleanly at seq {state['last_seq']} but the "
                    f"journal ends at seq {scan.last_seq}"
                    + (f" after cutting {scan.torn_bytes} torn bytes" if scan.torn_bytes else "")
                )
            self.recovery = RecoveryReport(False, 0, 0, 0, scan.last_seq)
        else:
            self.recovery = self._recover(scan.torn_bytes)
        self.applied_seq = self.journal.last_seq  # nothing uncommitted survives opening
        self._write_state(clean=False)
        self.journal.prepare_spare()
        self.checkpointer = Checkpointer(self)
        if self.snaps is not None and (self.snaps.dir / ROLLBACK_FILE).exists():
            self._finish_rollback()
        if self.cdp is not None and pending_restore(p):
            finish_restore(self)  # a CDP restore cut short (cdp.py)

    def _recover(self, torn: int) -> RecoveryReport:
        """Redo from the checkpoint; record hot extents for resync to peers.

        A replica redoes only through its last commit MARK: records after it are a batch
        torn before its commit, never applied to the store, and are cut."""
        assert self.journal is not None and self.store is not None and self.al is not None
        replayed = 0
        first = self.journal.segments[0].first_seq
        if self.checkpoint_seq + 1 < first:
            raise FormatError(
                f"volume {self.name}: redo must start at seq {self.checkpoint_seq + 1} "
                f"but the journal begins at seq {first}")
        pending: list[tuple[RecordHeader, bytes]] = []
        committed_seq = self.checkpoint_seq
        # Readers of the snapshots in other processes (a replica's exports) must not take
        # the older contents redo passes through for the snapshot's (snapshot.py).
        # The same for the CDP bases a replica's point views read (cdp.py).
        fences = [RedoFence(d.dir) for d in (self.snaps, self.cdp.bases if self.cdp else None)
                  if d is not None]
        for fence in fences:
            fence.begin()
        for hdr, payload in self.journal.records(self.checkpoint_seq + 1):
            if self.replica:
                pending.append((hdr, payload))
                if hdr.op is not Op.MARK:
                    continue
                body = msgpack.unpackb(payload)
                if body.get("event") != COMMIT_EVENT:
                    continue
                self.upstream_seq = int(body["last_seq"])
                committed_seq = hdr.seq
                batch, pending = pending, []
            else:
                batch = [(hdr, payload)]
            for h, p in batch:
                self._redo(h, p)
                replayed += 1
        for fence in fences:
            fence.end()
        if self.replica:
            torn += self.journal.truncate_after(committed_seq)
        hot = self.al.extents()
        self.add_resync(hot, reason="unclean shutdown")
        if hot:
            # Every known peer gets them too (DESIGN.md §2): written before the MARK below
            # makes the recovery visible, so a crash in between only repeats this.
            for peer in known_peers(self.info):
                write_dirty(self.info, peer, reason=DIRTY_HOT, from_seq=0,
                            through_seq=self.journal.last_seq, shift=self.shift, extents=hot)
        self.store.sync()
        self.mark({"event": "recovered", "hot_extents": hot, "extent_shift": self.shift,
                   "torn_bytes": torn, "replayed": replayed})
        self.journal.sync()
        self.applied_seq = self.journal.last_seq  # all that is left is in the store
        self.checkpoint()
        return RecoveryReport(True, torn, replayed, len(hot), self.journal.last_seq)

    def _write_state(self, clean: bool) -> None:
        assert self.journal is not None
        with self.state_lock:
            write_json(self._state_path(), {
                "kind": "state", "version": STATE_VERSION, "clean": clean,
                "checkpoint_seq": self.checkpoint_seq, "last_seq": self.journal.last_seq,
                "replica": self.replica, "inconsistent": self.inconsistent,
                "upstream_seq": self.upstream_seq,
            })

    # -- resync bookkeeping ----------------------------------------------------

    def add_resync(self, extents: list[int], reason: str, full: bool = False) -> None:
        """Persistently add extents that every peer must receive again."""
        add_resync(self.info, extents, reason, full)

    # -- the data path ---------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL if offset >= self.size else errno.ENOSPC,
                          f"request [{offset}, +{length}) outside volume of {self.size} bytes")

    def _check_writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, f"volume {self.name} is open read-only")

    def _activate(self, offset: int, length: int) -> None:
        assert self.al is not None
        hot = self.al.hot
        e0 = offset >> self.shift
        e1 = (offset + length - 1) >> self.shift if length else e0
        if e0 == e1 and e0 in hot:
            hot.move_to_end(e0)
            return
        ahead: range = range(0)
        if AL_AHEAD:
            # A sequential stream (DESIGN.md §1): one of the log's most recent entries
            # (extents just written or activated) is the extent before this request's,
            # or (a request over several extents) one of them but its last.
            for last in islice(reversed(hot), _STREAM_WINDOW):
                if e0 - 1 <= last < e1:
                    end = min(e1 + AL_AHEAD, (self.size - 1) >> self.shift)
                    ahead = range(e1 + 1, end + 1)
                    break
        self.al.activate(range(e0, e1 + 1), ahead)

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        # The hot path of every read, kept to one preadv and two comparisons (what
        # _check_range and Store.pread_into do, inlined: bench/datapath 4K reads).
        n = len(buf)
        if offset < 0 or offset + n > self.size:
            self._check_range(offset, n)
        assert self.store is not None
        if os.preadv(self.store.fd, [buf], offset) != n:
            self.store.pread_into(buf, offset)  # only a truncated store: says why

    def write(self, buf: bytes | memoryview, offset: int, fua: bool = False) -> int:
        """Store then journal one write; return its sequence number."""
        return self._change(Op.WRITE, Flag.FUA if fua else 0, offset, len(buf), buf)

    def _change(self, op: Op, flags: int, offset: int, length: int,
                payload: bytes | memoryview = b"") -> int:
        """The one write path of WRITE, TRIM and ZERO: store first, then the journal.
        Either failing may leave the store changed where the journal is not (a short
        write, or an append that failed after it): those extents are marked for resync.
        A write that would eat into the room kept for state files is refused first
        (space.py); TRIM never is.  Every failure is logged as a ``write_failed`` event
        (rate-limited, see FailureLog) and marked as logged."""
        if self.readonly:
            self._check_writable()
        if offset < 0 or length < 0 or offset + length > self.size:
            self._check_range(offset, length)
        assert self.journal is not None
        # The store write runs inside append (alongside the journal's copy of a large
        # payload); the record becomes valid only after it succeeded.  A partial, not a
        # closure: a closure would make every local of this function a cell.
        alongside = partial(self._store_change, op, flags, offset, length, payload)
        try:
            if op is not Op.TRIM and self.space is not None:
                # Store and journal copies of a write; a ZERO may allocate its range.
                self.space.check(2 * length + REC_HEADER_SIZE if op is Op.WRITE else
                                 REC_HEADER_SIZE if flags & Flag.MAY_TRIM else
                                 length + REC_HEADER_SIZE)
            self._activate(offset, length)
            if self.cdp is not None:
                self.cdp.before_write(self)  # a TIME mark at most once a second
            if self.snaps is not None or self.cdp is not None:
                self._cow(offset, length)
            try:
                seq = self.journal.append(op, flags, offset, length, payload,
                                          alongside=alongside)
            except OSError as e:
                self._unjournaled(offset, length, e)
                if is_enospc(e) and not isinstance(e, NoSpace):
                    seg = self.journal.segments[-1].path
                    raise no_space(seg, REC_HEADER_SIZE + len(payload),
                                   f"appending a record of {length} bytes to {seg}") from None
                raise
        except OSError as e:
            self.failures.report(op, offset, length, e)
            mark_logged(e)
            raise
        if flags & _FUA:  # a plain int: IntFlag's & costs microseconds per request
            if self.cdp is not None:
                self.cdp.flush_mark(self)  # durable with the record, by the same sync
            self.journal.sync()
        return seq

    def _store_change(self, op: Op, flags: int, offset: int, length: int,
                      payload: bytes | memoryview) -> None:
        """The store's side of a change; a full disk is said as NoSpace."""
        store = self.store
        assert store is not None
        try:
            if op is Op.WRITE:  # Store.apply's first case, a Python frame fewer
                store.pwrite(payload, offset)
            else:
                store.apply(op, flags, offset, length, payload)
        except OSError as e:
            if not is_enospc(e) or isinstance(e, NoSpace):
                raise
            raise no_space(store.path, length, f"{op.name.lower()} of {length} bytes "
                           f"at {offset} to {store.path}") from None

    def _unjournaled(self, offset: int, length: int, err: OSError) -> None:
        """The store may hold a change the journal does not (a failed or short store
        write, or a journal append that failed after it; the client gets the error):
        the peers must be sent those extents again.  Remembered in memory at
        once and persisted when possible; close() refuses to call the volume clean
        while any is unpersisted, so a crash still resyncs them (they are hot)."""
        e0, e1 = offset >> self.shift, (offset + length - 1) >> self.shift
        self.diverged.update(range(e0, e1 + 1))
        with contextlib.suppress(OSError):
            self.add_resync(sorted(self.diverged), f"journal append failed: {err.strerror}")
            self.diverged.clear()

    def apply_batch(self, first_seq: int, last_seq: int,
                    records: list[tuple[int, int, int, int, bytes]],
                    meta: dict[str, Any] | None = None) -> int:
        """Replica: apply one upstream batch atomically; return the durable upstream seq.

        The batch's records go to this replica's own journal, then a commit MARK, then
        one fdatasync: from there the batch is committed (redo finishes it after any
        crash) and may be acknowledged.  Only then is the store written.  Records are
        (op, flags, offset, length, data); MARK records are journaled, not applied.
        """
        return self.apply_batches([(first_seq, last_seq, records, meta)])

    def apply_batches(self, batches: list[UpstreamBatch],
                      committed: Callable[[int], None] | None = None) -> int:
        """Replica: apply consecutive upstream batches (first_seq, last_seq, records,
        meta), each as ``apply_batch`` does (its records and its own commit MARK), with
        one fdatasync for all of them (group commit: batches that queued up while the
        previous fdatasync ran cost one more, not one each).  A crash before that
        fdatasync leaves a prefix of whole batches at most (redo stops at the last commit
        MARK that made it); none of them was acknowledged.  Returns the last seq;
        ``committed(last seq)`` is called as soon as they are committed, before the store
        is written (the receiver acknowledges them then)."""
        if not self.replica:
            raise InvalidArgument(f"volume {self.name} is not a replica")
        applied = self.upstream_seq
        for first_seq, last_seq, _records, _meta in batches:
            if first_seq != applied + 1 or last_seq < first_seq:
                raise InvalidArgument(
                    f"volume {self.name}: batch {first_seq}..{last_seq} does not follow "
                    f"applied seq {applied}")
            applied = last_seq
        assert self.journal is not None and self.store is not None
        self._check_batch_ranges(batches)
        cdp = self.cdp
        if (cdp is not None and not self.inconsistent and not self.unapplied_commit
                and self.applied_seq == self.journal.last_seq
                and cdp.due()):
            cdp.housekeep(self)  # between batches: the store holds every record
        before = self.journal.last_seq
        commits: list[tuple[int, int]] = []  # (journal seq before the batch, its commit)
        try:
            for first_seq, last_seq, records, meta in batches:
                start = self.journal.last_seq
                for op, flags, offset, length, data in records:
                    self.journal.append(op, flags, offset, length, data)
                commits.append((start, self.mark({
                    **(meta or {}), "event": COMMIT_EVENT, "first_seq": first_seq,
                    "last_seq": last_seq})))
            self.journal.sync()
        except OSError:
            # Not committed: take the partial batches back out, so that the next commit
            # cannot cover them.  (A crash here has the same effect through recovery.)
            self.journal.truncate_after(before)
            raise
        self.upstream_seq = applied
        if committed is not None:
            committed(applied)
        try:
            for (start, commit), (_f, _l, records, _m) in zip(commits, batches, strict=True):
                self._store_records(start, records)
                self.applied_seq = commit
        except OSError:
            # Committed but not in the store: only redo can finish it, so close() must
            # leave the volume unclean.
            self.unapplied_commit = True
            raise
        return applied

    def _store_records(self, start: int, records: list[tuple[int, int, int, int, bytes]]
                       ) -> None:
        """A committed batch, journaled after seq ``start``, into the store."""
        assert self.store is not None
        for seq, (op, flags, offset, length, data) in enumerate(records, start + 1):
            if op == Op.MARK:
                self._snapshot_mark(seq, data)
                continue
            self._cow(offset, length)
            self.store.apply(Op(op), Flag(flags), offset, length, data)

    def _check_batch_ranges(self, batches: list[Any]) -> None:
        """Every record inside the volume as it will be at that record (a grow MARK
        raises the size for the records after it), its extent activated."""
        size = self.size
        for _first, _last, records, _meta in batches:
            for op, _flags, offset, length, data in records:
                if op == Op.MARK:
                    size = max(size, grow_size(data) or 0)
                    continue
                if offset < 0 or length < 0 or offset + length > size:
                    raise OSError(errno.EINVAL, f"request [{offset}, +{length}) outside "
                                                f"volume of {size} bytes")
                self._activate(offset, length)

    def begin_resync(self) -> None:
        """Replica: extent data is about to overwrite the store outside the batch
        stream.  Inconsistent, durably, and checkpointed, so that no redo of older
        batches ever lands on top of extent data."""
        self.inconsistent = True
        if self.cdp is not None:
            self.cdp.reset(self, "resync")
        self.checkpoint()

    def write_extent(self, offset: int, length: int, data: bytes) -> None:
        """Replica, during a resync: the primary's bytes for a range (empty: zeros)."""
        if not self.replica or not self.inconsistent:
            raise InvalidArgument(f"volume {self.name}: extent data outside a resync")
        self._check_range(offset, length)
        assert self.store is not None
        if data and len(data) != length:
            raise InvalidArgument(f"extent at {offset}: {len(data)} bytes for {length}")
        self._cow(offset, length)  # the replica's own snapshots keep their images
        if data:
            self.store.pwrite(data, offset)
        else:
            self.store.punch(offset, length)

    def sync(self) -> None:
        """Journal and store durable up to now."""
        self._make_durable()

    def end_resync(self, upstream_seq: int) -> None:
        """Replica: every extent is in the store; it now stands at ``upstream_seq`` of
        the upstream stream (still Inconsistent until the caller says otherwise)."""
        assert self.store is not None
        self.store.sync()
        self.upstream_seq = upstream_seq
        self._write_state(clean=False)

    def set_consistent(self, consistent: bool) -> None:
        """Replica: mark the end (or a restart) of an initial sync, durably."""
        self.inconsistent = not consistent
        self._write_state(clean=False)

    def trim(self, offset: int, length: int, fua: bool = False) -> int:
        return self._change(Op.TRIM, Flag.FUA if fua else 0, offset, length)

    def zero(self, offset: int, length: int, may_trim: bool = False, fua: bool = False) -> int:
        flags = (Flag.FUA if fua else 0) | (Flag.MAY_TRIM if may_trim else 0)
        return self._change(Op.ZERO, flags, offset, length)

    def flush(self) -> None:
        """Make every completed write durable (the journal is the durable copy); no
        fdatasync when ``sync_ahead`` already made all of it durable."""
        j = self.journal
        cdp = self.cdp
        if cdp is not None and cdp.dirty and not self.readonly:
            # A consistency point, made durable by the fdatasync below (CDP).
            with self.request_lock:
                cdp.flush_mark(self)
        if j is not None and not self.readonly and (
                j.synced_seq < j.last_seq or j.sync_error is not None):
            j.sync()

    def sync_ahead(self, seq: int) -> None:
        """Outside the request lock, while a write waits for its sync peers: make the
        journal durable through ``seq`` now if nothing else is syncing it (Journal.
        sync_ahead), so that a FLUSH right after costs no fdatasync of its own."""
        j = self.journal
        if j is not None and not self.readonly:
            j.sync_ahead(seq)

    # -- growing ------------------------------------------------------------------------

    def grow(self, size: int) -> int:
        """Grow this primary volume to ``size`` bytes (`nbdgw volume grow`): a grow MARK
        made durable in the journal first (so replicas grow at the same point of the
        write sequence, and redo finishes a grow cut short), then the store and
        volume.json.  Returns the MARK's seq.  New connections see the new size."""
        if self.replica:
            raise InvalidArgument(f"volume {self.name} is a replica: grow it on its primary "
                                  "(replicas follow through the journal)")
        self._check_writable()
        if size % 4096:
            raise InvalidArgument(f"size {size} is not a multiple of 4096")
        if size <= self.size:
            raise InvalidArgument(f"volume {self.name} is {self.size} bytes already; a "
                                  f"volume can only grow (asked {size})")
        assert self.journal is not None and self.store is not None
        # The store first: whatever step a crash interrupts, the store is then larger
        # than volume.json, and the next open finishes the grow (_finish_grow), even if
        # a checkpoint had passed the MARK already (then no redo would meet it).
        check_size_fits(self.info.path, size, "nothing was changed")
        os.ftruncate(self.store.fd, size)
        os.fsync(self.store.fd)
        seq = self.mark({"event": GROW_EVENT, "size": size, "from": self.size})
        self.journal.sync()
        self._apply_grow(size)
        _log.warning("volume_grown", volume=self.name, size=size, seq=seq)
        return seq

    def _apply_grow(self, size: int) -> None:
        """Make the store and volume.json ``size`` bytes (idempotent; never shrinks):
        the store first, so an interruption leaves a store larger than volume.json,
        which the next open finishes (``_finish_grow``)."""
        if size <= self.size:
            return
        assert self.store is not None
        if os.fstat(self.store.fd).st_size < size:
            os.ftruncate(self.store.fd, size)
            os.fsync(self.store.fd)
        self._write_size(size)

    def _write_size(self, size: int) -> None:
        meta = read_json(self.info.path / "volume.json", "volume", VOLUME_VERSION)
        write_json(self.info.path / "volume.json", {**meta, "size": size})
        self.info = replace(self.info, size=size)
        self.size = size
        if self.store is not None:
            self.store.size = size
        if self.snaps is not None:
            self.snaps.size = size
        if self.cdp is not None:
            self.cdp.bases.size = size

    def _finish_grow(self) -> None:
        """A store larger than volume.json is a grow cut short after its store step."""
        actual = os.stat(self.info.path / "store").st_size
        if actual > self.size and actual % 4096 == 0:
            _log.warning("volume_grow_finished", volume=self.name, size=actual,
                         was=self.size)
            self._write_size(actual)

    def grow_to(self, size: int) -> None:
        """Replica: the upstream volume is larger (a grow this replica has not met yet,
        or records released across one): grow now; the stream fills the new space."""
        if not self.replica:
            raise InvalidArgument(f"volume {self.name} is not a replica")
        self._apply_grow(size)

    def mark(self, body: dict[str, Any]) -> int:
        """Append a control record (msgpack body) to the journal."""
        assert self.journal is not None
        return self.journal.append(Op.MARK, 0, 0, 0, msgpack.packb(body))

    def extent_digest(self, offset: int, length: int) -> bytes:
        """Digest of the store's bytes at offset (online verify; see store.extent_digest)."""
        assert self.store is not None
        return extent_digest(self.store.fd, offset, length, self.size)

    def extents(self, offset: int, count: int) -> list[tuple[int, int, bool]]:
        assert self.store is not None
        return self.store.extents(offset, count)

    # -- snapshots (see snapshot.py for the model) -------------------------------

    def _cow(self, offset: int, length: int, seq: int | None = None) -> None:
        """Before the store changes [offset, +length): preserve the pre-images the
        newest snapshot (during redo: the newest taken before ``seq``) does not own yet,
        durably.  One dict lookup per extent when there is nothing to do."""
        snaps = self.snaps
        if snaps is not None:
            target = snaps.index.newest if seq is None else snaps.index.target_before(seq)
            if target is not None:
                todo = snaps.unpreserved(target, offset, length)
                if todo:
                    assert self.store is not None
                    snaps.preserve(target, todo, self.store)
        if self.cdp is not None:
            assert self.store is not None
            self.cdp.cow(self.store, offset, length, seq)

    def _redo(self, hdr: RecordHeader, payload: bytes) -> None:
        """Replay one journal record after a crash.  Snapshot MARKs are taken again if
        their index record was lost, and a record whose pre-image was not saved (a
        replica's batch cut short between commit and store) is preserved first: the
        store holds the state before that record, as redo replays in order."""
        assert self.store is not None
        if hdr.op is Op.MARK:
            self._snapshot_mark(hdr.seq, payload)
            return
        self._cow(hdr.offset, hdr.length, seq=hdr.seq)
        self.store.apply(hdr.op, hdr.flags, hdr.offset, hdr.length, payload)

    def _snapshots(self) -> SnapshotStore:
        """The snapshot store, created on first use."""
        if self.snaps is None:
            if self.readonly:
                raise OSError(errno.EROFS, f"volume {self.name} is open read-only")
            path = self.info.path / "snapshots"
            SnapshotStore.create(path, uuid.UUID(self.info.uuid).bytes)
            self.snaps = SnapshotStore(path, self.size)
        return self.snaps

    def _snapshot_mark(self, seq: int, payload: bytes | memoryview) -> None:
        """A snapshot MARK met in a replicated batch or in redo: take (or delete) the
        same snapshot at the same point.  Idempotent: redo meets MARKs already done."""
        body = msgpack.unpackb(payload)
        event = body.get("event") if isinstance(body, dict) else None
        if event == GROW_EVENT:
            self._apply_grow(int(body["size"]))
            return
        if event not in (SNAP_EVENT, SNAP_DELETE_EVENT):
            return
        sid = int(body["id"])
        if event == SNAP_DELETE_EVENT:
            if self.snaps is not None and sid in self.snaps.index.snaps:
                self.snaps.delete(sid)
            return
        snaps = self._snapshots()
        index = snaps.index
        if sid < index.next_id:
            return  # taken already, or refused or deleted since
        why = None
        if self.replica and self.inconsistent:
            why = "the replica is Inconsistent (a resync is not finished)"
        elif len(index) >= MAX_SNAPSHOTS:
            why = f"already {MAX_SNAPSHOTS} snapshots"
        elif body["name"] in index.by_name:
            why = f"a snapshot named {body['name']!r} exists"
        if why is not None:
            _log.warning("snapshot_refused", volume=self.name, snapshot=body["name"],
                         id=sid, reason=why)
            snaps.skip(sid)
            return
        snaps.add(Snapshot(sid, str(body["name"]), seq, float(body["time"]),
                           str(body.get("group", ""))))
        _log.info("snapshot_taken", volume=self.name, snapshot=body["name"], id=sid, seq=seq)

    def check_snapshot(self, name: str | None) -> None:
        """Raise SnapshotError unless ``snapshot_create(name)`` can succeed now."""
        if self.readonly:
            raise SnapshotError(f"volume {self.name} is open read-only")
        if self.replica:
            raise SnapshotError(f"volume {self.name} is a replica: it takes the snapshots "
                                "of its primary (they arrive in the journal)")
        if name is not None:
            validate_snapshot_name(name)
        if self.snaps is not None:
            if len(self.snaps.index) >= MAX_SNAPSHOTS:
                raise SnapshotError(
                    f"volume {self.name} has {MAX_SNAPSHOTS} snapshots (the maximum): "
                    "delete one first")
            if name is not None and name in self.snaps.index.by_name:
                raise SnapshotError(f"volume {self.name} has a snapshot named {name!r}")

    def snapshot_create(self, name: str | None = None, group: str = "") -> Snapshot:
        """Take a snapshot: a MARK in the journal (replicas take it at the same point),
        then the index record.  O(1): nothing is copied until an extent is overwritten."""
        self.check_snapshot(name)
        snaps = self._snapshots()
        assert self.journal is not None
        sid = snaps.index.next_id
        name = name or f"snap-{sid}"
        now = time.time()
        seq = self.mark({"event": SNAP_EVENT, "id": sid, "name": name, "time": now,
                         "group": group})
        self.journal.sync()
        snap = Snapshot(sid, name, seq, now, group)
        try:
            snaps.add(snap)
        except OSError:
            # The MARK is durable but the index lacks it: cancel it in the journal too,
            # so that redo and the replicas end without it (best effort; if even this
            # fails, the next open takes the snapshot from its MARK).
            with contextlib.suppress(OSError):
                self.mark({"event": SNAP_DELETE_EVENT, "id": sid, "name": name})
                self.journal.sync()
                snaps.skip(sid)
            raise
        _log.info("snapshot_taken", volume=self.name, snapshot=name, id=sid, seq=seq)
        return snap

    def keep_diverged(self, name: str) -> Snapshot | None:
        """Replica: keep the store as it stands as snapshot ``name`` before a resync from
        the winner of a fork overwrites it (copy-on-write, like any snapshot).

        No journal MARK: the snapshot is this copy's own, not its upstream's, so replicas
        downstream do not take it and redo has nothing to replay.  It is taken between
        batches, at the last applied seq: redo of records up to there never preserves
        into it (they are older), and the resync that follows checkpoints before its first
        extent, so no older record is replayed over extent data.  The index record is
        durable when this returns.  Idempotent: None when a snapshot of that name exists
        already (a repeated handshake, or the demotion took it)."""
        snaps = self._snapshots()
        if name in snaps.index.by_name:
            return None
        assert self.journal is not None
        snap = Snapshot(snaps.index.next_id, name, self.journal.last_seq, time.time(), "")
        snaps.add(snap)  # raises SnapshotError at MAX_SNAPSHOTS: nothing is overwritten
        _log.warning("diverged_snapshot_taken", volume=self.name, snapshot=name, id=snap.id,
                     seq=snap.mark_seq)
        return snap

    def snapshot_delete(self, name: str) -> None:
        """Delete a snapshot (MARK first: replicas delete it too); the others stay exact."""
        self._check_writable()
        if self.replica:
            raise SnapshotError(f"volume {self.name} is a replica: its snapshots are "
                                "deleted by its primary")
        if self.snaps is None:
            raise SnapshotError(f"volume {self.name} has no snapshot named {name!r}")
        snap = self.snaps.index.get(name)
        users = clones_of(self.info.path.parent.parent, self.name, name)
        if users:
            raise SnapshotError(
                f"snapshot {name} of volume {self.name} is the base of clone"
                f"{'s' if len(users) > 1 else ''} {', '.join(users)}: delete "
                f"{'them' if len(users) > 1 else 'it'} first (nbdgw clone delete NAME)")
        assert self.journal is not None
        self.mark({"event": SNAP_DELETE_EVENT, "id": snap.id, "name": name})
        self.journal.sync()
        self.snaps.delete(snap.id)
        _log.info("snapshot_deleted", volume=self.name, snapshot=name, id=snap.id)

    def snapshot_list(self) -> list[dict[str, Any]]:
        if self.snaps is None:
            return []
        return list_rows(self.snaps.index, self.snaps.shift)

    def snapshot_view(self, name: str) -> SnapshotView:
        """A read-only view of snapshot ``name`` (an NBD export of its own)."""
        if self.snaps is None:
            raise SnapshotError(f"volume {self.name} has no snapshot named {name!r}")
        assert self.store is not None
        return SnapshotView(self.snaps, self.store, self.snaps.index.get(name), self.name)

    def snapshot_rollback(self, name: str) -> int:
        """Make the live volume the image of snapshot ``name``; return bytes written.

        Written through the journal as WRITE and ZERO records (replicas follow), and
        copy-on-write as any write, so every snapshot, newer ones too, stays as it was.
        A rollback.json intent makes it all-or-nothing across a crash: the next open
        finishes it (it is idempotent: extents already equal are skipped)."""
        self._check_writable()
        if self.replica:
            raise SnapshotError(f"volume {self.name} is a replica: roll back its primary")
        if self.snaps is None:
            raise SnapshotError(f"volume {self.name} has no snapshot named {name!r}")
        snap = self.snaps.index.get(name)
        write_json(self.snaps.dir / ROLLBACK_FILE, {"kind": "rollback", "version": 1,
                                                   "id": snap.id, "name": name,
                                                   "started": time.time()})
        return self._finish_rollback()

    def _finish_rollback(self) -> int:
        assert self.snaps is not None and self.journal is not None
        path = self.snaps.dir / ROLLBACK_FILE
        intent = read_json(path, "rollback", 1)
        sid = int(intent["id"])
        snap = self.snaps.index.snaps.get(sid)
        if snap is None:  # deleted: cannot happen while the intent exists; say so
            raise SnapshotError(f"volume {self.name}: rollback to snapshot id {sid} "
                                f"({intent['name']}) pending, but the snapshot is gone")
        self.mark({"event": SNAP_ROLLBACK_EVENT, "id": sid, "name": snap.name,
                   "phase": "begin"})
        written = 0
        view = SnapshotView(self.snaps, self.store, snap, self.name)
        for e in sorted(self.snaps.index.changed_since(sid)):
            off, n = e << self.snaps.shift, self.snaps.extent_len(e)
            want = bytearray(n)
            view.read_into(want, off)
            live = bytearray(n)
            self.read_into(live, off)
            if live == want:
                continue
            if want == bytes(n):
                self.zero(off, n, may_trim=True)
            else:
                self.write(bytes(want), off)
            written += n
        self.mark({"event": SNAP_ROLLBACK_EVENT, "id": sid, "name": snap.name,
                   "phase": "done", "bytes": written})
        self.journal.sync()
        path.unlink()
        fsync_dir(path.parent)
        _log.info("snapshot_rolled_back", volume=self.name, snapshot=snap.name,
                  bytes_written=written)
        return written

    # -- checkpoints and close -------------------------------------------------

    def _make_durable(self) -> None:
        """Store and journal durable up to now (before an AL eviction)."""
        assert self.store is not None and self.journal is not None
        self.journal.sync()
        self.store.sync()

    def _applied(self) -> int:
        """Last local journal seq whose effect is in the store: every record on a
        primary; on a replica, the last commit MARK of a batch applied to the store."""
        assert self.journal is not None
        return self.applied_seq if self.replica else self.journal.last_seq

    def _on_rotate(self) -> None:
        """Journal segment full: the checkpoint thread prepares the next spare,
        checkpoints and releases old segments.  If it has fallen behind by more than two
        segments over the cap, checkpoint here: the bound on the journal is hard."""
        assert self.journal is not None
        if self.checkpointer is None:
            self.checkpoint()
        elif self.journal.retained_bytes() > (
                self.journal_cap + 2 * self.journal.segment_bytes):
            # The store durable and the redo point moved is all a release needs: no
            # journal fdatasync here (FLUSH does it; released segments need none).
            self.checkpoint_through(self._applied())
            self.release_journal()
        if self.checkpointer is not None:
            self.checkpointer.request(self._applied())

    def checkpoint_through(self, seq: int) -> None:
        """Every record up to ``seq`` is in the store; make the store durable and move
        the redo point there (runs on the checkpoint thread)."""
        assert self.store is not None
        self.store.sync()
        self._advance_checkpoint(seq)
        self._write_state(clean=False)

    def _advance_checkpoint(self, seq: int) -> None:
        """Move the redo point forward, never back: the checkpoint thread and a request
        that found the journal past its bound may both be here, and a redo point moved
        back behind released segments would make the volume unopenable after a crash."""
        with self.state_lock:
            self.checkpoint_seq = max(self.checkpoint_seq, seq)

    def checkpoint(self) -> None:
        """Store durable through the last applied record: redo may start after it."""
        assert self.store is not None and self.journal is not None
        self._make_durable()
        self._advance_checkpoint(self._applied())
        self._write_state(clean=False)
        self.release_journal()

    @property
    def journal_cap(self) -> int:
        """The journal's bound: journal.max_bytes, plus what a CDP window may hold."""
        return self.journal_max_bytes + (self.cdp.policy.max_bytes if self.cdp else 0)

    def release_journal(self) -> int:
        """Release the journal segments the peers no longer need; return bytes freed.

        Invariants: nothing after the checkpoint is released (redo needs it).  Up to
        ``journal_max_bytes``, nothing a known peer has not acked is released; with no
        known peer the journal simply keeps up to the cap.  Past the cap the oldest
        checkpointed segments go anyway (the primary never waits for a peer), and for every
        known peer that had not acked them, the extents their records touched are first
        written, durably, as a dirty set: a crash in between leaves a set too many, never
        released records unaccounted for.  Only record headers are read."""
        journal = self.journal
        assert journal is not None
        with self.release_lock:
            peers = known_peers(self.info)
            # CDP (DESIGN.md "CDP"): every record after the oldest base stays.
            floor = self.cdp.floor if self.cdp is not None else None
            keep_after = self.checkpoint_seq if floor is None else min(
                self.checkpoint_seq, floor)
            freed = 0
            if peers:
                freed += journal.release_through(min(keep_after, *peers.values()))
            excess = journal.retained_bytes() - self.journal_max_bytes
            doomed: list[tuple[Path, int, int]] = []  # (path, first seq, last seq)
            for seg, last in journal.sealed():
                if excess <= 0 or last > keep_after:
                    break
                doomed.append((seg.path, seg.first_seq, last))
                excess -= seg.path.stat().st_size
            if not doomed:
                return freed
            through = doomed[-1][2]
            lagging = {p: a for p, a in peers.items() if a < through}
            if lagging:
                self._record_dirty(doomed, lagging)
            return freed + journal.release_through(through)

    def _record_dirty(self, doomed: list[tuple[Path, int, int]], lagging: dict[str, int]
                      ) -> None:
        """Write a dirty set for each lagging peer: the extents touched by the records of
        ``doomed`` after that peer's acked seq (every extent if a header is unreadable)."""
        shift = dirty_shift(self.size)
        low = min(lagging.values())
        touched: list[tuple[int, range]] = []  # (seq, extents) of data records after low
        try:
            for path, first, last in doomed:
                if last <= low:
                    continue
                for hdr in record_headers(path, first, last):
                    if hdr.seq > low and is_data_op(hdr.op) and hdr.length:
                        touched.append((hdr.seq, extent_range(hdr.offset, hdr.length, shift)))
        except FormatError:
            touched = [(low + 1, extent_range(0, self.size, shift))]
        start, through = doomed[0][1], doomed[-1][2]
        for peer, acked in lagging.items():
            extents: set[int] = set()
            for seq, ext in touched:
                if seq > acked:
                    extents.update(ext)
            write_dirty(self.info, peer, reason=DIRTY_RELEASED, from_seq=max(acked + 1, start),
                        through_seq=through, shift=shift, extents=sorted(extents))

    @property
    def last_seq(self) -> int:
        assert self.journal is not None
        return self.journal.last_seq

    def _close_files(self) -> None:
        for part in (self.al, self.journal, self.store, self.snaps, self.cdp):
            if part is not None:
                part.close()

    def close(self) -> None:
        """Clean close: everything durable, activity log empty, state clean.

        What must be durable before it returns: every journal record and the store
        (an error there, EIO, is raised).  What may wait for the next open when the disk
        is full: resync.json for extents the store took but the journal lacks (they are
        hot in the activity log, and recovery resends hot extents), and the clean flag
        (without it the next open replays the journal from the checkpoint: slower, never
        wrong).  So a full disk leaves the volume unclean, logged, never unclosed."""
        if self.lock.fd < 0:
            return
        try:
            if self.checkpointer is not None:
                self.checkpointer.stop()
            self.failures.flush()
            if self.unapplied_commit:
                pass  # unclean on purpose: the next open redoes the committed batch
            elif not self.readonly and self.journal is not None and self.al is not None:
                self._close_clean()
        finally:
            self._close_files()
            self.lock.release()

    def _close_clean(self) -> None:
        assert self.journal is not None and self.al is not None
        unclean: OSError | None = None
        if self.diverged:
            try:
                self.add_resync(sorted(self.diverged), "journal append failed")
                self.diverged.clear()
            except OSError as e:
                if not is_enospc(e):
                    raise
                unclean = e
        self.journal.seal_for_close()
        self._make_durable()
        if unclean is None:
            self.checkpoint_seq = self._applied()
            # State first: if writing it fails (a full disk) the activity log still
            # names the hot extents for the unclean open that follows.
            try:
                self._write_state(clean=True)
            except OSError as e:
                if not is_enospc(e):
                    raise
                unclean = e
        if unclean is not None:
            _log.warning("volume_left_unclean", volume=self.name, error=str(unclean),
                         consequence="the next open replays the journal from its last "
                                     "checkpoint and resends the hot extents to the peers")
            return
        try:
            self.al.clear()
        except OSError as e:  # clean already: the stale hot set only widens a later resync
            _log.warning("activity_log_not_cleared", volume=self.name, error=str(e))

    def checksum(self) -> str:
        """SHA-256 of the volume's contents (holes hashed as zeros, never read)."""
        assert self.store is not None
        return checksum_fd(self.store.fd, self.size, self.store.extents(0, self.size))


def checksum_fd(fd: int, size: int, extents: list[tuple[int, int, bool]]) -> str:
    h = hashlib.sha256()
    zeros = bytes(1 << 20)
    chunk = 1 << 20
    for off, length, allocated in extents:
        end = off + length
        pos = off
        while pos < end:
            n = min(chunk, end - pos)
            if allocated:
                data = os.pread(fd, n, pos)
                if len(data) != n:
                    raise OSError(errno.EIO, f"short read at {pos}")
                h.update(data)
            else:
                h.update(zeros[:n] if n < chunk else zeros)
            pos += n
    return h.hexdigest()


def checksum_path(path: Path, size: int) -> str:
    """Checksum a store without opening the volume (used while it is being served)."""
    st = Store(str(path), size, readonly=True)
    try:
        return checksum_fd(st.fd, size, st.extents(0, size))
    finally:
        st.close()
