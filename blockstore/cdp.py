"""Continuous data protection: the retention window, the time index, and point views
(DESIGN.md "CDP").

Layout under ``volumes/<V>/cdp/``::

    policy.json   the window and max_bytes this site keeps (written by the gateway)
    bases/        a SnapshotStore of this site's own bases (copy-on-write images of the
                  volume at a journal seq; never in the journal, so never replicated)
    exports.json  the point exports `nbdgw cdp export` made (served read-only)

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
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import structlog
from crc32c import crc32c

from .errors import BlockstoreError, FormatError, InvalidArgument
from .journal import segment_firsts, segment_name
from .marks import COMMIT_EVENT, GROW_EVENT, TIME_EVENT
from .meta import read_json, write_json
from .modes import make_dir
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
    bases' pre-images) this site keeps for CDP."""
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

    def close(self) -> None:
        self.bases.close()

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
            built = _build(vol.info.path / "journal", base, point, _base_size(base, vol.size))
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


class Overlay:
    """Non-overlapping byte ranges -> where their newest content is: (segment file
    index, position of the byte at the range's start) or None for zeros.  Kept per
    bucket of 2^shift bytes of the volume (a range crossing buckets is cut), so that an
    insert shifts the entries of one bucket only: one sorted list for the whole volume
    made opening an instant quadratic (1 GiB of 4 KiB records: 12.6 s, against 0.86 s
    for 256 MiB; bench/cdp).  1 MiB buckets: 1.4 s for that GiB (64 MiB ones: 1.8 s)."""

    def __init__(self, shift: int = 20) -> None:
        self.shift = shift
        self.buckets: dict[int, _Runs] = {}

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets.values())

    def put(self, start: int, end: int, src: tuple[int, int] | None) -> None:
        """[start, end) now reads from ``src`` (later puts win)."""
        shift = self.shift
        pos = start
        while pos < end:
            k = pos >> shift
            stop = min(end, (k + 1) << shift)
            runs = self.buckets.get(k)
            if runs is None:
                runs = self.buckets[k] = _Runs()
            runs.put(pos, stop, _advance(src, pos - start))
            pos = stop

    def covering(self, start: int, end: int) -> Iterator[tuple[int, int, tuple[int, int] | None]]:
        """The ranges (clipped) that overlap [start, end), in order."""
        if end <= start:
            return
        first, last = start >> self.shift, (end - 1) >> self.shift
        keys = (range(first, last + 1) if last - first < 4 * len(self.buckets) + 4
                else sorted(k for k in self.buckets if first <= k <= last))
        for k in keys:
            runs = self.buckets.get(k)
            if runs is not None:
                yield from runs.covering(start, end)


class _Runs:
    """One bucket of an Overlay: sorted, non-overlapping ranges."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.srcs: list[tuple[int, int] | None] = []

    def __len__(self) -> int:
        return len(self.starts)

    def put(self, start: int, end: int, src: tuple[int, int] | None) -> None:
        """[start, end) now reads from ``src`` (later puts win)."""
        if end <= start:
            return
        starts, ends, srcs = self.starts, self.ends, self.srcs
        i = bisect.bisect_right(starts, start) - 1
        new_s: list[int] = []
        new_e: list[int] = []
        new_src: list[tuple[int, int] | None] = []
        if i >= 0 and ends[i] > start:
            # A range that begins at or before ``start`` and reaches into it: keep its head.
            s0, e0, src0 = starts[i], ends[i], srcs[i]
            if s0 < start:
                new_s.append(s0)
                new_e.append(start)
                new_src.append(src0)
            lo = i
            if e0 > end:
                new_s.append(start)
                new_e.append(end)
                new_src.append(src)
                new_s.append(end)
                new_e.append(e0)
                new_src.append(_advance(src0, end - s0))
                starts[lo:lo + 1] = new_s
                ends[lo:lo + 1] = new_e
                srcs[lo:lo + 1] = new_src
                return
        else:
            lo = i + 1
        hi = bisect.bisect_left(starts, end, lo)
        # Ranges beginning inside [start, end): gone, except the tail of the last.
        if hi > lo and ends[hi - 1] > end and starts[hi - 1] >= start:
            s1, e1, src1 = starts[hi - 1], ends[hi - 1], srcs[hi - 1]
            tail = (end, e1, _advance(src1, end - s1))
        else:
            tail = None
        new_s.append(start)
        new_e.append(end)
        new_src.append(src)
        if tail is not None:
            new_s.append(tail[0])
            new_e.append(tail[1])
            new_src.append(tail[2])
        starts[lo:hi] = new_s
        ends[lo:hi] = new_e
        srcs[lo:hi] = new_src

    def covering(self, start: int, end: int) -> Iterator[tuple[int, int, tuple[int, int] | None]]:
        """The ranges (clipped) that overlap [start, end), in order."""
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        while i < len(self.starts) and self.starts[i] < end:
            s, e = max(self.starts[i], start), min(self.ends[i], end)
            if s < e:
                yield s, e, _advance(self.srcs[i], s - self.starts[i])
            i += 1


def _advance(src: tuple[int, int] | None, n: int) -> tuple[int, int] | None:
    return None if src is None else (src[0], src[1] + n)


@dataclass
class _Built:
    """What opening a point built: the overlay, the segment files it reads, the size."""

    overlay: Overlay
    fds: list[int]
    size: int
    refs: int = 0

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _build(jdir: Path, base: Snapshot, point: Point, base_size: int) -> _Built:
    """Scan the records after ``base`` up to ``point`` into an overlay."""
    built = _Built(Overlay(), [], base_size)
    try:
        firsts = segment_firsts(jdir)
        opened: dict[int, int] = {}  # segment first seq -> index in built.fds
        found = False
        for seq, op, _flags, offset, length, at, raw in scan(jdir, base.mark_seq + 1,
                                                             point.seq):
            if op == Op.MARK:
                body = _body(raw)
                if body.get("event") == GROW_EVENT:
                    built.size = max(built.size, int(body["size"]))
                found = seq == point.seq and body.get("event") in (TIME_EVENT, COMMIT_EVENT)
                continue
            first = firsts[bisect.bisect_right(firsts, seq) - 1]
            if first not in opened:
                built.fds.append(os.open(jdir / segment_name(first), os.O_RDONLY))
                opened[first] = len(built.fds) - 1
            if op == Op.WRITE:
                built.overlay.put(offset, offset + length, (opened[first], at))
            else:  # TRIM and ZERO read as zeros
                built.overlay.put(offset, offset + length, None)
        if not found and point.seq > base.mark_seq:
            raise CdpError(f"no point at seq {point.seq} (not a TIME mark)")
    except BaseException:
        built.close()
        raise
    return built


def _read_overlay(built: _Built, view: memoryview, offset: int, name: str) -> None:
    """Lay the records of a point's overlay over ``view`` (the base's bytes at
    ``offset``)."""
    for s, e, src in built.overlay.covering(offset, offset + len(view)):
        if src is None:
            view[s - offset:e - offset] = bytes(e - s)
            continue
        fd, pos = src
        got = os.preadv(built.fds[fd], [view[s - offset:e - offset]], pos)
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
        self.fds = built.fds
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
            self.built = _build(vol_path / "journal", base, point,
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
    return (vol_path / CDP_DIR / RESTORE_FILE).exists()


def finish_restore(vol: Volume) -> int:
    """Write, through the journal, every extent where the live volume differs from the
    point restore.json names; then drop the intent.  Return the bytes written."""
    cdp = vol.cdp
    assert cdp is not None and vol.store is not None and vol.journal is not None
    path = cdp.path / RESTORE_FILE
    intent = read_json(path, "cdp-restore", 1)
    seq = int(intent["seq"])
    view = open_point(vol, f"seq-{seq}")
    try:
        vol.mark({"event": RESTORE_EVENT, "seq": seq, "phase": "begin"})
        shift = cdp.bases.shift
        ext = 1 << shift
        changed = cdp.bases.index.changed_since(view.base.id)
        for s_, e_, _src in view.overlay.covering(0, vol.size):
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
    path.unlink()
    _log.warning("cdp_restored", volume=vol.name, seq=seq, snapshot=intent["snapshot"],
                 bytes_written=written)
    return written
