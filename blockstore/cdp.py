"""Continuous data protection: the retention window, the time index, and point views
(DESIGN.md "CDP").

Layout under ``volumes/<V>/cdp/``::

    policy.json   the window and max_bytes this site keeps (written by the gateway)
    bases/        a SnapshotStore of this site's own bases (copy-on-write images of the
                  volume at a journal seq; never in the journal, so never replicated)
    exports.json  the point exports `nbdgw cdp export` made (served read-only)
    maps/         the overlay of a base through each sealed journal segment (a cache:
                  opening a point loads one and replays at most one segment; MapWriter)
    restore.json  a restore in progress (<data dir>/cdp-restores/: a group's intent)

Model.  With a policy, the primary appends TIME marks to the journal (``{"event":
"time", "t": <unix ns>, "flush": bool}``): before a write when a second or more passed
since the last mark, and at a FLUSH (or FUA write) after writes since the last mark,
before its fdatasync (so the mark is durable with it: no extra fdatasync).  TIME marks
replicate like any MARK; a replica's journal holds the same points with the primary's
clock.  A *point* is a TIME mark's journal seq N: the volume as the prefix of records
before N left it.

The volume as of N = the newest base B with B.seq <= N, overlaid with the journal's
records in (B.seq, N].  The journal keeps every segment with a record after the oldest
base's seq (the CDP floor, Volume.release_journal).  A new base every window/4; the
oldest is dropped once the next is older than the window; past max_bytes (journal bytes
from the floor on + base pre-image bytes) the oldest goes early, with a warning event.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime
import errno
import fcntl
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import structlog
from crc32c import crc32c

from .errors import BlockstoreError, FormatError, InvalidArgument
from .journal import segment_firsts, segment_name
from .marks import COMMIT_EVENT, GROW_EVENT, TIME_EVENT
from .meta import fsync_dir, read_json, write_json
from .modes import make_dir
from .overlay import MapKey, Overlay, decode_map, encode_map
from .record import (
    MAX_PAYLOAD,
    REC_HEADER,
    REC_HEADER_SIZE,
    REC_MAGIC,
    SEG_HEADER_SIZE,
    Op,
    decode_header,
)
from .snapshot import Snapshot, SnapshotFollower, SnapshotStore, read_index
from .store import Store

if TYPE_CHECKING:
    from .volume import Volume

_log = structlog.get_logger(component="blockstore")

CDP_DIR = "cdp"
BASES_DIR = "bases"
POLICY_FILE = "policy.json"
EXPORTS_FILE = "exports.json"
RESTORE_FILE = "restore.json"  # a restore in progress (finished by the next open)
RESTORE_EVENT = "cdp-restore"
# FollowedPointView's point "as of the last committed batch" (a replica's current image):
# the records through the last commit MARK, not a TIME mark.
LATEST = "latest"
MARK_EVERY_NS = 1_000_000_000  # a TIME mark before a write at most this long after the last
HOUSEKEEP_EVERY = 1.0  # seconds between checks of the bases and the byte budget
_CHUNK = 64 << 10  # record headers are read in chunks this large (a large record's
# payload is skipped: its next header is read with the next chunk)

_HEADER = REC_HEADER
_OPS = frozenset(int(o) for o in Op)
_WRITE, _MARK = int(Op.WRITE), int(Op.MARK)

_SEQ_RE = re.compile(r"^seq-(\d{1,19})$")
_AT_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class CdpError(InvalidArgument):
    """A point that does not exist (outside the window, unknown seq, no policy)."""


# -- policy -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CdpPolicy:
    """How much history this site keeps of one volume (0 window: none)."""

    window: float  # seconds
    max_bytes: int


def parse_duration(text: str | float) -> float:
    """``24h``, ``90m``, ``7d``, ``3600`` (seconds) -> seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise InvalidArgument(f"invalid duration {text!r}: negative")
        return float(text)
    m = _DURATION_RE.match(str(text))
    if not m:
        raise InvalidArgument(f"invalid duration {text!r}: a number with an optional unit "
                              "s, m, h, d or w")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def read_policy(vol_path: Path) -> CdpPolicy | None:
    path = vol_path / CDP_DIR / POLICY_FILE
    if not path.exists():
        return None
    d = read_json(path, "cdp-policy", 1)
    if float(d["window"]) <= 0:
        return None
    return CdpPolicy(float(d["window"]), int(d["max_bytes"]))


def journal_cap_for(vol_path: Path, journal_max: int) -> int:
    """The journal bound of the volume at ``vol_path``, as Volume.journal_cap computes it
    for an open volume: journal.max_bytes plus what its CDP window may hold."""
    try:
        policy = read_policy(vol_path)
    except (BlockstoreError, OSError, ValueError, KeyError):
        policy = None
    return journal_max + (policy.max_bytes if policy is not None else 0)


def write_policy(vol_path: Path, policy: CdpPolicy | None) -> bool:
    """Set this site's policy for the volume at ``vol_path`` (read at its next open);
    return whether it changed.  None (or a zero window) turns CDP off."""
    if read_policy(vol_path) == policy:
        return False
    make_dir(vol_path / CDP_DIR, exist_ok=True)
    write_json(vol_path / CDP_DIR / POLICY_FILE, {
        "kind": "cdp-policy", "version": 1,
        "window": policy.window if policy else 0, "max_bytes": policy.max_bytes if policy else 0})
    return True


# -- point names ------------------------------------------------------------------------------

def parse_point(text: str) -> tuple[str, int]:
    """``seq-N`` -> ("seq", N); ``2026-12-02T10:15:03Z`` -> ("at", unix ns).  Raises
    CdpError for anything else."""
    if m := _SEQ_RE.match(text):
        return "seq", int(m.group(1))
    if _AT_RE.match(text):
        return "at", parse_instant(text)
    raise CdpError(f"{text!r} is not a point: use seq-N or an instant such as "
                   "2026-12-02T10:15:03Z")


def is_point_name(text: str) -> bool:
    return bool(_SEQ_RE.match(text) or _AT_RE.match(text))


def parse_instant(text: str) -> int:
    """An ISO 8601 instant -> unix ns (a time without a zone is UTC)."""
    try:
        dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CdpError(f"invalid instant {text!r}: use ISO 8601, e.g. "
                       "2026-12-02T10:15:03Z") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    delta = dt - epoch
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def format_instant(t_ns: int) -> str:
    """unix ns -> ``2026-12-02T10:15:03.250Z`` (milliseconds only when not whole)."""
    dt = datetime.datetime.fromtimestamp(t_ns // 1_000_000_000, datetime.UTC)
    ms = (t_ns // 1_000_000) % 1000
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{ms:03d}Z" if ms else f"{base}Z"


# -- reading the journal's headers ------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """A TIME mark: the volume as the records before ``seq`` left it, at ``t`` (ns)."""

    seq: int
    t: int
    flush: bool


def scan(jdir: Path, from_seq: int, through_seq: int | None = None
         ) -> Iterator[tuple[int, int, int, int, int, int, bytes | None]]:
    """(seq, op, flags, offset, length, data position in its segment file, MARK body or
    None) of the journal's records from ``from_seq`` (through ``through_seq``), from
    their headers (payloads skipped, MARK bodies read).  Ends quietly at the journal's
    end, a torn or in-progress tail included; FileNotFoundError if ``from_seq`` was
    released.  The position is in segment ``segment_of`` (the caller's bisect)."""
    firsts = segment_firsts(jdir)
    from_seq = max(from_seq, 1)
    if not firsts or firsts[0] > from_seq:
        raise FileNotFoundError(f"journal {jdir}: seq {from_seq} is no longer retained")
    start = max(0, bisect.bisect_right(firsts, from_seq) - 1)
    for i in range(start, len(firsts)):
        first = firsts[i]
        nxt = firsts[i + 1] if i + 1 < len(firsts) else None
        try:
            fd = os.open(jdir / segment_name(first), os.O_RDONLY)
        except FileNotFoundError:
            if nxt is None:
                return
            raise
        try:
            yield from _scan_segment(fd, first, nxt, from_seq, through_seq)
        finally:
            os.close(fd)
        if through_seq is not None and nxt is not None and nxt > through_seq:
            return


def _scan_segment(fd: int, first: int, nxt: int | None, from_seq: int,
                  through_seq: int | None
                  ) -> Iterator[tuple[int, int, int, int, int, int, bytes | None]]:
    size = os.fstat(fd).st_size
    pos, seq = SEG_HEADER_SIZE, first
    buf, buf_at = b"", 0
    while pos + REC_HEADER_SIZE <= size and (nxt is None or seq < nxt):
        if through_seq is not None and seq > through_seq:
            return
        if pos < buf_at or pos + REC_HEADER_SIZE > buf_at + len(buf):
            buf, buf_at = os.pread(fd, _CHUNK, pos), pos
        rel = pos - buf_at
        # decode_header's checks, inlined (this loop runs once per record of history).
        magic, hcrc, hseq, op, flags, _r, _vol, offset, length, plen, _dcrc = \
            _HEADER.unpack_from(buf, rel)
        if (magic != REC_MAGIC or crc32c(buf[rel + 8:rel + REC_HEADER_SIZE]) != hcrc
                or op not in _OPS or plen > MAX_PAYLOAD
                or (op == _WRITE and plen != length)):
            if nxt is None:
                return  # the tail being written, or torn
            decode_header(buf[rel:rel + REC_HEADER_SIZE])  # raises FormatError saying why
            raise FormatError(f"segment {first:x}: bad record at {pos}")
        if hseq != seq:
            if nxt is None:
                return  # a recycled segment's old records past the end
            raise FormatError(f"segment {first:x}: seq {hseq} where {seq} was expected")
        data_at = pos + REC_HEADER_SIZE
        body: bytes | None = None
        if op == _MARK and seq >= from_seq:
            rel = data_at - buf_at
            body = (buf[rel:rel + plen] if rel + plen <= len(buf)
                    else os.pread(fd, plen, data_at))
            if len(body) != plen:
                return
        if data_at + plen > size:
            return  # payload still being written
        if seq >= from_seq:
            yield seq, op, flags, offset, length, data_at, body
        pos = data_at + plen
        seq += 1


def _body(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        d = msgpack.unpackb(raw)
    except (ValueError, msgpack.ExtraData):
        return {}
    return d if isinstance(d, dict) else {}


def points(vol_path: Path, from_seq: int, replica: bool) -> list[Point]:
    """The TIME marks of the journal from ``from_seq`` on, oldest first.  On a replica
    only those of committed batches (a commit MARK follows them): an uncommitted tail
    may be cut by recovery and its seqs reused."""
    return points_from(vol_path, from_seq, replica)[0]


def points_from(vol_path: Path, from_seq: int, replica: bool) -> tuple[list[Point], int]:
    """``points`` and the seq the next incremental scan starts after (the last record
    read on a primary; on a replica the last commit MARK)."""
    out: list[Point] = []
    pending: list[Point] = []
    resume = from_seq - 1
    for seq, op, _f, _o, _l, _at, raw in scan(vol_path / "journal", from_seq):
        if not replica:
            resume = seq
        if op != Op.MARK:
            continue
        body = _body(raw)
        ev = body.get("event")
        if ev == TIME_EVENT:
            pending.append(Point(seq, int(body["t"]), bool(body.get("flush"))))
            if not replica:
                out += pending
                pending = []
        elif ev == COMMIT_EVENT:
            out += pending
            pending = []
            resume = seq
    return out, resume


def resolve(pts: list[Point], kind: str, value: int, floor: int) -> Point:
    """The point a name or CLI option names: ``seq`` (a TIME mark's seq), ``at`` (the
    last FLUSH point at or before unix ns ``value``), ``before-last-flush`` (the FLUSH
    point before the newest one).  Only points at or after ``floor`` (the oldest base)
    can be rebuilt."""
    usable = [p for p in pts if p.seq >= floor]
    flushes = [p for p in usable if p.flush]
    if kind == "seq":
        for p in usable:
            if p.seq == value:
                return p
        raise CdpError(f"no point at seq {value} in the window (points: "
                       f"{_span(usable)})")
    if kind == "at":
        before = [p for p in flushes if p.t <= value]
        if not before:
            raise CdpError(f"no consistency point at or before {format_instant(value)} in "
                           f"the window (points: {_span(usable)})")
        return before[-1]
    if kind == "before-last-flush":
        if len(flushes) < 2:
            raise CdpError("fewer than two consistency points in the window")
        return flushes[-2]
    raise CdpError(f"unknown point kind {kind!r}")


def _span(pts: list[Point]) -> str:
    if not pts:
        return "none"
    return (f"seq {pts[0].seq} at {format_instant(pts[0].t)} to seq {pts[-1].seq} at "
            f"{format_instant(pts[-1].t)}")


def bases_of(vol_path: Path) -> list[Snapshot]:
    """This site's bases, oldest first (read from the index as it is)."""
    try:
        _shift, index = read_index(vol_path / CDP_DIR / BASES_DIR / "index")
    except FileNotFoundError:
        return []
    return [index.snaps[i] for i in index.order]


def held_bytes(vol_path: Path, floor: int | None) -> tuple[int, int]:
    """(journal bytes of the segments holding records after ``floor``, bytes of the
    bases' pre-images and of the saved overlay maps) this site keeps for CDP."""
    jdir = vol_path / "journal"
    firsts = segment_firsts(jdir)
    jbytes = 0
    if floor is not None:
        for first, nxt in zip(firsts, [*firsts[1:], None], strict=True):
            if nxt is not None and nxt - 1 <= floor:
                continue
            with contextlib.suppress(FileNotFoundError):
                jbytes += (jdir / segment_name(first)).stat().st_size
    try:
        bbytes = (vol_path / CDP_DIR / BASES_DIR / "data").stat().st_blocks * 512
    except FileNotFoundError:
        bbytes = 0
    for *_key, path in _saved(vol_path):
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile
            bbytes += path.stat().st_size
    return jbytes, bbytes


def summary(vol_path: Path, replica: bool) -> dict[str, Any] | None:
    """What `nbdgw cdp list` and `nbdgw status` show of a volume's window (None: no
    policy), read from the files as they are (the volume may be served)."""
    policy = read_policy(vol_path)
    if policy is None:
        return None
    bases = bases_of(vol_path)
    floor = bases[0].mark_seq if bases else None
    pts = points(vol_path, floor + 1, replica) if floor is not None else []
    jbytes, bbytes = held_bytes(vol_path, floor)
    oldest = pts[0] if pts else None
    return {
        "window_seconds": policy.window, "max_bytes": policy.max_bytes,
        "bytes_held": jbytes + bbytes, "journal_bytes": jbytes, "base_bytes": bbytes,
        "bases": [{"seq": b.mark_seq, "time": b.created} for b in bases],
        "oldest_point": ({"seq": oldest.seq, "time": format_instant(oldest.t)}
                         if oldest else None),
        "points": [{"seq": p.seq, "time": format_instant(p.t), "t_ns": p.t,
                    "flush": p.flush} for p in pts],
        "exports": read_exports(vol_path),
    }


def status(vol_path: Path) -> dict[str, Any] | None:
    """The window for `nbdgw status` (None: no policy), cheap: no journal scan.  The
    oldest point is the oldest base (the oldest state that can be rebuilt)."""
    policy = read_policy(vol_path)
    if policy is None:
        return None
    bases = bases_of(vol_path)
    jbytes, bbytes = held_bytes(vol_path, bases[0].mark_seq if bases else None)
    return {"window_seconds": policy.window, "max_bytes": policy.max_bytes,
            "bytes_held": jbytes + bbytes, "bases": len(bases),
            "oldest_point": ({"seq": bases[0].mark_seq, "time": bases[0].created}
                             if bases else None),
            "exports": read_exports(vol_path), **pins_report(vol_path, bases)}


def pins_report(vol_path: Path, bases: list[Snapshot]) -> dict[str, Any]:
    """What holds history here beyond the window: the clones of points (``pins``) and
    the bases open readers hold now (``readers``), each with the journal bytes kept
    from its base on (what dropping it would let go, were it the oldest)."""
    by_id = {b.id: b for b in bases}

    def held(base_id: int) -> dict[str, Any]:
        b = by_id.get(base_id)
        return {"base_seq": b.mark_seq if b else None,
                "journal_bytes": held_bytes(vol_path, b.mark_seq)[0] if b else 0}

    return {"pins": [{"owner": owner, "seq": seq, **held(base)}
                     for owner, (base, seq) in lasting_pins(vol_path).items()],
            "readers": [held(b.id) for b in bases if readers_of(vol_path, b.id)]}


def read_exports(vol_path: Path) -> list[str]:
    path = vol_path / CDP_DIR / EXPORTS_FILE
    if not path.exists():
        return []
    return [str(x) for x in read_json(path, "cdp-exports", 1)["exports"]]


def write_exports(vol_path: Path, names: list[str]) -> None:
    make_dir(vol_path / CDP_DIR, exist_ok=True)
    write_json(vol_path / CDP_DIR / EXPORTS_FILE,
               {"kind": "cdp-exports", "version": 1, "exports": sorted(set(names))})


# -- pins: history a reader in any process needs ------------------------------------------------

PINS_DIR = "pins"


def _pin_dir(vol_path: Path) -> Path:
    return vol_path / CDP_DIR / PINS_DIR


def _lock_path(vol_path: Path, base_id: int) -> Path:
    return _pin_dir(vol_path) / f"base-{base_id}.lock"


def _open_lock(vol_path: Path, base_id: int) -> int:
    make_dir(_pin_dir(vol_path), parents=True, exist_ok=True)
    return os.open(_lock_path(vol_path, base_id), os.O_RDWR | os.O_CREAT, 0o600)


def base_held(vol_path: Path, base_id: int) -> bool:
    """Whether base ``base_id`` is still in the bases' index (read as it is)."""
    return any(b.id == base_id for b in bases_of(vol_path))


def hold_base(vol_path: Path, base_id: int) -> int:
    """Pin base ``base_id`` for as long as the returned descriptor stays open (an open
    point view or clone, in any process: nbdkit on a replica's node pins what the
    receiver in the peerlink process would drop).  A shared flock on
    ``cdp/pins/base-<id>.lock``, taken before checking the base is still there: the
    dropper (``may_drop``) tries an exclusive one without waiting and drops only
    when it gets it, so a base is either seen pinned or seen gone, never freed under a
    reader.  The lock goes with the process: a reader killed pins nothing.  CdpError
    when the base was dropped meanwhile."""
    fd = _open_lock(vol_path, base_id)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # the dropper holds it only while it drops
        if not base_held(vol_path, base_id):
            raise CdpError(f"the history of base {base_id} was dropped (older than the "
                           "window, or past max_bytes): choose a newer point")
    except BaseException:
        os.close(fd)
        raise
    return fd


def add_pin(vol_path: Path, owner: str, base_id: int, seq: int, while_exists: str = ""
            ) -> None:
    """A lasting pin (a clone of point ``seq``): base ``base_id`` and the journal after
    it stay until ``remove_pin``, across restarts, or until the file ``while_exists``
    (relative to the data dir: the clone's clone.json) is gone, so a crash between
    deleting a clone and removing its pin frees the history anyway.  Written under the
    base's shared lock, so the dropper either sees the file or has dropped the base
    before (then CdpError)."""
    fd = hold_base(vol_path, base_id)
    try:
        write_json(_pin_dir(vol_path) / f"{owner}.json",
                   {"kind": "cdp-pin", "version": 1, "owner": owner, "base": base_id,
                    "seq": seq, "while": while_exists})
    finally:
        os.close(fd)


def remove_pin(vol_path: Path, owner: str) -> None:
    (_pin_dir(vol_path) / f"{owner}.json").unlink(missing_ok=True)


def lasting_pins(vol_path: Path) -> dict[str, tuple[int, int]]:
    """owner -> (base id, seq) of the lasting pins in force (clones of points)."""
    out: dict[str, tuple[int, int]] = {}
    d = _pin_dir(vol_path)
    if not d.is_dir():
        return out
    data_dir = vol_path.parent.parent
    for p in sorted(d.glob("*.json")):
        try:
            j = read_json(p, "cdp-pin", 1)
        except FileNotFoundError:
            continue  # removed meanwhile
        if j.get("while") and not (data_dir / str(j["while"])).exists():
            continue  # its clone is gone
        out[str(j["owner"])] = (int(j["base"]), int(j["seq"]))
    return out


def readers_of(vol_path: Path, base_id: int) -> bool:
    """Whether an open reader (any process) holds base ``base_id`` now."""
    try:
        fd = os.open(_lock_path(vol_path, base_id), os.O_RDONLY)
    except OSError:  # none (no reader ever), or not ours to see (control.group)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def may_drop(vol_path: Path, base_id: int) -> Iterator[bool]:
    """Whether base ``base_id`` may be dropped now (no reader holds it, no clone pins
    it), held so until the block ends: an exclusive flock taken without waiting (the
    dropper never waits for a reader: replication is never paused by one)."""
    fd = _open_lock(vol_path, base_id)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        if any(b == base_id for b, _s in lasting_pins(vol_path).values()):
            yield False
            return
        yield True
    finally:
        os.close(fd)


def forget_lock(vol_path: Path, base_id: int) -> None:
    """After a drop, inside ``may_drop``'s block: a reader that opened the file before
    locks a file no one else will, and finds the base gone."""
    _lock_path(vol_path, base_id).unlink(missing_ok=True)


# -- the live side (owned by an open Volume) --------------------------------------------------

class Cdp:
    """One open volume's history keeping: TIME marks, bases, the byte budget.  Called
    under the volume's request lock (the data path is single-threaded)."""

    def __init__(self, vol_path: Path, volume_uuid: bytes, size: int, policy: CdpPolicy,
                 readonly: bool) -> None:
        self.path = vol_path / CDP_DIR
        self.policy = policy
        bdir = self.path / BASES_DIR
        if not bdir.exists():
            if readonly:
                raise OSError(errno.EROFS, f"{bdir} does not exist (volume open read-only)")
            make_dir(self.path, exist_ok=True)
            SnapshotStore.create(bdir, volume_uuid)
        self.bases = SnapshotStore(bdir, size, readonly=readonly)
        self.last_mark_ns = 0  # wall clock of the last TIME mark this process appended
        self.dirty = False  # writes since the last TIME mark
        self.next_check = 0.0  # monotonic time of the next housekeeping
        self.pins: dict[int, int] = {}  # base id -> open point views reading it
        self.known: list[Point] = []  # the points found so far (see known_points)
        self.built: dict[tuple[int, int], _Built] = {}  # (base id, seq) -> open views' map
        self.scanned = 0  # the journal seq known_points scans after next time
        self.over_budget = False  # past max_bytes with the oldest base pinned
        self.force_base = False  # a resync kept a pinned base: take a new one first
        self.maps: MapWriter | None = None  # started by the first housekeeping

    def close(self) -> None:
        if self.maps is not None:
            self.maps.stop()
            self.maps = None
        self.bases.close()

    def kick_maps(self, vol: Volume) -> None:
        """Have the map writer look at the journal now (started if need be)."""
        if self.maps is None:
            self.maps = MapWriter(vol.info.path,
                                  lambda: vol.applied_seq if vol.replica else vol.last_seq)
        self.maps.wake.set()

    @property
    def floor(self) -> int | None:
        """The oldest base's seq: the journal keeps every record after it."""
        index = self.bases.index
        try:  # read by the checkpoint thread while a request may drop a base
            return index.snaps[index.order[0]].mark_seq if index.order else None
        except (IndexError, KeyError):
            return self.floor

    # -- hooks of the data path -------------------------------------------------------------

    def before_write(self, vol: Volume) -> None:
        """Before a client write (primary): a TIME mark if a second passed since the
        last one; the bases and the budget looked after at most once a second."""
        now = time.time_ns()
        if now - self.last_mark_ns >= MARK_EVERY_NS:
            if time.monotonic() >= self.next_check:
                self.housekeep(vol)
            vol.mark({"event": TIME_EVENT, "t": now, "flush": False})
            self.last_mark_ns = now
        self.dirty = True

    def flush_mark(self, vol: Volume) -> None:
        """At a FLUSH or FUA write after writes since the last mark, before the
        journal's fdatasync (which makes the mark durable with the data)."""
        if not self.dirty:
            return
        now = time.time_ns()
        vol.mark({"event": TIME_EVENT, "t": now, "flush": True})
        self.last_mark_ns = now
        self.dirty = False

    def cow(self, store: Store, offset: int, length: int, seq: int | None) -> None:
        """Before the store changes [offset, +length): the newest base (during redo: the
        newest before ``seq``) keeps its pre-images, as a user snapshot does."""
        index = self.bases.index
        target = index.newest if seq is None else index.target_before(seq)
        if target is None:
            return
        todo = self.bases.unpreserved(target, offset, length)
        if todo:
            self.bases.preserve(target, todo, store)

    # -- bases and the budget ---------------------------------------------------------------

    def due(self) -> bool:
        """Whether housekeeping is due (a replica asks between batches)."""
        return time.monotonic() >= self.next_check

    def housekeep(self, vol: Volume) -> None:
        """Take a base when none is younger than window/4; drop the oldest once the
        next is older than the window; drop early past max_bytes (a warning event).
        Only where the store holds every journaled record (a replica between batches)."""
        self.next_check = time.monotonic() + HOUSEKEEP_EVERY
        if self.maps is None:
            self.kick_maps(vol)
        index = self.bases.index
        wall = time.time()
        newest = index.newest
        if (newest is None or self.force_base
                or wall - newest.created >= self.policy.window / 4):
            self.take_base(vol)
            self.force_base = False
        while (len(index.order) >= 2
               and index.snaps[index.order[1]].created <= wall - self.policy.window
               and self._drop_oldest(vol, "window")):
            pass
        jbytes, bbytes = held_bytes(vol.info.path, self.floor)
        pinned_over = False
        while jbytes + bbytes > self.policy.max_bytes and index.order:
            last = len(index.order) == 1
            oldest = index.snaps[index.order[0]]
            if not self._drop_oldest(vol, "max_bytes"):
                pinned_over = True  # a reader or a clone needs it: over budget for now
                break
            _log.warning("cdp_history_dropped", volume=vol.name, reason="max_bytes",
                         held_bytes=jbytes + bbytes, max_bytes=self.policy.max_bytes,
                         base_seq=oldest.mark_seq)
            if last:
                self.take_base(vol)  # the history starts again now
                break
            jbytes, bbytes = held_bytes(vol.info.path, self.floor)
        if pinned_over and not self.over_budget:
            _log.warning("cdp_history_pinned", volume=vol.name, held_bytes=jbytes + bbytes,
                         max_bytes=self.policy.max_bytes,
                         pins=sorted(lasting_pins(vol.info.path)))
        self.over_budget = pinned_over

    def take_base(self, vol: Volume) -> Snapshot:
        """A base at the journal's end (the store holds every record up to it).  No
        journal MARK: the index record is durable before any later record is appended,
        so redo finds it (records after it preserve into it, as after a snapshot)."""
        sid = self.bases.index.next_id
        base = Snapshot(sid, f"base-{sid}", vol.last_seq, time.time(), f"size={vol.size}")
        self.bases.add(base)
        _log.info("cdp_base_taken", volume=vol.name, seq=base.mark_seq, id=sid)
        return base

    def _drop_oldest(self, vol: Volume, reason: str) -> bool:
        """Drop the oldest base unless a reader (this process's views, or any process's:
        ``may_drop``) or a clone pins it; whether it was dropped."""
        index = self.bases.index
        sid = index.order[0]
        return self._drop(vol, sid, reason)

    def _drop(self, vol: Volume, sid: int, reason: str) -> bool:
        if self.pins.get(sid):
            return False
        with may_drop(vol.info.path, sid) as ok:
            if not ok:
                return False
            seq = self.bases.index.snaps[sid].mark_seq
            self.bases.delete(sid)
            forget_lock(vol.info.path, sid)
        remove_maps(vol.info.path, {(b.id, b.mark_seq) for b in
                                    (self.bases.index.snaps[i] for i in self.bases.index.order)})
        _log.info("cdp_base_dropped", volume=vol.name, id=sid, seq=seq, reason=reason)
        return True

    def reset(self, vol: Volume, reason: str) -> None:
        """Forget every base (a resync writes outside the journal: no point before it
        can be rebuilt from records); the next housekeeping takes a new one."""
        for sid in list(self.bases.index.order):
            self._drop(vol, sid, reason)
        # A base a reader pins stays (the resync's writes copy-on-write into it, so its
        # points stay exact), but no point after the resync may be built on it: the next
        # housekeeping takes a base whatever the age of the newest.
        self.force_base = bool(self.bases.index.order)
        self.next_check = 0.0
        _log.warning("cdp_history_dropped", volume=vol.name, reason=reason)

    # -- point views ------------------------------------------------------------------------

    def view(self, vol: Volume, store: Store, point: Point, name: str) -> PointView:
        """A read-only view of the volume as of ``point`` (under the request lock)."""
        index = self.bases.index
        base = None
        for sid in index.order:
            b = index.snaps[sid]
            if b.mark_seq <= point.seq:
                base = b
        if base is None:
            raise CdpError(f"point seq {point.seq} is older than the window")
        key = (base.id, point.seq)
        built = self.built.get(key)
        if built is None:  # else shared with the open views of the same point (multi-conn)
            built = _build(vol.info.path, base, point, _base_size(base, vol.size))
            self.built[key] = built
        built.refs += 1
        self.pins[base.id] = self.pins.get(base.id, 0) + 1
        view = PointView(self, store, base, point, name, built)
        with contextlib.suppress(OSError):  # shown to `nbdgw status` (a read-only open
            # may not create the lock file; the in-process pin above is what counts)
            view.pin_fd = _open_lock(vol.info.path, base.id)
            fcntl.flock(view.pin_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return view

    def known_points(self, vol: Volume) -> list[Point]:
        """The points from the oldest base on, scanning only the records appended since
        the last call (under the request lock)."""
        floor = self.floor
        if floor is None:
            return []
        if self.scanned < floor:
            self.known, self.scanned = [], floor
        new, self.scanned = points_from(vol.info.path, self.scanned + 1, vol.replica)
        self.known = [p for p in self.known if p.seq > floor] + new
        return self.known

    def unpin(self, base_id: int) -> None:
        n = self.pins.get(base_id, 0) - 1
        if n > 0:
            self.pins[base_id] = n
        else:
            self.pins.pop(base_id, None)


def _base_size(base: Snapshot, default: int) -> int:
    if base.group.startswith("size="):
        return int(base.group[5:])
    return default


@dataclass
class _Built:
    """What opening a point built: the overlay (in two layers: a saved map's, unpacked
    a bucket at a time as reads touch it, and the records replayed after it, newer),
    the view's size, and the segment files its reads open (on first use: the base's
    pin keeps them)."""

    saved: Overlay
    overlay: Overlay
    jdir: Path
    size: int
    scanned: int = 0  # records read from the journal to build it (the rest: a saved map)
    refs: int = 0
    fds: dict[int, int] = field(default_factory=dict)  # segment first seq -> file

    def covering(self, start: int, end: int
                 ) -> Iterator[tuple[int, int, tuple[int, int] | None]]:
        """Both layers' ranges over [start, end), older first: laid in this order,
        the newer wins."""
        yield from self.saved.covering(start, end)
        yield from self.overlay.covering(start, end)

    def fd(self, first: int) -> int:
        fd = self.fds.get(first)
        if fd is None:
            fd = self.fds[first] = os.open(self.jdir / segment_name(first), os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def _replay(jdir: Path, ov: Overlay, size: int, from_seq: int, through_seq: int
            ) -> tuple[int, int, int, bool]:
    """Lay the records ``from_seq``..``through_seq`` over ``ov``; return (the view's
    size after them, the last seq read, how many were read, whether the last one read
    is a TIME mark)."""
    firsts = segment_firsts(jdir)
    last, n, is_time = from_seq - 1, 0, False
    for seq, op, _flags, offset, length, at, raw in scan(jdir, from_seq, through_seq):
        last, n, is_time = seq, n + 1, False
        if op == Op.MARK:
            body = _body(raw)
            if body.get("event") == GROW_EVENT:
                size = max(size, int(body["size"]))
            # A TIME mark, or a replica's commit mark (its current image: LATEST)
            is_time = body.get("event") in (TIME_EVENT, COMMIT_EVENT)
        elif op == Op.WRITE:
            ov.put(offset, offset + length,
                   (firsts[bisect.bisect_right(firsts, seq) - 1], at))
        else:  # TRIM and ZERO read as zeros
            ov.put(offset, offset + length, None)
    return size, last, n, is_time


def _build(vol_path: Path, base: Snapshot, point: Point, base_size: int) -> _Built:
    """The overlay of ``point`` on ``base``: the newest usable saved map before the
    point's segment, then the records after it (at most one segment's, when the map
    writer has caught up)."""
    jdir = vol_path / "journal"
    saved, size, through = saved_overlay(vol_path, base, point.seq, base_size)
    # In a layer of their own: laid into the map, a segment of random writes would
    # unpack nearly every bucket of it at once.
    built = _Built(saved, Overlay(), jdir, max(size, base_size))  # (maps start at size 0)
    built.size, last, built.scanned, is_time = _replay(jdir, built.overlay, built.size,
                                                       through + 1, point.seq)
    if point.seq > base.mark_seq and not (last == point.seq and is_time):
        raise CdpError(f"no point at seq {point.seq} (not a TIME mark)")
    return built


# -- saved overlays: a map per sealed segment --------------------------------------------------

MAPS_DIR = "maps"
_MAP_RE = re.compile(r"^(\d+)-(\d+)-([0-9a-f]{16})\.map$")
MAP_EVERY = 1.0  # seconds between the map writer's looks at the journal


def _maps_dir(vol_path: Path) -> Path:
    return vol_path / CDP_DIR / MAPS_DIR


def _map_name(base: Snapshot, first: int) -> str:
    return f"{base.id}-{base.mark_seq}-{first:016x}.map"


def _saved(vol_path: Path) -> list[tuple[int, int, int, Path]]:
    """(base id, base seq, segment first seq, path) of the map files there are."""
    try:
        names = os.listdir(_maps_dir(vol_path))
    except FileNotFoundError:
        return []
    return [(int(m.group(1)), int(m.group(2)), int(m.group(3), 16), _maps_dir(vol_path) / n)
            for n in names if (m := _MAP_RE.match(n))]


def _last_header(jdir: Path, first: int, pos: int) -> tuple[int, int]:
    """(seq, header CRC) of the record whose header is at ``pos`` of segment ``first``."""
    fd = os.open(jdir / segment_name(first), os.O_RDONLY)
    try:
        raw = os.pread(fd, REC_HEADER_SIZE, pos)
    finally:
        os.close(fd)
    if len(raw) != REC_HEADER_SIZE:
        raise FormatError(f"segment {first:x}: no record header at {pos}")
    magic, hcrc, seq = _HEADER.unpack_from(raw)[:3]
    if magic != REC_MAGIC or crc32c(raw[8:]) != hcrc:
        raise FormatError(f"segment {first:x}: no record header at {pos}")
    return seq, hcrc


def _load_map(vol_path: Path, path: Path, base: Snapshot, first: int, nxt: int
              ) -> tuple[Overlay, int, int]:
    """A saved map's (overlay, size, last seq) if it is the overlay of ``base`` through
    the end of the sealed segment ``first`` (followed by ``nxt``) as the journal holds
    it now; FormatError (or OSError) otherwise."""
    key, ov = decode_map(path.read_bytes())
    if ((key.base_id, key.base_seq, key.first, key.last) != (base.id, base.mark_seq, first,
                                                              nxt - 1)
            or _last_header(vol_path / "journal", first, key.last_pos)
            != (key.last, key.last_hcrc)):
        raise FormatError(f"{path.name}: not the overlay of this base and segment")
    return ov, key.size, key.last


def saved_overlay(vol_path: Path, base: Snapshot, seq: int, base_size: int
                  ) -> tuple[Overlay, int, int]:
    """(overlay, view size, last seq it covers) of ``base``'s records from the newest
    intact saved map of a segment ending before ``seq``; an empty overlay at the base
    when there is none.  A map that is torn, of another base or segment layout, or
    whose last record the journal no longer holds is skipped, never used."""
    firsts = segment_firsts(vol_path / "journal")
    nexts = dict(itertools.pairwise(firsts))
    mine = sorted((first, path) for bid, bseq, first, path in _saved(vol_path)
                  if (bid, bseq) == (base.id, base.mark_seq) and first in nexts
                  and base.mark_seq < nexts[first] - 1 < seq)
    for first, path in reversed(mine):
        try:
            return _load_map(vol_path, path, base, first, nexts[first])
        except (FormatError, OSError, ValueError) as e:
            _log.info("cdp_map_ignored", map=path.name, error=str(e))
            # So that the writer saves it again.  Should the writer have renamed a good
            # one over it meanwhile, that one goes: a missing map costs a replay, no more.
            with contextlib.suppress(OSError):  # (a reader that may not: it stays ignored)
                path.unlink()
    return Overlay(), base_size, base.mark_seq


def _write_map(vol_path: Path, base: Snapshot, first: int, last: int, ov: Overlay,
               size: int) -> None:
    """Save the overlay of ``base`` through ``last`` (the end of segment ``first``):
    a temp file renamed into place, so a reader in another process sees a whole map or
    none.  No fsync: a map lost or torn by a crash is skipped and written again."""
    jdir = vol_path / "journal"
    pos = _last_pos(jdir, first, last)
    _seq, hcrc = _last_header(jdir, first, pos)
    key = MapKey(base.id, base.mark_seq, first, last, pos, hcrc, size)
    d = _maps_dir(vol_path)
    make_dir(d, parents=True, exist_ok=True)
    tmp = d / f".tmp-{os.getpid()}-{threading.get_ident()}-{_map_name(base, first)}"
    tmp.write_bytes(encode_map(key, ov))
    os.replace(tmp, d / _map_name(base, first))


def _last_pos(jdir: Path, first: int, last: int) -> int:
    """Where the header of record ``last`` is in segment ``first``."""
    for seq, _op, _f, _o, _l, at, _raw in scan(jdir, last, last):
        if seq == last:
            return at - REC_HEADER_SIZE
    raise FormatError(f"segment {first:x}: record {last} not found")


def remove_maps(vol_path: Path, keep: set[tuple[int, int]], firsts: list[int] | None = None
                ) -> None:
    """Remove the maps of bases not in ``keep`` ((id, seq) pairs) and, given the journal's
    segments ``firsts``, those of segments no longer sealed there (released)."""
    sealed = set(firsts[:-1]) if firsts is not None else None
    for bid, bseq, first, path in _saved(vol_path):
        if (bid, bseq) not in keep or (sealed is not None and first not in sealed):
            path.unlink(missing_ok=True)


def update_maps(vol_path: Path, committed: int, cache: dict[str, Any] | None = None,
                stopping: Callable[[], bool] = lambda: False) -> int:
    """One pass of the map writer: save the overlay of every sealed segment whose
    records are all committed (``committed``: a replica's uncommitted tail may be cut
    and its seqs reused) on the newest base before the segment's end, from the previous
    segment's map (``cache``: the last one built, kept in memory); remove the maps of
    dropped bases and released segments; ``stopping`` is asked before each map (a volume
    closing does not wait for a writer far behind).  Return how many maps were written."""
    jdir = vol_path / "journal"
    firsts = segment_firsts(jdir)
    bases = bases_of(vol_path)
    remove_maps(vol_path, {(b.id, b.mark_seq) for b in bases}, firsts)
    have = {p.name for *_k, p in _saved(vol_path)}
    cache = {} if cache is None else cache
    written = 0
    for first, nxt in itertools.pairwise(firsts):
        last = nxt - 1
        if last > committed or stopping():
            break
        base = None
        for b in bases:
            if b.mark_seq < last:
                base = b
        if base is None or _map_name(base, first) in have:
            continue
        prev = cache.get("built")
        if prev is not None and prev[0] == (base.id, base.mark_seq, first):
            ov, size, through = prev[1:]
        else:
            ov, size, through = saved_overlay(vol_path, base, last, 0)
        size, got, _n, _t = _replay(jdir, ov, size, through + 1, last)
        if got != last:
            break  # released meanwhile, or not all there: next time
        _write_map(vol_path, base, first, last, ov, size)
        cache["built"] = ((base.id, base.mark_seq, nxt), ov, size, last)
        written += 1
    return written


class MapWriter:
    """The thread that saves the maps of an open volume's sealed segments, off the
    request path (a client write never waits for it; it reads sealed segments, which
    nothing rewrites, and the bases' index as a reader does)."""

    def __init__(self, vol_path: Path, committed: Callable[[], int]) -> None:
        self.vol_path = vol_path
        self.committed = committed
        self.wake = threading.Event()
        self.stopping = False
        self.cache: dict[str, Any] = {}
        for p in _maps_dir(vol_path).glob(".tmp-*"):  # a crash's half-written ones
            p.unlink(missing_ok=True)
        self.thread = threading.Thread(target=self._run, name="nbdgw-cdp-maps", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                update_maps(self.vol_path, self.committed(), self.cache,
                            lambda: self.stopping)
            except (OSError, BlockstoreError, ValueError) as e:
                # A cache: an open without it replays more records, never reads wrong.
                self.cache.clear()
                _log.warning("cdp_maps_failed", path=str(self.vol_path), error=str(e))
            self.wake.wait(MAP_EVERY)
            self.wake.clear()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join()


def _read_overlay(built: _Built, view: memoryview, offset: int, name: str) -> None:
    """Lay the records of a point's overlay over ``view`` (the base's bytes at
    ``offset``)."""
    for s, e, src in built.covering(offset, offset + len(view)):
        if src is None:
            view[s - offset:e - offset] = bytes(e - s)
            continue
        first, pos = src
        got = os.preadv(built.fd(first), [view[s - offset:e - offset]], pos)
        if got != e - s:
            raise OSError(errno.EIO, f"point {name}: short read of the journal")


class PointView:
    """The volume as of a point, read-only (what a ``VOLUME@<instant>`` export reads):
    the base's image, with the journal's records after the base up to the point laid
    over it.  Reads run under the volume's request lock, as a snapshot view's do."""

    readonly = True

    def __init__(self, cdp: Cdp, store: Store, base: Snapshot, point: Point, name: str,
                 built: _Built) -> None:
        self.cdp = cdp
        self.store = store
        self.base = base
        self.point = point
        self.name = name
        self.built = built
        self.overlay = built.overlay
        self.size = built.size
        self.closed = False
        self.pin_fd = -1

    def _check(self) -> None:
        if self.closed or self.cdp.bases.index.snaps.get(self.base.id) is not self.base:
            raise OSError(errno.EIO, f"point {self.name} is no longer held")

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        self._check()
        n = len(buf)
        if offset < 0 or offset + n > self.size:
            raise OSError(errno.EINVAL, f"read [{offset}, +{n}) outside {self.size}")
        view = memoryview(buf)
        base_end = min(offset + n, self.cdp.bases.size, self.store.size)
        if base_end > offset:
            self.cdp.bases.read_into(self.base.id, view[:base_end - offset], offset,
                                     self.store)
        if base_end < offset + n:
            view[max(0, base_end - offset):] = bytes(offset + n - max(base_end, offset))
        _read_overlay(self.built, view, offset, self.name)

    def extents(self, offset: int, count: int) -> list[tuple[int, int, bool]]:
        self._check()
        end = min(offset + count, self.size)
        return [(offset, end - offset, True)] if end > offset else []

    def flush(self) -> None:
        """Nothing to make durable: a point is never written."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.built.refs -= 1
            if self.built.refs == 0:
                self.built.close()
                key = (self.base.id, self.point.seq)
                if self.cdp.built.get(key) is self.built:
                    del self.cdp.built[key]
            self.cdp.unpin(self.base.id)
            if self.pin_fd >= 0:
                os.close(self.pin_fd)
                self.pin_fd = -1


def open_point(vol: Volume, text: str) -> PointView:
    """A view of ``VOLUME@text`` (``seq-N`` or an instant) of an open volume, under its
    request lock.  CdpError when the volume keeps no history or has no such point."""
    cdp = vol.cdp
    if cdp is None:
        raise CdpError(f"volume {vol.name} keeps no history (no cdp window)")
    kind, value = parse_point(text)
    floor = cdp.floor
    if floor is None:
        raise CdpError(f"volume {vol.name} holds no history yet")
    if kind == "seq" and not vol.replica and floor < value <= vol.last_seq:
        # No index needed: the view's own scan checks that seq N is a TIME mark.
        point = Point(value, 0, False)
    else:
        point = resolve(cdp.known_points(vol), kind, value, floor)
    assert vol.store is not None
    return cdp.view(vol, vol.store, point, f"{vol.name}@{text}")


class FollowedPointView:
    """A point of a volume another process writes (a replica's receiver), read-only:
    the base through a SnapshotFollower of ``cdp/bases`` (the protocol of snapshot.py,
    so the receiver is never waited for), the journal's records after it laid over.
    The base is pinned (``hold_base``) while the view is open, so the receiver neither
    drops it nor releases the journal after it.  One lock around each call (the
    caller's)."""

    readonly = True

    def __init__(self, vol_path: Path, volume: str, size: int, text: str) -> None:
        self.name = f"{volume}@{text}"
        self.closed = False
        self.pin_fd = -1
        self.built: _Built | None = None
        self.store = Store(str(vol_path / "store"), size, readonly=True, noatime=True)
        self.follower: SnapshotFollower | None = None
        try:
            self.follower = SnapshotFollower(vol_path / CDP_DIR / BASES_DIR, self.store,
                                             volume)
            self._open(vol_path, self.follower, text)
        except BaseException:
            self.close()
            raise

    def _open(self, vol_path: Path, follower: SnapshotFollower, text: str) -> None:
        kind, value = (LATEST, 0) if text == LATEST else parse_point(text)
        for _attempt in range(3):  # a base dropped between the choice and the pin: again
            follower.refresh()
            index = follower.index
            if not index.order:
                raise CdpError(f"{self.name}: the replica holds no history yet")
            floor = index.snaps[index.order[0]].mark_seq
            pts, last = points_from(vol_path, floor + 1, True)
            point = (Point(max(last, floor), pts[-1].t if pts else 0, False)
                     if kind == LATEST else resolve(pts, kind, value, floor))
            base = None
            for sid in index.order:
                if index.snaps[sid].mark_seq <= point.seq:
                    base = index.snaps[sid]
            if base is None:
                raise CdpError(f"point seq {point.seq} is older than the window")
            try:
                self.pin_fd = hold_base(vol_path, base.id)
            except CdpError:
                continue
            self.base, self.point = base, point
            self.built = _build(vol_path, base, point,
                                _base_size(base, self.store.size))
            self.size = self.built.size
            return
        raise CdpError(f"{self.name}: its history was dropped while it was opened")

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        if self.closed or self.built is None or self.follower is None:
            raise OSError(errno.EIO, f"point {self.name} is closed")
        n = len(buf)
        if offset < 0 or offset + n > self.size:
            raise OSError(errno.EINVAL, f"read [{offset}, +{n}) outside {self.size}")
        view = memoryview(buf)
        base_end = min(offset + n, self.follower.size)
        if base_end > offset:
            self.follower.read_into(self.base, view[:base_end - offset], offset)
        if base_end < offset + n:
            view[max(0, base_end - offset):] = bytes(offset + n - max(base_end, offset))
        _read_overlay(self.built, view, offset, self.name)

    def extents(self, offset: int, count: int) -> list[tuple[int, int, bool]]:
        end = min(offset + count, self.size)
        return [(offset, end - offset, True)] if end > offset else []

    def flush(self) -> None:
        """Nothing to make durable: a point is never written."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.built is not None:
            self.built.close()
        if self.follower is not None:
            self.follower.close()
        self.store.close()
        if self.pin_fd >= 0:
            os.close(self.pin_fd)  # the pin goes with it
            self.pin_fd = -1


# -- restore ----------------------------------------------------------------------------------

def restore(vol: Volume, text: str, snapshot: str) -> dict[str, Any]:
    """Make the live volume its image as of point ``text`` (``seq-N`` or an instant),
    keeping the state before as snapshot ``snapshot`` (journaled: replicas take it and
    follow the restore's writes).  A restore.json intent, written after the snapshot
    and before the first write, makes it all-or-nothing across a crash: the next open
    finishes it (idempotent: extents already equal are skipped).  Under the request
    lock (or on an idle volume)."""
    cdp = vol.cdp
    if cdp is None:
        raise CdpError(f"volume {vol.name} keeps no history (no cdp window)")
    if vol.replica:
        raise CdpError(f"volume {vol.name} is a replica: restore its primary")
    view = open_point(vol, text)  # resolves (and checks) the point first
    try:
        seq = view.point.seq
        vol.check_snapshot(snapshot)
        vol.snapshot_create(snapshot)
        write_json(cdp.path / RESTORE_FILE, {"kind": "cdp-restore", "version": 1,
                                             "seq": seq, "point": text,
                                             "snapshot": snapshot, "started": time.time()})
    finally:
        view.close()
    written = finish_restore(vol)
    return {"seq": seq, "snapshot": snapshot, "bytes_written": written}


def pending_restore(vol_path: Path) -> bool:
    """Whether a restore of this volume was cut short: its own intent, or a group
    restore's that names it and has not seen it done."""
    return ((vol_path / CDP_DIR / RESTORE_FILE).exists()
            or _group_pending(vol_path) is not None)


def finish_restore(vol: Volume) -> int:
    """Write, through the journal, every extent where the live volume differs from the
    point restore.json names; then drop the intent.  Return the bytes written.  A
    member of a group restore not begun yet begins first (its snapshot, its intent)."""
    cdp = vol.cdp
    assert cdp is not None and vol.store is not None and vol.journal is not None
    path = cdp.path / RESTORE_FILE
    if not path.exists():
        _begin_member(vol)
    intent = read_json(path, "cdp-restore", 1)
    seq = int(intent["seq"])
    view = open_point(vol, f"seq-{seq}")
    try:
        vol.mark({"event": RESTORE_EVENT, "seq": seq, "phase": "begin"})
        shift = cdp.bases.shift
        ext = 1 << shift
        changed = cdp.bases.index.changed_since(view.base.id)
        for s_, e_, _src in view.built.covering(0, vol.size):
            changed.update(range(s_ >> shift, ((e_ - 1) >> shift) + 1))
        if view.size < vol.size:  # grown since the point: that space was not there
            changed.update(range(view.size >> shift, ((vol.size - 1) >> shift) + 1))
        written = 0
        for e in sorted(changed):
            off = e << shift
            n = min(ext, vol.size - off)
            if n <= 0:
                continue
            want = bytearray(n)
            inside = max(0, min(n, view.size - off))
            if inside:
                view.read_into(memoryview(want)[:inside], off)
            live = bytearray(n)
            vol.read_into(live, off)
            if live == want:
                continue
            if want == bytes(n):
                vol.zero(off, n, may_trim=True)
            else:
                vol.write(bytes(want), off)
            written += n
        vol.mark({"event": RESTORE_EVENT, "seq": seq, "phase": "done", "bytes": written})
        vol.journal.sync()
    finally:
        view.close()
    group = str(intent.get("group", ""))
    if group:
        _member_done(vol.info.path, group)
    path.unlink()
    if group:
        _forget_group_if_done(vol.info.path, group)
    _log.warning("cdp_restored", volume=vol.name, seq=seq, snapshot=intent["snapshot"],
                 bytes_written=written, group=group or None)
    return written


# -- consistency-group restore ----------------------------------------------------------------

GROUPS_DIR = "cdp-restores"  # under the data dir: <group>.json intents, <group>.<V>.done


def _groups_dir(vol_path: Path) -> Path:
    return vol_path.parent.parent / GROUPS_DIR


def _group_pending(vol_path: Path) -> tuple[str, dict[str, Any]] | None:
    """(group id, intent) of a group restore that names this volume and has not seen it
    done, if there is one."""
    d = _groups_dir(vol_path)
    name = vol_path.name
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            intent = read_json(p, "cdp-group-restore", 1)
        except FileNotFoundError:
            continue  # finished meanwhile
        if name in intent["volumes"] and not (d / f"{p.stem}.{name}.done").exists():
            return p.stem, intent
    return None


def _begin_member(vol: Volume) -> None:
    """Start this volume's part of the group restore that names it: the snapshot of the
    state before (unless a run cut short took it), then its own intent."""
    cdp = vol.cdp
    assert cdp is not None
    found = _group_pending(vol.info.path)
    if found is None:
        raise CdpError(f"volume {vol.name}: no restore to finish")
    group, intent = found
    snapshot = str(intent["snapshot"])
    if vol.snaps is None or snapshot not in vol.snaps.index.by_name:
        vol.snapshot_create(snapshot)
    write_json(cdp.path / RESTORE_FILE, {
        "kind": "cdp-restore", "version": 1, "seq": int(intent["volumes"][vol.name]),
        "point": intent["point"], "snapshot": snapshot, "started": time.time(),
        "group": group})


def _member_done(vol_path: Path, group: str) -> None:
    """Durable before the member's own intent goes: a crash between leaves both, and the
    next open finishes again (nothing to write: the extents are equal)."""
    d = _groups_dir(vol_path)
    fd = os.open(d / f"{group}.{vol_path.name}.done", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    fsync_dir(d)


def _forget_group_if_done(vol_path: Path, group: str) -> None:
    d = _groups_dir(vol_path)
    try:
        intent = read_json(d / f"{group}.json", "cdp-group-restore", 1)
    except FileNotFoundError:
        return
    if all((d / f"{group}.{v}.done").exists() for v in intent["volumes"]):
        (d / f"{group}.json").unlink(missing_ok=True)  # first: then no member is pending
        for v in intent["volumes"]:
            (d / f"{group}.{v}.done").unlink(missing_ok=True)


def restore_group(vols: list[Volume], at_ns: int, point: str, snapshot: str
                  ) -> list[dict[str, Any]]:
    """Roll every volume of ``vols`` (one node's, open here, under their request locks
    or idle) back to its last FLUSH point at or before ``at_ns``, keeping each one's
    state before as snapshot ``snapshot``; all or nothing across a crash: every volume
    is checked first, then one intent naming them all is made durable, and from then on
    the next open of each finishes its part (DESIGN.md §7a "Consistency groups")."""
    seqs: dict[str, int] = {}
    for vol in vols:
        cdp = vol.cdp
        if cdp is None:
            raise CdpError(f"volume {vol.name} keeps no history (no cdp window)")
        if vol.replica:
            raise CdpError(f"volume {vol.name} is a replica: restore its primary")
        if cdp.floor is None:
            raise CdpError(f"volume {vol.name} holds no history yet")
        seqs[vol.name] = resolve(cdp.known_points(vol), "at", at_ns, cdp.floor).seq
        vol.check_snapshot(snapshot)
    paths = {vol.info.path.parent for vol in vols}
    if len(paths) != 1 or len(seqs) != len(vols):
        raise CdpError("a consistency group is distinct volumes of one data directory")
    d = _groups_dir(vols[0].info.path)
    make_dir(d, exist_ok=True)
    fsync_dir(d.parent)  # (the directory's entry, the first time: the intent's in it)
    group = os.urandom(8).hex()
    write_json(d / f"{group}.json", {"kind": "cdp-group-restore", "version": 1,
                                     "volumes": seqs, "point": point, "snapshot": snapshot,
                                     "started": time.time()})
    return [{"volume": vol.name, "seq": seqs[vol.name], "snapshot": snapshot,
             "bytes_written": finish_restore(vol)} for vol in vols]
