"""The sending end of peerlink: tails a volume's journal and ships it to one peer.

The sender never opens the volume (nbdkit holds its lock); it reads the journal files
with ``JournalTail`` as nbdkit appends to them.  Per connection:

1. Handshake (PROTOCOL.md).  The receiver's Hello says what it has committed
   (``last_applied_seq``); streaming resumes at the next seq, which the receiver checks.
2. A producer on one worker thread reads records from the resume seq on, feeds them to a
   ``BatchBuilder`` (coalescing, bounded in bytes and records), and closes a batch when it
   is full, when the journal has nothing new (the writer paused), or when the batch is
   ``linger`` old.  It encodes and compresses the frame (zstd, skipped for a while after
   a frame that did not pay) off the event loop.
3. The pump sends frames while fewer than ``window_bytes`` / ``window_batches`` are
   unacknowledged, awaiting the transport's drain (backpressure).  It wakes at once when
   the sync gate says a client waits for a seq (``want``: the nbdkit plugin tells it after
   each write) and then closes the batch at once (no linger); otherwise it polls the
   journal every few ms when idle (every ``SLOW_POLL`` while the plugin is notifying).
   Acks move the window; the acked seq is persisted in ``volumes/<V>/peers/<peer>.json``
   (for journal release and status), at most every ``PERSIST_INTERVAL``.
4. Any link error ends the connection; the sender reconnects with bounded exponential
   backoff and resumes from the receiver's word, so nothing is skipped or sent twice
   into the replica (the receiver refuses a batch out of sequence).

Resync (decided at the handshake, ``plan_resync``): the streaming position is fixed at the
journal's end S0, the extents are announced and sent, allocated bytes as data and holes
empty (``ExtentData``, read after S0 was fixed: the store is written before the journal,
so it holds every record up to S0), then ``ResyncDone(S1)`` with S1 the journal's end
after the last read, then batches from S0 + 1.  Batches re-apply what the extent reads
may already have seen, which converges; the replica is Inconsistent until it has applied
through S1.  Which extents:

- *dirty* (DESIGN.md §4 and 2): the peer's dirty sets (``peers/<peer>.dirty-*.json``,
  written by the volume when it released records the peer had not acked, and by recovery
  with the hot extents of an unclean restart) plus the extents touched by the retained
  records after the replica's seq (they are skipped, not streamed: replaying records older
  than the extent data could roll back hot extents).  Used when sets exist and, if the
  journal was released past the replica, they account for every released record.
- *full*: every extent, when the released records are not all accounted for (a new
  replica, a peer unknown when they were released, a replica older than its sender's ack).
- *compare* (DESIGN.md §5): the peer follows an older generation than this node (the
  primary before a failover or a switchover, or a replica of it).  Its seq numbers belong
  to another node's journal and mean nothing here, and it may hold writes this node never
  had.  Both stores are compared by digest (``Verify`` requests before ``ResyncExtents``,
  extents of the dirty-set size: 64 KiB up to 64 GiB volumes; holes hashed unread): the
  extents that differ are exactly those changed on either side since the last common
  point, and only they are sent.  Digests are read
  after S0 was fixed, like extent data, so the batches from S0 + 1 converge the same way.

The dirty sets a resync covered are deleted once the replica acknowledged it durably; sets
that appear while streaming end the session, so the next handshake resyncs them.

Bandwidth cap (``rate_limit``, bytes/s, 0 = none): one ``TokenBucket`` per sender (per
peer), kept across sessions, is debited with the wire bytes of every batch and resync frame
(after compression) and the pump sleeps what it says before writing the frame.  Pings and
handshake messages are not counted (a few bytes; they keep the link alive while it waits).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import os
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import msgpack
import structlog

from blockstore.errors import BlockstoreError, FormatError
from blockstore.generations import (
    History,
    Relation,
    describe_fork,
    is_split_brain,
    load_history,
    own_generation_after,
    settle_commands,
)
from blockstore.journal import (
    JournalTail,
    journal_bounds,
    retained_extents,
)
from blockstore.marks import COMMIT_EVENT
from blockstore.meta import read_json, write_json
from blockstore.modes import make_dir
from blockstore.node_state import EpochFloor
from blockstore.peers import (
    DIRTY_RELEASED,
    DIRTY_VERIFY,
    PEER_KIND,
    PEER_VERSION,
    clear_refused,
    covers,
    dirty_shift,
    read_dirty,
    rescale,
    write_dirty,
    write_refused,
)
from blockstore.record import (
    REC_HEADER_SIZE,
    Op,
    RecordHeader,
)
from blockstore.resync_plan import ResyncPlan, plan_resync
from blockstore.store import Store, extent_digest
from blockstore.volume import (
    Volume,
    find_volume,
    is_replica,
    read_resync,
)

from . import admin
from .auth import make_nonce
from .batch import BatchBuilder, payload_bytes
from .errors import PeerlinkError, PeerRefused
from .frames import encode_frame
from .front import connect_routed, preamble
from .handshake import replica_history
from .link import Link, LinkClosed, LinkTimeout, Refused, format_addr, is_compressed, session_ended
from .messages import (
    MAX_BATCH_RECORDS,
    MAX_REASON,
    PROTO_VERSION,
    Ack,
    ExtentData,
    Hello,
    Ping,
    Pong,
    Refuse,
    ResyncDone,
    ResyncExtents,
    Verify,
    VerifyResult,
)
from .ratelimit import RateSchedule, TokenBucket, format_rate
from .session import (
    Authenticated,
    Established,
    Output,
    PlanResync,
    Refusal,
    Send,
    SenderSession,
    from_wire,
    wire_epochs,
    wire_generations,
)
from .syncstate import Standing, SyncEvent, SyncStanding

log = structlog.get_logger(component="peerlink")

PERSIST_INTERVAL: Final = 0.05
RESYNC_PIECE: Final = 1 << 20
HOLE_PIECE: Final = 1 << 31  # zeros are sent empty; ExtentData.length is a u32
# After the last extent is read, writes whose store write it saw may still be appending
# their journal record; ResyncDone's seq is taken this long after, so it covers them.
RESYNC_SETTLE: Final = 0.05
COMPRESS_SKIP: Final = 16  # frames sent raw after one whose compression did not pay
DIRTY_POLL: Final = 0.5  # how often a streaming session looks for new dirty sets
PLAN_RETRIES: Final = 3  # re-plans of a resync when the journal was released meanwhile
LIVE_INTERVAL: Final = 1.0  # how often peers/<peer>.live.json is rewritten
LIVE_KIND: Final = "peer-live"
LIVE_VERSION: Final = 1
GROUP_BATCH_MAX: Final = 64 << 20  # frame body limit: one commit group always fits
SEEN_SAMPLE: Final = 0.05
VERIFY_SHIFT: Final = 20  # online verify compares 1 MiB extents
VERIFY_CHUNK: Final = 256  # extents per Verify message
COMPARE_CHUNK: Final = 1024  # extents per Verify message of a compare resync (64 KiB each)
VERIFY_ROUNDS: Final = 5  # re-checks of extents written while they were compared
VERIFY_TIMEOUT: Final = 120.0  # seconds between samples of (journal end, time first seen)
SYNC_TICK: Final = 0.05  # how often a sync peer's standing is checked (stall, recovery)
PERMISSION_POLL: Final = 0.1  # how often a stalled peer's permission to degrade is read
SLOW_POLL: Final = 0.1  # idle journal poll while the plugin notifies writes (a fallback)
NOTIFY_TRUST: Final = 1.0  # ... for this long after its last notification
INLINE_READ: Final = 256 << 10  # journal bytes a step reads on the event loop (a waiter)
INLINE_RECORDS: Final = 256  # ... when the records waited for are at most this many ahead


@dataclass(frozen=True)
class SenderConfig:
    """Tuning of one sender (every value has a reason; see the module docstring)."""

    timeout: float = 15.0  # liveness: no complete frame for this long drops the link
    ping_interval: float = 2.0
    batch_bytes: int = 4 << 20
    batch_records: int = 16384
    linger: float = 0.01  # close a batch this long after its first record
    poll_min: float = 0.002  # journal poll period when records keep coming
    poll_max: float = 0.01  # ... and when idle
    read_bytes: int = 8 << 20  # journal bytes read per producer step
    window_bytes: int = 32 << 20
    window_batches: int = 64
    compress: int = 3  # zstd level; 0 = never
    min_backoff: float = 0.1
    max_backoff: float = 10.0
    rate_limit: int = 0  # bytes per second on the wire, 0 = unlimited
    rate_burst: int | None = None  # None: ratelimit.default_burst(rate_limit)
    rate_schedule: RateSchedule | None = None  # caps by local time (rate_limit outside)
    sync: bool = False  # a synchronous peer: every write waits for its ack (syncstate.py)
    sync_timeout: float = 5.0  # ... until it is overdue this long: then it is stalled


@dataclass(frozen=True)
class Frame:
    """One encoded Batch, ready for the wire."""

    first_seq: int
    last_seq: int
    bufs: list[bytes | memoryview]
    wire_bytes: int
    data_bytes: int
    compressed: bool


class VerifyError(PeerlinkError):
    """Online verify could not run or was cut short (the message says why)."""


class SourceInconsistent(LinkClosed):
    """Cascade: the source replica is mid-resync; nothing can be shipped from it yet."""


class Compression:
    """zstd at ``level`` while it pays; after a frame where it did not, the next
    ``COMPRESS_SKIP`` frames go raw (random data costs CPU to try and saves nothing)."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.raw_frames = 0

    def frame(self, body: bytes) -> list[bytes | memoryview]:
        level = self.level if self.raw_frames == 0 else 0
        bufs = encode_frame(body, level)
        if level and not is_compressed(bufs):
            self.raw_frames = COMPRESS_SKIP
        elif self.raw_frames:
            self.raw_frames -= 1
        return bufs


class Producer:
    """Journal records in, encoded batch frames out (runs on the sender's worker thread).

    Not thread-safe: one producer per connection, all its steps on one thread.
    """

    def __init__(self, tail: JournalTail, volume: str, next_seq: int, cfg: SenderConfig,
                 limit: Callable[[], int | None] | None = None, epoch: int | None = None
                 ) -> None:
        self.tail = tail
        self.epoch = epoch  # the fencing token every batch carries
        self.cfg = cfg
        self.next_read = next_seq
        self.limit = limit
        self.group_read = cfg.read_bytes
        # With a limit (cascade), whole commit groups go into one batch: the bounds are
        # checked per group below, so the builder itself must never split one.
        self.builder = BatchBuilder(
            cfg.batch_bytes if limit is None else GROUP_BATCH_MAX,
            cfg.batch_records if limit is None else 1 << 30, volume=volume,
            next_seq=next_seq)
        self.started = 0.0  # when the open batch took its first record
        self.compression = Compression(cfg.compress)

    def _flush(self) -> Frame:
        batch = self.builder.build(self.epoch)
        self.started = 0.0
        bufs = self.compression.frame(batch.encode())
        return Frame(batch.first_seq, batch.last_seq, bufs, sum(len(b) for b in bufs),
                     payload_bytes(batch.records), is_compressed(bufs))

    def step(self, urgent: bool = False, budget: int | None = None,
             through: int | None = None) -> tuple[list[Frame], bool]:
        """Read what the journal has (up to ``budget``, default ``read_bytes``; with
        ``through``, no record past it); return the frames closed and whether more
        records are waiting (then the caller should not sleep).  ``urgent``: a client
        waits for a record not sent yet, so the open batch closes now."""
        out: list[Frame] = []
        if self.limit is not None:
            return self._step_groups(out)
        budget = budget or self.cfg.read_bytes
        recs: list[tuple[RecordHeader, bytes]] = self.tail.read(self.next_read, budget,
                                                                 through)
        for hdr, payload in recs:
            if not self.builder.add(hdr, payload):
                out.append(self._flush())
                if not self.builder.add(hdr, payload):
                    raise AssertionError("an empty batch builder refused a record")
            if self.started == 0.0:
                self.started = time.monotonic()
            self.next_read = hdr.seq + 1
        more = sum(REC_HEADER_SIZE + h.payload_len for h, _ in recs) >= budget
        if not self.builder.empty and (
                urgent or not recs or time.monotonic() - self.started >= self.cfg.linger
                or self.builder.size >= self.cfg.batch_bytes):
            out.append(self._flush())
        return out, more


    def _step_groups(self, out: list[Frame]) -> tuple[list[Frame], bool]:
        """Cascade: ship the source replica's journal through its last applied commit,
        one whole commit group (an upstream batch + its MARK) at a time."""
        assert self.limit is not None
        limit = self.limit()
        assert limit is not None
        more = False
        if limit >= self.next_read:
            start = self.next_read
            recs = self.tail.read(self.next_read, self.group_read)
            group: list[tuple[RecordHeader, bytes]] = []
            gbytes = 0
            for hdr, payload in recs:
                if hdr.seq > limit:
                    break
                group.append((hdr, payload))
                gbytes += REC_HEADER_SIZE + len(payload)
                if hdr.op is not Op.MARK or not is_commit(payload):
                    continue
                if not self.builder.empty and (
                        self.builder.size + gbytes > self.cfg.batch_bytes
                        or len(self.builder) + len(group) > MAX_BATCH_RECORDS):
                    out.append(self._flush())
                for h, p in group:
                    if not self.builder.add(h, p):
                        raise AssertionError("a commit group did not fit an empty batch")
                if self.started == 0.0:
                    self.started = time.monotonic()
                self.next_read = hdr.seq + 1
                group, gbytes = [], 0
            more = bool(recs) and self.next_read <= limit
            # A group bigger than what was read: read more next time (never stall).
            self.group_read = (self.group_read * 2 if self.next_read == start and group
                               else self.cfg.read_bytes)
        if not self.builder.empty and (
                not more or time.monotonic() - self.started >= self.cfg.linger):
            out.append(self._flush())
        return out, more


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def is_commit(payload: bytes | memoryview) -> bool:
    """Is this MARK body a replica's commit MARK (the end of one upstream batch)?"""
    try:
        body = msgpack.unpackb(payload)
    except (ValueError, msgpack.ExtraData):
        return False
    return isinstance(body, dict) and body.get("event") == COMMIT_EVENT


class ExtentReader:
    """Reads the primary's store for a resync (read-only; nbdkit keeps writing it).

    A cursor over the byte ranges of the announced extents: ``next_pieces()`` returns the
    next ExtentData messages, about ``budget`` data bytes at most per call.  Data is sent
    in pieces of ``RESYNC_PIECE`` bytes; holes and all-zero pieces are sent empty (the
    receiver punches them: sparseness survives and zeros cost nothing on the wire).
    """

    def __init__(self, path: Path, size: int, shift: int, name: str, extents: list[int]
                 ) -> None:
        self.store = Store(str(path), size, readonly=True)
        self.size, self.name = size, name
        self.ranges: deque[tuple[int, int]] = deque()  # [start, end) of extent runs
        ext = 1 << shift
        for e in extents:
            a, b = e * ext, min((e + 1) * ext, size)
            if self.ranges and self.ranges[-1][1] == a:
                self.ranges[-1] = (self.ranges[-1][0], b)
            else:
                self.ranges.append((a, b))

    def close(self) -> None:
        self.store.close()

    def _next_data(self, pos: int, end: int) -> int:
        """The first allocated offset in [pos, end), or end."""
        try:
            return min(os.lseek(self.store.fd, pos, os.SEEK_DATA), end)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            return end  # nothing allocated after pos

    def next_pieces(self, budget: int = 4 * RESYNC_PIECE) -> list[ExtentData]:
        """The next pieces in offset order; an empty list at the end.

        A hole is one empty piece up to the next allocated byte; data is read in whole
        ``RESYNC_PIECE`` pieces from the first allocated byte (small holes inside read as
        zeros: fewer, larger pieces), and a piece that is all zeros is sent empty."""
        out: list[ExtentData] = []
        spent = 0
        while self.ranges and spent < budget:
            start, end = self.ranges[0]
            data_at = self._next_data(start, end)
            if data_at > start:
                n = min(data_at - start, HOLE_PIECE)
                out.append(ExtentData(self.name, start, n, b""))
            else:
                n = min(RESYNC_PIECE, end - start)
                data = os.pread(self.store.fd, n, start)
                if len(data) != n:
                    raise OSError(errno.EIO, f"short read of the store at {start}")
                spent += n
                out.append(ExtentData(self.name, start, n, data if data.strip(b"\0") else b""))
            if start + n >= end:
                self.ranges.popleft()
            else:
                self.ranges[0] = (start + n, end)
        return out


class Sender:
    """Ship volume ``name``'s journal to peer ``peer`` at host:port, reconnecting forever."""

    epoch: int | None = None  # this node's failover epoch, read at each handshake

    def __init__(self, data_dir: Path, name: str, *, node: str, peer: str, host: str,
                 port: int, secret: bytes | None = None, next_secret: bytes | None = None,
                 config: SenderConfig | None = None, tls: ssl.SSLContext | None = None,
                 source: Volume | None = None,
                 outdated: Callable[[], set[str]] | None = None,
                 route: str | None = None) -> None:
        self.cfg = config or SenderConfig()
        # Sync mode: ``outdated`` reads the peers the daemon has had outdated (permission
        # to degrade a stalled peer); None: no failover core, degrade after sync_timeout.
        self.outdated = outdated
        # Cascade: ``source`` is this process's replica Volume (its receiver applies
        # batches to it).  Its journal holds each upstream batch as records + a commit
        # MARK, written *before* the store: only records through ``applied_seq`` (a
        # commit whose store apply finished) may be shipped or resynced from, whole
        # commit groups at a time, and nothing while it is Inconsistent (mid-resync).
        self.source = source
        self.role = "secondary" if source is not None else "primary"
        # ``route``: the peer's end is its node's shared port (front.py): open with the
        # route preamble naming this group, and prove the session for it.  None: a port
        # of the group's own.
        self.tls, self.route = tls, route
        self.info = find_volume(Path(data_dir), name)
        if source is None and is_replica(self.info):
            raise PeerlinkError(
                f"volume {name} is a replica: its journal holds uncommitted records; "
                "cascade it with `nbdgw replicate` (topology: cascade), which ships only "
                "committed batches")
        self.name = name
        self.node = node
        self.peer = peer
        self.host, self.port = host, port
        self.secret = secret
        self.next_secret = next_secret  # accepted besides secret during a rotation
        self.journal_dir = self.info.path / "journal"
        self.tail = JournalTail(self.journal_dir, uuid.UUID(self.info.uuid).bytes)
        self.peer_path = self.info.path / "peers" / f"{peer}.json"
        self.acked = self._load_acked()
        self._persisted = self.acked if self.peer_path.exists() else -1
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peerlink-read")
        # The connection's protocol state (handshake, window, verify tokens); None
        # between connections.
        self.session: SenderSession | None = None
        self.room = asyncio.Event()
        self.acked_event = asyncio.Event()
        self.sent_through = self.acked
        self.settles: list[Path] = []  # dirty sets to delete once the resync is durable
        self.floor = 0  # the session's streaming starts after this seq
        self.seen_dirty: set[str] = set()  # dirty sets this session accounted for
        self.bucket = TokenBucket(self.cfg.rate_limit, self.cfg.rate_burst)
        self.stats = {"batches": 0, "wire_bytes": 0, "data_bytes": 0, "sessions": 0}
        self.log = log.bind(volume=name, side="sender", node=node, peer=peer)
        # Live state (status, sync mode).  ``state``: disconnected, resync, initial-sync,
        # streaming.  ``seen``: (journal seq, wall time first seen) samples, for lag in
        # seconds: how long the oldest write the peer has not acknowledged has waited.
        self.state = "disconnected"
        self.state_since = time.time()
        self.journal_seen = self.acked
        self.seen: deque[tuple[int, float]] = deque()
        self.live_path = self.info.path / "peers" / f"{peer}.live.json"
        self.degraded: str | None = None  # why a sync peer is treated as async now
        self.degraded_at = 0.0
        # Sync mode: the peer's standing (syncstate.py), why it stalled, and since when
        # the link is in its state (monotonic).
        self.standing = SyncStanding(self.cfg.sync_timeout) if self.cfg.sync else None
        self.stall_why: str | None = None
        self.state_mono = time.monotonic()
        # The sync gate: the highest seq a client waits for and when the plugin last said
        # so, the pump's wake-up (flag, future), and who to tell when this peer's acks or
        # standing move.
        self.want_seq, self.notified_at = 0, -NOTIFY_TRUST
        self.woken, self.wakeup = False, cast("asyncio.Future[None] | None", None)
        self.on_change: Callable[[], None] | None = None
        self.live_event = asyncio.Event()
        self.verify_queue: deque[tuple[int, Verify]] = deque()  # (send after seq, request)
        self.verify_waiters: dict[int, asyncio.Future[VerifyResult]] = {}
        self.verify_token = 0
        # Long work under way (compare, resync): {"phase", "done", "total", "unit"}.
        self.progress: dict[str, Any] | None = None
        # What an operator asked of this link (peerlink/admin.py): active, paused,
        # disconnected.  ``admin_changed`` wakes whatever waits on it.
        self.admin = admin.state_of(Path(data_dir), peer)
        self.admin_changed = asyncio.Event()

    def _bounds(self) -> tuple[int, int]:
        """(first retained, last shippable) seq of the journal (worker thread)."""
        first, last = journal_bounds(self.journal_dir)
        if self.source is not None:
            last = min(last, self.source.applied_seq)
        return first, last

    def _fork_candidates(self, history: History, theirs: Hello, shift: int, last: int
                         ) -> list[int] | None:
        """The extents that may differ from a peer on the generation this node superseded
        (worker thread): the peer's own changes since the fork (``Hello.changed``, a
        demoted primary's account) and this node's, which are the records of its journal
        since it started its generation, its dirty sets for the peer and resync.json.
        None when either side cannot tell: then every extent is compared.  Also after a
        fork this node won (``own_generation_after`` finds none): the two generations
        after the common one started from different states of it, which neither journal
        accounts for."""
        if theirs.changed is None or not theirs.generations:
            return None
        own = own_generation_after(history, from_wire(theirs.generations, theirs.epochs)[-1])
        res = read_resync(self.info)
        if own is None or res["full"]:
            return None
        try:
            first, _ = journal_bounds(self.journal_dir)
            sets = read_dirty(self.info, self.peer)
            if own.start_seq < first and not covers(sets, own.start_seq - 1, first):
                return None
            out = retained_extents(self.journal_dir, max(own.start_seq, first), last, shift)
        except (FormatError, FileNotFoundError):
            return None
        for d_shift, extents in [(d.extent_shift, d.extents) for d in sets] + [
                (int(res["extent_shift"]), tuple(res["extents"])), theirs.changed]:
            out |= rescale(extents, d_shift, shift, self.info.size)
        return sorted(out)

    def _history(self) -> History:
        """This volume's generation history: its own, or a cascade source's (adopted
        from its upstream by the receiver)."""
        if self.source is not None:
            return replica_history(self.info)
        return load_history(self.info.path, self.info.uuid)

    def _limit(self) -> int | None:
        """The last seq a producer may read now; None: no limit (a primary's journal)."""
        if self.source is None:
            return None
        if self.source.inconsistent:
            return -1  # nothing while the source replica is mid-resync
        return self.source.applied_seq

    # -- online verify ------------------------------------------------------------------------

    def _digests(self, extents: list[int], shift: int, settle: bool = True
                 ) -> tuple[int, list[bytes], int]:
        """(journal end before, digests, journal end after) of this node's store (worker
        thread).  Every record up to the first end is in the store (a primary writes
        the store before the journal; a cascade source is bounded by its applied seq).
        ``settle``: wait for records of writes seen in the store (verify needs the end
        after; a compare resync does not: it streams from a point fixed before)."""
        _, before = self._bounds()
        fd = os.open(self.info.path / "store", os.O_RDONLY)
        try:
            digests = [extent_digest(fd, e << shift, 1 << shift, self.info.size)
                       for e in extents]
        finally:
            os.close(fd)
        if settle:
            time.sleep(RESYNC_SETTLE)  # writes whose store write we saw append their record
        _, after = self._bounds()
        return before, digests, after

    async def verify(self, resync: bool = True) -> dict[str, Any]:
        """Compare per-extent digests with the replica while writes go on (DESIGN.md §3: no
        silent divergence).  An extent written while it was being compared (a journal
        record between this side's reading and the replica's) proves nothing and is
        compared again, up to VERIFY_ROUNDS times.  Differing extents are written as a
        dirty set (reason "verify") when ``resync``: the session restarts and resyncs
        exactly them.  Raises VerifyError when the peer is not streaming."""
        if self.state != "streaming":
            raise VerifyError(f"peer {self.peer!r} of volume {self.name!r} is {self.state}, "
                              "not streaming: verify compares a streaming replica")
        loop = asyncio.get_running_loop()
        shift = VERIFY_SHIFT
        count = ((self.info.size - 1) >> shift) + 1
        pending = list(range(count))
        differing: list[int] = []
        t0 = time.monotonic()
        rounds = 0
        self.log.info("verify_started", extents=count, extent_bytes=1 << shift)
        while pending and rounds < VERIFY_ROUNDS:
            rounds += 1
            retry: list[int] = []
            for i in range(0, len(pending), VERIFY_CHUNK):
                chunk = pending[i:i + VERIFY_CHUNK]
                before, digests, after = await loop.run_in_executor(
                    self.executor, self._digests, chunk, shift)
                if self.state != "streaming":
                    raise VerifyError(f"peer {self.peer!r} stopped streaming during verify "
                                      f"({self.state}); run it again")
                self.verify_token += 1
                token = self.verify_token
                fut: asyncio.Future[VerifyResult] = loop.create_future()
                self.verify_waiters[token] = fut
                self.verify_queue.append((after, Verify(self.name, token, after, shift,
                                                        tuple(chunk), tuple(digests))))
                try:
                    result = await asyncio.wait_for(fut, VERIFY_TIMEOUT)
                except TimeoutError:
                    raise VerifyError(f"no verify result from {self.peer!r} within "
                                      f"{VERIFY_TIMEOUT:g} s") from None
                try:
                    busy = await loop.run_in_executor(
                        self.executor, retained_extents, self.journal_dir, before + 1,
                        max(after, result.applied_seq), shift)
                except (FormatError, FileNotFoundError):
                    busy = set(chunk)
                for e in result.differing:
                    (retry if e in busy else differing).append(e)
            pending = retry
        report = {"volume": self.name, "peer": self.peer, "extents": count,
                  "extent_bytes": 1 << shift, "differing": sorted(differing),
                  "unverified": sorted(pending), "rounds": rounds,
                  "seconds": round(time.monotonic() - t0, 3), "resync": False}
        if differing and resync:
            await loop.run_in_executor(None, lambda: write_dirty(
                self.info, self.peer, reason=DIRTY_VERIFY, from_seq=self.acked + 1,
                through_seq=self.acked + 1, shift=shift, extents=sorted(differing)))
            report["resync"] = True
        self.log.info("verify_done", **{k: v for k, v in report.items()
                                        if k not in ("differing", "unverified")},
                      differing=len(differing), unverified=len(pending))
        return report

    # -- the persisted ack ------------------------------------------------------------------

    def _load_acked(self) -> int:
        if not self.peer_path.exists():
            return 0
        meta = read_json(self.peer_path, PEER_KIND, PEER_VERSION)
        if meta.get("volume_uuid") != self.info.uuid:
            return 0  # a record of another incarnation of this volume name
        return int(meta["acked_seq"])

    def _persist(self, seq: int) -> None:
        make_dir(self.peer_path.parent, exist_ok=True)
        write_json(self.peer_path, {
            "kind": PEER_KIND, "version": PEER_VERSION, "peer": self.peer,
            "volume": self.name, "volume_uuid": self.info.uuid, "acked_seq": seq,
            "address": format_addr(self.host, self.port), "updated": time.time()})

    async def _persister(self) -> None:
        """Write the acked seq when it moved, at most every PERSIST_INTERVAL."""
        loop = asyncio.get_running_loop()
        while True:
            await self.acked_event.wait()
            self.acked_event.clear()
            seq = self.acked
            if seq != self._persisted:
                await loop.run_in_executor(None, self._persist, seq)
                self._persisted = seq
            await asyncio.sleep(PERSIST_INTERVAL)

    def _set_acked(self, seq: int) -> None:
        self.acked = seq
        self.acked_event.set()
        while self.seen and self.seen[0][0] <= seq:
            self.seen.popleft()
        st = self.standing
        if st is None:
            return
        st.acked(seq)
        if st.caught_up(seq, self.journal_seen, self.state == "streaming",
                        self.session is not None and bool(self.session.inflight)):
            st.fire(SyncEvent.CATCH_UP)
            self.log.warning("sync_resumed", acked_seq=seq,
                             degraded_for_s=round(time.time() - self.degraded_at, 1))
            self.degraded = None
            self.live_event.set()
        self._changed()

    # -- live state and sync mode -------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.state_since = time.time()
            self.state_mono = time.monotonic()
            self.live_event.set()

    def _saw(self, seq: int) -> None:
        """The journal holds records through ``seq`` (sampled for lag in seconds)."""
        if seq > self.journal_seen:
            now = time.time()
            if not self.seen or now - self.seen[-1][1] >= SEEN_SAMPLE:
                self.seen.append((seq, now))
            else:
                self.seen[-1] = (seq, self.seen[-1][1])
            self.journal_seen = seq

    def lag_seconds(self) -> float:
        """How long the oldest record this peer has not acknowledged has been waiting."""
        if self.journal_seen <= self.acked or not self.seen:
            return 0.0
        return max(0.0, time.time() - self.seen[0][1])

    def live(self) -> dict[str, Any]:
        state = "degraded" if self.degraded is not None else self.state
        st = self.standing
        return {"kind": LIVE_KIND, "version": LIVE_VERSION, "peer": self.peer,
                "volume": self.name, "volume_uuid": self.info.uuid, "state": state,
                "link": self.state, "state_since": self.state_since,
                "mode": "sync" if self.cfg.sync else "async", "degraded": self.degraded,
                "sync": st.state.value if st is not None else None,
                "stalled_since": st.stalled_since if st is not None else None,
                "acked_seq": self.acked, "journal_seq": self.journal_seen,
                "lag_records": max(0, self.journal_seen - self.acked),
                "lag_seconds": round(self.lag_seconds(), 3),
                "address": format_addr(self.host, self.port), "pid": os.getpid(),
                "updated": time.time(), "stats": dict(self.stats),
                "progress": self.progress, "admin": self.admin,
                "rate_limit": self.bucket.rate}

    # -- the sync gate ------------------------------------------------------------------------

    @property
    def holds(self) -> bool:
        """Must acknowledgements to clients wait for this peer (a sync peer, ok or
        stalled)?"""
        return self.standing is not None and self.standing.holds

    def want(self, seq: int) -> None:
        """A client waits for ``seq`` (the plugin wrote it): ship it at once, and for a
        sync peer time its acknowledgement."""
        now = time.monotonic()
        self.want_seq = max(self.want_seq, seq)
        self.notified_at = now
        self.woken = True
        if self.wakeup is not None:
            _settle(self.wakeup)
        if self.standing is not None:
            self.standing.want(seq, self.acked, now)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _degrade(self, why: str) -> None:
        """Permission given: stop holding waiters until the peer has caught up."""
        assert self.standing is not None
        self.standing.fire(SyncEvent.PERMIT)
        self.degraded = why
        self.degraded_at = time.time()
        self.live_event.set()
        self.log.error("sync_degraded", reason=why, acked_seq=self.acked,
                       journal_seq=self.journal_seen,
                       note="writes are acknowledged without this peer until it catches up")
        self._changed()

    async def _sync_watch(self) -> None:
        """A sync peer's standing (peerlink/syncstate.py): overdue for sync_timeout ->
        stalled; stalled -> degraded only once permitted (the daemon listed the peer in
        outdated.json), or at once without a failover core (``outdated`` is None)."""
        st = self.standing
        assert st is not None
        loop = asyncio.get_running_loop()
        checked = 0.0
        while True:
            await asyncio.sleep(SYNC_TICK)
            now = time.monotonic()
            down = self.state_mono if self.state == "disconnected" else None
            why = st.overdue(now, down)
            if st.state is Standing.OK and why is not None:
                st.fire(SyncEvent.STALL, time.time())
                self.stall_why = why
                self.live_event.set()
                self.log.error("sync_stalled", reason=why, acked_seq=self.acked,
                               journal_seq=self.journal_seen,
                               note="writes wait for this peer until it answers or the "
                                    "daemon has it outdated" if self.outdated is not None
                               else "failover.auto is off (no failover core to outdate "
                                    "the peer): degrading after sync_timeout on its own")
            if st.state is not Standing.STALLED:
                continue
            if why is None and self.state == "streaming":
                st.fire(SyncEvent.RECOVER)
                self.live_event.set()
                self.log.warning("sync_unstalled", acked_seq=self.acked)
                self._changed()
            elif self.outdated is None:
                self._degrade(f"{self.stall_why}; no failover core (failover.auto off): "
                              "degraded without the witness's permission")
            elif now - checked >= PERMISSION_POLL:
                checked = now
                try:
                    outdated = await loop.run_in_executor(None, self.outdated)
                except (BlockstoreError, OSError, ValueError) as e:
                    self.log.warning("outdated_unreadable", error=str(e))
                    continue
                if self.peer in outdated and st.state is Standing.STALLED:
                    self._degrade(f"{self.stall_why}; outdated by the daemon (the witness "
                                  "recorded it: it cannot be promoted)")

    async def _live_writer(self) -> None:
        """Rewrite peers/<peer>.live.json every LIVE_INTERVAL; while no session reads the
        journal, sample its end here (lag in seconds grows while the peer is away)."""
        loop = asyncio.get_running_loop()
        while True:
            if self.state == "disconnected":
                with contextlib.suppress(BlockstoreError, OSError):
                    _, last = await loop.run_in_executor(None, journal_bounds,
                                                         self.journal_dir)
                    self._saw(last)
            self.live_event.clear()
            with contextlib.suppress(OSError):
                make_dir(self.live_path.parent, exist_ok=True)
                await loop.run_in_executor(None, write_json, self.live_path, self.live())
            # Not asyncio.wait_for: on 3.11 it swallows a cancel that races with the event
            # being set (as stopping does), and this loop would never end.
            waiter = loop.create_task(self.live_event.wait())
            try:
                await asyncio.wait([waiter], timeout=LIVE_INTERVAL)
            finally:
                waiter.cancel()

    # -- the reconnect loop -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, stream, and reconnect with backoff until ``stop`` is set."""
        persister = asyncio.get_running_loop().create_task(self._persister())
        live = asyncio.get_running_loop().create_task(self._live_writer())
        watch = (asyncio.get_running_loop().create_task(self._sync_watch())
                 if self.standing is not None else None)
        backoff = self.cfg.min_backoff
        schedule = self.cfg.rate_schedule
        if schedule is not None:
            self._apply_schedule(schedule)
        self.log.info("rate_limit", bytes_per_s=self.bucket.rate,
                      burst_bytes=0 if self.bucket.unlimited else self.bucket.burst,
                      rate=format_rate(self.bucket.rate))
        scheduler = (asyncio.get_running_loop().create_task(self._follow_schedule(schedule))
                     if schedule is not None else None)
        try:
            while not stop.is_set():
                if self.admin == "disconnected":
                    self._set_state("disconnected")
                    self.log.warning("link_disconnected_by_operator")
                    await self._until_admin_changes(stop)
                    continue
                acked_before, t0 = self.acked, time.monotonic()
                try:
                    await self._session(stop)
                except (PeerlinkError, BlockstoreError, OSError) as e:
                    if not session_ended(self.log, e):
                        raise
                if stop.is_set():
                    break
                if self.acked > acked_before or time.monotonic() - t0 > 10 * backoff:
                    backoff = self.cfg.min_backoff  # it worked for a while: retry soon
                self.log.info("reconnecting", delay=round(backoff, 3), acked_seq=self.acked)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, self.cfg.max_backoff)
        finally:
            helpers = [persister, live, *(t for t in (watch, scheduler) if t is not None)]
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            self._set_state("disconnected")
            with contextlib.suppress(OSError):
                write_json(self.live_path, {**self.live(), "state": "stopped"})
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self.executor.shutdown, True)
            self.tail.close()
            if self.acked != self._persisted:
                await loop.run_in_executor(None, self._persist, self.acked)
                self._persisted = self.acked if self.peer_path.exists() else -1
            self.log.info("stopped", acked_seq=self.acked, **self.stats)

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> tuple[Any, Link]:
        """The connection, TLS and all; on a shared port, after the route preamble (in
        plaintext: the group's name is not secret, SECURITY.md)."""
        if self.route is None:
            return await loop.create_connection(Link, self.host, self.port, ssl=self.tls)
        sock = await loop.run_in_executor(None, connect_routed, self.host, self.port,
                                          self.cfg.timeout, preamble(self.route))
        try:
            return await loop.create_connection(
                Link, sock=sock, ssl=self.tls,
                server_hostname=self.host if self.tls is not None else None)
        except BaseException:
            sock.close()
            raise

    async def _session(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        t = self.cfg.timeout
        try:
            _, link = await asyncio.wait_for(self._connect(loop), t)
        except TimeoutError:
            raise LinkTimeout(f"connect to {format_addr(self.host, self.port)} timed out "
                              f"after {t:g} s") from None
        self.stats["sessions"] += 1
        try:
            try:
                resume, plan = await self._handshake(link, loop)
            except (Refused, PeerRefused) as e:
                await loop.run_in_executor(None, self._record_refusal, e)
                raise
            await loop.run_in_executor(None, clear_refused, self.info, self.peer)
            self._set_state("streaming" if plan is None else
                            "initial-sync" if plan.kind == "full" else "resync")
            await self._stream(link, resume, plan, stop)
        finally:
            self._set_state("disconnected")
            self.verify_queue.clear()
            for fut in self.verify_waiters.values():
                if not fut.done():
                    fut.set_exception(VerifyError("the link to the peer went down during "
                                                  "verify; run it again"))
            self.verify_waiters.clear()
            link.release(LinkClosed("session ended"))
            self.session = None
            self.settles = []

    def _record_refusal(self, e: Refused | PeerRefused) -> None:
        """A handshake refused either way: kept for `nbdgw status` (peers/<peer>.refused.json)
        until a handshake succeeds; a split brain with the commands that settle it."""
        split = is_split_brain(e.reason)
        write_refused(self.info, self.peer, side="sender",
                      by="this node" if isinstance(e, Refused) else "peer",
                      reason=e.reason, split_brain=split,
                      settle=settle_commands(self.node, self.peer) if split else None)
        if split:
            self.log.error("split_brain", reason=e.reason,
                           settle=[c["command"] for c in settle_commands(self.node, self.peer)])

    def _refuse(self, link: Link, reason: str, told: str | None = None) -> Refused:
        """Send the peer ``told`` (a code only, before it proved itself) or ``reason``,
        close, and return the error carrying the full reason (logged here)."""
        with contextlib.suppress(LinkClosed):
            link.send(Refuse((reason if told is None else told)[:MAX_REASON]))
        link.close()
        return Refused(reason)

    async def _plan(self, loop: asyncio.AbstractEventLoop, rel: Relation, theirs: Hello,
                    history: History, applied: int, first: int, last: int, fork: bool
                    ) -> tuple[ResyncPlan | None, int]:
        """The resync the peer needs before streaming (None: none), and the journal end
        the plan was made at."""
        plan = await loop.run_in_executor(self.executor, plan_resync, self.info, self.peer,
                                          applied, first, last)
        if rel is Relation.AHEAD:
            why = (describe_fork(self.name, self.node, history.generations, theirs.node,
                                 from_wire(theirs.generations, theirs.epochs)) if fork else
                   f"peer {theirs.node!r} is on generation "
                   f"{theirs.generations[-1].gen_id:016x}, older than this node's "
                   f"{history.current.gen_id:016x}")
            shift = dirty_shift(self.info.size)
            count = ((self.info.size - 1) >> shift) + 1
            cand = await loop.run_in_executor(self.executor, self._fork_candidates,
                                              history, theirs, shift, last)
            if cand is None:
                extents, why = list(range(count)), why + "; every extent compared"
            else:
                extents = cand
                why += (f"; {len(cand)} of {count} extents changed on either side since "
                        "the fork compared")
            return ResyncPlan("compare", shift, extents,
                              plan.settles if plan is not None else [], why), last
        for _ in range(PLAN_RETRIES):
            if plan is None or not plan.raced:
                break
            # The primary released segments between journal_bounds and the scan of the
            # retained records (it writes their dirty set first): with fresh bounds the
            # sets account for them, and a dirty resync is enough instead of a full one.
            first, last = await loop.run_in_executor(self.executor, self._bounds)
            plan = await loop.run_in_executor(self.executor, plan_resync, self.info,
                                              self.peer, applied, first, last)
        return plan, last

    async def _handshake(self, link: Link, loop: asyncio.AbstractEventLoop
                         ) -> tuple[int, ResyncPlan | None]:
        """The handshake (``SenderSession`` decides; this reads the journal and plans the
        resync it asks for).  Returns the resume seq and the plan."""
        t = self.cfg.timeout
        if self.source is not None and self.source.inconsistent:
            raise SourceInconsistent(
                f"volume {self.name}: this replica is Inconsistent (its own resync from "
                "upstream is running); cascading waits until it is Consistent")
        # volume.json again: the volume may have grown since the last session.
        self.info = await loop.run_in_executor(self.executor, find_volume,
                                               self.info.path.parent.parent, self.name)
        first, last = await loop.run_in_executor(self.executor, self._bounds)
        history = await loop.run_in_executor(self.executor, self._history)
        # The fencing token this session's batches carry: the epoch of the primary this
        # node serves or follows (its node core's, 0 without one), not the volume's
        # generation (a volume created after a promotion has one of epoch 0).
        self.epoch = await loop.run_in_executor(
            self.executor, EpochFloor(self.info.path.parent.parent).current)
        mine = Hello(PROTO_VERSION, self.node, self.name, history.logical_uuid, self.info.size,
                     self.role, wire_generations(history), last, make_nonce(),
                     epochs=wire_epochs(history))
        session = SenderSession(mine, history, peer=self.peer, secret=self.secret,
                                next_secret=self.next_secret, realm=self.route or "",
                                window_bytes=self.cfg.window_bytes,
                                window_batches=self.cfg.window_batches)
        self._perform(link, session.start())
        self._perform(link, session.receive(await link.recv_within(t, "Challenge")))
        # The receiver's Proof: checked before this node's Hello (its facts) goes out.
        self._perform(link, session.receive(await link.recv_within(t, "Proof")))
        ask = self._perform(link, session.receive(await link.recv_within(t, "Hello")))
        assert isinstance(ask, PlanResync)
        plan, last = await self._plan(loop, ask.rel, ask.theirs, history, ask.applied,
                                      first, last, ask.fork)
        self._perform(link, session.planned(plan is not None, last))
        est = self._perform(link, session.receive(await link.recv_within(t, "HelloOk")))
        assert isinstance(est, Established)
        resume, applied = est.resume, est.applied
        if applied < self.acked:
            self.log.warning("replica_behind_ack", acked_seq=self.acked, replica_seq=applied)
        self.session = session
        self._set_acked(applied)
        self.sent_through = applied
        self.floor = resume - 1
        self.seen_dirty = {p.name for p in plan.settles} if plan is not None else set()
        extra = {} if plan is None else {"kind": plan.kind, "extents": len(plan.extents),
                                         "extent_bytes": 1 << plan.shift, "why": plan.why}
        self.log.info("resync" if plan is not None else "streaming", resume_from=resume,
                      journal_first_seq=first, journal_last_seq=last, replica_seq=applied,
                      lag_records=last - applied, peer_addr=link.peername, **extra)
        return resume, plan

    def _perform(self, link: Link, outputs: list[Output]) -> Output | None:
        """Send what the session says; raise ``Refused`` where it refuses; return the
        output that asks the shell for more (a plan, the established stream)."""
        asked: Output | None = None
        for out in outputs:
            if isinstance(out, Send):
                link.send(out.msg)
            elif isinstance(out, Authenticated):
                link.authenticated()  # the receiver proved itself: lift the limits
            elif isinstance(out, Refusal):
                raise self._refuse(link, out.reason, out.told)
            else:
                asked = out
        return asked

    async def _stream(self, link: Link, resume: int, plan: ResyncPlan | None,
                      stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(c) for c in (
            self._pump(link, resume, plan), self._reader(link), self._pinger(link),
            self._dirty_watch(), link.watchdog(self.cfg.timeout), stop.wait(),
            self._admin_watch(stop))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if stop.is_set():
            return
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if link.error is not None:
            raise link.error
        raise LinkClosed("link ended")

    async def _compare(self, link: Link, plan: ResyncPlan) -> ResyncPlan:
        """The *compare* plan made concrete: the extents whose digests differ between
        this node's store and the peer's (module docstring)."""
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        self._set_state("comparing")
        differing: list[int] = []
        self.log.info("compare_started", extents=len(plan.extents),
                      extent_bytes=1 << plan.shift, why=plan.why)
        # Pipelined: this side digests the next chunk while the peer digests this one.
        pending: deque[asyncio.Future[VerifyResult]] = deque()
        done_extents = 0

        async def collect() -> None:
            nonlocal done_extents
            fut = pending.popleft()
            finished, _ = await asyncio.wait([fut], timeout=VERIFY_TIMEOUT)
            if not finished:
                raise LinkClosed(f"no digests from {self.peer!r} within {VERIFY_TIMEOUT:g} s")
            differing.extend(fut.result().differing)
            done_extents = min(len(plan.extents), done_extents + COMPARE_CHUNK)
            self.progress = {"phase": "compare", "done": done_extents,
                             "total": len(plan.extents), "unit": "extents"}

        for i in range(0, len(plan.extents), COMPARE_CHUNK):
            chunk = plan.extents[i:i + COMPARE_CHUNK]
            _, digests, after = await loop.run_in_executor(
                self.executor, self._digests, chunk, plan.shift, False)
            self.verify_token += 1
            fut: asyncio.Future[VerifyResult] = loop.create_future()
            self.verify_waiters[self.verify_token] = fut
            link.send(Verify(self.name, self.verify_token, after, plan.shift, tuple(chunk),
                             tuple(digests)))
            self._s.verify_sent(self.verify_token)
            pending.append(fut)
            if len(pending) > 1:
                await collect()
        while pending:
            await collect()
        why = (f"{plan.why}: {len(differing)} of {len(plan.extents)} extents differ")
        self.log.info("compare_done", extents=len(plan.extents), differing=len(differing),
                      seconds=round(time.monotonic() - t0, 3))
        self.stats["compared_extents"] = self.stats.get("compared_extents", 0) + len(
            plan.extents)
        return ResyncPlan("delta", plan.shift, sorted(differing), plan.settles, why)

    async def _resync(self, link: Link, resume: int, plan: ResyncPlan) -> None:
        """Send the plan's extents (holes empty), then ResyncDone (PROTOCOL.md)."""
        loop = asyncio.get_running_loop()
        if plan.kind == "compare":
            plan = await self._compare(link, plan)
            self._set_state("resync")
        t0 = time.monotonic()
        info = self.info
        extents = plan.extents
        reader = await loop.run_in_executor(self.executor, ExtentReader, info.path / "store",
                                            info.size, plan.shift, self.name, extents)
        sent = data = pieces = 0
        self.log.info("resync_started", kind=plan.kind, extents=len(extents),
                      extent_bytes=1 << plan.shift,
                      announced_bytes=min(len(extents) << plan.shift, info.size))
        link.send(ResyncExtents(self.name, plan.shift, tuple(extents)))
        compression = Compression(self.cfg.compress)

        def frames() -> list[tuple[list[bytes | memoryview], int, int]]:
            return [(compression.frame(m.encode()), len(m.data),
                     bisect.bisect_right(extents, (m.offset + m.length - 1) >> plan.shift))
                    for m in reader.next_pieces()]

        try:
            while batch := await loop.run_in_executor(self.executor, frames):
                for bufs, n, through in batch:
                    wire = sum(len(b) for b in bufs)
                    await self._throttle(wire)
                    link.send_frame(bufs)
                    sent += wire
                    data += n
                    pieces += 1
                    self.progress = {"phase": "resync", "done": through,
                                     "total": len(extents), "unit": "extents",
                                     "data_bytes": data}
                    await link.drain()
        finally:
            self.executor.submit(reader.close)  # after any read still running there
            self.progress = None
        await asyncio.sleep(RESYNC_SETTLE)
        _, done_seq = await loop.run_in_executor(self.executor, self._bounds)
        self._s.resync_sent(resume - 1)  # acked once the replica holds the extents durably
        self.settles = plan.settles
        link.send(ResyncDone(self.name, done_seq))
        self.stats["resync_wire_bytes"] = self.stats.get("resync_wire_bytes", 0) + sent
        self.log.info("resync_extents_sent", kind=plan.kind, extents=len(extents),
                      pieces=pieces, data_bytes=data, wire_bytes=sent,
                      volume_bytes=info.size, consistent_at=done_seq,
                      seconds=round(time.monotonic() - t0, 3))

    async def _pump(self, link: Link, resume: int, plan: ResyncPlan | None) -> None:
        loop = asyncio.get_running_loop()
        if plan is not None:
            await self._resync(link, resume, plan)
        producer = Producer(self.tail, self.name, resume, self.cfg, self._limit
                            if self.source is not None else None, epoch=self.epoch)
        session = self._s
        poll = self.cfg.poll_min
        while True:
            while self.admin == "paused":  # the link stays up; nothing more is shipped
                self._set_state("paused")
                await self._until_admin_changes(asyncio.Event())
            if self.state == "paused":
                self._set_state("streaming")
            while not session.room:
                self.room.clear()
                await self.room.wait()
            self.woken = False
            urgent = self.want_seq > self.sent_through
            if urgent and self.source is None and (
                    self.want_seq - self.sent_through <= INLINE_RECORDS):
                # A client waits for a few records: read, framed and sent right here (two
                # thread hops less on every synchronous write's round trip), and only
                # through the one waited for: it is written, so the end of the journal is
                # not probed (newer records come with their own ``want``, or by polling).
                frames, more = producer.step(True, INLINE_READ, self.want_seq)
            else:  # a backlog (catching up): read in large steps off the event loop
                frames, more = await loop.run_in_executor(self.executor, producer.step,
                                                          urgent)
            for f in frames:
                await self._throttle(f.wire_bytes)
                link.send_frame(f.bufs)
                session.sent(f.last_seq, f.wire_bytes)
                self.sent_through = f.last_seq
                self.stats["batches"] += 1
                self.stats["wire_bytes"] += f.wire_bytes
                self.stats["data_bytes"] += f.data_bytes
                await link.drain()
            self._saw(producer.next_read - 1)
            while self.verify_queue and self.verify_queue[0][0] <= self.sent_through:
                request = self.verify_queue.popleft()[1]
                link.send(request)
                session.verify_sent(request.token)
            poll = self.cfg.poll_min if frames or more else min(poll * 2, self.cfg.poll_max)
            if not more and not self.woken:
                notified = time.monotonic() - self.notified_at < NOTIFY_TRUST
                await self._idle(max(poll, SLOW_POLL) if notified else poll)

    def set_admin(self, state: str) -> None:
        """An operator paused, resumed, disconnected or connected this link."""
        if state != self.admin:
            self.log.warning("link_admin", state=state, old=self.admin)
            self.admin = state
            self.admin_changed.set()
            self.live_event.set()

    async def _until_admin_changes(self, stop: asyncio.Event) -> None:
        self.admin_changed.clear()
        waiters = [asyncio.ensure_future(self.admin_changed.wait()),
                   asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _admin_watch(self, stop: asyncio.Event) -> None:
        """End the session when the link is disconnected by an operator."""
        while self.admin != "disconnected":
            await self._until_admin_changes(stop)
            if stop.is_set():
                return
        raise LinkClosed("disconnected by an operator")

    async def _idle(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if ``want`` wakes the pump."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self.wakeup = fut
        timer = loop.call_later(seconds, _settle, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self.wakeup = None

    def _apply_schedule(self, schedule: RateSchedule) -> bool:
        """The cap of the window local time is in now; True if it changed."""
        t = time.localtime()
        rate = schedule.rate_at(t.tm_wday, t.tm_hour * 60 + t.tm_min)
        if rate == self.bucket.rate:
            return False
        self.bucket.set_rate(rate)
        return True

    async def _follow_schedule(self, schedule: RateSchedule) -> None:
        """Re-check the schedule at every minute boundary of local time (so a clock or
        time-zone change is followed within a minute)."""
        while True:
            await asyncio.sleep(60.05 - time.time() % 60)
            if self._apply_schedule(schedule):
                self.log.info("rate_limit", bytes_per_s=self.bucket.rate, scheduled=True,
                              burst_bytes=0 if self.bucket.unlimited else self.bucket.burst,
                              rate=format_rate(self.bucket.rate))
                self.live_event.set()

    async def _throttle(self, wire_bytes: int) -> None:
        """Wait until the bandwidth cap allows ``wire_bytes`` more on the link."""
        delay = self.bucket.take(wire_bytes)
        if delay > 0:
            self.stats["throttled_ms"] = self.stats.get("throttled_ms", 0) + round(delay * 1e3)
            await asyncio.sleep(delay)

    async def _reader(self, link: Link) -> None:
        while True:
            msg = await link.recv()
            if isinstance(msg, Pong):
                continue
            if isinstance(msg, Ack):
                self._on_ack(msg)
                continue
            if isinstance(msg, VerifyResult):
                self._s.on_verify_result(msg)
                fut = self.verify_waiters.pop(msg.token, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                continue
            self._s.receive(msg)  # raises: nothing else belongs on a stream

    @property
    def _s(self) -> SenderSession:
        assert self.session is not None, "no connection"
        return self.session

    def _on_ack(self, ack: Ack) -> None:
        seq, settled = self._s.on_ack(ack)
        if settled:
            # The resync is durable on the replica (the first Ack after ResyncDone; it may
            # repeat the replica's seq when the journal had nothing newer): the dirty sets
            # it covered are settled.
            self._set_state("streaming")
            for path in self.settles:
                path.unlink(missing_ok=True)
            if self.settles:
                self.log.info("dirty_sets_settled", count=len(self.settles))
            self.settles = []
        self._set_acked(seq)
        self.room.set()

    async def _dirty_watch(self) -> None:
        """End the session when a dirty set appears that this session does not account
        for (hot extents of a primary restart, records released past this peer's ack): the
        next handshake resyncs them.  Returns (ending the session) only then."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(DIRTY_POLL)
            sets = await loop.run_in_executor(None, read_dirty, self.info, self.peer)
            new = [d for d in sets if d.path.name not in self.seen_dirty and (
                d.reason != DIRTY_RELEASED or d.through_seq > max(self.acked, self.floor))]
            if new:
                self.log.info("dirty_extents_appeared", sets=len(new),
                              reasons=sorted({d.reason for d in new}),
                              extents=sum(len(d.extents) for d in new))
                raise LinkClosed("dirty extents to resync")

    async def _pinger(self, link: Link) -> None:
        while True:
            await asyncio.sleep(self.cfg.ping_interval)
            link.send(Ping(time.monotonic_ns()))
