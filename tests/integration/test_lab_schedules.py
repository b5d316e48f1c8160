"""Seeded compound-fault schedules in the three-site lab (sync mode).

A schedule is drawn from a seed by ``random.Random(seed)``: 3 to 5 faults, each
starting within failover.timeout + fence_margin of the one before (two faults close
together, often overlapping), the whole fault phase at most 40 s.  The faults:

- ``cut``: a power cut of a site (`nbdgw lab kill`), booted again after a while;
- ``isolate``: iptables in the site's namespace drops its traffic to and from both other
  sites (the client still reaches it), then the rules are removed;
- ``freeze``: SIGSTOP of the site's daemon for a few seconds, then SIGCONT;
- ``switchover``: `nbdgw switchover --to` the site in state standby, on the primary of
  the moment (skipped when there is none).

A client in the client namespace writes stamped 4 KiB blocks through the service address
all along, flushing every 4, reconnecting after errors and after any call not answered
within CALL_S (10 s: a connection gone silent without a reset), as qemu-nbd's reconnect
would (``Stamped`` of test_failover_faults; its "stuck" lines are in the report).  Then
everything is healed and booted, and the test checks what the README promises: one
primary and the others following it, no node left in split brain, no refusal record left
(a demoted primary's, refused as a stale copy, is cleared once moot), every block whose
FLUSH was acknowledged reads back (sync mode: no acknowledged write is lost), and the
three sites' copies converge.
While the faults run, no epoch ever has two different primaries.

Every run prints its schedule; a failure prints the seed, the schedule with what was
done when, and the tail of each daemon's log.  Replay one seed:
``NBDGW_SCHEDULE_SEEDS=17 pytest -m slow -s tests/integration/test_lab_schedules.py``
(``1-50`` or ``3,9,12`` for more).  A seed replays the schedule (faults, sites, times), not
the daemons' interleaving: what a fault meets can differ from run to run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.daemon import STALE_REFUSAL_QUIET
from gateway.lab import Lab, alive, locked
from tests.conftest import NBDGW
from tests.integration.conftest import (
    TIMEOUT,
    addr,
    cfg,
    check_blocks,
    converge,
    failover_state,
    in_ns,
    lab_cmd,
    node_dir,
    up,
)
from tests.integration.test_failover_faults import CALL_S, Stamped, live_states, wait_for

SITES = ("main", "dc", "dr")
KINDS = ("cut", "isolate", "freeze", "switchover")
PHASE_S = 40.0  # the fault phase ends by then: every fault healed
CI_SEEDS = (1, 2)


@dataclass
class Fault:
    kind: str
    site: str  # for a switchover: chosen when it runs (the standby of the moment)
    at: float  # seconds after the fault phase began
    duration: float  # until healed (0 for a switchover)

    def __str__(self) -> str:
        what = f"{self.kind} {self.site}" if self.kind != "switchover" else "switchover"
        return f"t={self.at:5.2f}s {what}" + (f" for {self.duration:.2f}s"
                                              if self.duration else "")


def draw(seed: int) -> list[Fault]:
    """The schedule of ``seed``: 3-5 faults, each begun within TIMEOUT of the previous
    one, all healed by PHASE_S."""
    rng = random.Random(seed)  # noqa: S311 - a test schedule, not a secret
    faults: list[Fault] = []
    at = rng.uniform(0.0, 1.0)
    for _ in range(rng.randint(3, 5)):
        kind = rng.choice(KINDS)
        site = rng.choice(SITES)
        duration = {"cut": rng.uniform(3.0, 12.0), "isolate": rng.uniform(3.0, 10.0),
                    "freeze": rng.uniform(1.5, 5.0), "switchover": 0.0}[kind]
        faults.append(Fault(kind, site if kind != "switchover" else "-", round(at, 2),
                            round(min(duration, PHASE_S - at), 2)))
        at += rng.uniform(0.3, TIMEOUT)
    return faults


def env_seeds() -> list[int]:
    """NBDGW_SCHEDULE_SEEDS: "1-50", "3,9,12" or a mix ("1-5,9")."""
    out: list[int] = []
    for part in os.environ.get("NBDGW_SCHEDULE_SEEDS", "").split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        elif part.strip():
            out.append(int(part))
    return out


@dataclass
class Runner:
    """Plays a schedule on a lab; remembers what it did, when, for the report."""

    lab: dict[str, Any]
    lab_dir: Path
    t0: float = 0.0
    wall0: float = 0.0  # time.time() at t0
    done: list[str] = field(default_factory=list)
    rules: list[tuple[str, list[str]]] = field(default_factory=list)  # (site, rule)
    frozen: dict[int, str] = field(default_factory=dict)  # pid -> site
    switches: list[subprocess.Popen[str]] = field(default_factory=list)
    primaries: dict[int, set[str]] = field(default_factory=dict)  # epoch -> sites
    stop_watch: threading.Event = field(default_factory=threading.Event)

    def note(self, what: str) -> None:
        self.done.append(f"t={time.monotonic() - self.t0:5.2f}s {what}")

    def daemon_pid(self, site: str) -> int | None:
        with locked(self.lab_dir):
            p = Lab.load(self.lab_dir).proc(site, "daemon")
        return int(p["pid"]) if alive(p) else None

    def boot(self, site: str) -> None:
        """Start the site's processes again if they are down (no waiting: faults go on)."""
        with locked(self.lab_dir):
            lab = Lab.load(self.lab_dir)
            if any(alive(p) for p in lab.node(site)["procs"]):
                self.note(f"start {site}: running, skipped")
                return
            lab.start_node(site)
        self.note(f"start {site}")

    def isolation_rules(self, site: str) -> list[list[str]]:
        return [[chain, flag, addr(self.lab, peer), "-j", "DROP"]
                for peer in SITES if peer != site
                for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d"))]

    def begin(self, f: Fault) -> None:
        if f.kind == "cut":
            lab_cmd("kill", f.site, "--dir", str(self.lab_dir))
            self.note(f"cut {f.site}")
        elif f.kind == "isolate":
            for rule in self.isolation_rules(f.site):
                in_ns(self.lab, f.site, "iptables", "-I", *rule)
                self.rules.append((f.site, rule))
            self.note(f"isolate {f.site}")
        elif f.kind == "freeze":
            pid = self.daemon_pid(f.site)
            if pid is None:
                self.note(f"freeze {f.site}: down, skipped")
                return
            os.kill(pid, signal.SIGSTOP)
            self.frozen[pid] = f.site
            f.site = f"{f.site}:{pid}"
            self.note(f"freeze {f.site}")
        else:
            st = live_states(self.lab)
            prim = [n for n, s in st.items() if s == "primary"]
            stby = [n for n, s in st.items() if s == "standby"]
            if len(prim) != 1 or not stby:
                self.note(f"switchover: skipped ({st})")
                return
            f.site = stby[0]
            self.switches.append(subprocess.Popen(
                [NBDGW, "-c", cfg(self.lab, prim[0]), "switchover", "--to", stby[0]],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            self.note(f"switchover {prim[0]} -> {stby[0]}")

    def end(self, f: Fault) -> None:
        if f.kind == "cut":
            self.boot(f.site)
        elif f.kind == "isolate":
            for rule in self.isolation_rules(f.site):
                if (f.site, rule) in self.rules:
                    self.rules.remove((f.site, rule))
                    in_ns(self.lab, f.site, "iptables", "-D", *rule)
            self.note(f"heal {f.site}")
        elif f.kind == "freeze" and ":" in f.site:
            site, pid = f.site.split(":")
            if self.frozen.pop(int(pid), None) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGCONT)
                self.note(f"thaw {site}")

    def watch(self) -> None:
        """Samples the published states: which site was primary on which epoch."""
        while not self.stop_watch.wait(0.1):
            for n in SITES:
                st = failover_state(self.lab, n)
                if st.get("state") == "primary":
                    self.primaries.setdefault(int(st.get("epoch", -1)), set()).add(n)

    def play(self, faults: list[Fault]) -> None:
        steps = sorted([(f.at, 0, i) for i, f in enumerate(faults)]
                       + [(f.at + f.duration, 1, i) for i, f in enumerate(faults)
                          if f.kind != "switchover"])
        self.t0, self.wall0 = time.monotonic(), time.time()
        for at, ending, i in steps:
            delay = self.t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            (self.end if ending else self.begin)(faults[i])

    def heal(self) -> None:
        """Every rule removed, every frozen daemon thawed, every site booted."""
        for site, rule in self.rules:
            in_ns(self.lab, site, "iptables", "-D", *rule)
        self.rules.clear()
        for pid, site in self.frozen.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self.note(f"thaw {site} (heal)")
        self.frozen.clear()
        for site in SITES:
            self.boot(site)

    def switch_results(self) -> list[str]:
        out = []
        for p in self.switches:
            try:
                text, _ = p.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                text, _ = p.communicate()
            out.append(f"rc {p.returncode}: {text.strip()[-200:]}")
        return out


def refusals(lab: dict[str, Any]) -> dict[str, str]:
    """Every refusal record of the lab: "site:peer" -> its reason."""
    out = {}
    for n in SITES:
        for path in (node_dir(lab, n) / "volumes" / "v1" / "peers").glob("*.refused.json"):
            with contextlib.suppress(OSError, ValueError):
                out[f"{n}:{path.name}"] = str(json.loads(path.read_text())["reason"])
    return out


def report(seed: int, faults: list[Fault], runner: Runner, lab_dir: Path,
           writer: Stamped) -> str:
    last = writer.flushed[-1:]
    lines = [f"seed {seed}; replay: NBDGW_SCHEDULE_SEEDS={seed} pytest -m slow -s "
             f"tests/integration/test_lab_schedules.py", "schedule:",
             *(f"  {f}" for f in faults), "done:", *(f"  {d}" for d in runner.done),
             f"writer: last flushed {last[0][0] if last else 0} at "
             f"t={last[0][1] - runner.wall0 if last else 0:.2f}s; calls not answered in "
             f"{CALL_S:g} s: {writer.stuck[:5] or 'none'}"]
    for n in SITES:
        with contextlib.suppress(OSError):
            tail = (lab_dir / n / "daemon.log").read_text(errors="replace").splitlines()[-25:]
            lines += [f"--- {n} daemon.log (tail)", *tail]
    return "\n".join(lines)


def run_schedule(seed: int, lab_dir: Path) -> None:
    faults = draw(seed)
    print(f"\nseed {seed}: " + "; ".join(str(f) for f in faults))
    lab = up(lab_dir.parent, "--mode", "sync")
    runner = Runner(lab, lab_dir)
    watcher = threading.Thread(target=runner.watch, daemon=True)
    watcher.start()
    writer = Stamped(lab, 300)
    try:
        writer.wait_flushed(32, 30)
        try:
            runner.play(faults)
        finally:
            runner.heal()
        t_healed = time.time()
        # Once healed: one primary, the others following it (bounded).
        wait_for("one primary, the others following",
                 lambda: sorted(live_states(lab).values()) == ["primary", "standby",
                                                               "witness"],
                 90, seen=lambda: live_states(lab))
        settled = time.time() - t_healed
        switched = runner.switch_results()  # one cut off in its drain: when it fenced
        mark = writer.flushed_before(time.time())
        writer.wait_flushed(mark + 16, 60)  # the client writes again
        result = writer.stop()
        runner.stop_watch.set()
        watcher.join(5)
        digest = converge(lab, 90)
        final = live_states(lab)
        primary = next(n for n, s in final.items() if s == "primary")
        flushed = max((n for n, _ in writer.flushed), default=0)
        got = check_blocks(lab, flushed, time.time())
        print(f"seed {seed}: done {runner.done}; switchovers {switched}; writer {result}; "
              f"settled {settled:.1f} s after the heal on {final}; {flushed} blocks "
              f"flushed, bad {got['bad']}; replicas {digest[:16]}; primaries by epoch "
              f"{ {e: sorted(s) for e, s in sorted(runner.primaries.items())} }")
        two = {e: sorted(s) for e, s in runner.primaries.items() if len(s) > 1}
        assert two == {}, f"two primaries on one epoch: {two}"
        assert final == {**{n: "standby" for n in ("main", "dc") if n != primary},
                         primary: "primary", "dr": "witness"}, final
        for n in SITES:
            assert not failover_state(lab, n).get("split_brain"), (
                n, failover_state(lab, n).get("split_brain"))
        # No refusal is left: a demoted primary's sender refused as a stale copy (a
        # `refused` peer, never split brain) is cleared on a node that follows another
        # primary once the refused node went quiet (STALE_REFUSAL_QUIET), or by the next
        # sender that replica takes.
        assert got["bad"] == [], f"acknowledged writes lost: {got}"
        t_refusals, left = time.time(), refusals(lab)
        wait_for("no refusal left", lambda: not refusals(lab), STALE_REFUSAL_QUIET + 30,
                 seen=lambda: refusals(lab))
        if left:
            print(f"seed {seed}: refusals {left} cleared within "
                  f"{time.time() - t_refusals:.1f} s")
    except BaseException:
        runner.stop_watch.set()
        with contextlib.suppress(BaseException):
            runner.heal()
        with contextlib.suppress(BaseException):
            writer.stop()
        print(report(seed, faults, runner, lab_dir, writer))
        raise


def test_schedules_are_drawn_from_the_seed_and_bounded() -> None:
    for seed in range(200):
        faults = draw(seed)
        assert draw(seed) == faults
        assert 3 <= len(faults) <= 5
        assert all(b.at - a.at <= TIMEOUT for a, b in itertools.pairwise(faults))
        assert max(f.at + f.duration for f in faults) <= PHASE_S
    assert len({str(draw(s)) for s in range(50)}) == 50


root = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (netns)")


@root
@pytest.mark.parametrize("seed", CI_SEEDS)
def test_seeded_schedule(seed: int, lab_dir: Path) -> None:
    run_schedule(seed, lab_dir)


@root
@pytest.mark.slow
@pytest.mark.parametrize("seed", env_seeds() or [
    pytest.param(0, marks=pytest.mark.skip(reason="set NBDGW_SCHEDULE_SEEDS, e.g. 1-50"))])
def test_seeded_schedule_from_env(seed: int, lab_dir: Path) -> None:
    run_schedule(seed, lab_dir)
