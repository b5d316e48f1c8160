"""One Python thread state per NBD connection, kept from open to close.

nbdkit's threads are not Python's: each callback the Python plugin makes takes the GIL
with ``PyGILState_Ensure`` and gives it back with ``PyGILState_Release``.  For a thread
that has no Python thread state of its own, Ensure creates one and the matching Release,
which brings the thread's count back to zero, destroys it: every request of every
connection built and tore down a thread state, and with it (CPython 3.11) the frame
stack's first chunk, mapped with ``mmap`` and unmapped with ``munmap`` (page faults
and a TLB flush per request).  Measured with `perf` on a 4 KiB write: about half the
bare plugin's CPU per request (bench/wcost, README "What a write costs").

``pin()``, called by the plugin's ``open`` on the connection's thread, takes one more
Ensure and keeps it, so the count never returns to zero between callbacks and the
thread state lives as long as the connection; ``unpin()`` in ``close`` gives it back,
and nbdkit's own Release after ``close`` then destroys it as before.  Without sync peers
(thread model ``SERIALIZE_REQUESTS``) nbdkit runs a connection's handshake, requests and
``close`` on that one thread, so every request finds the state ready.

With sync peers (``PARALLEL``) a connection's requests run on nbdkit's worker threads,
which end with the connection without a callback of their own.  A ``Workers`` per
connection keeps each worker's state from its first request (``Workers.pin``, one
attribute test per request after that) and remembers it; ``close`` runs on the
connection's thread after nbdkit has joined every worker (server/connections.c:
the workers' ``pthread_join``, then ``backend_close``), so ``Workers.release`` clears
and deletes states whose threads are gone (``PyThreadState_Clear`` with the GIL held,
``PyThreadState_Delete``: what the interpreter does with any thread state at exit).
If nbdkit is quitting it does not call ``close``, and the interpreter's finalisation
deletes them.

Nothing else changes: the GIL is still released after each callback, as before.  A
connection whose thread state did not survive from ``open`` to ``close`` (nbdkit calling
them on different threads) is counted in ``stats()["lost"]``; the tests check that it
stays zero and that ``pinned`` and ``workers`` return to zero once the connections are
gone.
"""

from __future__ import annotations

import ctypes
import threading


def _capi(name: str, restype: type | None, *argtypes: type) -> ctypes._NamedFuncPointer:
    """A function of the C API, with its signature."""
    f = getattr(ctypes.pythonapi, name)
    f.argtypes, f.restype = list(argtypes), restype
    return f  # type: ignore[no-any-return]


# PyGILState_STATE: PyGILState_LOCKED = 0, PyGILState_UNLOCKED = 1.
_ensure = _capi("PyGILState_Ensure", ctypes.c_int)
_release = _capi("PyGILState_Release", None, ctypes.c_int)
_current = _capi("PyThreadState_Get", ctypes.c_void_p)
_clear = _capi("PyThreadState_Clear", None, ctypes.c_void_p)
_delete = _capi("PyThreadState_Delete", None, ctypes.c_void_p)

_lock = threading.Lock()
_pinned: dict[int, int] = {}  # thread ident -> the state our Ensure returned
_lost = 0
_workers = 0  # worker thread states kept, over every connection
_mine = threading.local()  # lives in the thread state: gone if the state was rebuilt


def pin() -> None:
    """Keep the calling thread's Python thread state until ``unpin()`` (idempotent)."""
    tid = threading.get_ident()
    with _lock:
        if tid in _pinned:
            return
        _pinned[tid] = _ensure()  # we hold the GIL: only counts, returns LOCKED
    _mine.pinned = True


def unpin() -> None:
    """Give back what ``pin()`` took on this thread, if it took anything."""
    global _lost
    tid = threading.get_ident()
    with _lock:
        state = _pinned.pop(tid, None)
        if state is not None and not getattr(_mine, "pinned", False):
            _lost += 1
    if state is not None:
        _mine.pinned = False
        _release(state)


class Workers:
    """The thread states kept for one connection's nbdkit worker threads (PARALLEL)."""

    __slots__ = ("lock", "states")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.states: list[int] = []

    def pin(self) -> None:
        """On a worker, in a callback: keep this thread's state (once per thread)."""
        global _workers
        if getattr(_mine, "pinned", False):
            return
        _ensure()  # we hold the GIL: only counts
        _mine.pinned = True
        state = _current()
        assert state is not None
        with self.lock:
            self.states.append(state)
        with _lock:
            _workers += 1

    def release(self) -> None:
        """In ``close``, on the connection's thread: every worker has been joined, so
        its state belongs to no thread any more; clear and delete it."""
        global _workers
        with self.lock:
            states, self.states = self.states, []
        for state in states:
            _clear(state)
            _delete(state)
        with _lock:
            _workers -= len(states)


def stats() -> dict[str, int]:
    """Thread states kept now (connections' and workers'), and connections whose state
    was rebuilt all the same."""
    with _lock:
        return {"pinned": len(_pinned), "workers": _workers, "lost": _lost}
