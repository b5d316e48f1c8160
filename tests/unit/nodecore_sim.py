"""A simulated three-site cluster of node cores (gateway/nodecore.py) for model checking.

Three ``NodeCore``s (main: primary, dc: secondary, and a third site: dr, a DR site with a
replica, or wit, a witness that holds no data: ``Sim(topology=...)``) exchange real sealed beats
(gateway/heartbeat.py ``seal``/``unseal`` and ``BeatGuard``) through a network that
drops, delays, duplicates and reorders them, where links can be cut one way or both,
and where an attacker records every datagram and plays old ones again (from their
sender's address or another).  Each node has its own monotonic clock (offset and rate
drift), can crash (power cut: it restarts from its persisted HardState with a new boot
nonce), can freeze (its daemon stops; the lease it handed to nbdkit stays in force until
it expires), and has a tiny shell that performs actions (promotions take time and may
fail).  A write stream models acknowledged writes: the primary acknowledges a write only
with a valid lease and, for its sync peer, once that peer has it or is confirmed
outdated.

A witness must never be needed for its data: it is never shipped to, never a candidate
or a switchover target, never promoted; operator requests to make it primary are
refused; the model checks all of that at every step (``Violation`` otherwise).

``Sim.run(seed)`` draws a fault schedule from the seed, checks the safety invariants at
every step, heals everything, and checks that the cluster converged.  A failure raises
``Violation`` with the seed and a trace of the schedule, so any run can be replayed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from gateway.heartbeat import BadBeat, BeatGuard, derive_key, seal, unseal
from gateway.nodecore import (
    BeatIn,
    CoreConfig,
    Done,
    Facts,
    HardState,
    NodeCore,
    Request,
    Tick,
)

TOPOLOGIES = {
    "dr": {"main": "primary", "dc": "secondary", "dr": "dr"},
    "witness": {"main": "primary", "dc": "secondary", "wit": "witness"},
}
THIRD = {"dr": "dr", "witness": "wit"}  # the third site's name in each topology
ADDR = {"main": "10.0.0.1", "dc": "10.0.0.2", "dr": "10.0.0.3", "wit": "10.0.0.4"}
ATTACKER = "10.0.0.66"
DT = 0.05
SYNC_TIMEOUT = 1.0
SETTLE = 45.0  # after healing, the cluster must converge within this
ISOLATED_STOP = 2.0  # an isolated primary's lease ends within this (the timeout)


class Violation(AssertionError):
    pass


@dataclass
class Node:
    name: str
    core: NodeCore | None
    hard: HardState
    offset: float
    rate: float
    boots: int = 0
    crashed: bool = False
    frozen_until: float = -math.inf
    lease_until_local: float = -math.inf  # what nbdkit was last told
    serving: bool = False
    data: list[int] = field(default_factory=list)  # write ids, in order
    consistent: bool = True
    data_epoch: int = 0
    busy_until: float = math.inf  # the slow action under way finishes then
    busy: tuple[str, dict[str, Any]] | None = None
    queue: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    degraded: frozenset[str] = frozenset()
    resync_until: float = math.inf
    next_facts: float = 0.0
    drain_deadline: float = math.inf
    replies: list[dict[str, Any]] = field(default_factory=list)

    def local(self, t: float) -> float:
        return self.offset + t * self.rate


@dataclass
class Msg:
    at: float
    src: str
    dst: str
    data: bytes
    src_addr: str


class Sim:
    isolated_stop = ISOLATED_STOP  # a subclass whose primary needs no peer sets inf

    def __init__(self, seed: int, *, sync: bool = True, guard: bool = True,
                 trace: bool = False, promote_failure: float = 0.0,
                 topology: str = "dr",
                 clocks: dict[str, tuple[float, float]] | None = None) -> None:
        """``clocks``: a site's clock (offset, rate) when it is given, as cores of several
        groups that run on one host share that host's (GroupsSim)."""
        self.rng = random.Random(seed)  # noqa: S311 - a replayable schedule, not a secret
        self.seed = seed
        self.topology = topology
        self.sites = TOPOLOGIES[topology]
        self.sync = sync
        self.use_guard = guard
        self.t = 0.0
        self.key = derive_key(b"x" * 32)
        self.links: dict[tuple[str, str], bool] = {(a, b): True for a in self.sites
                                                   for b in self.sites if a != b}
        self.inflight: list[Msg] = []
        self.recorded: list[Msg] = []
        self.attack = False
        self.drop = 0.0
        self.dup = 0.0
        self.max_delay = 0.02
        self.log: list[str] = []
        self.trace = trace
        self.guards = {n: BeatGuard({p: frozenset({ADDR[p]}) for p in self.sites if p != n})
                       for n in self.sites}
        self.next_write = 1
        self.acked: set[int] = set()  # writes acknowledged to a client, by any primary
        self.waiting: dict[str, list[int]] = {}  # primary -> writes waiting for its sync peer
        self.epoch_primary: dict[int, str] = {}
        self.history: dict[int, list[int]] = {}
        self.write_at: dict[int, float] = {}
        self.checked_epochs: set[int] = {0}  # epochs whose first lease was checked
        self.elected_data: dict[int, list[int]] = {}  # epoch -> its primary's data then
        self.forced_epochs: set[int] = set()
        self.isolated_since: dict[str, float | None] = dict.fromkeys(self.sites)
        self.nodes: dict[str, Node] = {}
        self.promote_failure = promote_failure
        for n, role in self.sites.items():
            hard = HardState(role=role, epoch=0, primary="main")
            offset, rate = self.rng.uniform(0, 1000), 1 + self.rng.uniform(-1e-3, 1e-3)
            if clocks is not None and n in clocks:
                offset, rate = clocks[n]
            node = Node(n, None, hard, offset=offset, rate=rate)
            node.data = []
            self.nodes[n] = node
            self._boot(node)

    # -- nodes ---------------------------------------------------------------------------

    def is_witness(self, n: str) -> bool:
        return self.sites[n] == "witness"

    def cfg(self, n: str) -> CoreConfig:
        peers = {p: r for p, r in self.sites.items() if p != n}
        sync = frozenset()
        if self.sync and n in ("main", "dc"):
            sync = frozenset({"dc" if n == "main" else "main"})
        return CoreConfig(me=n, role=self.sites[n], peers=peers, sync_peers=sync,
                          timeout=2.0, fence_margin=1.0, interval=0.5)

    def _boot(self, node: Node) -> None:
        node.boots += 1
        node.core = self.make_core(node)
        node.crashed = False
        node.busy, node.busy_until, node.queue = None, math.inf, []
        node.serving = False
        node.next_facts = self.t
        self._step(node, Tick(node.local(self.t)))

    def make_core(self, node: Node) -> NodeCore:
        """A new boot's core (a subclass puts another coordinator's core here)."""
        boot = bytes([node.boots]) + self.rng.randbytes(15)
        return NodeCore(self.cfg(node.name), node.hard, node.local(self.t), boot)

    def crash(self, n: str) -> None:
        node = self.nodes[n]
        node.crashed = True
        node.core = None
        node.serving = False
        node.lease_until_local = -math.inf  # nbdkit died with it
        self.waiting.pop(n, None)
        self._note(f"crash {n}")

    def restart(self, n: str) -> None:
        node = self.nodes[n]
        if node.crashed:
            self._note(f"restart {n}")
            self._boot(node)

    def freeze(self, n: str, d: float) -> None:
        node = self.nodes[n]
        if not node.crashed:
            node.frozen_until = self.t + d
            self._note(f"freeze {n} {d:.1f}s")

    def _note(self, what: str) -> None:
        self.log.append(f"t={self.t:.2f} {what}")

    # -- the shell ---------------------------------------------------------------------------

    def _step(self, node: Node, ev: Any) -> None:
        assert node.core is not None
        ready = node.core.step(ev)
        if ready.persist is not None:
            node.hard = ready.persist
        node.lease_until_local = ready.lease_until
        if ready.beat is not None:
            data = seal(self.key, node.name, node.core.boot, node.core.seq, ready.beat)
            for p in self.sites:
                if p != node.name:
                    self._send(node.name, p, data, ADDR[node.name])
        for out in ready.actions:
            self._perform(node, out.kind, dict(out.args))

    def _perform(self, node: Node, kind: str, args: dict[str, Any]) -> None:
        if kind == "log":
            if self.trace:
                self._note(f"{node.name}: {args.get('event')} "
                           + " ".join(f"{k}={v}" for k, v in args.items()
                                      if k not in ("event", "level")))
            return
        if self.is_witness(node.name) and (kind in ("serve", "promote", "reclaim", "rejoin",
                                                    "drain")
                                           or (kind == "degrade" and args["peers"])):
            raise Violation(f"witness {node.name} was told to {kind}: it holds no data")
        if kind == "serve":
            node.serving = True
        elif kind == "fence":
            node.serving = False
            self.waiting.pop(node.name, None)  # nbdkit killed: never acknowledged
        elif kind == "degrade":
            node.degraded = frozenset(args["peers"])
        elif kind == "reply":
            node.replies.append(args["payload"])
        elif kind in ("promote", "reclaim", "rejoin", "drain"):
            if kind == "drain":
                node.drain_deadline = self.t + float(args.get("timeout", 5))
            node.queue.append((kind, args))
        elif kind == "abort_drain":  # fenced mid-drain: the daemon stops waiting
            node.drain_deadline = self.t
        elif kind in ("receive", "follow", "clear_split_brain"):
            pass
        else:
            self._perform_other(node, kind, args)
        self._start_busy(node)

    def _perform_other(self, node: Node, kind: str, args: dict[str, Any]) -> None:
        """An action of a subclass's core (etcd requests); none for the heartbeat core."""
        raise Violation(f"unknown action {kind}")

    def _start_busy(self, node: Node) -> None:
        if node.busy is None and node.queue:
            node.busy = node.queue.pop(0)
            node.busy_until = self.t + self.rng.uniform(0.05, 1.5)

    def _finish_busy(self, node: Node) -> None:
        assert node.busy is not None and node.core is not None
        kind, args = node.busy
        node.busy, node.busy_until = None, math.inf
        now = node.local(self.t)
        if kind in ("promote", "reclaim"):
            ok = self.rng.random() >= self.promote_failure
            if ok:
                e = int(args["epoch"])
                if e in self.epoch_primary and self.epoch_primary[e] != node.name:
                    raise Violation(f"epoch {e}: {node.name} promoted, but "
                                    f"{self.epoch_primary[e]} already was")
                self.epoch_primary[e] = node.name
                node.data_epoch = e
                self.elected_data[e] = list(node.data)
                if node.hard.quorum_exempt:
                    self.forced_epochs.add(e)
                self._note(f"{node.name} promoted epoch {e}")
            self._step(node, Done(now, kind, ok, {"epoch": args["epoch"]} if ok
                                  else {"error": "injected failure"}))
        elif kind == "rejoin":
            primary = self.nodes[args["primary"]]
            if args.get("concurrent") and not self.forced_epochs:
                raise Violation(f"{node.name} served while {primary.name} was primary")
            node.consistent = not args.get("preserve", True)
            node.resync_until = math.inf
            self._step(node, Done(now, "rejoin", True, {"outcome": "rejoined",
                                                       "consistent": node.consistent}))
        elif kind == "drain":
            target = self.nodes[args["target"]]
            ok = self._net_up(node.name, target.name) and target.data == node.data
            if not ok and self.t < node.drain_deadline:
                node.busy = (kind, args)  # still draining: client I/O stays held
                node.busy_until = self.t + DT
                return
            node.drain_deadline = math.inf
            self._step(node, Done(now, "drain", ok, {"seqs": {}} if ok else
                                  {"error": "the target did not catch up"}))
        self._start_busy(node)

    def _check_elected(self, node: Node, e: int) -> None:
        """An elected node holds every acknowledged write (sync) and is a prefix of the
        history of the last primary before it (any mode: no write comes back from the
        dead, no history forks)."""
        data = self.elected_data.get(e, node.data)
        if self.sync:
            lost = sorted(self.acked - set(data))
            if lost:
                raise Violation(f"{node.name} elected on epoch {e} without acknowledged "
                                f"writes {lost[:5]} (of {len(lost)})")
        before = [x for x in self.history if x < e]
        if before:
            last = self.history[max(before)]
            if data != last[:len(data)]:
                raise Violation(f"{node.name} elected on epoch {e} with a history that is "
                                f"no prefix of epoch {max(before)}'s")

    def _facts(self, node: Node) -> None:
        assert node.core is not None
        primary = node.core.state.value == "primary"
        stalled, healthy, streaming = set(), set(), set()
        if primary:
            for p in node.core.cfg.sync_peers:
                w = self.waiting.get(node.name)
                if self._net_up(node.name, p) and self.nodes[p].hard.primary == node.name \
                        and self.nodes[p].data == node.data:
                    healthy.add(p)
                elif w and self.t - self.write_at[w[0]] >= SYNC_TIMEOUT:
                    stalled.add(p)
            # A witness has no replica: nothing streams to it (the daemon sees no link).
            streaming = {p for p in self.sites if p != node.name
                         and not self.is_witness(p) and self._net_up(node.name, p)
                         and self.nodes[p].data == node.data}
        self._step(node, Facts(node.local(self.t), node.consistent, data_epoch=node.data_epoch,
                               stalled=frozenset(stalled), healthy=frozenset(healthy),
                               streaming=frozenset(streaming)))

    def _net_up(self, a: str, b: str) -> bool:
        """Replication between a and b works (peerlink does not stop when a daemon is
        frozen; a crashed node runs nothing)."""
        na, nb = self.nodes[a], self.nodes[b]
        return (not na.crashed and not nb.crashed and self.links[(a, b)]
                and self.links[(b, a)])

    # -- the network --------------------------------------------------------------------------

    def _send(self, src: str, dst: str, data: bytes, src_addr: str) -> None:
        msg = Msg(self.t + self.rng.uniform(0.0005, self.max_delay), src, dst, data, src_addr)
        self.recorded.append(msg)
        if len(self.recorded) > 4000:
            del self.recorded[:1000]
        if not self.links[(src, dst)] or self.rng.random() < self.drop:
            return
        self.inflight.append(msg)
        if self.rng.random() < self.dup:
            self.inflight.append(Msg(msg.at + self.rng.uniform(0, 0.3), src, dst, data,
                                     src_addr))

    def _deliver(self, m: Msg) -> None:
        node = self.nodes[m.dst]
        if node.crashed or node.frozen_until > self.t:
            return
        try:
            s = unseal(self.key, m.data)
            if self.use_guard:
                self.guards[m.dst].admit(s, m.src_addr)
        except BadBeat:
            return
        self._step(node, BeatIn(node.local(self.t), s.node, s.boot, s.counter, s.body))

    def _replay(self) -> None:
        if not self.recorded:
            return
        old = self.rng.choice(self.recorded[:max(1, len(self.recorded) - 20)])
        dst = self.rng.choice([n for n in self.sites if n != old.src])
        src_addr = old.src_addr if self.rng.random() < 0.5 else ATTACKER
        if self.use_guard and src_addr == ATTACKER:
            return  # the address check stops it; play it from the victim's address
        self.inflight.append(Msg(self.t, old.src, dst, old.data, old.src_addr))

    # -- writes ------------------------------------------------------------------------------

    def _writes(self) -> None:
        """nbdkit takes a write while its lease holds (a frozen daemon does not stop it);
        a write is acknowledged once every sync peer has it or is confirmed outdated."""
        self._check_new_epochs(self._holders())
        for n, node in self.nodes.items():
            if node.crashed or not node.serving or (node.busy or ("",))[0] == "drain":
                continue
            if node.local(self.t) >= node.lease_until_local:
                continue  # nbdkit refuses: the lease expired
            w = self.next_write
            self.next_write += 1
            self.write_at[w] = self.t
            node.data.append(w)
            self.waiting.setdefault(n, []).append(w)
            self.history[node.hard.epoch] = list(node.data)
        for n, ws in self.waiting.items():
            node = self.nodes[n]
            if node.crashed or not ws:
                ws.clear()
                continue
            peers = self.cfg(n).sync_peers
            while ws:
                w = ws[0]
                if all(p in node.degraded or w in self.nodes[p].data for p in peers):
                    ws.pop(0)
                    if peers:  # a DR primary (after a switchover to it) acks async
                        self.acked.add(w)
                else:
                    break

    def _replicate(self) -> None:
        """The current serving primary's data flows to the replicas it reaches: a
        replica is always a prefix of its primary (async DR lags at random)."""
        for n, node in self.nodes.items():
            if node.crashed or not node.serving:
                continue
            for p, other in self.nodes.items():
                if p == n or other.crashed or other.core is None:
                    continue
                if other.core.state.value not in ("standby", "witness"):
                    continue
                if other.hard.primary != n or not self._net_up(n, p):
                    continue
                if self.is_witness(p):
                    continue  # holds no data: never shipped to
                if self.sites[p] == "dr" and self.rng.random() < 0.5:
                    continue  # async: it trails
                if other.data != node.data[:len(other.data)]:
                    # a diverged replica: resync (its own tail was kept as a snapshot)
                    if other.resync_until == math.inf:
                        other.resync_until = self.t + self.rng.uniform(0.2, 2.0)
                    if self.t < other.resync_until:
                        continue
                    other.resync_until = math.inf
                other.data = list(node.data)
                other.data_epoch = node.data_epoch
                if not other.consistent:
                    other.consistent = True

    # -- invariants ---------------------------------------------------------------------------

    def _holders(self) -> list[str]:
        return [n for n, node in self.nodes.items()
                if node.lease_until_local > node.local(self.t) and not node.crashed]

    def _check_new_epochs(self, holders: list[str]) -> None:
        """The first lease on an epoch: checked before that epoch's first write (a
        write acknowledged on the new epoch is not one the elected node lacked)."""
        for n in holders:
            e = self.nodes[n].hard.epoch
            if e not in self.checked_epochs and e not in self.forced_epochs:
                self.checked_epochs.add(e)
                self._check_elected(self.nodes[n], e)

    def _check(self) -> None:
        holders = self._holders()
        if len(holders) > 1 and not self.forced_epochs:
            raise Violation(f"two valid write leases at once: {holders}")
        self._check_new_epochs(holders)
        for n in self.nodes:
            cut = all(not self.links[(n, p)] and not self.links[(p, n)]
                      for p in self.sites if p != n)
            if cut:
                if self.isolated_since[n] is None:
                    self.isolated_since[n] = self.t
                since = self.isolated_since[n]
                assert since is not None
                if n in holders and self.t - since > self.isolated_stop + 0.05:
                    raise Violation(f"{n} isolated since t={since:.2f} still holds its "
                                    "lease after the timeout")
            else:
                self.isolated_since[n] = None
        for n, node in self.nodes.items():
            if not self.is_witness(n):
                continue
            st = node.core.state.value if node.core is not None else "witness"
            if st != "witness" or node.data or node.hard.role != "witness" \
                    or node.hard.vote_for == n:
                raise Violation(f"witness {n} is {st} (role {node.hard.role}, vote for "
                                f"{node.hard.vote_for}, {len(node.data)} writes): a "
                                "witness holds no data and never stands")

    # -- running ----------------------------------------------------------------------------

    def advance(self, until: float) -> None:
        while self.t < until:
            self.t = round(self.t + DT, 6)
            if self.attack and self.rng.random() < 0.3:
                self._replay()
            due = sorted((m for m in self.inflight if m.at <= self.t), key=lambda m: m.at)
            self.inflight = [m for m in self.inflight if m.at > self.t]
            for m in due:
                self._deliver(m)
            for node in self.nodes.values():
                if node.crashed or node.core is None or node.frozen_until > self.t:
                    continue
                if node.busy is not None and self.t >= node.busy_until:
                    self._finish_busy(node)
                if self.t >= node.next_facts:
                    node.next_facts = self.t + 0.5
                    self._facts(node)
                self._step(node, Tick(node.local(self.t)))
            self._writes()
            self._replicate()
            self._check()

    def request(self, n: str, op: str, **args: Any) -> None:
        node = self.nodes[n]
        if node.crashed or node.core is None:
            return
        self._note(f"request {n} {op} {args}")
        self._step(node, Request(node.local(self.t), len(node.replies) + 1000, op, args))

    def set_link(self, a: str, b: str, up: bool) -> None:
        self.links[(a, b)] = up

    def isolate(self, n: str) -> None:
        for p in self.sites:
            if p != n:
                self.links[(n, p)] = self.links[(p, n)] = False
        self._note(f"isolate {n}")

    def heal(self) -> None:
        for k in self.links:
            self.links[k] = True
        self.drop = self.dup = 0.0
        self.attack = False
        for n in self.sites:
            self.restart(n)
            self.nodes[n].frozen_until = -math.inf
        self._note("heal")

    def converged(self) -> str | None:
        """None when exactly one node serves with a lease and every other follows it."""
        prim = [n for n, node in self.nodes.items() if node.core is not None
                and node.core.state.value == "primary"
                and node.lease_until_local > node.local(self.t)]
        if len(prim) != 1:
            return f"primaries with a lease: {prim}"
        p = prim[0]
        e = self.nodes[p].hard.epoch
        for n, node in self.nodes.items():
            if n == p:
                continue
            assert node.core is not None
            st = node.core.state.value
            if st not in ("standby", "witness") or node.hard.primary != p \
                    or node.hard.epoch != e:
                return f"{n} is {st} following {node.hard.primary} on epoch {node.hard.epoch}"
        return None

    def states(self) -> str:
        return ", ".join(f"{n}={node.core.state.value if node.core else 'down'}"
                         f"/e{node.hard.epoch}/{node.hard.primary}"
                         f"/v{node.hard.vote_epoch}:{node.hard.vote_for}"
                         f"/o{sorted(node.hard.outdated)}"
                         for n, node in self.nodes.items())

    def fail(self, why: str) -> Violation:
        tail = "\n  ".join(self.log[-(400 if self.trace else 40):])
        return Violation(f"seed {self.seed}: {why}\n  states: {self.states()}\n  {tail}")


FAULTS = ("isolate", "cut_pair", "one_way", "heal_links", "crash", "restart", "freeze",
          "lossy", "switchover", "attack")
# With a witness, operators also try to make it primary (refused, checked).
WITNESS_FAULTS = (*FAULTS, "promote_witness")


def refused_for_witness(sim: Sim, n: str, op: str, **args: Any) -> None:
    """A request that would make the witness primary: the core must refuse it at once,
    saying why."""
    node = sim.nodes[n]
    if node.crashed or node.core is None:
        return
    before = len(node.replies)
    sim.request(n, op, **args)
    reply = node.replies[before] if len(node.replies) > before else {}
    if "is a witness" not in str(reply.get("error")):
        raise Violation(f"{op} {args} on {n} with a witness: not refused ({reply})")


def apply_fault(sim: Sim, rng: random.Random, kind: str) -> None:  # noqa: PLR0912 - one branch a fault
    """One fault of the schedule (``kind`` from FAULTS), its targets drawn from ``rng``."""
    a, b = rng.sample(list(sim.sites), 2)
    if kind == "isolate":
        sim.isolate(a)
    elif kind == "cut_pair":
        sim.set_link(a, b, False)
        sim.set_link(b, a, False)
        sim._note(f"cut {a}<->{b}")
    elif kind == "one_way":
        sim.set_link(a, b, False)
        sim._note(f"cut {a}->{b}")
    elif kind == "heal_links":
        for k in sim.links:
            sim.links[k] = True
        sim._note("links healed")
    elif kind == "crash":
        sim.crash(a)
    elif kind == "restart":
        sim.restart(a)
    elif kind == "freeze":
        sim.freeze(a, rng.uniform(0.5, 6.0))
    elif kind == "lossy":
        sim.drop, sim.dup = rng.uniform(0, 0.3), rng.uniform(0, 0.3)
        sim.max_delay = rng.uniform(0.01, 0.8)
        sim._note(f"lossy drop={sim.drop:.2f} dup={sim.dup:.2f} delay<={sim.max_delay:.2f}")
    elif kind == "switchover":
        prim = [n for n, node in sim.nodes.items() if node.core is not None
                and node.core.state.value == "primary"]
        if prim:
            to = rng.choice([n for n in sim.sites if n != prim[0]])
            if sim.is_witness(to):
                refused_for_witness(sim, prim[0], "switchover", to=to, timeout=5)
            else:
                sim.request(prim[0], "switchover", to=to, timeout=5)
    elif kind == "attack":
        sim.attack = True
        sim._note("attacker replays captured beats")
    elif kind == "promote_witness":
        w = THIRD[sim.topology]
        refused_for_witness(sim, w, "promote", force=rng.random() < 0.5)


def random_run(seed: int, *, duration: float = 40.0, faults: int = 8,
               guard: bool = True, sync: bool = True, trace: bool = False,
               topology: str = "dr") -> Sim:
    """Draw ``faults`` faults at random times in ``duration`` seconds, then heal and
    check convergence.  Raises Violation (with the seed and the schedule) on failure."""
    sim = Sim(seed, guard=guard, sync=sync, trace=trace, promote_failure=0.05,
              topology=topology)
    kinds = WITNESS_FAULTS if topology == "witness" else FAULTS
    rng = random.Random(seed * 7919 + 1)  # noqa: S311 - replayable by seed
    try:
        sim.advance(5.0)  # the cluster forms
        for at in sorted(rng.uniform(5.0, duration) for _ in range(faults)):
            sim.advance(at)
            apply_fault(sim, rng, rng.choice(kinds))
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


# -- two groups on three hosts, one witness for both -----------------------------------------

# Volume groups (issue 22): each group runs its own core on each of its sites, as a
# process of its own (`nbdgw --group G daemon`); the hosts are shared.  g1 is primary on
# A with its secondary on B, g2 the other way round, and W hosts one witness core per
# group.  A host's power cut, freeze or partition hits every core on it at once; beats of
# the two groups are separate datagrams (their own ports), lost and delayed apart.
HOSTS = ("A", "B", "W")
GROUP_HOSTS = {"g1": {"main": "A", "dc": "B", "wit": "W"},
               "g2": {"main": "B", "dc": "A", "wit": "W"}}


class GroupsSim:
    """Two witness-topology Sims (one per group) stepped side by side on one clock per
    host; every invariant of Sim holds within each group (never two valid write leases
    in a group, elected primaries hold every acknowledged write, the witness never
    stands), and after healing each group converges on its own."""

    def __init__(self, seed: int, **kw: Any) -> None:
        rng = random.Random(seed)  # noqa: S311 - replayable by seed
        clocks = {h: (rng.uniform(0, 1000), 1 + rng.uniform(-1e-3, 1e-3)) for h in HOSTS}
        self.seed = seed
        self.groups = {g: Sim(seed * 31 + i, topology="witness",
                              clocks={site: clocks[h] for site, h in hosts.items()}, **kw)
                       for i, (g, hosts) in enumerate(GROUP_HOSTS.items())}

    @property
    def t(self) -> float:
        return self.groups["g1"].t

    def site(self, group: str, host: str) -> str:
        return next(s for s, h in GROUP_HOSTS[group].items() if h == host)

    def each(self, host: str, what: str, *args: Any) -> None:
        """``what`` (crash, restart, freeze, isolate) on every core of ``host``."""
        for g, sim in self.groups.items():
            getattr(sim, what)(self.site(g, host), *args)

    def set_link(self, a: str, b: str, up: bool) -> None:
        for g, sim in self.groups.items():
            sim.set_link(self.site(g, a), self.site(g, b), up)

    def advance(self, until: float) -> None:
        while self.t < until:
            step = round(self.t + DT, 6)
            for g, sim in self.groups.items():
                try:
                    sim.advance(step)
                except Violation as e:
                    raise Violation(f"group {g}: {e}") from None

    def primary(self, group: str) -> str | None:
        """The host serving ``group`` with a valid lease (None: none or several)."""
        sim = self.groups[group]
        prim = [GROUP_HOSTS[group][n] for n, node in sim.nodes.items() if node.core is not None
                and node.core.state.value == "primary"
                and node.lease_until_local > node.local(sim.t)]
        return prim[0] if len(prim) == 1 else None

    def converged(self) -> str | None:
        for g, sim in self.groups.items():
            why = sim.converged()
            if why is not None:
                return f"group {g}: {why}"
        return None

    def fail(self, why: str) -> Violation:
        logs = "\n".join(f"group {g}:\n  " + "\n  ".join(sim.log[-30:])
                         for g, sim in self.groups.items())
        states = "; ".join(f"{g}: {sim.states()}" for g, sim in self.groups.items())
        return Violation(f"seed {self.seed}: {why}\n  states: {states}\n{logs}")


def apply_host_fault(gs: GroupsSim, rng: random.Random, kind: str) -> None:
    """One fault of a groups schedule: a host's (every core on it) or a link's (both
    groups' beats), or an operator's request to one group."""
    a, b = rng.sample(HOSTS, 2)
    if kind in ("isolate", "crash", "restart"):
        gs.each(a, kind)
    elif kind == "freeze":
        gs.each(a, "freeze", rng.uniform(0.5, 6.0))
    elif kind in ("cut_pair", "one_way"):
        gs.set_link(a, b, False)
        if kind == "cut_pair":
            gs.set_link(b, a, False)
    elif kind in ("heal_links", "lossy", "attack"):
        for sim in gs.groups.values():
            apply_fault(sim, rng, kind)
    else:  # switchover, promote_witness: one group's operator
        apply_fault(gs.groups[rng.choice(list(GROUP_HOSTS))], rng, kind)


def random_groups_run(seed: int, *, duration: float = 40.0, faults: int = 8) -> GroupsSim:
    """random_run for two groups sharing hosts and a witness (WITNESS_FAULTS, by host)."""
    gs = GroupsSim(seed, promote_failure=0.05)
    rng = random.Random(seed * 7919 + 3)  # noqa: S311 - replayable by seed
    try:
        gs.advance(5.0)
        for at in sorted(rng.uniform(5.0, duration) for _ in range(faults)):
            gs.advance(at)
            apply_host_fault(gs, rng, rng.choice(WITNESS_FAULTS))
        gs.advance(duration)
        for sim in gs.groups.values():
            sim.heal()
        deadline = gs.t + SETTLE
        while gs.t < deadline:
            gs.advance(gs.t + 1.0)
            if gs.converged() is None:
                break
        why = gs.converged()
        if why is not None:
            raise gs.fail(f"did not converge within {SETTLE:g} s after healing: {why}")
    except Violation as e:
        if str(e).startswith("seed "):
            raise
        raise gs.fail(str(e)) from None
    return gs
