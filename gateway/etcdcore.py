"""The node core on etcd: who is primary of one volume group is decided by etcd v3
(DESIGN.md §6, "Coordination on etcd"), pure.

The same outward interface as gateway/nodecore.py (``step(event) -> Ready``: actions,
hard state, write lease; the failover table of gateway/failover.py), so the daemon
performs it unchanged; instead of beats, the ``Ready`` carries *etcd requests* (actions
of kind ``etcd``: grant, keepalive, txn) and the daemon's etcd shell
(gateway/etcdshell.py) answers each with an ``EtcdReply`` event.  No clock, socket or
thread here; tests/unit/etcd_sim.py runs cores against a simulated linearizable store
with leases that expire by the store's clock.

Theory of operation.

*Keys* (``/<prefix>/groups/<group>/``): ``primary`` = {node, epoch}, created by a
transaction that compares its ``create_revision`` with 0 and bound to the taker's lease:
its holder is the group's primary, and only etcd's expiry of that lease (or the holder's
own delete, after it fenced) frees it.  ``state`` = {epoch, served, outdated}: never
bound to a lease, changed only by transactions that compare its ``mod_revision`` (and,
except the take itself, that the writer still holds ``primary``): ``epoch`` is the last
epoch taken, ``served`` the last epoch on which a primary held a write lease,
``outdated`` the sync peers the primary went on without.  ``handover`` = {to, from}:
a switchover's word, bound to the old primary's lease.  ``members/<node>``: what each
node says of itself (for `nbdgw fleet status`), bound to its lease.

*Epochs, the fencing token.*  Taking ``primary`` raises ``state.epoch`` by one in the
same transaction: one taker per epoch, and epochs only grow.  The taker promotes its
replicas to a new generation on that epoch (blockstore), as after an election of the
heartbeat core, so peerlink's generation check (the newer epoch wins, an older sender
is refused: DESIGN.md §5) refuses a deposed primary's sessions once a replica took the
new generation.  (Batches carry no epoch: what refuses a deposed primary's late
*writes* is its write lease, below; peerlink checks the token when a session starts.)

*The write lease never outlives the etcd lease.*  etcd expires a lease TTL seconds
after the last keepalive it *processed*, by its own clock; a keepalive is processed
after it was sent.  The core records the local send time ``s`` of each keepalive (its
own ``now`` when it asks: the shell sends later, never earlier) and, when the answer
says the lease lives, anchors nbdkit's lease at ``s + TTL x (1 - DRIFT) - MARGIN``.
Suppose the node's clock and etcd's each run within a factor ``1 +- r`` of real time:
``L`` local seconds last at most ``L / (1 - r)`` real ones, and etcd's ``TTL`` at least
``TTL / (1 + r)``; ``TTL (1 - DRIFT) / (1 - r) < TTL / (1 + r)`` holds for ``r`` up to
about ``DRIFT / 2`` (2.5 %: crystal clocks drift by parts per million).  ``MARGIN``
covers a write that passed nbdkit's check just before expiry.  So a primary cut off from
etcd, frozen or whose daemon died stops writing before etcd can expire its lease, and
the key can be taken by another only after that expiry.  A leader change in etcd only
extends leases: a leader cut off from its quorum may renew a keepalive until it steps
down (about an election timeout later), and the new leader, elected no earlier, extends
every lease by an election timeout plus its TTL.

*One lease per node* (``shared``).  With volume groups the groups parent keeps the
node's one lease (a ``LeaseKeeper``, the same a core of its own lease embeds) and reads
every group's keys; each group's core learns both from ``Shared`` events and sends no
grant, keepalive or poll.  It takes the keeper's time as its lease's life (never
extending it itself), so when the keeper is frozen or dead it fences at the last time
published, which etcd's expiry cannot precede (DESIGN.md §6b).

*Who may take the key.*  A node takes ``primary`` only when it is absent, no
``handover`` names another node, and the node is a candidate: it holds data (not a
witness), may campaign (a DR site only by an operator's promote, or as a switchover's
target), its replicas are Consistent, its data is of an epoch at least ``state.served``
(else it may lack a served epoch's history), and it is not in ``state.outdated``.
Outdating (sync mode) mirrors the heartbeat core: before peerlink may stop waiting for a
stalled sync peer, the primary writes the mark into ``state`` by a transaction that
compares its own ``primary`` key, and lets peerlink degrade only peers whose mark it
knows is there (its own write, answered, and no clearing transaction sent since); the
mark goes when the peer has caught up.  The take itself outdates the primary it replaces
when that one is a sync peer gone without a handover (it will lack the new writes).

*Switchover.*  The primary drains (client I/O held, the target caught up), fences, and
then, in one transaction that compares its ``primary`` key, deletes it and writes
``handover`` = {to: target}; only the target may take the key while that exists.  It
disappears with the old primary's lease, or the old primary withdraws it when the
target did not take over within HANDOVER_WAIT.

*A new group* (no ``state`` key yet) is started in etcd by a node whose volumes are
primary volumes (the installed primary, on its own epoch); replicas wait for it, however
long (an operator's promote does not).  A standby just started leaves the key a TTL to
its last holder; a node with primary volumes demotes them only for a holder that served
(``state.served``: a taker whose promotion fails gives the key back).

*Restarts.*  A node whose volumes are primary volumes and that was primary of
``state.epoch`` takes the key back on that same epoch when it is free (nobody took a
newer epoch, so nobody served since); a held ``primary`` of its own (a previous boot's
lease, still alive) is rebound to the new lease by a transaction comparing its
``mod_revision``.  Otherwise it campaigns (a reclaim: a new generation on a new epoch)
or rejoins whoever holds the key.

Every change goes through one transaction that compares what it read; nothing is read,
changed and written back.  Times are seconds of the node's monotonic clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .failover import Action, Event, State
from .nodecore import (
    MAIN_SITE,
    WITNESS_ROLE,
    CoreBase,
    Done,
    Facts,
    HardState,
    Ready,
    Request,
    Tick,
)

DRIFT: Final = 0.05  # of the TTL: room for 2.5 % of clock-rate drift (module docstring)
MARGIN: Final = 0.5  # s: a write that passed nbdkit's check just before the lease ended
KEEPALIVE_FRACTION: Final = 0.25  # a keepalive every this x TTL
REQUEST_LOST_AFTER: Final = 3.0  # s: a request unanswered this long is given up (the
# shell's own timeout is shorter: it answers ok=False first)
RETRY_AFTER: Final = 0.2  # s: after a transaction that got no answer
PROMOTE_RETRY_AFTER: Final = 10.0
REJOIN_RETRY_AFTER: Final = 2.0
HANDOVER_WAIT: Final = 10.0  # s: a switchover's successor takes the key within this
MEMBER_EVERY: Final = 5.0  # s: the member record is rewritten at least this often
ASKED: Final = -1  # the request id of a switchover asked through etcd (no one to answer)


def group_prefix(prefix: str, group: str) -> str:
    return f"{prefix.rstrip('/')}/groups/{group}/"


def groups_prefix(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/groups/"


@dataclass(frozen=True)
class EtcdCoreConfig:
    me: str
    role: str  # installed role: "primary", "secondary", "dr" or "witness"
    peers: Mapping[str, str]  # peer name -> installed role
    group: str = "default"
    prefix: str = "/nbdgw"
    lease_ttl: int = 5  # s (etcd leases are whole seconds)
    poll: float = 0.5  # s between reads of the group's keys
    sync_peers: frozenset[str] = frozenset()
    auto: bool = True
    # The node's lease and the read of its groups' keys are the groups parent's
    # (``NodeLease``), given to this core as ``Shared`` events: no grant, keepalive or
    # poll of its own.
    shared: bool = False

    @property
    def keys(self) -> str:
        return group_prefix(self.prefix, self.group)

    @property
    def lease_span(self) -> float:
        """How long after a keepalive's send time the write lease lasts."""
        return self.lease_ttl * (1 - DRIFT) - MARGIN

    def role_of(self, node: str) -> str | None:
        return self.role if node == self.me else self.peers.get(node)

    def holds_data(self, node: str) -> bool:
        return self.role_of(node) != WITNESS_ROLE


# -- etcd requests and their answers (pure data; the shell turns them into API calls) ----


@dataclass(frozen=True)
class Cmp:
    """A transaction's comparison: ``target`` (create, mod, value) of ``key`` == value."""

    key: str
    target: str
    value: int | str


@dataclass(frozen=True)
class Put:
    key: str
    value: str
    leased: bool = False  # bound to this node's lease


@dataclass(frozen=True)
class Delete:
    key: str


@dataclass(frozen=True)
class Txn:
    """Compare, then the success or failure operations; both end with a read of the
    group's keys (``prefix``), so every answer carries the group as of its revision."""

    compare: tuple[Cmp, ...]
    success: tuple[Put | Delete, ...]
    prefix: str
    failure: tuple[Put | Delete, ...] = ()


@dataclass(frozen=True)
class KV:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class EtcdReply:
    """The answer to etcd request ``req_id`` (``ok`` False: no answer, an error or a
    timeout; ``error`` says which)."""

    now: float
    req_id: int
    ok: bool
    lease: int = 0  # grant: the new lease's id
    ttl: int = 0  # grant and keepalive: seconds left (0: the lease is gone)
    succeeded: bool = False  # txn: the comparisons held
    revision: int = 0
    kvs: tuple[KV, ...] = ()  # txn: the group's keys
    error: str = ""


@dataclass(frozen=True)
class Shared:
    """What the node's lease keeper published (``shared`` cores): its lease, the local
    monotonic time until which etcd cannot have expired it (the keeper's anchor, on the
    host's clock that every process of the node reads), and its last read of the groups'
    keys (``revision`` 0: none yet)."""

    now: float
    lease: int
    until: float
    revision: int = 0
    kvs: tuple[KV, ...] = ()


EtcdEvent = Tick | Facts | Done | Request | EtcdReply | Shared


@dataclass(frozen=True)
class PrimaryKey:
    node: str
    epoch: int
    lease: int
    mod_revision: int


@dataclass(frozen=True)
class GroupState:
    epoch: int = 0
    served: int = 0
    outdated: frozenset[str] = frozenset()
    mod_revision: int = 0  # 0: the key does not exist yet


@dataclass(frozen=True)
class Handover:
    to: str
    frm: str
    mod_revision: int


@dataclass(frozen=True)
class SwitchoverAsk:
    """``switchover`` = {to, from, epoch, timeout, answer}: `nbdgw fleet place` asks
    the primary ``frm`` of ``epoch`` through etcd to switch over to ``to``; ``answer`` is
    the primary's.  An ask of another epoch is void (its primary was gone before it
    answered: the node, primary again later, must not act on it)."""

    to: str
    frm: str
    epoch: int
    timeout: float
    answer: str | None
    mod_revision: int


@dataclass(frozen=True)
class GroupView:
    """The group's keys as of ``revision``."""

    revision: int = 0
    primary: PrimaryKey | None = None
    state: GroupState = GroupState()
    handover: Handover | None = None
    members: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    ask: SwitchoverAsk | None = None


def parse_group(keys: str, revision: int, kvs: tuple[KV, ...]) -> GroupView:
    """The group's keys under ``keys`` (a value that is not what nbdgw writes is
    ignored: the key counts as held, but by nobody this node knows)."""
    primary: PrimaryKey | None = None
    state = GroupState()
    handover: Handover | None = None
    members: dict[str, Mapping[str, Any]] = {}
    ask: SwitchoverAsk | None = None
    for kv in kvs:
        name = kv.key[len(keys):] if kv.key.startswith(keys) else None
        try:
            v = json.loads(kv.value)
        except ValueError:
            v = {}
        if not isinstance(v, dict):
            v = {}
        if name == "primary":
            primary = PrimaryKey(str(v.get("node", "?")), int(v.get("epoch", 0)), kv.lease,
                                 kv.mod_revision)
        elif name == "state":
            state = GroupState(int(v.get("epoch", 0)), int(v.get("served", 0)),
                               frozenset(str(p) for p in v.get("outdated", [])),
                               kv.mod_revision)
        elif name == "handover":
            handover = Handover(str(v.get("to", "?")), str(v.get("from", "?")),
                                kv.mod_revision)
        elif name is not None and name.startswith("members/"):
            members[name[len("members/"):]] = v
        elif name == "switchover":
            ask = SwitchoverAsk(str(v.get("to", "?")), str(v.get("from", "?")),
                                int(v.get("epoch", 0)), float(v.get("timeout", 30)),
                                None if v.get("answer") is None else str(v["answer"]),
                                kv.mod_revision)
    return GroupView(revision, primary, state, handover, members, ask)


def state_value(epoch: int, served: int, outdated: frozenset[str]) -> str:
    return json.dumps({"epoch": epoch, "served": served, "outdated": sorted(outdated)},
                      sort_keys=True)


class LeaseKeeper:
    """One etcd lease kept alive, pure: the lease of a node core of its own, or the
    node's one lease for all its groups (the groups parent's ``NodeLease``, which also
    has it read every group's keys every ``poll`` s and publishes both to the groups'
    cores).  ``due(now, new_id)`` gives the requests to send now (their ``req_id`` from
    ``new_id``), ``answer(reply)`` takes an answer.  ``alive_until``: the local time
    before which etcd cannot have expired ``lease_id``, anchored at each keepalive's send
    time (module docstring).  A keeper started with the ``lease`` of a previous run (a
    restarted parent) keeps it alive if etcd still has it, so its groups' keys stay
    theirs; else it asks a new one."""

    def __init__(self, ttl: int, now: float, lease: int = 0, poll: float = 0.0,
                 prefix: str = "") -> None:
        self.ttl = ttl
        self.lease_id = lease
        self.alive_until = -math.inf
        self.poll = poll
        self.prefix = prefix
        self.inflight: dict[int, tuple[str, float, int]] = {}  # id -> (op, sent, lease)
        self.next_keepalive = now
        self.next_poll = now
        self.revision = 0  # the last read of ``prefix`` (poll > 0)
        self.kvs: tuple[KV, ...] = ()

    def due(self, now: float, new_id: Callable[[], int]) -> list[dict[str, Any]]:
        for rid, (_, sent, _) in list(self.inflight.items()):
            if now - sent > REQUEST_LOST_AFTER:
                del self.inflight[rid]
        out = []
        if self.lease_id == 0:
            if not any(op == "grant" for op, _, _ in self.inflight.values()):
                out.append(self._ask(now, new_id(), op="grant", ttl=self.ttl))
        elif now >= self.next_keepalive:
            # Not held back by one in flight: each is anchored at its own send time.
            self.next_keepalive = now + KEEPALIVE_FRACTION * self.ttl
            out.append(self._ask(now, new_id(), op="keepalive", lease=self.lease_id))
        if self.poll > 0 and now >= self.next_poll \
                and not any(op == "txn" for op, _, _ in self.inflight.values()):
            self.next_poll = now + self.poll
            out.append(self._ask(now, new_id(), op="txn", txn=Txn((), (), self.prefix)))
        return out

    def _ask(self, now: float, rid: int, **args: Any) -> dict[str, Any]:
        self.inflight[rid] = (str(args["op"]), now, self.lease_id)
        return {"req_id": rid, **args}

    def owns(self, req_id: int) -> bool:
        return req_id in self.inflight

    def answer(self, r: EtcdReply) -> tuple[str, str, dict[str, Any]] | None:
        """Take the answer to one of this keeper's requests; (level, event, fields) to
        log, if anything."""
        entry = self.inflight.pop(r.req_id, None)
        if entry is None:
            return None
        op, sent, lease = entry
        if op == "txn":
            if r.ok and r.revision >= self.revision:
                self.revision, self.kvs = r.revision, r.kvs
            return None
        if not r.ok:
            return "warning", "etcd_unreachable", {"request": op, "error": r.error}
        return self._renewed(op, sent, lease, r)

    def _renewed(self, op: str, sent: float, lease: int,
                 r: EtcdReply) -> tuple[str, str, dict[str, Any]] | None:
        if op == "grant" and r.lease and r.ttl > 0:
            self.lease_id = r.lease
            self._alive(sent, r.ttl)
            self.next_keepalive = sent
            return "info", "etcd_lease_granted", {"lease": f"{r.lease:x}", "ttl": r.ttl}
        if op != "keepalive" or lease != self.lease_id:
            return None  # an answer about a lease this keeper dropped already
        if r.ttl > 0:
            self._alive(sent, r.ttl)
            return None
        self.lease_id = 0
        self.alive_until = -math.inf
        return "error", "etcd_lease_expired", {
            "lease": f"{lease:x}", "note": "etcd expired this node's lease: a new one is asked"}

    def _alive(self, sent: float, ttl: int) -> None:
        """etcd processed a keepalive (or grant) of this lease sent at ``sent``: it cannot
        expire the lease before ``sent`` + TTL by its clock (module docstring)."""
        span = min(ttl, self.ttl) * (1 - DRIFT) - MARGIN
        self.alive_until = max(self.alive_until, sent + span)

    def published(self, now: float) -> Shared:
        return Shared(now, self.lease_id, self.alive_until, self.revision, self.kvs)


class EtcdCore(CoreBase):
    """All failover state of one node of one group, on etcd; ``step(event)`` -> ``Ready``."""

    cfg: EtcdCoreConfig

    def __init__(self, cfg: EtcdCoreConfig, hard: HardState, now: float, boot: bytes,
                 split_brain: bool = False) -> None:
        self.cfg = cfg
        self.hard = hard
        self.boot = boot
        self.seq = 0  # no beats (the daemon reads it only with a beat)
        self.peers: dict[str, Any] = {}  # no heartbeat peers (the daemon looks them up)
        self.started = now
        self.now = now
        self.lease_id = 0  # this node's etcd lease (0: none yet)
        self.lease_alive_until = -math.inf  # local: etcd cannot have expired it before
        # Its own lease, or (``shared``) the node's, learned from ``Shared`` events.
        self.keeper = None if cfg.shared else LeaseKeeper(cfg.lease_ttl, now)
        self.lease_until = -math.inf  # what nbdkit is told (while primary)
        self.lease_since: float | None = None
        self.view = GroupView()
        self.inflight: dict[int, tuple[str, float, Any]] = {}  # id -> (what, sent, extra)
        self.next_id = 0
        self.next_poll = now
        self.txn_after = now  # no transaction before this (after a lost answer)
        self.consistent = hard.role == "primary"
        self.data_epoch = hard.epoch if hard.role == "primary" else 0
        self.facts: Facts | None = None
        self.split_brain = split_brain
        self.split_brain_with: str | None = None
        self.promote_blocked_until = -math.inf
        self.rejoin_at: float | None = None
        self.rejoin_args: dict[str, Any] | None = None
        self.rejoin_inflight = False
        self.handover_to: str | None = None
        self.draining: tuple[str, int, float] | None = None
        self.pending: dict[str, tuple[int, float]] = {}
        self.switchover_deadline = math.inf
        self.handing: str | None = None  # the successor this node hands the key to
        self._switchover_info: dict[str, Any] = {}
        self.taking: int = 0  # the epoch this node took the key on (promotion under way)
        self.promoted = False  # PROMOTING: the volumes are primary volumes now
        self.confirmed: frozenset[str] = frozenset()
        self.marked: frozenset[str] = frozenset()  # outdated marks known to be in etcd
        self._announced = False
        self.member_said: tuple[Any, ...] | None = None
        self.member_at = -math.inf
        self.operator = False  # the take under way is an operator's promote
        self._start_state(cfg.role, cfg.auto, split_brain)

    # -- the entry point ----------------------------------------------------------------

    def step(self, ev: EtcdEvent) -> Ready:
        self._ready = Ready()
        self.now = max(self.now, ev.now)
        if isinstance(ev, EtcdReply):
            self._reply_in(ev)
        elif isinstance(ev, Facts):
            self._facts(ev)
        elif isinstance(ev, Done):
            self._done(ev)
        elif isinstance(ev, Request):
            self._request(ev)
        elif isinstance(ev, Shared):
            self._shared(ev)
        if not self._announced:
            self._set_confirmed(frozenset())
        if self.cfg.auto:
            self._expire_requests()
            self._lease_requests()
            self._decide()
            self._poll()
        return self._end_step()

    # -- helpers ----------------------------------------------------------------------------

    def _log_fields(self) -> dict[str, Any]:
        return {"group": self.cfg.group}

    def _action(self, a: Action, **args: Any) -> None:
        if a is Action.FENCE:
            self.lease_until = -math.inf
            self.lease_since = None
            self._do(a.value, reason=args.get("reason", "lease lost"),
                     handover=self.handover_to is not None)
            self._drain_lost(str(args.get("reason", "lease lost")))
        elif a is Action.REJOIN:
            self.rejoin_args = {"preserve": args.get("preserve", True), "adopt": False,
                                "concurrent": args.get("concurrent", False)}
            self.rejoin_at = self.now
            self._try_rejoin()
        elif a is Action.FOLLOW:
            self._do(a.value, primary=self.hard.primary, epoch=self.hard.epoch, adopt=False)
        elif a in (Action.PROMOTE, Action.RECLAIM):
            self._do(a.value, epoch=args["epoch"], why=args.get("why", ""))
        else:
            self._do(a.value)

    def _key(self, name: str) -> str:
        return self.cfg.keys + name

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _request_etcd(self, what: str, extra: Any = None, **args: Any) -> int:
        rid = self._new_id()
        self.inflight[rid] = (what, self.now, extra)
        self._do("etcd", req_id=rid, **args)
        return rid

    def _busy(self, what: str) -> bool:
        return any(w == what for w, _, _ in self.inflight.values())

    def _txn_busy(self) -> bool:
        return any(w.startswith("txn:") for w, _, _ in self.inflight.values())

    def _txn(self, what: str, compare: list[Cmp], success: list[Put | Delete],
             extra: Any = None) -> None:
        self._request_etcd("txn:" + what, extra, op="txn", lease=self.lease_id,
                           txn=Txn(tuple(compare), tuple(success), self.cfg.keys))

    def _holds_key(self) -> bool:
        """The ``primary`` key is this node's, bound to its current lease.  With a live
        lease it still is: only that lease's expiry or this node deletes it."""
        p = self.view.primary
        return (p is not None and p.node == self.cfg.me and self.lease_id != 0
                and p.lease == self.lease_id)

    def _lease_valid(self) -> bool:
        return self.lease_until > self.now

    # -- answers --------------------------------------------------------------------------

    def _reply_in(self, r: EtcdReply) -> None:
        if self.keeper is not None and self.keeper.owns(r.req_id):
            said = self.keeper.answer(r)
            if said is not None:
                self._log(said[0], said[1], **said[2])
            self.lease_id, self.lease_alive_until = (self.keeper.lease_id,
                                                     self.keeper.alive_until)
            return
        entry = self.inflight.pop(r.req_id, None)
        if entry is None:
            return  # given up already (or a duplicate): nothing depends on it
        what, _, extra = entry
        if r.ok and what.startswith(("txn:", "poll", "member")):
            self._learn(parse_group(self.cfg.keys, r.revision, r.kvs))
        if what.startswith("txn:"):
            if not r.ok:
                self.txn_after = self.now + RETRY_AFTER
                self._log("warning", "etcd_unreachable", request=what[4:], error=r.error)
            self._txn_done(what[4:], r, extra)

    def _shared(self, sh: Shared) -> None:
        """The node's lease keeper published: its lease and how long etcd keeps it, which
        this core uses as its own (fencing at ``until`` by its own clock when nothing
        newer comes: a keeper frozen or dead extends nothing), and the group's keys."""
        if sh.lease != self.lease_id:
            if self.lease_id:
                self._log("warning", "etcd_node_lease_changed", old=f"{self.lease_id:x}",
                          new=f"{sh.lease:x}" if sh.lease else None)
            self.lease_id = sh.lease
            self.lease_alive_until = sh.until if sh.lease else -math.inf
        else:
            self.lease_alive_until = max(self.lease_alive_until, sh.until)
        if sh.revision:
            self._learn(parse_group(self.cfg.keys, sh.revision, sh.kvs))

    def _learn(self, v: GroupView) -> None:
        if v.revision < self.view.revision:
            return  # an older read than the one this node holds
        self.view = v
        p = v.primary
        h = self.hard
        replica = self.state in (State.STANDBY, State.WITNESS)
        if p is not None and p.node != self.cfg.me and (p.epoch > h.epoch or (
                p.epoch == h.epoch and p.node != h.primary and replica)) \
                and (replica or v.state.served >= p.epoch):
            # A node with primary volumes demotes them only for a holder that served
            # (a taker whose promotion fails gives the key back; this node may then
            # take it again with all its data).
            self._new_epoch(p.epoch, p.node)

    def _new_epoch(self, epoch: int, primary: str) -> None:
        old = self.hard.epoch
        self._persist(epoch=epoch, primary=primary, quorum_exempt=False)
        self._log("warning", "newer_epoch", epoch=epoch, primary=primary, old_epoch=old,
                  why="the group's primary key in etcd")
        if self.state in (State.STARTING, State.PRIMARY, State.FENCED, State.STALE):
            concurrent = self.state is State.PRIMARY and self._lease_valid()
            self.handover_to = None if self.handover_to != primary else self.handover_to
            self._feed(Event.NEWER_PRIMARY, reason=f"node {primary} serves on epoch {epoch}",
                       concurrent=concurrent, preserve=self.handover_to is None)
        elif self.state in (State.STANDBY, State.WITNESS):
            self._feed(Event.NEWER_PRIMARY)
        # PROMOTING / RECLAIMING: its own take failed or was lost; decided when done.

    # -- the lease ------------------------------------------------------------------------

    def _lease_requests(self) -> None:
        if self.keeper is None:
            return  # the node's keeper's (``Shared``)
        for args in self.keeper.due(self.now, self._new_id):
            self._do("etcd", **args)

    def _expire_requests(self) -> None:
        for rid, (what, sent, _) in list(self.inflight.items()):
            if self.now - sent > REQUEST_LOST_AFTER:
                del self.inflight[rid]
                self._log("warning", "etcd_request_lost", request=what)
                if what.startswith("txn:"):
                    self._txn_done(what[4:], EtcdReply(self.now, rid, False,
                                                       error="no answer"), None)

    def _compute_lease(self) -> None:
        if self.state not in (State.STARTING, State.PRIMARY, State.FENCED):
            self.lease_until = -math.inf
            self.lease_since = None
            return
        mine = (self._holds_key() and self.view.primary is not None
                and self.view.primary.epoch == self.hard.epoch
                and self.view.state.served >= self.hard.epoch)
        if mine and self.lease_alive_until > self.now:
            self.lease_until = self.lease_alive_until
        else:
            self.lease_until = -math.inf
        if self._lease_valid():
            if self.lease_since is None:
                self.lease_since = self.now
        else:
            self.lease_since = None

    # -- decisions -------------------------------------------------------------------------

    def _poll(self) -> None:
        """Read the group's keys every ``poll`` seconds (the primary less often: its lease
        tells it what it needs; it reads to learn of operators' changes)."""
        if self.cfg.shared:
            return  # the node's keeper reads every group's keys (``Shared``)
        every = self.cfg.poll * (4 if self.state is State.PRIMARY else 1)
        if self.now >= self.next_poll and not self._busy("poll"):
            self.next_poll = self.now + every
            self._request_etcd("poll", op="txn", txn=Txn((), (), self.cfg.keys))

    def _decide(self) -> None:
        self._compute_lease()
        self._member()
        p = self.view.primary
        if p is not None and p.node != self.cfg.me and p.epoch >= self.hard.epoch \
                and self.view.state.served >= p.epoch \
                and self.state in (State.STARTING, State.PRIMARY, State.FENCED):
            # Another node holds the key on this node's epoch or a newer one (this node
            # learned it while promoting, or took its epoch back too late): it rejoins.
            self._new_epoch(p.epoch, p.node)
        s = self.state
        if s is State.STARTING:
            self._starting()
        elif s is State.PRIMARY:
            if not self._lease_valid():
                why = ("this primary's etcd lease may expire: it stopped serving before "
                       "etcd can give the group to another node")
                self._feed(Event.QUORUM_LOST, reason=why)
            else:
                self._mark_served()
                self._outdating()
                self._asked_switchover()
        elif s is State.FENCED:
            self._mark_served()
            self._compute_lease()
            steady = self.lease_since is not None
            if steady:
                self._feed(Event.QUORUM_OK)
            else:
                self._maybe_take("its own epoch was lost")
        elif s in (State.PROMOTING, State.RECLAIMING) and self.promoted:
            self._promoted()
        elif s is State.STALE and self.rejoin_at is not None and self.now >= self.rejoin_at:
            self._try_rejoin()
        elif s in (State.STANDBY, State.WITNESS):
            self._maybe_take(None)
        self._orphan()
        self._handover()
        self._withdraw_handover()
        self._pending_replies()

    def _promoted(self) -> None:
        """The volumes are primary volumes on the epoch taken: serve once
        ``state.served`` says so, or fence at once if the key was lost meanwhile."""
        if self._holds_key() and self.view.state.served < self.hard.epoch:
            self._mark_served()
            return
        self.promoted = False
        self._feed(Event.RECLAIMED if self.state is State.RECLAIMING else Event.PROMOTED)
        self._compute_lease()
        if not self._lease_valid():
            self._feed(Event.QUORUM_LOST, reason="the group's key was lost during the "
                       "promotion")

    def _orphan(self) -> None:
        """A key of this node's lease on an epoch it does not serve on (a take whose
        answer was lost): give it up, or the group would have a primary that never acts."""
        p = self.view.primary
        if (p is None or not self._holds_key() or self.taking or self._txn_busy()
                or self.handing is not None
                or self.state in (State.PROMOTING, State.RECLAIMING)):
            return
        if self.state in (State.STANDBY, State.WITNESS, State.STALE) \
                or p.epoch != self.hard.epoch:
            self._release(f"a key on epoch {p.epoch} this node does not serve on")

    def _starting(self) -> None:
        """A node whose volumes are primary volumes, just booted: take the key back on
        its own epoch if nobody took a newer one, rebind a key of its own to the new
        lease, or campaign / rejoin (module docstring)."""
        if self.view.revision == 0 or self.lease_id == 0 or self._txn_busy() \
                or self.now < self.txn_after:
            return
        v, h, me = self.view, self.hard, self.cfg.me
        p = v.primary
        if self._holds_key():
            if v.state.served < h.epoch:
                self._mark_served()
            else:
                self._feed(Event.QUORUM_OK)
            return
        if p is not None and p.node == me and p.epoch == h.epoch:
            self._txn("rebind", [Cmp(self._key("primary"), "mod", p.mod_revision)],
                      [Put(self._key("primary"), self._primary_value(h.epoch), leased=True)])
            return
        if p is None and v.handover is None and h.primary in (me, None) \
                and v.state.epoch <= h.epoch and me not in v.state.outdated:
            # Nobody took an epoch after this node's: nobody served since it did.
            epoch = h.epoch
            self._txn("resume", [Cmp(self._key("primary"), "create", 0),
                                 Cmp(self._key("state"), "mod", v.state.mod_revision)],
                      [Put(self._key("primary"), self._primary_value(epoch), leased=True),
                       Put(self._key("state"), state_value(
                           epoch, v.state.served, v.state.outdated))], epoch)
            return
        if self.now - self.started >= self.cfg.lease_ttl:
            self._feed(Event.QUORUM_LOST)  # -> FENCED: campaign (reclaim) from there

    def _primary_value(self, epoch: int) -> str:
        return json.dumps({"node": self.cfg.me, "epoch": epoch}, sort_keys=True)

    def candidate_refusal(self) -> str | None:  # noqa: PLR0911
        """Why this node may not take the group's key now (None: it may)."""
        me, v = self.cfg.me, self.view
        if not self.cfg.holds_data(me):
            return f"{me} is a witness: it holds no data"
        if v.primary is not None:
            return f"{v.primary.node} holds the key (epoch {v.primary.epoch})"
        if v.handover is not None and v.handover.to != me:
            return f"{v.handover.frm} hands the group over to {v.handover.to}"
        if me in v.state.outdated:
            return (f"{me} is outdated (it lacks writes acknowledged on epoch "
                    f"{v.state.epoch})")
        if not self.consistent:
            return f"a replica of {me} is not Consistent"
        if self.data_epoch < v.state.served:
            return (f"{me} holds data of epoch {self.data_epoch}, older than epoch "
                    f"{v.state.served}, which served: it could lose writes")
        if self.lease_alive_until <= self.now:
            return f"{me} holds no live etcd lease"
        return None

    def _maybe_take(self, why: str | None) -> None:
        if self.view.revision == 0 or self._txn_busy() or self.now < self.txn_after \
                or self.now < self.promote_blocked_until:
            return
        v = self.view
        handover = v.handover is not None and v.handover.to == self.cfg.me
        s = self.state
        # A standby just started leaves the key a TTL to the node that held it (a
        # primary restarting takes it back on its own epoch): a preference, not safety.
        settled = self.now - self.started >= self.cfg.lease_ttl
        may = (handover or s in (State.FENCED, State.STARTING)
               or (self.cfg.role in MAIN_SITE and settled))
        if not may or self.candidate_refusal() is not None:
            return
        if v.state.mod_revision == 0 and self.hard.role != "primary":
            return  # a new group starts in etcd when a node with primary volumes takes it
        reason = why or (f"switchover from {v.handover.frm}" if handover and v.handover
                         else "the group has no primary")
        self._take(reason)

    def _take(self, why: str) -> None:
        v = self.view
        epoch = max(v.state.epoch, self.hard.epoch, self.hard.vote_epoch) + 1
        compare = [Cmp(self._key("primary"), "create", 0),
                   Cmp(self._key("state"), "mod", v.state.mod_revision)]
        # The primary this node followed, gone without a handover, lacks nothing yet but
        # will lack this node's writes: outdated in the take itself, so writes need not
        # wait a sync timeout for it (it must catch up before it may take the key again).
        prev = self.hard.primary
        gone = (frozenset({prev}) & self.cfg.sync_peers
                if v.handover is None and prev not in (None, self.cfg.me) else frozenset())
        success: list[Put | Delete] = [
            Put(self._key("primary"), self._primary_value(epoch), leased=True),
            Put(self._key("state"), state_value(epoch, v.state.served,
                                                v.state.outdated | gone))]
        if v.handover is not None:
            compare.append(Cmp(self._key("handover"), "mod", v.handover.mod_revision))
            success.append(Delete(self._key("handover")))
        else:
            compare.append(Cmp(self._key("handover"), "create", 0))
        self._log("warning", "etcd_take", epoch=epoch, why=why)
        self._txn("take", compare, success, (epoch, why))

    def _mark_served(self) -> None:
        """Before the first write lease on an epoch: ``state.served`` says so (a
        candidate with older data is refused from then on)."""
        v, e = self.view, self.hard.epoch
        if not self._holds_key() or v.state.served >= e or self._txn_busy() \
                or self.now < self.txn_after:
            return
        self._txn("served", [Cmp(self._key("primary"), "mod", self._primary_rev()),
                             Cmp(self._key("state"), "mod", v.state.mod_revision)],
                  [Put(self._key("state"), state_value(max(v.state.epoch, e), e,
                                                       v.state.outdated))])

    def _primary_rev(self) -> int:
        p = self.view.primary
        return p.mod_revision if p is not None else -1

    def _txn_done(self, what: str, r: EtcdReply, extra: Any) -> None:
        if what == "take":
            epoch, why = extra if extra is not None else (0, "")
            pend = self.pending.pop("promote", None) if not r.succeeded else None
            if pend is not None:
                err = r.error or self.candidate_refusal() or "another node took the key"
                self._reply(pend[0], {"error": f"not promoted: {err}"})
            if not r.succeeded:
                self.operator = False
                return
            if self.state not in (State.STANDBY, State.WITNESS, State.FENCED,
                                  State.STARTING):
                self.operator = False
                self._release(f"it is {self.state.value} now")
                return
            self._persist(vote_epoch=epoch, vote_for=self.cfg.me)
            self.taking = epoch
            self._log("warning", "elected", epoch=epoch, why=why)
            if self.operator:
                self.operator = False
                self._feed(Event.OPERATOR_PROMOTE, epoch=epoch, why=why)
            else:
                self._feed(Event.ELECTED, epoch=epoch, why=why)
        elif what == "resume" and r.succeeded:
            self._log("warning", "etcd_resumed", epoch=extra)
        elif what == "handover":
            self._handover_done(r)
        elif what == "ask":
            self._ask_answered(r, extra)
        elif what == "release" and r.succeeded:
            self._log("warning", "etcd_released", epoch=self.hard.epoch)
        elif what == "outdate" and r.succeeded:
            self.marked = frozenset(extra)
            self._log("error" if extra else "warning", "outdated_in_etcd",
                      peers=sorted(extra))

    # -- facts and slow actions -----------------------------------------------------------

    def _facts(self, f: Facts) -> None:
        self.facts = f
        self.consistent = True if self.hard.role == "primary" else f.consistent
        self.data_epoch = f.data_epoch
        self.split_brain = f.split_brain
        self.split_brain_with = f.split_brain_with

    def _done(self, d: Done) -> None:
        if d.kind in ("promote", "reclaim"):
            self._promote_done(d)
        elif d.kind == "rejoin":
            self._rejoin_done(d)
        elif d.kind == "drain":
            self._drain_done(d)

    def _promote_done(self, d: Done) -> None:
        if self.state not in (State.PROMOTING, State.RECLAIMING):
            return
        pend = self.pending.pop("promote", None)
        if not d.ok:
            self.promote_blocked_until = self.now + PROMOTE_RETRY_AFTER
            self.taking = 0
            self._release("the promotion failed")
            self._feed(Event.RECLAIM_FAILED if self.state is State.RECLAIMING
                       else Event.PROMOTION_FAILED_DR if self.cfg.role == "dr"
                       else Event.PROMOTION_FAILED)
            if pend is not None:
                self._reply(pend[0], {"error": f"promotion failed: {d.detail.get('error')}"})
            return
        e = int(d.detail["epoch"])
        if e >= self.hard.epoch:
            self._persist(role="primary", epoch=e, primary=self.cfg.me)
        else:  # a newer primary was learned meanwhile: it rejoins it (_decide)
            self._persist(role="primary")
        self.consistent = True
        self.data_epoch = e
        self.taking = 0
        self.marked = frozenset()
        self._set_confirmed(frozenset())
        self.promoted = True  # PROMOTED (RECLAIMED) once state.served says so: _decide
        if pend is not None:
            self._reply(pend[0], {"ok": True, "node": self.cfg.me, "epoch": e,
                                  **{k: v for k, v in d.detail.items() if k != "epoch"}})

    def _release(self, why: str) -> None:
        """Give the key up (this node fenced or never served on it): delete-if-mine."""
        if not self._holds_key():
            return
        self._log("warning", "etcd_release", why=why)
        self._txn("release", [Cmp(self._key("primary"), "mod", self._primary_rev())],
                  [Delete(self._key("primary"))])

    def _try_rejoin(self) -> None:
        args = self.rejoin_args
        if args is None or self.rejoin_inflight:
            return
        primary = self.handover_to or (self.view.primary.node if self.view.primary
                                       else None) or self.hard.primary
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
        pend = self.pending.pop("resolve", None)
        if d.ok:
            self.rejoin_args = None
            self.split_brain = False
            role = self.cfg.role if self.cfg.role != "primary" else "secondary"
            self._persist(role=role, quorum_exempt=False)
            self.consistent = bool(d.detail.get("consistent", False))
            self.handover_to = None
            self._feed(Event.REJOINED_AS_WITNESS if role == "dr" else Event.REJOINED)
            if pend is not None:
                self._reply(pend[0], {"ok": True, "discarded": self.cfg.me,
                                      "following": self.hard.primary,
                                      "state": self.state.value})
        elif d.detail.get("outcome") == "split_brain":
            self.split_brain = True
            self.rejoin_args = None
            self._log("error", "split_brain", other=self.hard.primary)
            if pend is not None:
                self._reply(pend[0], {"error": "still in split brain (see the log)"})
        else:
            self.rejoin_at = self.now + REJOIN_RETRY_AFTER
            if pend is not None:
                self._reply(pend[0], {"error": "rejoin did not complete; the daemon "
                                               "retries"})

    # -- outdating (sync peers) -----------------------------------------------------------

    def _outdating(self) -> None:
        """Peerlink may stop waiting for a sync peer only while this node *knows* etcd
        holds its mark: written by a transaction of its own whose success it heard, and
        no transaction that may clear it sent since (an unanswered clear may still land
        later; a successful write after it compares a newer ``mod_revision``, so the
        old one can never land)."""
        f = self.facts
        if f is None or not self._holds_key():
            return
        st = self.view.state
        sync = self.cfg.sync_peers
        want = (st.outdated | (f.stalled & sync)) - (f.healthy - f.stalled)
        self.marked &= st.outdated
        if (want != st.outdated or not want & sync <= self.marked) \
                and not self._txn_busy() and self.now >= self.txn_after:
            self.marked &= want  # a clear under way: those are not known marked
            self._txn("outdate", [Cmp(self._key("primary"), "mod", self._primary_rev()),
                                  Cmp(self._key("state"), "mod", st.mod_revision)],
                      [Put(self._key("state"), state_value(st.epoch, st.served, want))],
                      want)
        self._set_confirmed(frozenset(self.marked & sync))

    def _set_confirmed(self, confirmed: frozenset[str]) -> None:
        if confirmed != self.confirmed or not self._announced:
            self._announced = True
            self.confirmed = confirmed
            self._do("degrade", epoch=self.hard.epoch, peers=sorted(confirmed))

    # -- the member record ----------------------------------------------------------------

    def _member(self) -> None:
        """What this node says of itself in etcd (`nbdgw fleet status`): rewritten when it
        changes, and when the keys last read lack it (at most every MEMBER_EVERY s); bound
        to its lease, so a dead node's goes.  Not rewritten while unchanged: a steady
        node sends no request of its own (the read of the keys shows it is there)."""
        if self.lease_id == 0 or self._busy("member"):
            return
        said = (self.state.value, self.consistent, self.data_epoch, self.hard.epoch,
                self.lease_id)
        if said == self.member_said and (self.cfg.me in self.view.members
                                         or self.now - self.member_at < MEMBER_EVERY):
            return
        self.member_said, self.member_at = said, self.now
        value = json.dumps({"state": said[0], "consistent": said[1], "data_epoch": said[2],
                            "epoch": said[3], "role": self.cfg.role}, sort_keys=True)
        self._request_etcd("member", op="txn", lease=self.lease_id, txn=Txn(
            (), (Put(self._key(f"members/{self.cfg.me}"), value, leased=True),),
            self.cfg.keys))

    # -- operator requests ----------------------------------------------------------------

    def _operator_promote(self, r: Request) -> None:
        me = self.cfg.me
        if self.state not in (State.WITNESS, State.STANDBY):
            self._reply(r.req_id, {"error": f"node {me} is {self.state.value}: only a "
                                            "standby or witness site can be promoted"})
            return
        why = self.candidate_refusal()
        if why is None and (self._txn_busy() or self.view.revision == 0):
            why = "etcd has not answered yet; try again"
        if why is not None:
            # --force cannot override etcd: the key is taken by a transaction or not at all.
            self._reply(r.req_id, {"error": f"not promoted: {why}"})
            return
        self.pending["promote"] = (r.req_id, math.inf)
        self.operator = True
        self._take("promoted by an operator")

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
            return f"{target} is a witness: it holds no data and can never take over"
        if self.state is not State.PRIMARY:
            return (f"node {me} is {self.state.value}, not the serving primary: run "
                    f"switchover on the primary ({self.hard.primary or 'unknown'})")
        if self.draining is not None:
            return f"a switchover to {self.draining[0]} is under way"
        if target == me:
            return f"node {me} is the primary already"
        if target not in self.cfg.peers:
            return f"{target!r} is not a peer of {me} (peers: {', '.join(self.cfg.peers)})"
        m = self.view.members.get(target)
        if m is None:
            return f"{target} has no live record in etcd: it cannot take over"
        if m.get("state") not in (State.STANDBY.value, State.WITNESS.value):
            return f"{target} is {m.get('state')}, not a standby or witness"
        if target in self.view.state.outdated:
            return f"{target} is outdated (it stopped acknowledging): it cannot take over"
        f = self.facts
        if f is None or target not in f.streaming:
            return f"{target} is not streaming every volume; switch over once it is in sync"
        return None

    def _drain_done(self, d: Done) -> None:
        if self.draining is None:
            return
        target, req_id, deadline = self.draining
        self.draining = None
        if not d.ok or self.state is not State.PRIMARY or not self._holds_key():
            self._reply(req_id, {"error": str(d.detail.get("error", "switchover failed"))})
            return
        self.handover_to = self.handing = target
        self._switchover_info = {**d.detail, "from": self.cfg.me, "to": target}
        self.pending["switchover"] = (req_id, deadline)
        self.switchover_deadline = self.now + HANDOVER_WAIT
        # Fenced first (the lease file, then nbdkit), and only then the key goes.
        self._feed(Event.HANDED_OVER, reason="switchover: the target takes over",
                   preserve=False)
        self._handover()

    def _handover(self) -> None:
        """Delete the key and name the successor, in one transaction comparing the key:
        sent again (from ``_decide``) while the key is still this node's."""
        target = self.handing
        if target is None or not self._holds_key() or self._txn_busy() \
                or self.now < self.txn_after:
            return
        self._txn("handover", [Cmp(self._key("primary"), "mod", self._primary_rev())],
                  [Delete(self._key("primary")),
                   Put(self._key("handover"), json.dumps({"to": target, "from": self.cfg.me},
                                                         sort_keys=True), leased=True)])

    def _handover_done(self, r: EtcdReply) -> None:
        if r.succeeded:
            self._log("warning", "etcd_handover", to=self.handing)
        elif r.ok and not self._holds_key():
            self._log("error", "etcd_handover_failed", to=self.handing, error=r.error)
            self.handing = None
            sw = self.pending.pop("switchover", None)
            if sw is not None:
                self._reply(sw[0], {"error": "this node no longer held the group's key: "
                                             "fenced; the node that holds it stays primary"})

    def _withdraw_handover(self) -> None:
        """The successor did not take the key within HANDOVER_WAIT: withdraw the word,
        so that any candidate may (this node included, once it is a replica)."""
        h = self.view.handover
        if h is None or h.frm != self.cfg.me or self.view.primary is not None:
            if self.view.primary is not None:
                self.handing = None
            return
        if self.now > self.switchover_deadline and not self._txn_busy() \
                and self.now >= self.txn_after:
            self.handing = None
            self._log("warning", "etcd_handover_withdrawn", to=h.to,
                      waited_s=HANDOVER_WAIT)
            self._txn("withdraw", [Cmp(self._key("handover"), "mod", h.mod_revision)],
                      [Delete(self._key("handover"))])

    def _pending_replies(self) -> None:
        sw = self.pending.get("switchover")
        if sw is None:
            return
        target = self._switchover_info.get("to")
        p = self.view.primary
        serving = p is not None and p.node == target
        if serving or self.now > sw[1]:
            del self.pending["switchover"]
            self._reply(sw[0], {"ok": True, **self._switchover_info,
                                "target_serving": serving, "state": self.state.value})

    def _resolve(self, r: Request) -> None:
        discard = str(r.args.get("discard"))
        me = self.cfg.me
        if not self.split_brain:
            self._reply(r.req_id, {"error": f"node {me} is not in split brain: nothing to "
                                            "resolve"})
            return
        if discard != me:
            self._reply(r.req_id, {"error": "with etcd, the node that holds the group's key "
                                            "keeps its data: run 'nbdgw resolve --discard "
                                            f"{me}' here, or stop the holder first"})
            return
        self._do("clear_split_brain")
        self.split_brain = False
        if self.state is State.STALE:
            self.pending["resolve"] = (r.req_id, math.inf)
            self.rejoin_args = {"preserve": True, "adopt": False, "concurrent": False}
            self.rejoin_at = self.now
            self._try_rejoin()
        else:
            self._do(Action.FOLLOW.value, primary=self.hard.primary, epoch=self.hard.epoch,
                     adopt=True)
            self._reply(r.req_id, {"ok": True, "discarded": me,
                                   "following": self.hard.primary, "state": self.state.value})

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        h, v = self.hard, self.view
        return {
            "state": self.state.value, "epoch": h.epoch, "primary": h.primary,
            "vote": None,
            "lease_s": (round(self.lease_until - self.now, 3) if self._lease_valid()
                        else 0.0),
            "quorum_exempt": False, "outdated": sorted(v.state.outdated),
            "outdating": [], "degraded": sorted(self.confirmed), "campaign": None,
            "handover_to": self.handover_to, "consistent": self.consistent,
            "auto": self.cfg.auto, "peers": {},
            "coordinator": {
                "kind": "etcd", "group": self.cfg.group, "revision": v.revision,
                "lease": f"{self.lease_id:x}" if self.lease_id else None,
                "lease_alive_s": round(max(0.0, self.lease_alive_until - self.now), 3),
                "holder": v.primary.node if v.primary else None,
                "holder_epoch": v.primary.epoch if v.primary else None,
                "served": v.state.served, "members": sorted(v.members)},
        }

    # -- a switchover asked through etcd (`nbdgw fleet place`) ------------------------------

    def _asked_switchover(self) -> None:
        """A ``switchover`` key names this primary and is not answered yet: answer it
        (comparing the key as read, and this node's ``primary``), then, accepted, drain as
        for `nbdgw switchover` (its answer goes nowhere: the asker watches etcd)."""
        a, p = self.view.ask, self.view.primary
        if a is None or a.answer is not None or a.frm != self.cfg.me or p is None \
                or a.epoch != p.epoch or self._txn_busy() or self.now < self.txn_after \
                or not self._holds_key():
            return
        why = self._switchover_refusal(a.to)
        answer = f"refused: {why}" if why else f"accepted: {self.cfg.me} drains"
        value = json.dumps({"to": a.to, "from": a.frm, "epoch": a.epoch,
                            "timeout": a.timeout, "answer": answer}, sort_keys=True)
        self._txn("ask", [Cmp(self._key("switchover"), "mod", a.mod_revision),
                          Cmp(self._key("primary"), "mod", self._primary_rev())],
                  [Put(self._key("switchover"), value)], (a, why is None))

    def _ask_answered(self, r: EtcdReply, extra: tuple[SwitchoverAsk, bool]) -> None:
        a, accepted = extra
        if r.succeeded and accepted:
            self._log("warning", "etcd_switchover_asked", to=a.to)
            self._switchover(Request(self.now, ASKED, "switchover",
                                     {"to": a.to, "timeout": a.timeout}))
