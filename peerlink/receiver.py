"""The receiving end of peerlink: owns a replica volume and applies batches to it.

One ``Receiver`` per replica volume.  It listens; a sender connects and the handshake of
PROTOCOL.md runs (the sender's Intro, a Challenge, HMAC proofs both ways when a shared
secret is configured, this side's only after the sender's checked, then Hello both ways,
``check_hello``, HelloOk).  Then each
``Batch`` is checked (``check_batch``: the next seq exactly, inside the volume) and handed
to one applier task, which runs ``Volume.apply_batches`` on a single worker thread (it ends
in an fdatasync) strictly in order and acknowledges the durable seq as soon as that
fdatasync returned (the apply thread writes the Ack on the link itself,
``Link.send_from_thread``, before the store is written: the batch is committed; the
event loop is not woken first).  Batches that queued up while the previous fdatasync ran
are applied together, each with its own commit MARK but with one fdatasync and one Ack
for all (group commit: a sync sender ships each write at once, and its waiters are
released by that one Ack).

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
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from blockstore.diverged import lost_writes, record_diverged
from blockstore.generations import Generation as BGeneration
from blockstore.generations import (
    History,
    common_generation,
    describe_fork,
    diverged_name,
    load_history,
    save_history,
    settle_commands,
)
from blockstore.journal import sync_delays_for_tests
from blockstore.meta import read_json, write_json
from blockstore.node_state import EpochFloor
from blockstore.peers import (
    ADOPT_KEY,
    CHANGED_KEY,
    DIRTY_UPSTREAM,
    UPSTREAM_FILE,
    UPSTREAM_KIND,
    UPSTREAM_VERSION,
    clear_refused,
    clear_stale_refusals,
    known_peers,
    upstream_record,
    write_dirty,
    write_refused,
)
from blockstore.snapshot import MAX_SNAPSHOTS
from blockstore.volume import Volume

from .auth import make_nonce
from .batch import payload_bytes
from .errors import Fenced, PeerlinkError, PeerProtocolError
from .link import AdmissionGate, Link, LinkClosed, Refused, format_addr, session_ended
from .messages import (
    MAX_REASON,
    Ack,
    Batch,
    ExtentData,
    Hello,
    Intro,
    Pong,
    Refuse,
    ResyncDone,
    ResyncExtents,
    Verify,
    VerifyResult,
)
from .session import (
    Admitted,
    Authenticated,
    Output,
    Phase,
    ReceiverSession,
    Refusal,
    ReplicaFacts,
    Send,
    TakeOver,
    from_wire,
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


def refuse(link: Link, out: Refusal) -> Refused:
    """Send the peer what ``out`` tells it (a code only, before it authenticated), close,
    and return the error carrying the full reason (logged as ``peer_refused_by_us``)."""
    with contextlib.suppress(LinkClosed):
        link.send(Refuse(out.told[:MAX_REASON]))
    link.close()
    return Refused(out.reason)


async def perform(link: Link, outputs: list[Output], clog: Any,
                  on_refusal: Callable[[Refusal, Any], Awaitable[None]] | None = None
                  ) -> Output | None:
    """Do what a ``ReceiverSession`` says: send, lift the link's limits once the peer
    authenticated, refuse (``on_refusal`` first: a record for `nbdgw status`; then
    raise ``Refused``).  Returns the output that asks the shell for more."""
    asked: Output | None = None
    for out in outputs:
        if isinstance(out, Send):
            link.send(out.msg)
        elif isinstance(out, Authenticated):
            link.authenticated()
        elif isinstance(out, Refusal):
            if on_refusal is not None:
                await on_refusal(out, clog)
            raise refuse(link, out)
        else:
            asked = out
    return asked


_Work = Batch | ResyncExtents | ExtentData | ResyncDone | Verify


@dataclass
class _Session:
    """One accepted connection that passed the handshake and streams batches: the
    protocol state (``core``: phase, expected seq, announced extents) and the shell's
    queue to the applier."""

    link: Link
    node: str
    resume_from: int
    core: ReceiverSession
    queue: asyncio.Queue[_Work | None] = field(default_factory=asyncio.Queue)
    queued_bytes: int = 0
    space: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    applied_batches: int = 0
    applied_bytes: int = 0
    history: History | None = None  # the sender's: adopted at bind and when a resync ends
    fork: History | None = None  # this copy's own history, when it lost a fork to the sender


class Receiver:
    """Listen for a sender and apply its batches to the replica volume ``name``."""

    def __init__(self, data_dir: Path, name: str, *, node: str, role: str = "secondary",
                 secret: bytes | None = None, next_secret: bytes | None = None,
                 timeout: float = 15.0, tls: ssl.SSLContext | None = None) -> None:
        if role not in ("secondary", "dr"):
            raise ValueError(f"receiver role must be secondary or dr, got {role!r}")
        self.data_dir = Path(data_dir)
        self.name = name
        self.node = node
        self.role = role
        self.secret = secret
        self.next_secret = next_secret  # accepted besides secret during a rotation
        self.timeout = timeout
        self.tls = tls
        self.vol = Volume.open(self.data_dir, name)  # takes the volume's lock
        self.fence = EpochFloor(self.data_dir)  # batches of a deposed primary are refused
        if not self.vol.replica:
            self.vol.close()
            raise ReceiverError(
                f"volume {name} is not a replica (create it with 'nbdgw volume create "
                f"{name} --replica')")
        delay = sync_delays_for_tests(os.environ.get("NBDGW_TEST_SYNC_DELAY", "")).get(name)
        if delay and self.vol.journal is not None:  # a test hook: a slow replica disk
            self.vol.journal.sync_delay = delay
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
        self.gate = AdmissionGate()
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
        self.server = await loop.create_server(
            self._accept, host, port, ssl=self.tls,
            ssl_handshake_timeout=self.timeout if self.tls is not None else None)
        self.live_task = loop.create_task(self._live_writer())
        sock = self.server.sockets[0].getsockname()
        self.log.info("listening", address=format_addr(sock[0], sock[1]))
        return str(sock[0]), int(sock[1])

    def live(self) -> dict[str, Any]:
        """This replica's link as `nbdgw status` shows it."""
        s = self.active
        if s is None:
            state = "waiting"
        elif s.core.phase in (Phase.ANNOUNCE, Phase.EXTENTS) or self.vol.inconsistent:
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
        link = Link(gate=self.gate, handshake_timeout=self.timeout)
        self.links.add(link)
        self.adopt(link)
        return link

    def adopt(self, link: Link, hello: Intro | Hello | None = None) -> None:
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

    async def _connection(self, link: Link, hello: Intro | Hello | None = None) -> None:
        """Serve one connection; ``hello`` (its first message) when a ``ReceiverServer``
        already read it."""
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

    def _facts(self) -> ReplicaFacts:
        """What the session needs to know of this replica when a connection opens."""
        history = self._history()
        snaps = self.vol.snaps
        name = diverged_name(history.current.gen_id)
        full = snaps is not None and len(snaps.index) >= MAX_SNAPSHOTS and \
            name not in snaps.index.by_name
        up = self.upstream or {}
        return ReplicaFacts(
            node=self.node, volume=self.name, role=self.role, size=self.vol.size,
            uuid=self._upstream_uuid(""), history=history, applied=self.vol.upstream_seq,
            fresh=self._fresh(), adopt_for=up.get(ADOPT_KEY),
            changed=up.get(CHANGED_KEY) if isinstance(up.get(CHANGED_KEY), dict) else None,
            diverged_blocked=name if full else None, max_snapshots=MAX_SNAPSHOTS)

    async def _handshake_and_stream(self, link: Link, clog: Any,
                                    hello: Intro | Hello | None = None) -> None:
        """The handshake (``ReceiverSession`` decides; this reads the replica once the
        sender proved itself and said Hello, takes it over and binds it), then the
        stream."""
        t = self.timeout
        first = hello if hello is not None else await link.recv_within(t, "Intro")
        core = ReceiverSession(self.node, self.name, secret=self.secret, nonce=make_nonce(),
                               next_secret=self.next_secret, realm=link.realm)
        outs = core.receive(first)
        clog = clog.bind(peer=getattr(first, "node", None))
        await perform(link, outs, clog)  # a Challenge, or a refusal by code
        # The sender's Proof; once it checks, this side's Proof, then the sender's Hello.
        await perform(link, core.receive(await link.recv_within(t, "Proof")), clog)
        theirs = await link.recv_within(t, "Hello")
        await perform(link, core.receive(theirs), clog)
        assert isinstance(theirs, Hello)  # else receive raised
        facts = self._facts()  # the sender proved itself: now the replica is read
        await perform(link, core.offer(facts), clog, self._history_refusals(theirs.node))
        if core.adopts:
            clog.warning("adopting_unrelated_history", peer=theirs.node, forked=core.fork)
        take = await perform(link, core.receive(await link.recv_within(t, "HelloOk")), clog)
        assert isinstance(take, TakeOver)
        theirs_gens = core.sender_history
        vuuid = facts.uuid if not facts.fresh else theirs.volume_uuid
        async with self.takeover:
            await self._retire_active(f"replaced by a new connection from {theirs.node!r}")
            await self._grow_to(take.size, clog)
            pending = self._resync_marker()
            outs = core.admitted(self.vol.upstream_seq, self._fresh(),
                                 pending is not None and not pending["done"])
            adm = next((o for o in outs if isinstance(o, Admitted)), None)
            if adm is None:
                await perform(link, outs, clog)
                raise AssertionError("admitted() neither admitted nor refused")
            await self._bind(theirs, vuuid, adm.resume_from, clog, adm.newer)
            await perform(link, outs, clog)
            await asyncio.get_running_loop().run_in_executor(
                None, clear_refused, self.vol.info, theirs.node)
            stale = await asyncio.get_running_loop().run_in_executor(
                None, clear_stale_refusals, self.vol.info)
            if stale:
                clog.info("stale_refusals_cleared", peers=stale, taken_from=theirs.node)
            session = _Session(link, theirs.node, adm.resume_from, core)
            session.history = History(vuuid, theirs_gens)
            if adm.fork_lost:
                session.fork = facts.history
                clog.warning("fork_lost", detail=describe_fork(
                    self.name, theirs.node, theirs_gens, self.node,
                    facts.history.generations))
            self.active = session
            if self.source != theirs.node:
                self.source, self.source_since = theirs.node, time.time()
        clog.info("resync_expected" if adm.resync else "streaming",
                  resume_from=adm.resume_from,
                  sender_last_seq=theirs.last_applied_seq,
                  lag_records=max(0, theirs.last_applied_seq - self.vol.upstream_seq))
        try:
            await self._stream(session, clog)
        finally:
            clog.info("session_ended", applied_batches=session.applied_batches,
                      applied_bytes=session.applied_bytes, upstream_seq=self.vol.upstream_seq)

    def _history_refusals(self, node: str) -> Callable[[Refusal, Any], Awaitable[None]]:
        """Keep a refusal by history where `nbdgw status` reads it."""
        async def record(out: Refusal, clog: Any) -> None:
            if out.history:
                await self._record_refusal(node, out.reason, out.split_brain, clog)
        return record

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
                try:
                    n = s.core.admit(msg, self.vol.size, self.fence.current())
                except Fenced as e:  # tell the deposed sender why before closing
                    with contextlib.suppress(LinkClosed):
                        s.link.send(Refuse(str(e)[:MAX_REASON]))
                    raise
                if isinstance(msg, Batch):
                    self.received_seq = max(self.received_seq, msg.last_seq)
                while s.queued_bytes > APPLY_QUEUE_BYTES and not applier.done():
                    s.space.clear()
                    await s.space.wait()
                if applier.done():
                    break
                s.queued_bytes += n
                s.queue.put_nowait(msg)  # type: ignore[arg-type]  # admit checked the type
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

    async def _record_refusal(self, node: str, reason: str, split: bool, clog: Any) -> None:
        """Keep a history refusal where `nbdgw status` reads it (peers/<node>.refused.json):
        a split brain with the commands that settle it, else why the sender is refused."""
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

        def committed(seq: int) -> None:
            # Sent from here, the moment the fdatasync returned (Link.send_from_thread):
            # the sender's waiting writes need not wait for this process's loop to wake.
            s.link.send_from_thread(Ack(self.name, seq))

        return self.vol.apply_batches([(b.first_seq, b.last_seq, list(b.records), meta)
                                       for b in batches], committed)

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
                raise self._apply_failed(s, clog, type(item).__name__, e) from e
            self._applied(s, n)
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

    def _apply_failed(self, s: _Session, clog: Any, what: str, e: Exception
                      ) -> ReceiverError:
        """An apply failed (a full or failing disk): fatal for this receiver (module
        docstring); the link is dropped and the error to raise returned."""
        self.fatal = e
        self.failed.set()
        clog.error("apply_failed", what=what, error=str(e))
        s.link.abort(LinkClosed("apply failed on the receiver"))
        return ReceiverError(f"apply of {what} failed: {e}")

    @staticmethod
    def _applied(s: _Session, n: int) -> None:
        """``n`` payload bytes left the queue into the replica: room for more."""
        s.queued_bytes -= n
        s.space.set()
        s.applied_bytes += n

    async def _apply_group(self, s: _Session, clog: Any, group: list[Batch]) -> None:
        """Apply queued batches with one fdatasync and one Ack for the last of them (sent
        by ``_apply`` once they are committed)."""
        loop = asyncio.get_running_loop()
        n = sum(payload_bytes(b.records) for b in group)
        try:
            _, consistent = await loop.run_in_executor(self.executor, self._work, group, s)
        except Exception as e:
            what = f"batch {group[0].first_seq}-{group[-1].last_seq}"
            raise self._apply_failed(s, clog, what, e) from e
        self._applied(s, n)
        s.applied_batches += len(group)
        if consistent:
            clog.info("replica_consistent", reason="resync complete",
                      upstream_seq=self.vol.upstream_seq)


class ReceiverServer:
    """One listening port for every replica volume of a node.

    Each connection's first message (``Intro``) names the volume; the connection is
    handed to that volume's ``Receiver``, which runs the rest of the handshake.  A volume
    this node holds no replica of is challenged all the same (a stranger cannot tell
    which volumes exist) and refused, by name, only to a sender that proved it knows
    ``secret``.  A receiver whose apply failed (a full or failing disk) is closed and its
    volume refused from then on; the others keep streaming.
    """

    def __init__(self, receivers: dict[str, Receiver], *, node: str, timeout: float = 15.0,
                 tls: ssl.SSLContext | None = None, secret: bytes | None = None,
                 next_secret: bytes | None = None) -> None:
        self.receivers = dict(receivers)
        self.failed_volumes: dict[str, str] = {}
        self.node = node
        self.timeout = timeout
        self.tls = tls
        self.secret = secret
        self.next_secret = next_secret
        self.gate = AdmissionGate()
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.pending: set[Link] = set()
        self.log = log.bind(side="receiver", node=node)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._accept, host, port, ssl=self.tls,
            ssl_handshake_timeout=self.timeout if self.tls is not None else None)
        sock = self.server.sockets[0].getsockname()
        self.log.info("listening", address=format_addr(sock[0], sock[1]),
                      volumes=sorted(self.receivers))
        self.begin()
        return str(sock[0]), int(sock[1])

    def begin(self) -> None:
        """What ``start`` does besides listening: watch the receivers, write their live
        state.  Alone for a group on its node's shared port, whose connections all come
        from the front (``adopt_socket``)."""
        loop = asyncio.get_running_loop()
        for name, rx in self.receivers.items():
            self._spawn(self._watch(name, rx))
            rx.live_task = loop.create_task(rx._live_writer())

    def adopt_socket(self, sock: socket.socket, realm: str) -> None:
        """Serve a connection the node's front accepted and handed over (front.py) for
        group ``realm`` as if it was accepted here: TLS, the handshake and the rest are
        this process's; both proofs cover ``realm`` (this group's own name), so a sender
        proving a session for another group fails."""
        self._spawn(self._adopt_socket(sock, realm))

    async def _adopt_socket(self, sock: socket.socket, realm: str) -> None:
        def made() -> Link:
            link = self._accept()
            link.realm = realm
            return link

        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                made, sock, ssl=self.tls,
                ssl_handshake_timeout=self.timeout if self.tls is not None else None)
        except OSError as e:  # the TLS handshake failed or timed out, the peer left
            self.log.warning("peer_dropped", reason=f"handed-over connection: {e}")
            sock.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _accept(self) -> Link:
        link = Link(gate=self.gate, handshake_timeout=self.timeout)
        self.pending.add(link)
        self._spawn(self._dispatch(link))
        return link

    async def _dispatch(self, link: Link) -> None:
        try:
            if not await wait_connected(link, self.timeout):
                return
            try:
                hello = await link.recv_within(self.timeout, "Intro")
            except PeerlinkError as e:
                self.log.warning("peer_dropped", peer_addr=link.peername, reason=str(e))
                link.release(LinkClosed("no Intro"))
                return
        finally:
            self.pending.discard(link)
        if not isinstance(hello, (Intro, Hello)):  # a Hello: an older version's, refused
            link.abort(PeerProtocolError(
                f"expected Intro to open the connection, got {type(hello).__name__}"))
            self.log.warning("peer_dropped", peer_addr=link.peername,
                             reason=f"{type(hello).__name__} before Intro")
            return
        rx = self.receivers.get(hello.volume)
        if rx is None or isinstance(hello, Hello):
            await self._decline(link, hello)
            return
        rx.adopt(link, hello)

    async def _decline(self, link: Link, hello: Intro | Hello) -> None:
        """A volume this node holds no replica of (or stopped): the same challenge as for
        one it holds, then the refusal, with the reason only for a sender that proved
        itself (after its Hello, as for a volume held).  A Hello first is refused by code
        (an older version)."""
        why = self.failed_volumes.get(hello.volume)
        reason = (f"volume {hello.volume} on node {self.node!r} is stopped: {why}" if why
                  else f"node {self.node!r} holds no replica of volume {hello.volume}")
        clog = self.log.bind(peer_addr=link.peername, peer=hello.node, volume=hello.volume)
        core = ReceiverSession(self.node, hello.volume, secret=self.secret,
                               nonce=make_nonce(), next_secret=self.next_secret,
                               realm=link.realm)
        t = self.timeout
        try:
            await perform(link, core.receive(hello), clog)
            await perform(link, core.receive(await link.recv_within(t, "Proof")), clog)
            await perform(link, core.receive(await link.recv_within(t, "Hello")), clog)
            await perform(link, core.decline(reason), clog)
        except PeerlinkError as e:
            session_ended(clog, e)
        finally:
            link.release(LinkClosed("session ended"))

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
