"""The node core: every piece of failover state of one node, pure (DESIGN.md §6).

Events in (``Tick``, ``BeatIn``, ``Facts``, requests, the results of slow actions), a
``Ready`` out: the actions to perform in order, the hard state to persist *before* any
of them (as raft's ``Ready`` returns ``HardState``), the beat to send, and the write
lease.  No clock, socket, file or thread here: the daemon (gateway/daemon.py) feeds one
queue of events and performs what comes back; tests/unit/test_nodecore_model.py wires
three cores through a simulated network that drops, delays, duplicates, reorders and
replays beats, with crashes, freezes, partitions and operator requests.

Theory of operation.

*Epochs and votes.*  A primary serves on an epoch (an integer; one primary at most per
epoch).  A node that wants to become primary campaigns for an epoch above every epoch
and vote it has seen, votes for itself and asks the others in its beats; a node grants
at most one vote per epoch (persisted before the beat that shows it), and only when it
does not hear a live primary itself, the candidate is consistent, and the candidate is
not *outdated* (below).  A majority of votes elects.  A primary that drains for a
switchover votes for its successor, which then needs no other vote (two of three).

*Support and the write lease.*  A node *supports* the primary it knows on its epoch as
long as it has not voted for a higher epoch.  Each beat echoes the last beat heard from
every peer (its sender's boot nonce and counter).  The primary's lease is anchored at
its own send time of a beat that a supporter echoed: valid until ``sent + lease`` where
``lease`` < ``timeout``.  A voter grants a vote only after it has not received a fresh
beat from the primary for ``timeout``; it received every beat it echoed after that beat
was sent, so its vote, and any promotion it enables, come after every lease it backed
has run out, whatever the delays, duplicates or reordering on the way.  A frozen or cut
off primary therefore stops writing (nbdkit checks the lease on every write) before any
other node can be elected, without any help from it.  Replays cannot extend anything:
beats carry a per-boot nonce and a counter that must increase (gateway/heartbeat.py
drops the rest), and a beat is *fresh* only if it echoes this node's current boot.

*Outdating (sync mode).*  A sync peer that stops acknowledging would block writes for
ever; before the primary may acknowledge writes without it, the peer must be unable to
win an election: the primary lists it as outdated in its beats, supporters record that
(persisted) and refuse it their votes; only once a supporter's fresh beat confirms the
mark (echoing a beat that carried it) does the primary let peerlink degrade the peer.
The mark goes once the peer has caught up.

*The witness.*  A node of role ``witness`` holds no data: it votes, backs the primary
and records outdated marks as the DR site does, but is never a candidate, a switchover
target or an operator's promotion (``CoreConfig.holds_data``).  Nothing above needs the
third site's data, only what it heard and granted, which is its hard state.

*Histories.*  Each promotion starts a new generation on its epoch (blockstore); a
former primary that learns of a higher epoch goes STALE and rejoins as a replica of the
new primary (keeping what only it had as a ``diverged-*`` snapshot); if it held a valid
lease at that moment, both served at once (only an operator's DR promotion or resolve
can cause that) and the daemon checks for a split brain before it rejoins.

Times are seconds of the node's monotonic clock; wall-clock jumps never reach the core.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from .failover import Action, Event, State, step

LEASE_FRACTION: Final = 0.95  # lease = this x timeout: room for 2.5 % of clock-rate drift
SENT_WINDOW: Final = 128  # beats whose send time is kept (echoes older than this are stale)
PROMOTE_RETRY_AFTER: Final = 10.0  # after a promotion that *failed* (an I/O error)
REJOIN_RETRY_AFTER: Final = 2.0
CAMPAIGN_TIMEOUT_FACTOR: Final = 2.0  # a campaign without a majority ends after this x timeout
ECHO_AT_ONCE_EVERY: Final = 0.2  # x interval: how often a supporter may answer out of turn

MAIN_SITE: Final = ("primary", "secondary")
WITNESS_ROLE: Final = "witness"  # votes and records outdated marks; holds no data
REPLICA_ROLES: Final = ("dr", WITNESS_ROLE)  # never campaign on their own: State.WITNESS
# A node in one of these states is on its way to serving: not a reason to campaign.
BUSY_STATES: Final = frozenset({"starting", "promoting", "reclaiming"})


def majority_of(sites: int) -> int:
    """How many of ``sites`` nodes (this one included) make a majority: the one quorum
    rule, for the core's votes and leases and for what `nbdgw status` shows."""
    return sites // 2 + 1


@dataclass(frozen=True)
class CoreConfig:
    me: str
    role: str  # installed role: "primary", "secondary", "dr" or "witness"
    peers: Mapping[str, str]  # peer name -> installed role
    sync_peers: frozenset[str] = frozenset()  # shipped to synchronously when primary
    timeout: float = 2.0
    fence_margin: float = 1.0
    interval: float = 0.5
    auto: bool = True

    @property
    def lease(self) -> float:
        return LEASE_FRACTION * self.timeout

    @property
    def majority(self) -> int:
        return majority_of(len(self.peers) + 1)

    def role_of(self, node: str) -> str | None:
        return self.role if node == self.me else self.peers.get(node)

    def may_campaign(self, node: str) -> bool:
        return self.role_of(node) in MAIN_SITE

    def holds_data(self, node: str) -> bool:
        """A witness holds no data: it is never a candidate, target or primary."""
        return self.role_of(node) != WITNESS_ROLE


@dataclass(frozen=True)
class HardState:
    """What survives a restart (node-state.json): written before any beat shows it."""

    role: str  # runtime: "primary" (this node's volumes are primary volumes) | replica role
    epoch: int = 0  # the highest epoch with a known primary
    primary: str | None = None  # that primary
    vote_epoch: int = 0  # the last vote granted (own campaigns included)
    vote_for: str | None = None
    outdated: frozenset[str] = frozenset()  # nodes the primary of ``epoch`` outdated
    quorum_exempt: bool = False  # promoted by an operator without a majority
    # The highest epoch this node voted for *another* node on (and who): a primary may
    # have served there, so data older than it must not be elected.
    granted_epoch: int = 0
    granted_to: str | None = None
    served_epoch: int = 0  # the highest epoch on which this node held a write lease
    floor_epoch: int = 0  # the highest epoch on which any node is known to have held one


@dataclass(frozen=True)
class Echo:
    boot: bytes  # the peer's boot nonce
    seq: int  # the last counter heard from it
    held: float  # seconds between hearing it and sending this beat
    fresh: bool = False  # that beat counted as evidence of life here (it echoed my boot)


@dataclass(frozen=True)
class BeatBody:
    """What one beat says (the envelope, gateway/heartbeat.py, adds node, boot, counter)."""

    state: str
    epoch: int
    primary: str | None
    vote_epoch: int
    vote_for: str | None
    serving: bool  # holds a valid write lease
    consistent: bool  # every replica of this node is Consistent
    campaign: int = 0  # the epoch it campaigns for (0: none)
    precampaign: int = 0  # the epoch it asks pre-votes for (0: none): nothing is cast yet
    prevotes: tuple[str, ...] = ()  # candidates it would vote for now
    data_epoch: int = 0  # the epoch of the generation its data belongs to
    served_epoch: int = 0  # the highest epoch on which it held a write lease
    outdated: tuple[str, ...] = ()
    handover_to: str | None = None
    discarding: str | None = None
    echo: Mapping[str, Echo] = field(default_factory=dict)
    sees: Mapping[str, float] = field(default_factory=dict)  # s since a fresh beat
    sync: tuple[str, ...] = ()  # its sync peers when primary (the pair must agree)

    def supports(self, node: str, epoch: int) -> bool:
        """Does the sender of this beat back ``node`` as primary on ``epoch``?"""
        return ((self.epoch == epoch and self.primary == node and self.vote_epoch <= epoch)
                or (self.vote_epoch == epoch and self.vote_for == node))


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class BeatIn:
    """An authenticated beat that passed the replay guard."""

    now: float
    node: str
    boot: bytes
    seq: int
    body: BeatBody


@dataclass(frozen=True)
class Facts:
    """What the daemon observed locally (volumes and links)."""

    now: float
    consistent: bool  # every replica volume is Consistent (primary volumes are)
    data_epoch: int = 0  # the oldest epoch among the generations of its volumes' data
    stalled: frozenset[str] = frozenset()  # sync peers that stopped acknowledging
    healthy: frozenset[str] = frozenset()  # sync peers acknowledging every write again
    streaming: frozenset[str] = frozenset()  # peers streaming every volume (switchover)
    split_brain: bool = False  # a split-brain record waits for `nbdgw resolve`
    split_brain_with: str | None = None  # the other node of that record


@dataclass(frozen=True)
class Done:
    """A slow action finished: ``kind`` promote, reclaim, rejoin or drain."""

    now: float
    kind: str
    ok: bool
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """An operator request from the control socket: promote, switchover, resolve."""

    now: float
    req_id: int
    op: str
    args: Mapping[str, Any] = field(default_factory=dict)


CoreEvent = Tick | BeatIn | Facts | Done | Request


# -- outputs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Out:
    """One action for the daemon: ``kind`` names it, ``args`` its parameters."""

    kind: str  # an Action value, or: drain, abort_drain, degrade, reply, log, clear_split_brain
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Ready:
    actions: list[Out] = field(default_factory=list)
    persist: HardState | None = None
    beat: BeatBody | None = None
    lease_until: float = -math.inf


@dataclass
class PeerView:
    boot: bytes = b""
    seq: int = 0  # its last counter (echoed back to it)
    seq_at: float = -math.inf  # when that beat arrived
    fresh_at: float = -math.inf  # when the last fresh beat arrived
    body: BeatBody | None = None  # the last fresh beat
    anchor: float = -math.inf  # my send time of the newest beat of mine it counted fresh
    seq_fresh: bool = False  # the beat of ``seq`` was fresh
    serving_at: float = -math.inf  # when a fresh beat last said it holds a lease
    rtt: float | None = None  # round trip: my send time to its echo, minus its hold
    high: dict[bytes, int] = field(default_factory=dict)  # boot -> highest counter seen
    mine_seq: int = 0  # the newest beat of mine that a fresh beat of it echoed


class CoreBase:
    """What every node core shares (this one on heartbeats, gateway/etcdcore.py on etcd):
    the start state from the hard state, the ``Ready`` a step builds and its helpers, the
    failover table's transitions, operator request dispatch and how a step ends (the
    first lease on an epoch persisted, nbdkit's lease only while serving)."""

    cfg: Any
    hard: HardState
    state: State
    now: float
    lease_until: float
    rejoin_at: float | None
    rejoin_args: dict[str, Any] | None
    draining: tuple[str, int, float] | None  # a switchover's drain: target, req_id, deadline
    _ready: Ready

    def _start_state(self, role: str, auto: bool, split_brain: bool) -> None:
        """The state a core starts in, from what it persisted (``role``: its installed
        role)."""
        hard = self.hard
        if not auto:
            self.state = (State.PRIMARY if hard.role == "primary" else
                          State.WITNESS if role in REPLICA_ROLES else State.STANDBY)
        elif split_brain:
            self.state = State.STALE
        elif hard.role == "primary" and hard.primary not in (None, self.cfg.me):
            # It stopped while rejoining a newer primary: finish that first.
            self.state = State.STALE
            self.rejoin_args = {"preserve": True, "adopt": False, "concurrent": False}
            self.rejoin_at = self.now
        elif hard.role == "primary":
            self.state = State.STARTING
        else:
            self.state = State.WITNESS if role in REPLICA_ROLES else State.STANDBY
        self._ready = Ready()

    def _end_step(self) -> Ready:
        """nbdkit is handed a lease only while serving; a fenced node's computed lease
        is for its own hysteresis.  The first lease on an epoch is persisted first."""
        serving = self.state is State.PRIMARY and self._lease_valid()
        if serving and self.hard.served_epoch < self.hard.epoch:
            self._persist(served_epoch=self.hard.epoch,
                          floor_epoch=max(self.hard.floor_epoch, self.hard.epoch))
        r = self._ready
        r.lease_until = self.lease_until if self.state is State.PRIMARY else -math.inf
        return r

    def _lease_valid(self) -> bool:
        raise NotImplementedError

    def _persist(self, **changes: Any) -> None:
        new = replace(self.hard, **changes)
        if new != self.hard:
            self.hard = new
            self._ready.persist = new

    def _do(self, kind: str, **args: Any) -> None:
        self._ready.actions.append(Out(kind, args))

    def _log_fields(self) -> dict[str, Any]:
        """Fields every log action of this core carries."""
        return {}

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self._do("log", level=level, event=event, **self._log_fields(), **fields)

    def _reply(self, req_id: int, payload: dict[str, Any]) -> None:
        self._do("reply", req_id=req_id, payload=payload)

    def _drain_lost(self, why: str) -> None:
        """Fenced (or deposed) while a switchover drained: the switchover failed here,
        now.  Nothing resumes on this node (nbdkit is killed with the held requests, never
        acknowledged); the daemon stops the drain, which would hold the worker, and the
        rejoin queued behind it, until its timeout (lab schedules: 30 s)."""
        if self.draining is None:
            return
        target, req_id, _ = self.draining
        self.draining = None
        me, p = self.cfg.me, self.hard.primary
        where = (f"; node {p} is primary on epoch {self.hard.epoch}" if p not in (None, me)
                 else "; the cluster elects a primary without it")
        self._log("error", "switchover_failed", to=target, reason=why,
                  state=self.state.value, note="lost the primary role during the drain")
        self._do("abort_drain", reason=why)
        self._reply(req_id, {
            "error": f"switchover to {target} failed: node {me} lost its primary role during "
                     f"the drain ({why}); it is {self.state.value} now: client I/O is not "
                     "resumed here (the requests held were never acknowledged; clients "
                     f"retry on the primary){where}",
            "lost_primary": True, "state": self.state.value})

    def _feed(self, event: Event, **args: Any) -> None:
        old = self.state
        self.state, actions = step(old, event)
        self._log("warning" if self.state is not old else "info", "failover_transition",
                  trigger=event.value, old=old.value, new=self.state.value,
                  actions=[a.value for a in actions])
        for a in actions:
            self._action(a, **args)

    def _action(self, a: Action, **args: Any) -> None:
        raise NotImplementedError

    def _request(self, r: Request) -> None:
        if r.op == "promote":
            self._operator_promote(r)
        elif r.op == "switchover":
            self._switchover(r)
        elif r.op == "resolve":
            self._resolve(r)
        else:
            self._reply(r.req_id, {"error": f"unknown request {r.op!r}"})

    def _operator_promote(self, r: Request) -> None:
        raise NotImplementedError

    def _switchover(self, r: Request) -> None:
        raise NotImplementedError

    def _resolve(self, r: Request) -> None:
        raise NotImplementedError


class NodeCore(CoreBase):
    """All failover state of one node; ``step(event)`` -> ``Ready``."""

    cfg: CoreConfig

    def __init__(self, cfg: CoreConfig, hard: HardState, now: float, boot: bytes,
                 split_brain: bool = False) -> None:
        self.cfg = cfg
        self.hard = hard
        self.boot = boot
        self.started = now
        self.now = now
        self.peers = {p: PeerView() for p in cfg.peers}
        self.seq = 0
        self.sent: dict[int, float] = {}
        self.next_beat = now
        self.last_sent = -math.inf
        self.lease_until = -math.inf
        self.lease_since: float | None = None  # a valid lease continuously since
        self.consistent = hard.role == "primary"
        self.data_epoch = hard.epoch if hard.role == "primary" else 0
        self.split_brain = split_brain
        self.facts: Facts | None = None
        self.campaign = 0
        self.campaign_since = 0.0
        self.precampaign = 0
        self.precampaign_since = 0.0
        self.prevotes: dict[str, float] = {}  # candidate -> when this node would vote
        self.campaign_after = 0.0  # no new campaign before this
        self.promote_blocked_until = -math.inf
        self.rejoin_at: float | None = None
        self.rejoin_args: dict[str, Any] | None = None
        self.outdate_req: dict[str, int] = {}  # peer -> my first seq that carried it
        self.confirmed: frozenset[str] = frozenset()
        self.handover_to: str | None = None
        self.discarding: str | None = None
        self.draining: tuple[str, int, float] | None = None  # target, req_id, deadline
        self.pending: dict[str, tuple[int, float]] = {}  # what -> (req_id, deadline)
        self.switchover_epoch = 0
        self._switchover_info: dict[str, Any] = {}
        self.rejoin_inflight = False
        self._announced = False  # the daemon was told the (empty) degrade set once
        self.voted_at = -math.inf  # when this node last granted a vote to another
        self._last_refusal: tuple[str, int, str] | None = None
        self.split_brain_with: str | None = None
        self._start_state(cfg.role, cfg.auto, split_brain)

    # -- the entry point ----------------------------------------------------------------

    def step(self, ev: CoreEvent) -> Ready:
        self._ready = Ready()
        self.now = max(self.now, ev.now)
        if isinstance(ev, BeatIn):
            self._beat_in(ev)
        elif isinstance(ev, Facts):
            self._facts(ev)
        elif isinstance(ev, Done):
            self._done(ev)
        elif isinstance(ev, Request):
            self._request(ev)
        if not self._announced:
            self._set_confirmed(frozenset())  # whatever an earlier run allowed is void
            h = self.hard
            if self.cfg.auto and h.vote_for == self.cfg.me and h.vote_epoch > h.epoch:
                # It stopped during its own campaign or promotion, before serving on that
                # epoch: release the nodes that voted for it.
                self._resign("restarted during its own campaign")
        self._decide()
        if self.cfg.auto and self.now >= self.next_beat:
            self._send_beat()
        return self._end_step()

    # -- helpers ----------------------------------------------------------------------------

    def _fresh(self, p: str) -> bool:
        return self.now - self.peers[p].fresh_at < self.cfg.timeout

    def _silence(self, p: str) -> float:
        """Seconds without a fresh beat from ``p``, counted from this node's start at
        most: a node that just booted has forgotten what it heard before, so it must
        not vote or campaign as if it had heard nothing for ever."""
        return self.now - max(self.peers[p].fresh_at, self.started)

    def alive(self) -> set[str]:
        return {p for p in self.peers if self._fresh(p)}

    def _seen_epoch(self) -> int:
        """The highest epoch of any vote or primary seen (own included)."""
        top = max(self.hard.epoch, self.hard.vote_epoch, self.campaign)
        for v in self.peers.values():
            if v.body is not None:
                top = max(top, v.body.epoch, v.body.vote_epoch, v.body.campaign)
        return top

    def _action(self, a: Action, **args: Any) -> None:
        if a is Action.FENCE:
            self.lease_until = -math.inf
            self.lease_since = None
            self._do(a.value, reason=args.get("reason", "lease lost"),
                     handover=self.handover_to is not None)
            self._drain_lost(str(args.get("reason", "lease lost")))
        elif a is Action.REJOIN:
            self.rejoin_args = {"preserve": args.get("preserve", True),
                                "adopt": self._discarded_by_primary(),
                                "concurrent": args.get("concurrent", False)}
            self.rejoin_at = self.now
            self._try_rejoin()
        elif a is Action.FOLLOW:
            self._do(a.value, primary=self.hard.primary, epoch=self.hard.epoch,
                     adopt=self._discarded_by_primary())
        elif a in (Action.PROMOTE, Action.RECLAIM):
            self._do(a.value, epoch=args["epoch"], why=args.get("why", ""))
        else:
            self._do(a.value)

    def _discarded_by_primary(self) -> bool:
        p = self.hard.primary
        v = self.peers.get(p) if p is not None else None
        return v is not None and v.body is not None and v.body.discarding == self.cfg.me

    # -- beats ------------------------------------------------------------------------------

    def _send_beat(self) -> None:
        self.seq += 1
        self.last_sent = self.now
        self.sent[self.seq] = self.now
        self.sent.pop(self.seq - SENT_WINDOW, None)
        # The primary beats twice as often, and supporters answer its beats at once: its
        # lease is anchored at beats of its that came back, so a blip of up to half the
        # timeout passes without fencing, and a cut-off primary still stops in time.
        self.next_beat = self.now + self.cfg.interval * (
            0.5 if self.state is State.PRIMARY else 1.0)
        h = self.hard
        echo = {p: Echo(v.boot, v.seq, max(0.0, round(self.now - v.seq_at, 6)), v.seq_fresh)
                for p, v in self.peers.items() if v.seq}
        sees = {p: (round(self.now - v.fresh_at, 3) if v.fresh_at > -math.inf else math.inf)
                for p, v in self.peers.items()}
        outdated = tuple(sorted(h.outdated))
        self._ready.beat = BeatBody(
            state=self.state.value, epoch=h.epoch, primary=h.primary,
            vote_epoch=h.vote_epoch, vote_for=h.vote_for, serving=self._lease_valid(),
            consistent=self.consistent, campaign=self.campaign, data_epoch=self.data_epoch,
            precampaign=self.precampaign,
            prevotes=tuple(sorted(c for c, at in self.prevotes.items()
                                  if self.now - at < self.cfg.timeout)),
            served_epoch=h.served_epoch,
            outdated=outdated,
            handover_to=self.handover_to, discarding=self.discarding, echo=echo, sees=sees,
            sync=tuple(sorted(self.cfg.sync_peers)))

    @property
    def last_seq(self) -> int:
        return self.seq

    def _beat_in(self, ev: BeatIn) -> None:
        v = self.peers.get(ev.node)
        if v is None:
            return  # the heartbeat layer drops these; never trust them here
        if ev.seq <= v.high.get(ev.boot, 0):
            return  # a duplicate or a reordered older beat: nothing new
        if ev.boot not in v.high and len(v.high) >= 8:
            v.high.pop(next(iter(v.high)))
        v.high[ev.boot] = ev.seq
        mine = ev.body.echo.get(self.cfg.me)
        fresh = mine is not None and mine.boot == self.boot and mine.seq in self.sent
        if fresh and mine is not None and mine.seq < v.mine_seq:
            return  # it left the peer before the beat this node holds: a late one
        # Echoed back in the next beat (a restarted peer needs that to prove itself).
        v.boot, v.seq, v.seq_at, v.seq_fresh = ev.boot, ev.seq, ev.now, fresh
        if not fresh or mine is None:
            return  # not fresh: it does not echo a beat of this boot (yet)
        v.mine_seq = mine.seq
        v.rtt = round(max(0.0, ev.now - self.sent[mine.seq] - mine.held), 6)
        if mine.fresh:
            # It counted that beat of mine as a sign of life: it cannot vote against me
            # until ``timeout`` after it received it, which was after I sent it.
            v.anchor = max(v.anchor, self.sent[mine.seq])
        v.fresh_at = ev.now
        if ev.body.serving:
            v.serving_at = ev.now
            if ev.node == self.hard.primary and self.now - self.last_sent \
                    >= ECHO_AT_ONCE_EVERY * self.cfg.interval:
                # Answer the primary at once: its lease is anchored at the beats of its
                # that come back, so the sooner they do, the longer a blip it survives.
                self.next_beat = self.now
        v.body = ev.body
        self._learn(ev.node, ev.body)

    def _learn(self, node: str, b: BeatBody) -> None:
        """Take what a fresh beat teaches: newer epochs, outdated marks, votes asked."""
        h = self.hard
        if b.epoch > h.epoch and b.primary is not None:
            self._new_epoch(b.epoch, b.primary, f"heard from {node}")
        elif (b.epoch == h.epoch and h.primary is None and b.primary is not None):
            self._persist(primary=b.primary)
        # The primary of the known epoch decides who is outdated; supporters mirror it.
        if (node == self.hard.primary and b.state == State.PRIMARY.value
                and b.epoch == self.hard.epoch and self.hard.vote_epoch <= b.epoch
                and frozenset(b.outdated) != self.hard.outdated):
            self._persist(outdated=frozenset(b.outdated))
            self._log("warning", "outdated_marks", primary=node, epoch=b.epoch,
                      outdated=sorted(b.outdated))
        h = self.hard
        served = max(b.served_epoch, b.epoch if b.serving else 0)
        if served > h.floor_epoch:
            self._persist(floor_epoch=served)
        if (node == h.granted_to and b.served_epoch < h.granted_epoch < b.vote_epoch
                and not b.campaign and not b.serving
                and b.state not in (State.PRIMARY.value, *BUSY_STATES)):
            # It never served on the epoch this node voted it: it would have persisted
            # that epoch first.  The grant no longer raises the bar for others' data.
            self._persist(granted_epoch=0, granted_to=None)
        if b.campaign:
            self._consider_vote(node, b)
        self._consider_prevote(node, b)

    def _new_epoch(self, epoch: int, primary: str, why: str) -> None:
        old = self.hard.epoch
        # Outdated marks stay until the primary says otherwise (its beats replace them):
        # a node that lacks acknowledged writes lacks them whatever the epoch.
        changes: dict[str, Any] = {"epoch": epoch, "primary": primary}
        if primary != self.cfg.me:
            changes["quorum_exempt"] = False
        self._persist(**changes)
        self._log("warning", "newer_epoch", epoch=epoch, primary=primary, old_epoch=old,
                  why=why)
        if primary == self.cfg.me:
            return
        if self.campaign and (self.campaign <= epoch or self.state in (
                State.STARTING, State.PRIMARY, State.FENCED, State.STALE)):
            # A former primary rejoins first; it may campaign again once consistent.
            self._end_campaign(f"node {primary} is primary on epoch {epoch}")
        if self.state in (State.STARTING, State.PRIMARY, State.FENCED, State.STALE):
            concurrent = self.state is State.PRIMARY and self._lease_valid()
            self.handover_to = None if self.handover_to != primary else self.handover_to
            self._feed(Event.NEWER_PRIMARY, reason=f"node {primary} serves on epoch {epoch}",
                       concurrent=concurrent, preserve=self.handover_to is None)
        elif self.state in (State.STANDBY, State.WITNESS):
            self._feed(Event.NEWER_PRIMARY)
        # PROMOTING / RECLAIMING: the action finishes first; then PRIMARY learns of it.

    def _consider_vote(self, cand: str, b: BeatBody) -> None:
        h = self.hard
        e = b.campaign
        if e <= h.vote_epoch or e <= h.epoch or cand == self.cfg.me:
            if h.vote_epoch == e and h.vote_for == cand:
                return  # granted already (it will see it in the next beat)
            return
        why = self._vote_refusal(cand, b)
        if why is not None:
            if self._last_refusal != (cand, e, why):
                self._last_refusal = (cand, e, why)
                self._log("info", "vote_refused", candidate=cand, epoch=e, reason=why)
            return
        self._persist(vote_epoch=e, vote_for=cand, granted_epoch=max(e, h.granted_epoch),
                      granted_to=cand if e >= h.granted_epoch else h.granted_to)
        self.voted_at = self.now
        self._log("warning", "vote_granted", candidate=cand, epoch=e)
        self.next_beat = self.now  # tell it now

    def _consider_prevote(self, cand: str, b: BeatBody) -> None:
        """Would this node vote for ``cand`` if it campaigned now?  Nothing is cast or
        persisted: a candidate cut off from the primary alone does not disturb it."""
        e = b.precampaign
        h = self.hard
        if not e or e <= h.vote_epoch or e <= h.epoch:
            self.prevotes.pop(cand, None)
            return
        if self._vote_refusal(cand, b, e) is None:
            if cand not in self.prevotes:
                self.next_beat = self.now
            self.prevotes[cand] = self.now
        else:
            self.prevotes.pop(cand, None)

    def _vote_refusal(self, cand: str, b: BeatBody,  # noqa: PLR0911
                      epoch: int | None = None) -> str | None:
        h = self.hard
        e = b.campaign if epoch is None else epoch
        if not self.cfg.holds_data(cand):
            return f"{cand} is a witness: it holds no data"
        handover = self._handover_from_primary() == cand or self._resigned_for(cand, e)
        if cand in h.outdated:
            return f"{cand} is outdated (it lacks writes acknowledged on epoch {h.epoch})"
        if not b.consistent:
            return f"{cand} is not Consistent"
        floor = self._data_floor(cand)
        if b.data_epoch < floor:
            return (f"{cand} holds data of epoch {b.data_epoch}, older than epoch {floor}, "
                    "which may have served: it could lose or bring back writes")
        reclaim = b.state in (State.FENCED.value, State.STARTING.value)
        if not handover and not reclaim and not self.cfg.may_campaign(cand):
            return f"{cand} is a DR site: only an operator promotes it"
        if self.state in (State.PRIMARY, State.PROMOTING, State.RECLAIMING):
            return f"this node is {self.state.value}"
        backed = self._backed()
        if backed is not None and backed != cand and not handover:
            if backed == self.cfg.me:
                if self._lease_valid() or self.campaign:
                    return "this node holds the write lease or campaigns itself"
            elif not self._gone(backed, self.cfg.timeout):
                ago = self._silence(backed)
                return f"{backed}, which this node backs, is alive (heard {ago:.1f} s ago)"
        for n, v in self.peers.items():
            if n != cand and self._fresh(n) and v.body is not None and v.body.serving \
                    and v.body.epoch >= h.epoch:
                return f"{n} serves on epoch {v.body.epoch}"
        return None

    def _data_floor(self, cand: str) -> int:
        """The oldest data epoch a candidate may hold: every epoch a primary held a
        lease on as far as this node knows, and the epoch it voted another node on
        (that one may have served without this node hearing of it).  Any majority
        includes a voter that knows, as in Raft's up-to-date check."""
        h = self.hard
        granted = h.granted_epoch if h.granted_to not in (None, cand) else 0
        return max(h.floor_epoch, h.served_epoch, granted)

    def _gone(self, node: str, wait: float) -> bool:
        """``node`` can no longer hold a lease on the epoch this node knows it by: no
        fresh beat from it for ``wait``, or its fresh beat says it gave that epoch up
        (it voted for a newer one while holding no lease; it never serves on it again)."""
        if self._silence(node) >= wait:
            return True
        v = self.peers.get(node)
        b = v.body if v is not None else None
        # A node that campaigns may yet win; one that voted past its epoch and is not
        # campaigning (nor promoting) gave that epoch up.  (Not "it has not campaigned
        # yet for the epoch this node voted it": it may be about to, with that vote.)
        if b is None or b.campaign or b.serving or b.state in (State.PRIMARY.value,
                                                               *BUSY_STATES):
            return False
        return b.vote_epoch > b.epoch

    def _resigned_for(self, cand: str, epoch: int) -> bool:
        """The node this node backs voted for ``cand`` on the epoch it campaigns for: it
        gave up its own claim (a drained switchover, or a fenced primary standing aside)."""
        backed = self._backed()
        v = self.peers.get(backed) if backed is not None else None
        return (v is not None and v.body is not None and self._fresh_of(v)
                and v.body.vote_epoch == epoch and v.body.vote_for == cand)

    def _backed(self) -> str | None:
        """The node this node backs now: the one it last voted for on an epoch above the
        known primary's, else the known primary."""
        h = self.hard
        if h.vote_for is not None and h.vote_epoch > h.epoch:
            return h.vote_for
        return h.primary

    def _handover_from_primary(self) -> str | None:
        """The successor the primary of the known epoch chose: the node it voted for on
        the next epoch while holding no lease (a drained switchover, or a fenced primary
        standing aside).  Its vote is persisted, so this survives restarts of either."""
        p = self.hard.primary
        v = self.peers.get(p) if p is not None else None
        if v is None or v.body is None or v.body.epoch != self.hard.epoch:
            return None
        h = self.hard
        # A node that voted past that primary's epoch since is no longer bound by its
        # word (a candidate's own vote for itself on the next epoch does not count).
        own = h.vote_for == self.cfg.me and h.vote_epoch == h.epoch + 1
        if (self._backed() not in (p, self.cfg.me) or h.vote_epoch > h.epoch) and not own:
            return None
        b = v.body
        if b.handover_to is not None:
            return b.handover_to
        if not b.serving and b.vote_for not in (None, p) and b.vote_epoch == b.epoch + 1:
            return b.vote_for
        return None

    # -- the lease -------------------------------------------------------------------------

    def _lease_valid(self) -> bool:
        return self.lease_until > self.now

    def _compute_lease(self) -> None:
        h = self.hard
        if self.state not in (State.STARTING, State.PRIMARY, State.FENCED):
            self.lease_until = -math.inf
            return
        if (h.primary not in (self.cfg.me, None) and h.epoch) or h.vote_epoch > h.epoch:
            # It backs another node now, or campaigns for a newer epoch: either way it
            # gave up this epoch for good (it may serve again only when elected).
            self.lease_until = -math.inf
            self.lease_since = None
            return
        if h.quorum_exempt:
            self.lease_until = self.now + self.cfg.lease
            return
        anchors = sorted((v.anchor for v in self.peers.values() if v.body is not None
                          and v.body.supports(self.cfg.me, h.epoch)), reverse=True)
        need = self.cfg.majority - 1
        if need == 0:
            self.lease_until = self.now + self.cfg.lease
        elif len(anchors) >= need:
            self.lease_until = max(self.lease_until if self.state is State.PRIMARY
                                   else -math.inf, anchors[need - 1] + self.cfg.lease)
        if self.state is not State.PRIMARY and not self._lease_valid():
            self.lease_until = -math.inf
        if self._lease_valid():
            if self.lease_since is None:
                self.lease_since = self.now
        else:
            self.lease_since = None

    # -- decisions ---------------------------------------------------------------------------

    def _decide(self) -> None:
        if not self.cfg.auto:
            return
        self._compute_lease()
        s = self.state
        if s is State.STARTING:
            heard_all = self.alive() == set(self.peers)
            waited = self.now - self.started >= self.cfg.timeout
            if self._lease_valid() and (heard_all or waited) and not self._other_serving():
                self._feed(Event.QUORUM_OK)
            elif waited and not self._lease_valid():
                self._feed(Event.QUORUM_LOST)
        elif s is State.PRIMARY:
            if self.hard.quorum_exempt and self._real_majority():
                self._persist(quorum_exempt=False)
                self._log("warning", "quorum_regained", epoch=self.hard.epoch)
            if not self._lease_valid():
                self._feed(Event.QUORUM_LOST, reason="this primary lost the majority of "
                           "the sites: it stopped serving so that another may take over")
            else:
                self._outdating()
        elif s is State.FENCED:
            steady = (self.lease_since is not None
                      and self.now - self.lease_since >= self.cfg.timeout)
            if steady and not self._other_serving():
                self._feed(Event.QUORUM_OK)
        elif s is State.STALE and self.rejoin_at is not None and self.now >= self.rejoin_at:
            self._try_rejoin()
        elif s is State.STANDBY:
            self._release_own_vote()
        self._campaign_step()
        self._pending_replies()

    def _release_own_vote(self) -> None:
        """A standby's own campaign ended without a promotion (it timed out, or a former
        primary learned of a newer one and rejoined): release the nodes that voted for
        it, as after a restart mid-campaign.  Until it votes past that epoch they must
        assume it may have served there and refuse any candidate whose data is older
        (seed 10367 of the witness soak: the only current candidate stayed blocked)."""
        h = self.hard
        if not self.campaign and not self.precampaign and h.vote_for == self.cfg.me \
                and h.vote_epoch > h.epoch:
            self._resign("its own campaign ended without a promotion")

    def _real_majority(self) -> bool:
        n = sum(1 for v in self.peers.values() if v.body is not None and self._fresh_of(v)
                and v.body.supports(self.cfg.me, self.hard.epoch))
        return n + 1 >= self.cfg.majority

    def _fresh_of(self, v: PeerView) -> bool:
        return self.now - v.fresh_at < self.cfg.timeout

    def _other_serving(self) -> bool:
        return any(self._fresh(p) and v.body is not None and v.body.serving
                   for p, v in self.peers.items())

    # -- campaigns ---------------------------------------------------------------------------

    def _campaign_step(self) -> None:
        if self.campaign:
            votes = 1 + sum(1 for v in self.peers.values() if v.body is not None
                            and v.body.vote_epoch == self.campaign
                            and v.body.vote_for == self.cfg.me)
            if votes >= self.cfg.majority:
                e = self.campaign
                self.campaign = 0
                if self.state not in (State.STANDBY, State.WITNESS, State.FENCED,
                                      State.STARTING) or not self.consistent:
                    return  # it moved on meanwhile (an operator promotion, a rejoin)
                self._log("warning", "elected", epoch=e, votes=votes)
                self._feed(Event.ELECTED, epoch=e, why=self._why_elected())
            elif self.now - self.campaign_since > CAMPAIGN_TIMEOUT_FACTOR * self.cfg.timeout:
                self._end_campaign("no majority of votes")
            return
        why = self._campaign_reason()
        if why is None:
            if self.precampaign:
                self.precampaign = 0  # the reason went away (the primary is back)
            return
        if self._handover_from_primary() == self.cfg.me:
            self.precampaign = 0
            self._start_campaign(why)  # the primary's own vote: no pre-vote needed
            return
        if not self.precampaign:
            self.precampaign = self._seen_epoch() + 1
            self.precampaign_since = self.now
            self.next_beat = self.now
            self._log("info", "precampaign", epoch=self.precampaign, why=why)
            return
        yes = 1 + sum(1 for v in self.peers.values() if v.body is not None
                      and self._fresh_of(v) and self.cfg.me in v.body.prevotes)
        if yes >= self.cfg.majority:
            self.precampaign = 0
            self._start_campaign(f"{why}; a majority would vote for it")
        elif self.now - self.precampaign_since > CAMPAIGN_TIMEOUT_FACTOR * self.cfg.timeout:
            self.precampaign = 0
            self._end_campaign("no majority would vote for it")

    def _why_elected(self) -> str:
        h = self._handover_from_primary()
        if h == self.cfg.me:
            return f"switchover from {self.hard.primary}"
        return f"elected: primary {self.hard.primary} gone"

    def _campaign_reason(self) -> str | None:  # noqa: PLR0911
        """Why this node should campaign now (None: it should not).  A campaign is a
        vote for itself: the node it backs must be gone, as for any vote."""
        if self.now < self.campaign_after or self.now < self.promote_blocked_until \
                or not self.cfg.holds_data(self.cfg.me):
            return None
        s, h = self.state, self.hard
        handover = self._handover_from_primary() == self.cfg.me
        if handover and s in (State.STANDBY, State.WITNESS) and self.consistent \
                and self.data_epoch >= self.hard.epoch:
            return f"{h.primary} handed over to this node"
        current = (self.cfg.me not in h.outdated and self.consistent
                   and self.data_epoch >= self._data_floor(self.cfg.me))
        # A replica of the DR site is never promoted automatically; a node whose volumes
        # are primary volumes (a DR site after a switchover to it included) may reclaim.
        eligible = current and (self.cfg.may_campaign(self.cfg.me) or s in (
            State.FENCED, State.STARTING))
        wait = self.cfg.timeout + self.cfg.fence_margin
        backed = self._backed()
        if s is State.STANDBY:
            if not eligible or self._other_serving():
                return None
            if backed is None or backed == self.cfg.me:
                backed = h.primary
            if backed is None or backed not in self.peers:
                gone = self.now - self.started >= wait
            else:
                gone = self.now - self.voted_at >= wait and self._gone(backed, wait)
            return f"{backed or 'no primary'} gone for {wait:g} s" if gone else None
        if s in (State.FENCED, State.STARTING):
            # Supporters voted past this node's epoch and nobody serves: it can never
            # serve on that epoch again.  Take it back on a newer one (its volumes hold
            # every write it acknowledged), or, if it may not, give it up explicitly.
            moved = [p for p, v in self.peers.items() if v.body is not None
                     and v.body.vote_epoch > h.epoch]
            quiet = self.now - self.started >= wait
            if backed not in (None, self.cfg.me) and not self._gone(backed, wait):
                return None
            if moved and quiet and not self._other_serving() and not self._lease_valid():
                if eligible:
                    return f"supporters {sorted(moved)} voted past epoch {h.epoch}"
                self._resign(f"supporters {sorted(moved)} voted past epoch {h.epoch}")
        return None

    def _resign(self, why: str) -> None:
        """Give up this node's epoch for good (a vote for nobody on a newer one), so that
        the others may elect a primary without waiting for it to fall silent."""
        h = self.hard
        if h.vote_epoch > h.epoch and h.vote_for is None:
            return  # given up already
        e = self._seen_epoch() + 1
        self._persist(vote_epoch=e, vote_for=None)
        self.voted_at = self.now
        self._log("warning", "resigned", epoch=h.epoch, why=why)
        self.next_beat = self.now

    def _start_campaign(self, why: str) -> None:
        handover = self._handover_from_primary() == self.cfg.me
        e = self.hard.epoch + 1 if handover else self._seen_epoch() + 1
        if e <= self.hard.vote_epoch:
            e = self.hard.vote_epoch + 1
        self.campaign = e
        self.campaign_since = self.now
        self._persist(vote_epoch=e, vote_for=self.cfg.me)
        self._log("warning", "campaign", epoch=e, why=why)
        self.next_beat = self.now

    def _end_campaign(self, why: str) -> None:
        self._log("info", "campaign_ended", epoch=self.campaign, why=why)
        self.campaign = 0
        # Not all at once again: a per-node back-off, so two candidates do not collide.
        spread = (zlib.crc32(self.cfg.me.encode()) % 1000) / 1000
        self.campaign_after = self.now + self.cfg.timeout * (1 + spread)

    # -- outdating (sync peers) -----------------------------------------------------------------

    def _outdating(self) -> None:
        f = self.facts
        if f is None:
            return
        for p in sorted(self.hard.outdated - set(self.outdate_req)):
            self.outdate_req[p] = self.seq + 1  # marks persisted before a restart
        for p in sorted(f.stalled & self.cfg.sync_peers):
            if p not in self.outdate_req:
                self.outdate_req[p] = self.seq + 1  # the next beat carries it
                # Persisted first: after a restart this node must still refuse it a vote.
                self._persist(outdated=self.hard.outdated | {p})
                self._log("error", "outdating_peer", peer=p, epoch=self.hard.epoch,
                          note="it stopped acknowledging: it may not be promoted until "
                               "it has caught up; writes wait until a witness confirms")
                self.next_beat = self.now
        for p in sorted(set(self.outdate_req) & f.healthy):
            if p not in f.stalled:
                del self.outdate_req[p]
                self._persist(outdated=self.hard.outdated - {p})
                self._log("warning", "peer_current_again", peer=p, epoch=self.hard.epoch)
                self.next_beat = self.now
        self._set_confirmed(frozenset(p for p, first in self.outdate_req.items()
                                      if self._confirmed(p, first)))

    def _set_confirmed(self, confirmed: frozenset[str]) -> None:
        """Tell peerlink which sync peers it may stop waiting for (outdated.json)."""
        if confirmed != self.confirmed or not self._announced:
            self._announced = True
            self.confirmed = confirmed
            self._do("degrade", epoch=self.hard.epoch, peers=sorted(confirmed))

    def _confirmed(self, peer: str, first_seq: int) -> bool:
        """A supporter other than ``peer`` recorded the mark, in a beat that echoes one of
        mine carrying it."""
        for n, v in self.peers.items():
            b = v.body
            if n == peer or b is None or not b.supports(self.cfg.me, self.hard.epoch):
                continue
            e = b.echo.get(self.cfg.me)
            if e is not None and e.boot == self.boot and e.seq >= first_seq \
                    and peer in b.outdated:
                return True
        return False

    # -- facts and results ------------------------------------------------------------------

    def _facts(self, f: Facts) -> None:
        self.facts = f
        if self.hard.role != "primary":
            self.consistent = f.consistent
        else:
            self.consistent = True
        self.data_epoch = f.data_epoch
        if f.split_brain != self.split_brain:
            self.split_brain = f.split_brain
        self.split_brain_with = f.split_brain_with

    def _done(self, d: Done) -> None:
        if d.kind == "promote":
            self._promote_done(d)
        elif d.kind == "reclaim":
            self._reclaim_done(d)
        elif d.kind == "rejoin":
            self._rejoin_done(d)
        elif d.kind == "drain":
            self._drain_done(d)

    def _promote_done(self, d: Done) -> None:
        if self.state is not State.PROMOTING:
            return
        pend = self.pending.pop("promote", None)
        if not d.ok:
            self.promote_blocked_until = self.now + PROMOTE_RETRY_AFTER
            self._persist(quorum_exempt=False)
            # Release the nodes that voted for it: it will not serve on that epoch.
            self._resign(f"promotion failed: {d.detail.get('error')}")
            self._feed(Event.PROMOTION_FAILED_DR if self.cfg.role == "dr"
                       else Event.PROMOTION_FAILED)
            if pend is not None:
                self._reply(pend[0], {"error": f"promotion failed: {d.detail.get('error')}"})
            return
        e = int(d.detail["epoch"])
        self._persist(role="primary", epoch=e, primary=self.cfg.me,
                      outdated=self.hard.outdated - {self.cfg.me})
        self.consistent = True
        self.data_epoch = e
        self.outdate_req.clear()
        self._set_confirmed(frozenset())
        self._compute_lease()
        self._feed(Event.PROMOTED)
        if pend is not None:
            self._reply(pend[0], {"ok": True, "node": self.cfg.me, "epoch": e,
                                  **{k: v for k, v in d.detail.items() if k != "epoch"}})

    def _reclaim_done(self, d: Done) -> None:
        if self.state is not State.RECLAIMING:
            return
        pend = self.pending.pop("keep", None)
        if not d.ok:
            self._persist(quorum_exempt=False)
            self._resign(f"reclaim failed: {d.detail.get('error')}")
            self._feed(Event.RECLAIM_FAILED)
            if pend is not None:
                self._reply(pend[0], {"error": f"{d.detail.get('error')}; nothing served"})
            return
        e = int(d.detail["epoch"])
        self._persist(role="primary", epoch=e, primary=self.cfg.me,
                      outdated=self.hard.outdated - {self.cfg.me})
        self.data_epoch = e
        self.outdate_req.clear()
        self._set_confirmed(frozenset())
        self._compute_lease()
        self._feed(Event.RECLAIMED)
        if pend is not None:
            self._reply(pend[0], {"ok": True, "discarded": self.discarding,
                                  "following": self.cfg.me, "epoch": e,
                                  "state": self.state.value})

    def _try_rejoin(self) -> None:
        """Demote towards the newer primary (a switchover's target at once)."""
        args = self.rejoin_args
        if args is None or self.rejoin_inflight:
            return
        primary = self.handover_to or self.hard.primary
        if primary is None or primary == self.cfg.me:
            self.rejoin_at = self.now + REJOIN_RETRY_AFTER
            return
        self.rejoin_at = None
        self.rejoin_inflight = True
        self._do(Action.REJOIN.value, **{**args, "primary": primary})

    def _rejoin_done(self, d: Done) -> None:
        self.rejoin_inflight = False
        if self.state is not State.STALE:
            return
        outcome = d.detail.get("outcome")
        pend = self.pending.pop("resolve", None)
        if d.ok:
            self.rejoin_args = None
            self.split_brain = False
            role = self.cfg.role if self.cfg.role != "primary" else "secondary"
            self._persist(role=role, quorum_exempt=False)
            # A demoted primary is Inconsistent until its resync from the new primary
            # completes (a drained switchover excepted): the daemon says which.
            self.consistent = bool(d.detail.get("consistent", False))
            self.handover_to = None
            self._feed(Event.REJOINED_AS_WITNESS if role == "dr" else Event.REJOINED)
            if pend is not None:
                self._reply(pend[0], {"ok": True, "discarded": self.cfg.me,
                                      "following": self.hard.primary,
                                      "state": self.state.value})
        elif outcome == "split_brain":
            self.split_brain = True
            self.rejoin_args = None
            self._log("error", "split_brain", other=self.hard.primary,
                      detail="both sites took writes; nothing is synced until "
                             "'nbdgw resolve --discard NODE'")
            if pend is not None:
                self._reply(pend[0], {"error": "still in split brain (see the log)"})
        else:
            self.rejoin_at = self.now + REJOIN_RETRY_AFTER
            if pend is not None:
                self._reply(pend[0], {"error": "rejoin did not complete (see the log); the "
                                               "daemon retries"})

    def _drain_done(self, d: Done) -> None:
        if self.draining is None:
            return
        target, req_id, deadline = self.draining
        self.draining = None
        if not d.ok or self.state is not State.PRIMARY:
            self._reply(req_id, {"error": str(d.detail.get("error", "switchover failed"))})
            return
        self.switchover_epoch = self.hard.epoch
        self._persist(vote_epoch=self.hard.epoch + 1, vote_for=target)
        self.voted_at = self.now
        self.handover_to = target
        self.next_beat = self.now
        self._feed(Event.HANDED_OVER, reason="switchover: the target takes over",
                   preserve=False)
        self.pending["switchover"] = (req_id, deadline)
        self._switchover_info = {k: v for k, v in d.detail.items()}
        self._switchover_info.update({"from": self.cfg.me, "to": target})

    def _pending_replies(self) -> None:
        sw = self.pending.get("switchover")
        if sw is not None:
            target = self._switchover_info["to"]
            v = self.peers.get(target)
            serving = (v is not None and v.body is not None and v.body.serving
                       and v.body.epoch > self.switchover_epoch)
            if serving or self.now > sw[1]:
                del self.pending["switchover"]
                self._reply(sw[0], {"ok": True, **self._switchover_info,
                                    "target_serving": serving, "state": self.state.value})

    # -- operator requests ----------------------------------------------------------------

    def _operator_promote(self, r: Request) -> None:
        force = bool(r.args.get("force"))
        me = self.cfg.me
        if not self.cfg.holds_data(me):
            self._reply(r.req_id, {"error": f"node {me} is a witness: it holds no data, so "
                                            "it can never be promoted; promote a data site"})
            return
        if self.state not in (State.WITNESS, State.STANDBY):
            self._reply(r.req_id, {"error": f"node {me} is {self.state.value}: only a "
                                            "standby or witness site can be promoted"})
            return
        if not self.consistent:
            self._reply(r.req_id, {"error": "a replica of this node is Inconsistent (its "
                                            "sync from the primary never completed): it can "
                                            "never be promoted, --force or not"})
            return
        heard = {p: round(self.now - self.peers[p].fresh_at, 1) for p in self.alive()
                 if self.cfg.peers[p] in MAIN_SITE}
        if heard and not force:
            who = ", ".join(f"{p} (heard {a} s ago)" for p, a in sorted(heard.items()))
            self._reply(r.req_id, {"error": f"the main site is alive: {who}; it holds the "
                                            "majority, so promoting this site would make two "
                                            "primaries. Refused; --force overrides this check"})
            return
        e = self._seen_epoch() + 1
        self._persist(vote_epoch=e, vote_for=me, quorum_exempt=True)
        self._log("warning", "operator_promote", forced=force, main_site_heard=heard, epoch=e)
        self.pending["promote"] = (r.req_id, math.inf)
        self._feed(Event.OPERATOR_PROMOTE, epoch=e, why="promoted by an operator")

    def _switchover(self, r: Request) -> None:
        target = str(r.args.get("to"))
        why = self._switchover_refusal(target)
        if why is not None:
            self._reply(r.req_id, {"error": why})
            return
        timeout = float(r.args.get("timeout", 30))
        self.draining = (target, r.req_id, self.now + timeout + 30)
        self._do("drain", target=target, timeout=timeout)

    def _switchover_refusal(self, target: str) -> str | None:  # noqa: PLR0911
        me = self.cfg.me
        if not self.cfg.holds_data(target):
            return (f"{target} is a witness: it holds no data and can never take over; "
                    "switch over to a data site")
        if self.state is not State.PRIMARY:
            return (f"node {me} is {self.state.value}, not the serving primary: run "
                    f"switchover on the primary ({self.hard.primary or 'unknown'})")
        if self.draining is not None:
            return f"a switchover to {self.draining[0]} is under way"
        if target == me:
            return f"node {me} is the primary already"
        if target not in self.peers:
            return (f"{target!r} is not a peer of {me} (peers: "
                    f"{', '.join(self.peers)})")
        v = self.peers[target]
        if not self._fresh(target) or v.body is None:
            return f"{target} is not heard: it cannot take over"
        if v.body.state not in (State.STANDBY.value, State.WITNESS.value):
            return f"{target} is {v.body.state}, not a standby or witness"
        if target in self.outdate_req:
            return f"{target} is outdated (it stopped acknowledging): it cannot take over"
        f = self.facts
        if f is None or target not in f.streaming:
            return (f"{target} is not streaming every volume; switch over once it is in "
                    "sync")
        return None

    def _resolve(self, r: Request) -> None:
        discard = str(r.args.get("discard"))
        me = self.cfg.me
        if self.split_brain and self.state in (State.STANDBY, State.WITNESS):
            # A replica whose upstream's history is unrelated to its own (peerlink
            # refused it): it can only give its own side up; the other keeps its data.
            other = self.split_brain_with or self.hard.primary
            if discard == me:
                self._do("clear_split_brain")
                self.split_brain = False
                self._do(Action.FOLLOW.value, primary=other, epoch=self.hard.epoch,
                         adopt=True)
                self._reply(r.req_id, {"ok": True, "discarded": me, "following": other,
                                       "state": self.state.value})
            else:
                self._reply(r.req_id, {"error": f"node {me} holds replicas only: to keep "
                                                f"its data, run 'nbdgw resolve --discard "
                                                f"{discard}' on {discard}"})
            return
        if not self.split_brain or self.state is not State.STALE:
            self._reply(r.req_id, {"error": f"node {me} is not in split brain: nothing to "
                                            "resolve"})
            return
        other = self.hard.primary
        if discard not in (me, other):
            self._reply(r.req_id, {"error": f"the split brain is between {me} and {other}; "
                                            f"--discard names one of them, not {discard!r}"})
            return
        self._do("clear_split_brain")
        self.split_brain = False
        if discard == me:
            self.pending["resolve"] = (r.req_id, math.inf)
            self.rejoin_args = {"primary": other, "preserve": True, "adopt": False,
                                "concurrent": False}
            self.rejoin_at = self.now
            self._try_rejoin()
            return
        e = self._seen_epoch() + 1
        self.discarding = other
        self._persist(vote_epoch=e, vote_for=me, quorum_exempt=True)
        self._log("warning", "split_brain_resolved", kept=me, discarded=other, epoch=e)
        self.pending["keep"] = (r.req_id, math.inf)
        self._feed(Event.KEPT, epoch=e, why=f"split brain resolved: the writes of {other} "
                                           "discarded")

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        h = self.hard
        return {
            "state": self.state.value, "epoch": h.epoch, "primary": h.primary,
            "vote": {"epoch": h.vote_epoch, "for": h.vote_for} if h.vote_for else None,
            "lease_s": (round(self.lease_until - self.now, 3) if self._lease_valid()
                        else 0.0),
            "quorum_exempt": h.quorum_exempt, "outdated": sorted(h.outdated),
            "outdating": sorted(self.outdate_req), "degraded": sorted(self.confirmed),
            "campaign": self.campaign or None, "handover_to": self.handover_to,
            "consistent": self.consistent, "auto": self.cfg.auto,
            "peers": {p: {"heard_s_ago": (round(self.now - v.fresh_at, 2)
                                          if v.fresh_at > -math.inf else None),
                          "state": v.body.state if v.body else None,
                          "epoch": v.body.epoch if v.body else None}
                      for p, v in self.peers.items()},
        }
