"""Signal handlers that only write a byte: the work happens in a thread.

A Python signal handler runs in the main thread between two bytecodes, wherever that
thread is, including inside ``threading.Condition.wait`` at the moments it holds the
condition's lock.  A handler that takes the same lock (``Event.set``, ``Queue.put``
while the main thread waits on that event or queue) then waits for itself forever.
`nbdgw serve` did so about once in 30 stops: SIGTERM arrived while its main thread was
in ``stop.wait(0.2)`` and the handler's ``stop.set()`` never returned.

``relay_signals`` installs a handler that writes the signal's number to a pipe and
nothing else; a thread reads the pipe and calls ``on_signal(signum)``, where taking a
lock is safe.  Every long-running entry point (serve, iscsi, the daemons, the FUSE
server) handles its signals through it; asyncio programs use ``add_signal_handler``,
which works the same way.

``dump_stacks_on(SIGUSR2)``: that signal prints every thread's Python stack to stderr
(faulthandler: written by C code in the handler, with no lock), and the process goes on.
For a process that seems stuck: ``kill -USR2 PID``, then read its log.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType


def relay_signals(signums: Iterable[int], on_signal: Callable[[int], None]) -> None:
    """Call ``on_signal(signum)`` in a thread of its own for each of ``signums`` received.
    Call from the main thread (Python's rule for ``signal.signal``)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(w, False)

    def handler(signum: int, _frame: FrameType | None) -> None:
        # A full pipe holds 64 Ki signals not yet relayed: this one adds nothing to them.
        with contextlib.suppress(BlockingIOError):
            os.write(w, bytes([signum]))

    def relay() -> None:
        while data := os.read(r, 64):
            for signum in data:
                on_signal(signum)

    threading.Thread(target=relay, name="signals", daemon=True).start()
    for signum in signums:
        signal.signal(signum, handler)


#: The signal that makes an nbdgw process print its threads' stacks (and go on).
STACKS_SIGNAL = signal.SIGUSR2


def dump_stacks_on(signum: int = STACKS_SIGNAL) -> None:
    """Print every thread's Python stack to stderr when ``signum`` arrives."""
    faulthandler.register(signum, all_threads=True, chain=False)
