"""Per-volume I/O counters of the serving nbdkit process, for `nbdgw status` and the
Prometheus endpoint (gateway/metrics.py), read through the control socket's ``stats`` op.

Hot-path cost is the point of this shape: one call per request doing three list
additions, an increment and ``int.bit_length()`` of the service time in nanoseconds,
which *is* the histogram bucket (bucket k counts requests that took [2^(k-1), 2^k) ns).
Each connection counts on lists of its own (``opened``), so connections of one volume
never share a lock to count: a connection's requests count one at a time (nbdkit runs
them one at a time, or with a sync gate in parallel under the handle's count lock);
the control thread only reads, summing the open connections and those closed (a scrape
may see one request half counted; it is counted in full by the next).  Counters start
at zero with each nbdkit process, as Prometheus counters may.
"""

from __future__ import annotations

import threading
from typing import Any, Final

OPS: Final = ("read", "write", "flush", "trim", "zero")
READ, WRITE, FLUSH, TRIM, ZERO = range(5)
BUCKETS: Final = 64  # bit lengths of a duration in ns (2^63 ns is 292 years)
_OPS_I: Final = 0
_BYTES_I: Final = 1
_NS_I: Final = 2
_HIST_I: Final = 3


def _zeros() -> list[list[int]]:
    # ops[op] = [requests, bytes, sum of ns, hist[0], ..., hist[63]]
    return [[0] * (_HIST_I + BUCKETS) for _ in OPS]


class VolumeIO:
    """The counters of one export (a volume, or a snapshot ``V@S``): those of the
    connections that closed, and the open connections' own."""

    __slots__ = ("closed", "connections_total", "live")

    def __init__(self) -> None:
        self.closed = _zeros()
        self.live: list[list[list[int]]] = []
        self.connections_total = 0

    @property
    def ops(self) -> list[list[int]]:
        out = [list(c) for c in self.closed]
        for conn in list(self.live):
            for total, c in zip(out, conn, strict=True):
                for i, x in enumerate(c):
                    total[i] += x
        return out

    def snapshot(self) -> dict[str, Any]:
        return {"connections": len(self.live), "connections_total": self.connections_total,
                "ops": {name: {"requests": c[_OPS_I], "bytes": c[_BYTES_I],
                               "ns": c[_NS_I], "hist_log2_ns": c[_HIST_I:]}
                        for name, c in zip(OPS, self.ops, strict=True)}}


VOLUMES: dict[str, VolumeIO] = {}
_MEMBERS = threading.Lock()  # connections come and go in parallel (not the hot path)


def volume(name: str) -> VolumeIO:
    v = VOLUMES.get(name)
    if v is None:
        v = VOLUMES[name] = VolumeIO()
    return v


def count(c: list[int], nbytes: int, ns: int) -> None:
    """One completed request that took ``ns`` nanoseconds, on its op's counters
    (``opened(name)[op]``, kept on the connection's handle)."""
    c[0] += 1
    c[1] += nbytes
    c[2] += ns
    c[3 + ns.bit_length()] += 1


def opened(name: str) -> list[list[int]]:
    """A connection opened on export ``name``; returns its counters, one list per op."""
    ops = _zeros()
    with _MEMBERS:
        v = volume(name)
        v.live.append(ops)
        v.connections_total += 1
    return ops


def closed(name: str, ops: list[list[int]]) -> None:
    """The connection whose counters are ``ops`` closed: they join the closed ones."""
    with _MEMBERS:
        v = volume(name)
        for total, c in zip(v.closed, ops, strict=True):
            for i, x in enumerate(c):
                total[i] += x
        # By identity: two connections' counters may be equal.
        v.live = [o for o in v.live if o is not ops]


def snapshot() -> dict[str, Any]:
    """Every export's counters (the ``stats`` control reply)."""
    return {name: v.snapshot() for name, v in list(VOLUMES.items())}
