"""Never two peerlink processes at once, whichever way the daemon stops one.

Found by the lab's seed 77 (isolate main twice, a switchover, freeze dc): dc was
fenced, which stops peerlink on the worker thread (it can take seconds: a sync sender
waits for its peer), and regained the majority 2.5 s later; the new primary started a
second peerlink while the first was still stopping.  The first, exiting, removed the
sync gate's socket the second had bound at the same path: nbdkit could never reach
the gate again, and once the sync peer was current again every write waited for good.

The daemon's own methods run here on a harness that has what they use: children that
take a while to stop, the worker thread, and the main loop's event queue.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from typing import Any

from gateway.daemon import Child, Daemon, Supervisor, WorkDone, Worker


class Procs:
    """Fake processes: how many are alive now, and the most ever alive at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.alive = 0
        self.most = 0
        self.started: list[str] = []

    def child(self, name: str, tag: str, stop_s: float = 0.3) -> Child:
        state = {"up": False}

        def start() -> None:
            with self.lock:
                state["up"] = True
                self.alive += 1
                self.most = max(self.most, self.alive)
                self.started.append(tag)

        def stop() -> int | None:
            if not state["up"]:
                return None
            time.sleep(stop_s)  # a sender finishing with its peer
            with self.lock:
                state["up"] = False
                self.alive -= 1
            return 0

        return Child(name, start, stop, lambda: None if state["up"] else 0, stop)


class Harness(Supervisor):
    _drop_child_async = Daemon._drop_child_async
    _restart_peerlink_async = Daemon._restart_peerlink_async
    _stop_peerlink_now = Daemon._stop_peerlink_now

    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.children: dict[str, Child] = {}
        self.retiring: Counter[str] = Counter()
        self.deferred: dict[str, Child] = {}
        self.stopping = False
        self.events: queue.Queue[Any] = queue.Queue()
        self.worker = Worker(self.events.put)
        self.n = 0

    def _peerlink_child(self) -> Child:
        self.n += 1
        return self.procs.child("peerlink", f"planned{self.n}")

    def loop(self, seconds: float) -> None:
        """The main loop's part: run what the worker hands back."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                ev = self.events.get(timeout=0.02)
            except queue.Empty:
                continue
            assert isinstance(ev, WorkDone)
            if ev.after is not None:
                ev.after()


def test_a_peerlink_started_while_the_fenced_ones_stops_waits_for_it() -> None:
    procs = Procs()
    h = Harness(procs)
    h._run_child(procs.child("peerlink", "p0"))
    h._drop_child_async("peerlink")  # fenced: stopped on the worker
    h._run_child(procs.child("peerlink", "p1"))  # primary again at once
    h.loop(1.0)
    assert procs.most == 1, f"{procs.most} peerlink processes at once"
    assert procs.started == ["p0", "p1"] and procs.alive == 1  # p1 runs, after p0


def test_a_restart_or_a_stop_for_promotion_overlaps_no_other_start() -> None:
    procs = Procs()
    h = Harness(procs)
    h._run_child(procs.child("peerlink", "p0"))
    h._restart_peerlink_async()  # a plan change
    h._run_child(procs.child("peerlink", "p1"))  # e.g. following a new primary
    h.loop(1.0)
    assert procs.most == 1, f"{procs.most} peerlink processes at once"
    assert procs.alive == 1 and procs.started[0] == "p0"

    promoted = threading.Event()
    h.worker.submit(lambda: (h._stop_peerlink_now(), promoted.set(), None)[-1])
    h.loop(0.1)  # the worker's take() runs on the main loop
    h._run_child(procs.child("peerlink", "p2"))  # asked for while the promotion stops it
    h.loop(1.0)
    assert promoted.is_set()
    assert procs.most == 1, f"{procs.most} peerlink processes at once"
    assert procs.alive == 1 and procs.started[-1] == "p2"


def test_a_deferred_start_that_is_dropped_never_starts() -> None:
    procs = Procs()
    h = Harness(procs)
    h._run_child(procs.child("peerlink", "p0"))
    h._drop_child_async("peerlink")
    h._run_child(procs.child("peerlink", "p1"))
    h._drop_child_async("peerlink")  # fenced again before p0 was gone
    h.loop(1.0)
    assert procs.started == ["p0"] and procs.alive == 0
