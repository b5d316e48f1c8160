"""The receiving end of peerlink: owns a replica volume and applies batches to it.

One ``Receiver`` per replica volume.  It listens; a sender connects and the handshake of
PROTOCOL.md runs (Hello both ways, ``check_hello``, HelloOk with HMAC proofs when a shared
secret is configured; this side proves itself only after the sender did).  Then each
``Batch`` is checked (``check_batch``: the next seq exactly, inside the volume) and handed
to one applier task, which runs ``Volume.apply_batches`` on a single worker thread (it ends
in an fdatasync) strictly in order and acknowledges the durable seq as soon as that
fdatasync returned (from the apply thread, before the store is written: the batch is
committed).  Batches that queued up while the previous fdatasync ran are applied
together, each with its own commit MARK but with one fdatasync and one Ack for all (group
commit: a sync sender ships each write at once, and its waiters are released by that one
Ack).

Invariants:
- One volume, one applier thread: batches are applied in stream order, never two at once.
- At most one session streams at a time.  A newly authenticated connection takes over:
  the old one is dropped and its in-flight apply finishes before the new one's resume
  point is checked against the volume (``check_resume``), so nothing is applied twice.
- A bad frame, a bad message or a batch out of sequence drops the connection; batches
  received but not yet applied are discarded (the sender resends them from the resume
  point), the one being applied completes (it was whole and checked).
- A failed apply (a full or failing disk) is fatal: the receiver stops without closing
  the volume cleanly, so the next open redoes the journal through the last commit.

A new replica carries its own uuid (``nbdgw volume create --replica``).  The first sender
that authenticates while the replica is still empty binds it to the upstream volume's
uuid (``peerlink-upstream.json`` next to volume.json); from then on any other uuid is
refused as "a different volume".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from blockstore.diverged import lost_writes, record_diverged
from blockstore.generations import Generation as BGeneration
from blockstore.generations import (
    History,
    Relation,
    common_generation,
    decide,
    describe_fork,
    diverged_name,
    load_history,
    save_history,
    settle_commands,
    unrelated_refusal,
)
from blockstore.meta import read_json, write_json
from blockstore.peers import (
    ADOPT_KEY,
    CHANGED_KEY,
    DIRTY_UPSTREAM,
    UPSTREAM_FILE,
    UPSTREAM_KIND,
    UPSTREAM_VERSION,
    clear_refused,
    known_peers,
    upstream_record,
    write_dirty,
    write_refused,
)
from blockstore.snapshot import MAX_SNAPSHOTS
from blockstore.volume import Volume

from .auth import Prover, Transcript, make_nonce, proof, verify
from .batch import check_batch, payload_bytes
from .errors import PeerAuthError, PeerlinkError, PeerProtocolError
from .handshake import expect, from_wire, wire_epochs, wire_generations
from .link import Link, LinkClosed, Refused, format_addr, session_ended
from .messages import (
    PROTO_VERSION,
    Ack,
    Batch,
    ExtentData,
    Hello,
    HelloOk,
    Message,
    Pong,
    Refuse,
    ResyncDone,
    ResyncExtents,
    Verify,
    VerifyResult,
    check_hello,
    check_resume,
)

log = structlog.get_logger(component="peerlink")

APPLY_QUEUE_BYTES: Final = 64 << 20  # received batches waiting for the applier
LIVE_FILE: Final = "upstream.live.json"  # volumes/<V>/: this replica's link, for status
LIVE_KIND: Final = "upstream-live"
LIVE_VERSION: Final = 1
LIVE_INTERVAL: Final = 1.0
GROUP_BYTES: Final = 16 << 20  # payload bytes of queued batches applied with one fdatasync


class ReceiverError(PeerlinkError):
    """Local trouble on the receiving node (not a replica, apply failed)."""


@dataclass(frozen=True)
class Verdict:
    """What this replica makes of a sender's history (``blockstore.generations.decide``
    from this side): ``rel`` SAME (stream), BEHIND (the sender is the sync source: a
    compare resync), AHEAD (the sender is stale), FORKED (a split brain), UNRELATED.
    ``fork``: the histories forked (then BEHIND means this copy lost: it keeps what only
    it had as a diverged snapshot first).  ``adopts``: an operator resolved a split
    brain for the sender's side."""

    rel: Relation
    fork: bool = False
    adopts: bool = False


async def wait_connected(link: Link, timeout: float) -> bool:
    """Wait for the transport (and TLS handshake) to come up; False if it never did."""
    try:
        # Bounded: a TLS handshake that fails never reports to the protocol at all.
        await asyncio.wait_for(asyncio.shield(link.connected), timeout)
    except (LinkClosed, TimeoutError):
        if not link.connected.done():
            link.abort(LinkClosed("TLS handshake did not complete"))
        link.connected.exception()  # retrieved: the reason is logged by the sender side
        return False
    return True


_Work = Batch | ResyncExtents | ExtentData | ResyncDone | Verify


@dataclass
class _Session:
    """One accepted connection that passed the handshake and streams batches.

    ``phase`` is "announce" (a resync begins: ResyncExtents must come first), "open"
    (either a resync or the first Batch), "extents" (ExtentData until ResyncDone) or
    "stream" (Batches from ``expect_seq``)."""

    link: Link
    node: str
    resume_from: int
    expect_seq: int
    phase: str = "stream"
    announced: frozenset[int] = frozenset()
    extent_shift: int = 0
    queue: asyncio.Queue[_Work | None] = field(default_factory=asyncio.Queue)
    queued_bytes: int = 0
    space: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    applied_batches: int = 0
    applied_bytes: int = 0
    history: History | None = None  # the sender's: adopted at bind and when a resync ends
    fork: History | None = None  # this copy's own history, when it lost a fork to the sender
    size: int = 0  # the volume's size once the batches admitted so far are applied
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)


class Receiver:
    """Listen for a sender and apply its batches to the replica volume ``name``."""

    def __init__(self, data_dir: Path, name: str, *, node: str, role: str = "secondary",
                 secret: bytes | None = None, timeout: float = 15.0,
                 tls: ssl.SSLContext | None = None) -> None:
        if role not in ("secondary", "dr"):
            raise ValueError(f"receiver role must be secondary or dr, got {role!r}")
        self.data_dir = Path(data_dir)
        self.name = name
        self.node = node
        self.role = role
        self.secret = secret
        self.timeout = timeout
        self.tls = tls
        self.vol = Volume.open(self.data_dir, name)  # takes the volume's lock
        if not self.vol.replica:
            self.vol.close()
            raise ReceiverError(
                f"volume {name} is not a replica (create it with 'nbdgw volume create "
                f"{name} --replica')")
        self.upstream_path = self.vol.info.path / UPSTREAM_FILE
        self.upstream: dict[str, Any] | None = (
            read_json(self.upstream_path, UPSTREAM_KIND, UPSTREAM_VERSION)
            if self.upstream_path.exists() else None)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peerlink-apply")
        self._gen_cache: BGeneration | None = None
        self.server: asyncio.AbstractServer | None = None
        self.active: _Session | None = None
        self.takeover = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()
        self.links: set[Link] = set()
        self.fatal: BaseException | None = None
        self.failed = asyncio.Event()  # set on a fatal error: the process should stop
        self.log = log.bind(volume=name, side="receiver", node=node)
        # What `nbdgw status` shows of this replica's link (upstream.live.json).
        self.received_seq = self.vol.upstream_seq  # the newest batch seen from upstream
        self.source: str | None = None
        self.source_since = time.time()
        self.live_path = self.vol.info.path / LIVE_FILE
        self.live_task: asyncio.Task[None] | None = None
        r = self.vol.recovery
        self.log.info("volume_opened", upstream_seq=self.vol.upstream_seq,
                      inconsistent=self.vol.inconsistent, unclean=r.unclean,
                      replayed=r.replayed, torn_bytes=r.torn_bytes,
                      bound_to=self.upstream["upstream_uuid"] if self.upstream else None)

    # -- listening and shutdown --------------------------------------------------------------

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (0 = any free port); return the address bound."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._accept, host, port, ssl=self.tls)
        self.live_task = loop.create_task(self._live_writer())
        sock = self.server.sockets[0].getsockname()
        self.log.info("listening", address=format_addr(sock[0], sock[1]))
        return str(sock[0]), int(sock[1])

    def live(self) -> dict[str, Any]:
        """This replica's link as `nbdgw status` shows it."""
        s = self.active
        if s is None:
            state = "waiting"
        elif s.phase in ("announce", "extents") or self.vol.inconsistent:
            state = "resync"
        else:
            state = "streaming"
        applied = self.vol.upstream_seq
        return {"kind": LIVE_KIND, "version": LIVE_VERSION, "volume": self.name,
                "source": self.source, "state": state, "since": self.source_since,
                "applied_seq": applied, "received_seq": max(self.received_seq, applied),
                "lag_records": max(0, self.received_seq - applied),
                "inconsistent": self.vol.inconsistent, "pid": os.getpid(),
                "updated": time.time()}

    async def _live_writer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(OSError):
                await loop.run_in_executor(None, write_json, self.live_path, self.live())
            await asyncio.sleep(LIVE_INTERVAL)

    def _accept(self) -> Link:
        link = Link()
        self.links.add(link)
        self.adopt(link)
        return link

    def adopt(self, link: Link, hello: Hello | None = None) -> None:
        """Serve ``link`` as one of this receiver's connections (``close`` waits for it)."""
        self.links.add(link)
        task = asyncio.get_running_loop().create_task(self._connection(link, hello))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        """Stop listening, drop every connection, let the in-flight apply finish, and
        close the volume cleanly (unless an apply failed: then recovery must redo)."""
        if self.server is not None:
            self.server.close()
        if self.live_task is not None:
            self.live_task.cancel()
            await asyncio.gather(self.live_task, return_exceptions=True)
            with contextlib.suppress(OSError):
                write_json(self.live_path, {**self.live(), "state": "stopped"})
        for link in list(self.links):
            link.abort(LinkClosed("receiver stopping"))
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.executor.shutdown(wait=True)
        if self.fatal is None:
            await asyncio.get_running_loop().run_in_executor(None, self.vol.close)
            self.log.info("volume_closed", upstream_seq=self.vol.upstream_seq)
        else:
            self.log.error("volume_left_unclean", reason=str(self.fatal))

    # -- one connection ----------------------------------------------------------------------

    async def _connection(self, link: Link, hello: Hello | None = None) -> None:
        """Serve one connection; ``hello`` when a ``ReceiverServer`` already read it."""
        if hello is None and not await wait_connected(link, self.timeout):
            self.links.discard(link)
            return
        clog = self.log.bind(peer_addr=link.peername)
        clog.info("peer_connected")
        try:
            await self._handshake_and_stream(link, clog, hello)
        except ReceiverError as e:
            clog.error("receiver_failed", reason=str(e))
        except PeerlinkError as e:
            if not session_ended(clog, e):
                raise
        finally:
            link.release(LinkClosed("session ended"))
            self.links.discard(link)

    def _refuse(self, link: Link, reason: str) -> Refused:
        with contextlib.suppress(LinkClosed):
            link.send(Refuse(reason))
        link.close()
        return Refused(reason)

    def _upstream_uuid(self, offered: str) -> str:
        """The uuid this replica answers to: its binding, or (while still empty and
        unbound) the one the sender offers, else its own."""
        if self.upstream is not None:
            return str(self.upstream["upstream_uuid"])
        if self._fresh():
            return offered
        return self.vol.info.uuid

    def _fresh(self) -> bool:
        """Never received anything: the store is the volume's initial (zero) state."""
        return self.vol.upstream_seq == 0 and self.upstream is None

    async def _handshake_and_stream(self, link: Link, clog: Any,  # noqa: PLR0915
                                    hello: Hello | None = None) -> None:
        t = self.timeout
        theirs = hello if hello is not None else await link.recv_within(t, "Hello")
        expect(theirs, Hello, "to open the connection")
        assert isinstance(theirs, Hello)
        clog = clog.bind(peer=theirs.node)
        vuuid = self._upstream_uuid(theirs.volume_uuid)
        history = self._history()
        theirs_gens = from_wire(theirs.generations, theirs.epochs)
        verdict = self._relation(history, theirs.node, theirs_gens, clog)
        adopts = verdict.adopts
        mine = Hello(PROTO_VERSION, self.node, self.name, vuuid, self.vol.size, self.role,
                     wire_generations(history), 0 if adopts else self.vol.upstream_seq,
                     make_nonce(), adopts, self._changed(verdict.rel, theirs.node, history),
                     wire_epochs(history))
        refusal = check_hello(mine, theirs, sending=False) or await self._generation_refusal(
            verdict, theirs.node, theirs_gens, history, clog)
        if refusal is not None:
            raise self._refuse(link, refusal.reason)
        link.send(mine)
        ok = await link.recv_within(t, "HelloOk")
        expect(ok, HelloOk, "after Hello")
        assert isinstance(ok, HelloOk)
        if ok.node != theirs.node:
            raise PeerProtocolError(
                f"HelloOk.node: {ok.node!r} is not the node that said Hello ({theirs.node!r})")
        tr = self._authenticate(link, theirs, mine, ok)
        async with self.takeover:
            await self._retire_active(f"replaced by a new connection from {theirs.node!r}")
            await self._grow_to(theirs.volume_size, clog)
            applied = self.vol.upstream_seq
            # A sender on a newer generation (a failover or switchover happened, or it won
            # a fork): this replica's seq numbers belong to another node's journal, so the
            # sender compares digests and resyncs; any resume point is its to choose.
            newer = verdict.rel is Relation.BEHIND and not self._fresh()
            refusal = None if newer else check_resume(applied, ok.resume_from_seq)
            pending = self._resync_marker()
            if refusal is not None:
                raise self._refuse(link, refusal.reason)
            await self._bind(theirs, vuuid, ok.resume_from_seq, clog, newer)
            link.send(HelloOk(self.node, ok.resume_from_seq,
                              proof(self.secret, Prover.RECEIVER, tr) if self.secret else b""))
            await asyncio.get_running_loop().run_in_executor(
                None, clear_refused, self.vol.info, theirs.node)
            session = _Session(link, theirs.node, ok.resume_from_seq, ok.resume_from_seq)
            session.history = History(vuuid, theirs_gens)
            if verdict.fork and newer:
                session.fork = history
                clog.warning("fork_lost", detail=describe_fork(
                    self.name, theirs.node, theirs_gens, self.node, history.generations))
            if newer or ok.resume_from_seq > applied + 1 or (pending is not None
                                                              and not pending["done"]):
                # The sender skips records (it resyncs extents instead), or this replica
                # was interrupted in a resync and needs another one: a resync must come.
                session.phase = "announce"
            else:
                # Batches from applied + 1, or first a resync of some extents (hot extents
                # of a primary restart when this replica already has every record).
                session.phase = "open"
            self.active = session
            if self.source != theirs.node:
                self.source, self.source_since = theirs.node, time.time()
        clog.info("resync_expected" if session.phase == "announce" else "streaming",
                  resume_from=ok.resume_from_seq,
                  sender_last_seq=theirs.last_applied_seq,
                  lag_records=max(0, theirs.last_applied_seq - self.vol.upstream_seq))
        try:
            await self._stream(session, clog)
        finally:
            clog.info("session_ended", applied_batches=session.applied_batches,
                      applied_bytes=session.applied_bytes, upstream_seq=self.vol.upstream_seq)

    def _authenticate(self, link: Link, theirs: Hello, mine: Hello, ok: HelloOk) -> Transcript:
        """Check the sender's proof (refused if it fails); the transcript this side then
        proves itself with."""
        tr = Transcript(PROTO_VERSION, theirs.node, self.node, theirs.auth_nonce,
                        mine.auth_nonce)
        if self.secret is not None:
            try:
                verify(self.secret, Prover.SENDER, tr, ok.auth_proof)
            except PeerAuthError as e:
                raise self._refuse(link, str(e)) from None
        elif ok.auth_proof:
            raise self._refuse(link, "peer authentication failed: the peer sent a proof but "
                                     f"node {self.node!r} has no shared secret configured")
        return tr

    def _relation(self, history: History, node: str, theirs: tuple[BGeneration, ...],
                  clog: Any) -> Verdict:
        """How the sender's history relates to this replica's (``Verdict``).  A split
        brain (unrelated, or forked on one epoch) that an operator resolved for
        ``node``'s side is adopted: its data is taken, compared then resynced, as if it
        were on a newer generation."""
        if self._fresh():
            return Verdict(Relation.BEHIND)
        rel, fork = decide(history.generations, theirs)
        if rel in (Relation.UNRELATED, Relation.FORKED) and (
                self.upstream or {}).get(ADOPT_KEY) == node:
            clog.warning("adopting_unrelated_history", peer=node, forked=fork)
            return Verdict(Relation.BEHIND, fork, adopts=True)
        return Verdict(rel, fork)

    def _changed(self, rel: Relation, node: str, history: History
                 ) -> tuple[int, tuple[int, ...]] | None:
        """For a sender on a newer generation: the extents this demoted primary changed
        that ``node`` may lack (recorded at demotion for that node and this generation)."""
        rec = (self.upstream or {}).get(CHANGED_KEY)
        if rel is not Relation.BEHIND or self._fresh() or not isinstance(rec, dict):
            return None
        if rec.get("peer") != node or rec.get("generation") != history.current.gen_id:
            return None
        return int(rec["extent_shift"]), tuple(int(e) for e in rec["extents"])

    async def _bind(self, theirs: Hello, vuuid: str, resume_from: int, clog: Any,
                    newer: bool) -> None:
        """Bind a fresh replica to the upstream volume; an empty replica is the
        upstream's state at seq 0, so it is Consistent from here on (not so a copy that
        holds data of its own and takes a newer generation's: a demoted primary stays
        Inconsistent until its resync completes)."""
        loop = asyncio.get_running_loop()
        if self.upstream is None:
            rec = upstream_record(vuuid, theirs.node)
            await loop.run_in_executor(self.executor, write_json, self.upstream_path, rec)
            self.upstream = rec
            await loop.run_in_executor(
                self.executor, save_history, self.vol.info.path,
                History(vuuid, from_wire(theirs.generations, theirs.epochs)))
            self._gen_cache = None
            clog.info("replica_bound", upstream_uuid=vuuid, upstream_node=theirs.node)
        if (self.vol.inconsistent and self.vol.upstream_seq == 0 and resume_from == 1
                and not newer and self._resync_marker() is None):
            await loop.run_in_executor(self.executor, self.vol.set_consistent, True)
            clog.info("replica_consistent", reason="empty replica streams from seq 1")

    async def _grow_to(self, size: int, clog: Any) -> None:
        """The authenticated source is larger: a grow this replica has not met (or whose
        records were released).  Grow now; the stream or the resync fills the space."""
        if size > self.vol.size:
            await asyncio.get_running_loop().run_in_executor(
                self.executor, self.vol.grow_to, size)
            clog.warning("replica_grown", size=size)

    async def _retire_active(self, why: str) -> None:
        old = self.active
        if old is not None:
            old.link.abort(LinkClosed(why))
            await old.finished.wait()
            self.active = None

    async def _stream(self, s: _Session, clog: Any) -> None:
        """Read batches and queue them for the applier until the link fails."""
        applier = asyncio.get_running_loop().create_task(self._applier(s, clog))
        watchdog = asyncio.get_running_loop().create_task(s.link.watchdog(self.timeout))
        try:
            while True:
                msg = await s.link.recv()
                if isinstance(msg, Pong):
                    continue
                n = self._admit(s, msg)
                if isinstance(msg, Batch):
                    self.received_seq = max(self.received_seq, msg.last_seq)
                while s.queued_bytes > APPLY_QUEUE_BYTES and not applier.done():
                    s.space.clear()
                    await s.space.wait()
                if applier.done():
                    break
                s.queued_bytes += n
                s.queue.put_nowait(msg)  # type: ignore[arg-type]  # _admit checked the type
        finally:
            while not s.queue.empty():  # received, not applied: the sender resends them
                s.queue.get_nowait()
            s.queue.put_nowait(None)
            s.space.set()
            await asyncio.wait([applier])  # never cancelled: the in-flight apply completes
            watchdog.cancel()
            s.finished.set()
            if applier.done() and not applier.cancelled() and applier.exception() is not None:
                raise applier.exception()  # type: ignore[misc]

    def _admit(self, s: _Session, msg: Message) -> int:
        """Check ``msg`` against the session's phase; return its payload bytes.  Raises
        PeerProtocolError for anything out of place (nothing of it is applied)."""
        if s.phase == "open":
            s.phase = "announce" if isinstance(msg, ResyncExtents) else "stream"
        if s.phase == "announce" and isinstance(msg, Verify):
            self._check_verify(msg)  # a compare resync: digests before the extents
            return 0
        if s.phase == "announce":
            expect(msg, ResyncExtents, "to begin a resync")
            assert isinstance(msg, ResyncExtents)
            if msg.volume != self.name:
                raise PeerProtocolError(f"ResyncExtents for volume {msg.volume!r} on the "
                                        f"stream of volume {self.name!r}")
            count = (self.vol.size + (1 << msg.extent_shift) - 1) >> msg.extent_shift
            if msg.extents and msg.extents[-1] >= count:
                raise PeerProtocolError(
                    f"ResyncExtents: extent {msg.extents[-1]} is past the volume end "
                    f"({count} extents of 2^{msg.extent_shift} bytes)")
            s.phase, s.announced, s.extent_shift = "extents", frozenset(msg.extents), \
                msg.extent_shift
            return 0
        if s.phase == "extents":
            if isinstance(msg, ResyncDone):
                if msg.volume != self.name:
                    raise PeerProtocolError(f"ResyncDone for volume {msg.volume!r} on the "
                                            f"stream of volume {self.name!r}")
                s.phase = "stream"
                return 0
            expect(msg, ExtentData, "during a resync")
            assert isinstance(msg, ExtentData)
            end = msg.offset + msg.length
            if msg.volume != self.name or end > self.vol.size or any(
                    e not in s.announced for e in range(msg.offset >> s.extent_shift,
                                                         ((end - 1) >> s.extent_shift) + 1)):
                raise PeerProtocolError(
                    f"ExtentData of {msg.length} bytes at {msg.offset} for volume "
                    f"{msg.volume!r} lies outside the announced extents")
            return len(msg.data)
        if isinstance(msg, Verify):
            self._check_verify(msg)
            return 0
        expect(msg, Batch, "while streaming")
        assert isinstance(msg, Batch)
        # Checked against the size the replica will have when it applies this batch:
        # a grow MARK in a batch still queued counts.
        s.size = check_batch(msg, volume=self.name, volume_size=max(s.size, self.vol.size),
                             expect_first_seq=s.expect_seq)
        s.expect_seq = msg.last_seq + 1
        return payload_bytes(msg.records)

    def _check_verify(self, msg: Verify) -> None:
        count = (self.vol.size + (1 << msg.extent_shift) - 1) >> msg.extent_shift
        if msg.volume != self.name or (msg.extents and msg.extents[-1] >= count):
            raise PeerProtocolError(
                f"Verify for volume {msg.volume!r} names extents outside volume "
                f"{self.name!r}")

    def _verify(self, msg: Verify) -> VerifyResult:
        """Compare this replica's digests of the extents with the sender's (apply thread)."""
        differing = [e for e, d in zip(msg.extents, msg.digests, strict=True)
                     if self.vol.extent_digest(e << msg.extent_shift,
                                               1 << msg.extent_shift) != d]
        return VerifyResult(self.name, msg.token, self.vol.upstream_seq, tuple(differing))

    # -- resync (runs on the apply thread, in stream order) ----------------------------------

    def _resync_marker(self) -> dict[str, Any] | None:
        marker = (self.upstream or {}).get("resync")
        return marker if isinstance(marker, dict) else None

    def _set_resync_marker(self, marker: dict[str, Any] | None) -> None:
        assert self.upstream is not None
        rec = {**self.upstream, "resync": marker}
        write_json(self.upstream_path, rec)
        self.upstream = rec

    def _keep_diverged(self, s: _Session) -> None:
        """This copy lost a fork to the sender: before the first extent byte, keep what
        it alone had as snapshot ``diverged-<its newest generation>`` and count in
        diverged.json the writes the sender lacks (its journal since it started its own
        generation after the fork).  Idempotent, so a crash anywhere before the resync
        completes repeats it harmlessly: the handshake after it finds the same fork (the
        sender's history is adopted only at ResyncDone), the snapshot is there and its
        pre-images were preserved by the extents written so far."""
        mine = s.fork
        assert mine is not None and s.history is not None
        name = diverged_name(mine.current.gen_id)
        self.vol.keep_diverged(name)
        common = common_generation(mine.generations, s.history.generations)
        assert common is not None
        after = mine.generations[[g.gen_id for g in mine.generations].index(
            common.gen_id) + 1:]
        unknown = None
        if any(g.gen_id not in mine.local for g in after):
            unknown = (f"generation {after[0].gen_id:016x} was started on another node: "
                       "this copy's journal does not tell which of its records came "
                       "after the fork")
        entry = record_diverged(self.vol.info, lost_writes(
            self.vol.info, snapshot=name, new_primary=s.node,
            from_seq=after[0].start_seq if unknown is None else None,
            through_seq=self.vol.last_seq, unknown=unknown,
            basis=f"writes since generation {after[0].gen_id:016x} began here (the fork)"),
            keep_known=True)
        self.log.warning("diverged_kept", peer=s.node, snapshot=name,
                         records=entry["records"], bytes=entry["bytes"],
                         unknown=entry["unknown"])

    def _resync_begin(self, msg: ResyncExtents, s: _Session) -> None:
        """Before the first extent byte: what only this copy had is kept (a lost fork),
        then Inconsistent durably, and the store checkpointed so that redo never replays
        older batches over extent data."""
        resume_from = s.resume_from
        if s.fork is not None:
            self._keep_diverged(s)
        self._set_resync_marker({"resume_from": resume_from, "done": False,
                                 "extents": len(msg.extents), "started": time.time()})
        # Cascade: extent data bypasses this replica's journal, so every downstream peer
        # (one that acked something from this replica) must get these extents resynced.
        downstream = known_peers(self.vol.info)
        for peer in downstream:
            write_dirty(self.vol.info, peer, reason=DIRTY_UPSTREAM,
                        from_seq=self.vol.last_seq + 1, through_seq=self.vol.last_seq + 1,
                        shift=msg.extent_shift, extents=list(msg.extents))
        if downstream:
            self.log.info("downstream_dirty", peers=sorted(downstream),
                          extents=len(msg.extents))
        self.vol.begin_resync()

    def _resync_extent(self, msg: ExtentData) -> None:
        self.vol.write_extent(msg.offset, msg.length, msg.data)

    def _resync_done(self, msg: ResyncDone, resume_from: int) -> None:
        """Every extent is in the store: make it durable, then stand at resume_from - 1
        (the marker first: a crash in between makes the next sender resync again)."""
        self.vol.sync()
        self._set_resync_marker({"resume_from": resume_from, "done": True,
                                 "consistent_at": msg.seq})
        self.vol.end_resync(resume_from - 1)
        self._maybe_consistent()  # nothing was written meanwhile: Consistent at once

    def _maybe_consistent(self) -> bool:
        """After a resync: Consistent once the batches reach the ResyncDone seq."""
        marker = self._resync_marker()
        if marker is None or not marker["done"] or self.vol.upstream_seq < marker[
                "consistent_at"]:
            return False
        self.vol.set_consistent(True)
        self._set_resync_marker(None)
        return True

    def _work(self, item: _Work | list[Batch], s: _Session) -> tuple[int | None, bool]:
        """Apply one queued item (or a group of Batches) on the apply thread; return the
        seq to Ack (if any) and whether the replica just became Consistent."""
        if isinstance(item, list):
            self._apply(item, s)  # acknowledged as soon as committed
            return None, self._maybe_consistent()
        if isinstance(item, ResyncExtents):
            self._resync_begin(item, s)
        elif isinstance(item, ExtentData):
            self._resync_extent(item)
        elif isinstance(item, ResyncDone):
            self._resync_done(item, s.resume_from)
            if s.history is not None and s.history != self._history():
                save_history(self.vol.info.path, s.history)  # now on the sender's generation
                self._gen_cache = None
            once = (ADOPT_KEY, CHANGED_KEY)  # for the first resync after a demotion only
            if self.upstream is not None and any(k in self.upstream for k in once):
                rec = {k: v for k, v in self.upstream.items() if k not in once}
                write_json(self.upstream_path, rec)
                self.upstream = rec
            # The store holds everything through resume_from - 1, durably: say so.
            return self.vol.upstream_seq, not self.vol.inconsistent
        return None, False

    async def _generation_refusal(self, v: Verdict, node: str,
                                  theirs: tuple[BGeneration, ...], history: History,
                                  clog: Any) -> Refuse | None:
        """The refusal for a sender on an older generation (demoted, or the older epoch
        of a fork), a split brain (a fork on one epoch) or an unrelated history, recorded
        for `nbdgw status`."""
        refusal = self._history_refusal(v, node, theirs, history)
        if refusal is not None:
            await self._record_refusal(node, refusal.reason, v, clog)
        return refusal

    def _history_refusal(self, v: Verdict, node: str, theirs: tuple[BGeneration, ...],
                         history: History) -> Refuse | None:
        if v.fork and v.rel in (Relation.AHEAD, Relation.FORKED):
            return Refuse(describe_fork(self.name, node, theirs, self.node,
                                        history.generations))
        if v.rel is Relation.AHEAD:
            return Refuse(
                f"volume {self.name!r}: node {node!r} is on generation "
                f"{theirs[-1].gen_id:016x}, older than this replica's "
                f"{history.current.gen_id:016x} (it was demoted by a failover); refusing "
                "its data")
        if v.rel is Relation.UNRELATED:
            return Refuse(unrelated_refusal(self.name, node, self.node))
        snaps = self.vol.snaps
        if v.fork and snaps is not None and len(snaps.index) >= MAX_SNAPSHOTS and \
                diverged_name(history.current.gen_id) not in snaps.index.by_name:
            return Refuse(
                f"volume {self.name!r}: {self.node!r} must keep what only it had as "
                f"snapshot {diverged_name(history.current.gen_id)} before it takes "
                f"{node!r}'s data, but it has {MAX_SNAPSHOTS} snapshots (the maximum): "
                "delete one there")
        return None

    async def _record_refusal(self, node: str, reason: str, v: Verdict, clog: Any) -> None:
        """Keep a history refusal where `nbdgw status` reads it (peers/<node>.refused.json):
        a split brain with the commands that settle it, else why the sender is refused."""
        split = v.rel in (Relation.FORKED, Relation.UNRELATED)
        settle = settle_commands(node, self.node) if split else None
        ok = await asyncio.get_running_loop().run_in_executor(
            None, lambda: write_refused(self.vol.info, node, side="receiver", by="this node",
                                        reason=reason, split_brain=split, settle=settle))
        if split:
            clog.error("split_brain", peer=node, reason=reason,
                       settle=[c["command"] for c in settle or []], recorded=ok)

    def _history(self) -> History:
        """This replica's generation history (its upstream's, adopted when bound)."""
        up = str(self.upstream["upstream_uuid"]) if self.upstream is not None else None
        return load_history(self.vol.info.path, self.vol.info.uuid, up)

    def _apply(self, batches: list[Batch], s: _Session) -> int:
        """Apply a group of Batches (apply thread); Ack it once it is committed."""
        gen = self._gen_cache if self._gen_cache is not None else self._history().current
        self._gen_cache = gen
        meta = {"source": s.node, "gen": gen.gen_id}
        loop = s.loop

        def committed(seq: int) -> None:
            loop.call_soon_threadsafe(self._ack, s, seq)

        return self.vol.apply_batches([(b.first_seq, b.last_seq, list(b.records), meta)
                                       for b in batches], committed)

    def _ack(self, s: _Session, seq: int) -> None:
        with contextlib.suppress(LinkClosed):
            s.link.send(Ack(self.name, seq))

    @staticmethod
    def _group(s: _Session, first: Batch) -> tuple[list[Batch], _Work | None, bool]:
        """``first`` and the Batches queued right behind it (up to GROUP_BYTES), to be
        applied with one fdatasync; then the item that ended the group (not a Batch) and
        whether the end of the session was reached."""
        group, size = [first], payload_bytes(first.records)
        while size < GROUP_BYTES and not s.queue.empty():
            nxt = s.queue.get_nowait()
            if not isinstance(nxt, Batch):
                return group, nxt, nxt is None
            group.append(nxt)
            size += payload_bytes(nxt.records)
        return group, None, False

    async def _applier(self, s: _Session, clog: Any) -> None:
        loop = asyncio.get_running_loop()
        carried: _Work | None = None  # the item that ended the last group of Batches
        while True:
            item: _Work | None
            if carried is not None:
                item, carried = carried, None
            else:
                item = await s.queue.get()
            if item is None:
                return
            if isinstance(item, Batch):
                group, carried, ended = self._group(s, item)
                await self._apply_group(s, clog, group)
                if ended:
                    return
                continue
            if isinstance(item, Verify):
                # In stream order: every batch sent before it is applied by now.
                result = await loop.run_in_executor(self.executor, self._verify, item)
                clog.info("verify_compared", extents=len(item.extents),
                          differing=len(result.differing), applied_seq=result.applied_seq)
                with contextlib.suppress(LinkClosed):
                    s.link.send(result)
                continue
            n = len(item.data) if isinstance(item, ExtentData) else 0
            try:
                durable, consistent = await loop.run_in_executor(self.executor, self._work,
                                                                 item, s)
            except Exception as e:
                self.fatal = e
                self.failed.set()
                what = type(item).__name__
                clog.error("apply_failed", what=what, error=str(e))
                s.link.abort(LinkClosed("apply failed on the receiver"))
                raise ReceiverError(f"apply of {what} failed: {e}") from e
            s.queued_bytes -= n
            s.space.set()
            s.applied_bytes += n
            if isinstance(item, ResyncExtents):
                clog.info("resync_started", extents=len(item.extents),
                          extent_shift=item.extent_shift)
            elif isinstance(item, ResyncDone):
                clog.info("resync_extents_done", consistent_at=item.seq,
                          upstream_seq=self.vol.upstream_seq)
            if consistent:
                clog.info("replica_consistent", reason="resync complete",
                          upstream_seq=self.vol.upstream_seq)
            if durable is not None:
                with contextlib.suppress(LinkClosed):
                    s.link.send(Ack(self.name, durable))

    async def _apply_group(self, s: _Session, clog: Any, group: list[Batch]) -> None:
        """Apply queued batches with one fdatasync and one Ack for the last of them (sent
        by ``_apply`` once they are committed)."""
        loop = asyncio.get_running_loop()
        n = sum(payload_bytes(b.records) for b in group)
        try:
            _, consistent = await loop.run_in_executor(self.executor, self._work, group, s)
        except Exception as e:
            self.fatal = e
            self.failed.set()
            what = f"batch {group[0].first_seq}-{group[-1].last_seq}"
            clog.error("apply_failed", what=what, error=str(e))
            s.link.abort(LinkClosed("apply failed on the receiver"))
            raise ReceiverError(f"apply of {what} failed: {e}") from e
        s.queued_bytes -= n
        s.space.set()
        s.applied_bytes += n
        s.applied_batches += len(group)
        if consistent:
            clog.info("replica_consistent", reason="resync complete",
                      upstream_seq=self.vol.upstream_seq)


class ReceiverServer:
    """One listening port for every replica volume of a node.

    Each connection's first message (``Hello``) names the volume; the connection is
    handed to that volume's ``Receiver``, which runs the rest of the handshake.  A volume
    this node holds no replica of is refused by name.  A receiver whose apply failed
    (a full or failing disk) is closed and its volume refused from then on; the others
    keep streaming.
    """

    def __init__(self, receivers: dict[str, Receiver], *, node: str, timeout: float = 15.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.receivers = dict(receivers)
        self.failed_volumes: dict[str, str] = {}
        self.node = node
        self.timeout = timeout
        self.tls = tls
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.pending: set[Link] = set()
        self.log = log.bind(side="receiver", node=node)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._accept, host, port, ssl=self.tls)
        sock = self.server.sockets[0].getsockname()
        self.log.info("listening", address=format_addr(sock[0], sock[1]),
                      volumes=sorted(self.receivers))
        for name, rx in self.receivers.items():
            self._spawn(self._watch(name, rx))
            rx.live_task = loop.create_task(rx._live_writer())
        return str(sock[0]), int(sock[1])

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _accept(self) -> Link:
        link = Link()
        self.pending.add(link)
        self._spawn(self._dispatch(link))
        return link

    async def _dispatch(self, link: Link) -> None:
        try:
            if not await wait_connected(link, self.timeout):
                return
            try:
                hello = await link.recv_within(self.timeout, "Hello")
            except PeerlinkError as e:
                self.log.warning("peer_dropped", peer_addr=link.peername, reason=str(e))
                link.release(LinkClosed("no Hello"))
                return
        finally:
            self.pending.discard(link)
        if not isinstance(hello, Hello):
            link.abort(PeerProtocolError(
                f"expected Hello to open the connection, got {type(hello).__name__}"))
            self.log.warning("peer_dropped", peer_addr=link.peername,
                             reason=f"{type(hello).__name__} before Hello")
            return
        rx = self.receivers.get(hello.volume)
        if rx is None:
            why = self.failed_volumes.get(hello.volume)
            reason = (f"volume {hello.volume} on node {self.node!r} is stopped: {why}" if why
                      else f"node {self.node!r} holds no replica of volume {hello.volume}")
            self.log.warning("peer_refused", peer=hello.node, volume=hello.volume,
                             reason=reason)
            with contextlib.suppress(LinkClosed):
                link.send(Refuse(reason))
            link.close()
            return
        rx.adopt(link, hello)

    async def _watch(self, name: str, rx: Receiver) -> None:
        await rx.failed.wait()
        self.receivers.pop(name, None)
        self.failed_volumes[name] = str(rx.fatal)
        self.log.error("volume_stopped", volume=name, reason=str(rx.fatal))
        await rx.close()

    async def close(self) -> None:
        """Stop listening; each receiver drops its links, finishes its in-flight apply
        and closes its volume."""
        if self.server is not None:
            self.server.close()
        for link in list(self.pending):
            link.abort(LinkClosed("receiver stopping"))
        receivers = list(self.receivers.values())
        self.receivers.clear()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(rx.close() for rx in receivers))
