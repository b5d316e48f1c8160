"""Per-volume I/O counters of the serving nbdkit process, for `nbdgw status` and the
Prometheus endpoint (gateway/metrics.py), read through the control socket's ``stats`` op.

Hot-path cost is the point of this shape: one call per request doing three list
additions, an increment and ``int.bit_length()`` of the service time in nanoseconds,
which *is* the histogram bucket (bucket k counts requests that took [2^(k-1), 2^k) ns).
No locks of its own: requests count under the server lock (nbdkit serialises them,
or with a sync gate runs them in parallel, each counting under that lock) and the
control thread only reads (a scrape may see one request half counted; it is counted
in full by the next).  Counters start at zero with each nbdkit process, as Prometheus
counters may.
"""

from __future__ import annotations

from typing import Any, Final

OPS: Final = ("read", "write", "flush", "trim", "zero")
READ, WRITE, FLUSH, TRIM, ZERO = range(5)
BUCKETS: Final = 64  # bit lengths of a duration in ns (2^63 ns is 292 years)
_OPS_I: Final = 0
_BYTES_I: Final = 1
_NS_I: Final = 2
_HIST_I: Final = 3


class VolumeIO:
    """The counters of one export (a volume, or a snapshot ``V@S``)."""

    __slots__ = ("connections", "connections_total", "ops")

    def __init__(self) -> None:
        # ops[op] = [requests, bytes, sum of ns, hist[0], ..., hist[63]]
        self.ops: list[list[int]] = [[0] * (_HIST_I + BUCKETS) for _ in OPS]
        self.connections = 0
        self.connections_total = 0

    def snapshot(self) -> dict[str, Any]:
        return {"connections": self.connections, "connections_total": self.connections_total,
                "ops": {name: {"requests": c[_OPS_I], "bytes": c[_BYTES_I],
                               "ns": c[_NS_I], "hist_log2_ns": c[_HIST_I:]}
                        for name, c in zip(OPS, self.ops, strict=True)}}


VOLUMES: dict[str, VolumeIO] = {}


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
    v = volume(name)
    v.connections += 1
    v.connections_total += 1
    return v.ops


def closed(name: str) -> None:
    v = volume(name)
    v.connections = max(0, v.connections - 1)


def snapshot() -> dict[str, Any]:
    """Every export's counters (the ``stats`` control reply)."""
    return {name: v.snapshot() for name, v in list(VOLUMES.items())}
