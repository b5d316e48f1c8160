"""Signals reach a main thread that waits on the very lock a handler would take.

The child below does what every entry point of nbdgw does between signals: it waits on
an Event or a Queue that its signal handling feeds, here in polls that do not sleep in
the lock, so that the signals arrive while its main thread runs Python code, sometimes
holding the lock.
Such a handler blocks on the lock; the next signal runs another handler inside that
wait (lock waits are interruptible), which blocks too: back to back, the child dies of
a RecursionError; with one SIGTERM, as `nbdgw serve` did, it waits forever.  It is sent
signals back to back until it has seen enough; a handler that took the waited-on lock
itself failed within a second or two (see nbdgw_common/signals.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WANTED = 1000  # signals the child must see; the kernel merges those sent while one waits
DEADLINE = 20.0

CHILD = textwrap.dedent("""
    import queue, signal, sys, threading, time
    from nbdgw_common.signals import relay_signals

    how, wanted = sys.argv[1], int(sys.argv[2])
    seen = 0
    if how == "event":
        ev = threading.Event()
        relay_signals([signal.SIGUSR1], lambda _s: ev.set())
        print("ready", flush=True)
        while seen < wanted:
            if ev.wait(0):  # no wait in the lock: signals land in Python code
                ev.clear()
                seen += 1
            elif time.monotonic_ns() % 8 == 0:
                time.sleep(0.00001)  # now and then: a thread setting the event gets a turn
    else:
        q = queue.Queue()
        relay_signals([signal.SIGUSR1, signal.SIGUSR2], q.put)
        print("ready", flush=True)
        while seen < wanted:
            try:
                q.get(block=False)
            except queue.Empty:
                if time.monotonic_ns() % 8 == 0:
                    time.sleep(0.00001)
                continue
            seen += 1
    for sig in (signal.SIGUSR1, signal.SIGUSR2):  # Python's exit restores SIG_DFL
        signal.signal(sig, signal.SIG_IGN)
    print("done", seen, flush=True)
""")


@pytest.mark.parametrize("how", ["event", "queue"])
def test_signals_back_to_back_never_stall_the_main_thread(how: str, tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    child = subprocess.Popen([sys.executable, "-c", CHILD, how, str(WANTED)],
                             stdout=subprocess.PIPE, stderr=err.open("w"), text=True, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        sigs = [signal.SIGUSR1, signal.SIGUSR2] if how == "queue" else [signal.SIGUSR1]
        sent = 0
        deadline = time.monotonic() + DEADLINE
        while child.poll() is None and time.monotonic() < deadline:
            os.kill(child.pid, sigs[sent % len(sigs)])
            sent += 1
            time.sleep(0.0005)
        assert child.poll() == 0, (
            f"the child did not see {WANTED} signals: {sent} sent in {DEADLINE:g} s, exit "
            f"status {child.poll()}, waiting in {_wchan(child.pid)}; stderr ends: "
            f"{err.read_text()[-300:]!r}")
        assert child.stdout.read() == f"done {WANTED}\n"
    finally:
        child.kill()
        child.wait()


def _wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return "(gone)"


def test_no_entry_point_installs_a_handler_of_its_own() -> None:
    """Handlers go through relay_signals (or asyncio's add_signal_handler); setting a
    signal back to its default or to ignored is the only other use of signal.signal."""
    offenders = []
    for pkg in ("nbdgw_common", "blockstore", "gateway", "nbd_plugin", "iscsi_bridge",
                "peerlink"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == ROOT / "nbdgw_common/signals.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "signal.signal(" in line and "SIG_DFL" not in line and "SIG_IGN" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
