"""The etcd node core (gateway/etcdcore.py) in the simulated cluster of nodecore_sim.py,
against a simulated linearizable etcd.

``EtcdSim`` is ``nodecore_sim.Sim`` (its nodes, clocks, crashes, freezes, slow actions,
write stream, replication and invariants) with the heartbeats replaced by a store: every
request of a core (grant, keepalive, txn) travels to the store and its answer back over
links that drop, delay and can be cut (``links[(node, STORE)]``), and the store applies
each request atomically when it arrives (linearizable: one order, the arrival order).
Leases expire by the store's own clock, which runs at its own rate; node clocks run at
rates up to ``skew`` away from it.  A reply to a request of an earlier boot is dropped.

On top of the base invariants (never two valid write leases; an elected node holds
every acknowledged sync write and a prefix of the last history; one promotion per
epoch) it checks at every step: no node writes on an epoch below one the store has
granted since (a deposed primary's writes end before its successor's epoch exists:
the fencing token only grows), and a primary cut off from the store stops writing within
its lease span.  ``run(seed)`` draws faults, heals, and checks a primary is elected and
followed within ``SETTLE`` s.  Replay a seed with ``etcd_run(seed, trace=True)``.

``EtcdSim(shared=True)`` runs each node's lease as the groups parent does
(``NodeLease``): a *keeper* per node, a process apart from the node's core, that grants
and keeps alive the node's lease and reads the groups' keys, and publishes both (the
run dir's file: it outlives the keeper, not a power cut, whose reboot starts a new
monotonic clock) for the core to read at its ticks.  The keeper crashes, restarts
(adopting the published lease) and freezes on its own (``keeper_*`` faults); the core
must then fence on its own at the published deadline.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any

from gateway.etcdcore import (
    KV,
    Cmp,
    Delete,
    EtcdCore,
    EtcdCoreConfig,
    EtcdReply,
    LeaseKeeper,
    Put,
    Shared,
    Txn,
    groups_prefix,
    parse_group,
)
from gateway.nodecore import HardState
from tests.unit.nodecore_sim import DT, SETTLE, Msg, Node, Sim, Violation

STORE = "etcd"
SWEEP = 0.5  # s of store time between expiry sweeps (etcd's lessor checks every 500 ms)
TTL = 3


@dataclass
class StoreMsg(Msg):
    payload: Any = None
    keeper: bool = False  # to or from the node's lease keeper (not its core)


@dataclass
class Keeper:
    """A node's lease keeper (shared mode): its own process, crashes and freezes."""

    lk: LeaseKeeper | None = None  # None: down
    boots: int = 0
    frozen_until: float = -math.inf
    next_id: int = 0
    published: Shared | None = None  # the file in the run dir

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id


class Store:
    """A linearizable etcd: revisions, keys, leases that expire by the store's clock."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.revision = 1
        self.kv: dict[str, KV] = {}
        self.leases: dict[int, float] = {}  # id -> expiry (store time)
        self.next_lease = 0x100
        self.next_sweep = 0.0
        self.granted: list[tuple[float, int]] = []  # (sim time, epoch) of each take

    def clock(self, t: float) -> float:
        return t * self.rate

    def sweep(self, t: float) -> None:
        now = self.clock(t)
        if now < self.next_sweep:
            return
        self.next_sweep = now + SWEEP
        for lid, exp in list(self.leases.items()):
            if exp <= now:
                self._revoke(lid)

    def _revoke(self, lid: int) -> None:
        del self.leases[lid]
        gone = [k for k, v in self.kv.items() if v.lease == lid]
        if gone:
            self.revision += 1
            for k in gone:
                del self.kv[k]

    def _live(self, lid: int, now: float) -> bool:
        return lid in self.leases and self.leases[lid] > now

    def apply(self, t: float, args: dict[str, Any], rid: int) -> EtcdReply:
        now = self.clock(t)
        op = args["op"]
        if op == "grant":
            self.next_lease += 1
            self.leases[self.next_lease] = now + int(args["ttl"])
            return EtcdReply(0.0, rid, True, lease=self.next_lease, ttl=int(args["ttl"]))
        if op == "keepalive":
            lid = int(args["lease"])
            if not self._live(lid, now):
                return EtcdReply(0.0, rid, True, ttl=0)
            self.leases[lid] = now + TTL
            return EtcdReply(0.0, rid, True, ttl=TTL)
        txn: Txn = args["txn"]
        lid = int(args.get("lease", 0))
        ok = all(self._holds(c) for c in txn.compare)
        ops = txn.success if ok else txn.failure
        if any(isinstance(o, Put) and o.leased for o in ops) and not self._live(lid, now):
            return EtcdReply(0.0, rid, False, error="etcdserver: requested lease not found")
        if ops:
            self.revision += 1
        for o in ops:
            if isinstance(o, Put):
                old = self.kv.get(o.key)
                self.kv[o.key] = KV(o.key, o.value, old.create_revision if old
                                    else self.revision, self.revision, lid if o.leased else 0)
            elif isinstance(o, Delete):
                self.kv.pop(o.key, None)
        if ok and any(isinstance(o, Put) and o.key.endswith("/primary") for o in ops):
            st = parse_group(txn.prefix, self.revision, tuple(self.kv.values())).state
            if not self.granted or st.epoch > self.granted[-1][1]:
                self.granted.append((t, st.epoch))
        kvs = tuple(v for k, v in sorted(self.kv.items()) if k.startswith(txn.prefix))
        return EtcdReply(0.0, rid, True, succeeded=ok, revision=self.revision, kvs=kvs)

    def _holds(self, c: Cmp) -> bool:
        kv = self.kv.get(c.key)
        if c.target == "create":
            return (kv.create_revision if kv else 0) == c.value
        if c.target == "mod":
            return (kv.mod_revision if kv else 0) == c.value
        return (kv.value if kv else None) == c.value


class EtcdSim(Sim):
    # Cut off from the other nodes but not from etcd, a primary rightly serves on (its
    # sync peer is outdated through etcd); cut off from etcd, it stops: _check.
    isolated_stop = math.inf
    cut_stop = TTL * 0.95 - 0.5  # the lease span: cut off from etcd, it stops within this

    def __init__(self, seed: int, *, skew: float = 0.01, shared: bool = False,
                 **kw: Any) -> None:
        rng = random.Random(seed * 31 + 7)  # noqa: S311 - replayable by seed
        self.store = Store(1 + rng.uniform(-skew, skew))
        self.cut_since: dict[str, float | None] = {}
        self.shared = shared
        self.keepers: dict[str, Keeper] = {}
        super().__init__(seed, guard=False, **kw)
        for n in self.sites:
            if shared:
                self.keepers[n] = Keeper()
                self.keeper_restart(n)
            self.links[(n, STORE)] = self.links[(STORE, n)] = True
            self.cut_since[n] = None
            # Bounded clock-rate skew between the nodes and the store (a few % at most:
            # the core's DRIFT allowance covers 2.5 % each way).
            self.nodes[n].rate = 1 + rng.uniform(-skew, skew)

    # -- nodes: an etcd core instead of a heartbeat core ------------------------------------

    def ecfg(self, n: str) -> EtcdCoreConfig:
        base = super().cfg(n)
        return EtcdCoreConfig(me=n, role=base.role, peers=base.peers, group="g",
                              prefix="/nbdgw", lease_ttl=TTL, poll=0.25,
                              sync_peers=base.sync_peers, shared=self.shared)

    # -- the node's lease keeper (shared) ---------------------------------------------------

    def keeper_crash(self, n: str) -> None:
        k = self.keepers[n]
        if k.lk is not None:
            k.lk = None
            self._note(f"keeper of {n} crashes (its core runs on)")

    def keeper_restart(self, n: str) -> None:
        """A new keeper adopts the lease the file names (a restarted parent)."""
        k, node = self.keepers[n], self.nodes[n]
        if k.lk is not None or node.crashed:
            return
        k.boots += 1
        k.frozen_until = -math.inf
        lease = k.published.lease if k.published is not None else 0
        k.lk = LeaseKeeper(TTL, node.local(self.t), lease=lease, poll=0.25,
                           prefix=groups_prefix("/nbdgw"))
        if k.boots > 1:
            self._note(f"keeper of {n} restarts (lease {lease:x})")

    def keeper_freeze(self, n: str, d: float) -> None:
        k = self.keepers[n]
        if k.lk is not None:
            k.frozen_until = self.t + d
            self._note(f"keeper of {n} freezes {d:.1f}s")

    def crash(self, n: str) -> None:
        super().crash(n)
        if self.shared:  # a power cut: the keeper too, and the file means nothing after
            self.keeper_crash(n)
            self.keepers[n].published = None

    def restart(self, n: str) -> None:
        super().restart(n)
        if self.shared:
            self.keeper_restart(n)

    def heal(self) -> None:
        super().heal()
        for n in self.keepers:
            self.keeper_restart(n)
            self.keepers[n].frozen_until = -math.inf

    def advance(self, until: float) -> None:
        while self.t < until:
            super().advance(round(self.t + DT, 6))  # one step of the nodes
            for n, k in self.keepers.items():
                self._keeper_step(n, k)

    def _keeper_step(self, n: str, k: Keeper) -> None:
        node = self.nodes[n]
        if k.lk is not None and k.frozen_until <= self.t:
            for args in k.lk.due(node.local(self.t), k.new_id):
                self._to(n, STORE, (n, k.boots, args), keeper=True)
        # The core reads the file at every tick, changed or not (a frozen or crashed
        # core reads nothing).
        if node.crashed or node.core is None or node.frozen_until > self.t \
                or k.published is None:
            return
        self._step(node, replace(k.published, now=node.local(self.t)))

    def make_core(self, node: Node) -> EtcdCore:  # type: ignore[override]
        return EtcdCore(self.ecfg(node.name), node.hard, node.local(self.t),
                        bytes([node.boots]))

    def _perform_other(self, node: Node, kind: str, args: dict[str, Any]) -> None:
        if kind != "etcd":
            super()._perform_other(node, kind, args)
        self._request(node, args)

    # -- the store and the links to it ------------------------------------------------------

    def _request(self, node: Node, args: dict[str, Any]) -> None:
        self._to(node.name, STORE, (node.name, node.boots, args))

    def _to(self, src: str, dst: str, payload: Any, keeper: bool = False) -> None:
        if not self.links.get((src, dst), True) or self.rng.random() < self.drop:
            return
        at = self.t + self.rng.uniform(0.0005, self.max_delay)
        self.inflight.append(StoreMsg(at, src, dst, b"", "", payload, keeper))

    def _deliver(self, m: Msg) -> None:
        assert isinstance(m, StoreMsg)
        if m.dst == STORE:
            name, boot, args = m.payload
            reply = self.store.apply(self.t, args, int(args["req_id"]))
            self._to(STORE, name, (boot, reply), keeper=m.keeper)
            return
        if m.keeper:
            self._keeper_answer(m.dst, m.payload)
            return
        node = self.nodes[m.dst]
        boot, reply = m.payload
        if node.crashed or node.frozen_until > self.t or boot != node.boots:
            return
        self._step(node, replace(reply, now=node.local(self.t)))

    def _keeper_answer(self, n: str, payload: tuple[int, EtcdReply]) -> None:
        k = self.keepers[n]
        boot, reply = payload
        if k.lk is None or k.frozen_until > self.t or boot != k.boots:
            return
        now = self.nodes[n].local(self.t)
        said = k.lk.answer(replace(reply, now=now))
        if said is not None and self.trace:
            self._note(f"keeper of {n}: {said[1]} {said[2]}")
        k.published = k.lk.published(now)

    # -- invariants --------------------------------------------------------------------------

    def _writes(self) -> None:
        granted = self.store.granted
        top = granted[-1][1] if granted else 0
        for n, node in self.nodes.items():
            if node.crashed or not node.serving or node.local(self.t) >= node.lease_until_local:
                continue
            if node.hard.epoch < top:
                raise Violation(f"{n} writes on epoch {node.hard.epoch} after the store "
                                f"granted epoch {top}: a deposed primary still writes")
        super()._writes()

    def _check(self) -> None:
        self.store.sweep(self.t)
        super()._check()
        for n, node in self.nodes.items():
            if self.links[(n, STORE)] and self.links[(STORE, n)]:
                self.cut_since[n] = None
                continue
            since = self.cut_since[n]
            if since is None:
                self.cut_since[n] = since = self.t
            if node.lease_until_local > node.local(self.t) and not node.crashed \
                    and self.t - since > self.cut_stop / node.rate + 0.1:
                raise Violation(f"{n} cut off from etcd since t={since:.2f} still holds a "
                                "write lease")

    def _check_elected(self, node: Node, e: int) -> None:
        """The DR site takes the key only by an operator's promote (or a switchover,
        which drains it first): asynchronous, it may lack the newest acknowledged writes,
        which is what a DR promotion accepts (README).  The prefix check still holds."""
        if self.sites[node.name] != "dr":
            super()._check_elected(node, e)
            return
        sync, self.sync = self.sync, False
        try:
            super()._check_elected(node, e)
        finally:
            self.sync = sync
        # What it lacked is lost for good (the old primary keeps it as a diverged-*
        # snapshot when it rejoins): later elections are checked against what is left.
        self.acked &= set(self.elected_data.get(e, node.data))

    def isolate(self, n: str) -> None:
        """Cut ``n`` from the store (and, as the base does, from the other nodes)."""
        super().isolate(n)
        self.links[(n, STORE)] = self.links[(STORE, n)] = False

    def states(self) -> str:
        return super().states() + f"; store rev {self.store.revision} keys " + ", ".join(
            f"{k.rsplit('/', 1)[-1]}={v.value}" for k, v in sorted(self.store.kv.items())
            if k.split("/")[-2] != "members")


ETCD_FAULTS = ("isolate", "cut_store", "cut_pair", "heal_links", "crash", "restart",
               "freeze", "lossy", "switchover", "promote")
KEEPER_FAULTS = ("keeper_crash", "keeper_restart", "keeper_freeze")


def apply_etcd_fault(sim: EtcdSim, rng: random.Random, kind: str) -> None:
    a = rng.choice(list(sim.sites))
    if kind == "cut_store":
        one_way = rng.random() < 0.3
        sim.links[(a, STORE)] = False
        if not one_way:
            sim.links[(STORE, a)] = False
        sim._note(f"cut {a} from etcd{' (one way)' if one_way else ''}")
    elif kind == "promote":
        sim.request(a, "promote")
    elif kind in ("keeper_crash", "keeper_restart"):
        getattr(sim, kind)(a)
    elif kind == "keeper_freeze":
        sim.keeper_freeze(a, rng.uniform(0.5, 6.0))
    else:
        from tests.unit.nodecore_sim import apply_fault

        apply_fault(sim, rng, kind)


def etcd_run(seed: int, *, duration: float = 40.0, faults: int = 8, sync: bool = True,
             trace: bool = False, topology: str = "dr", skew: float = 0.01,
             shared: bool = False) -> EtcdSim:
    """Faults at random times, then heal: exactly one primary, the others following it,
    within SETTLE s.  Raises Violation with the seed and the schedule.  ``shared``: the
    node's lease is its keeper's, which has faults of its own."""
    sim = EtcdSim(seed, sync=sync, trace=trace, promote_failure=0.05, topology=topology,
                  skew=skew, shared=shared)
    rng = random.Random(seed * 7919 + 3)  # noqa: S311 - replayable by seed
    kinds = ETCD_FAULTS + KEEPER_FAULTS * 2 if shared else ETCD_FAULTS
    try:
        sim.advance(5.0)
        for at in sorted(rng.uniform(5.0, duration) for _ in range(faults)):
            sim.advance(at)
            apply_etcd_fault(sim, rng, rng.choice(kinds))
        sim.advance(duration)
        sim.heal()
        deadline = sim.t + SETTLE
        while sim.t < deadline:
            sim.advance(sim.t + 1.0)
            if sim.converged() is None:
                break
        why = sim.converged()
        if why is not None:
            raise sim.fail(f"did not converge within {SETTLE:g} s after healing: {why}")
    except Violation as e:
        if str(e).startswith("seed "):
            raise
        raise sim.fail(str(e)) from None
    return sim


__all__ = ["STORE", "EtcdSim", "HardState", "etcd_run"]
