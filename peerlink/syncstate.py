"""A synchronous peer's standing in the sync gate (pure: no sockets, files or clocks).

Theory of operation.  In ``mode: sync`` every write is acknowledged to the client only
once every sync peer that *holds* (is ``ok`` or ``stalled``) has acknowledged it durably
(a receiver's Ack means committed with an fdatasync, so one ack level serves writes and
FLUSH alike).  A peer that has not acknowledged a waited-for seq within its
``sync_timeout``, or whose link has been down that long, is ``stalled``: it still holds
the waiters, which keep waiting.  It stops holding them (``degraded``) only with
permission: the daemon has had the cluster's witness record the peer as outdated (so it
can no longer be promoted) and lists it in ``<data_dir>/run/outdated.json``; a node
without a failover core (``failover.auto: false``, or no peers to run failover with)
gives itself that permission after ``sync_timeout``.  A degraded peer holds waiters
again as soon as it has caught up (streaming, acknowledged everything the journal held
when it was last read and everything acknowledged to clients without it), which is
always safe.  A stalled peer that catches up before any permission is simply ``ok``
again.

    TRANSITIONS[state][event] -> state; an event a state does not list is an error.

The sender (the shell) feeds it waited-for seqs, acks and clock ticks, and asks it what
to do; times are passed in (monotonic seconds).
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Final


class Standing(enum.Enum):
    OK = "ok"  # holds waiters; acknowledging them in time
    STALLED = "stalled"  # holds waiters; overdue, waiting for permission to degrade
    DEGRADED = "degraded"  # treated as async until it has caught up


class SyncEvent(enum.Enum):
    STALL = "stall"  # a waited-for seq overdue, or the link down, for sync_timeout
    RECOVER = "recover"  # a stalled peer acknowledged every waited seq, link streaming
    PERMIT = "permit"  # outdated by the daemon (or no failover core): may degrade
    CATCH_UP = "catch_up"  # a degraded peer holds everything acknowledged without it


TRANSITIONS: Final[dict[Standing, dict[SyncEvent, Standing]]] = {
    Standing.OK: {SyncEvent.STALL: Standing.STALLED},
    Standing.STALLED: {SyncEvent.RECOVER: Standing.OK, SyncEvent.PERMIT: Standing.DEGRADED},
    Standing.DEGRADED: {SyncEvent.CATCH_UP: Standing.OK},
}


class IllegalSyncEvent(ValueError):
    """An event the current standing does not accept (a bug in the shell)."""


class SyncStanding:
    """One sync peer: its standing and the waited-for seqs it has not acknowledged."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.state = Standing.OK
        self.stalled_since: float | None = None  # wall time, for live state and status
        # (seq, monotonic time first waited for), seqs ascending, all above the peer's ack
        self.waiting: deque[tuple[int, float]] = deque()
        # The highest seq acknowledged to a client without this peer (while degraded):
        # it must hold that before it may hold waiters again.
        self.released = 0

    @property
    def holds(self) -> bool:
        """Do waiters wait for this peer's acks?"""
        return self.state is not Standing.DEGRADED

    def fire(self, event: SyncEvent, wall: float = 0.0) -> Standing:
        try:
            new = TRANSITIONS[self.state][event]
        except KeyError:
            raise IllegalSyncEvent(f"sync standing {self.state.value}: event "
                                   f"{event.value} is not allowed") from None
        if new is Standing.STALLED:
            self.stalled_since = wall
        elif new is Standing.DEGRADED:
            self.stalled_since = None
            if self.waiting:
                self.released = max(self.released, self.waiting[-1][0])
            self.waiting.clear()
        else:
            self.stalled_since = None
        self.state = new
        return new

    def want(self, seq: int, acked: int, now: float) -> None:
        """A client waits for ``seq`` (the peer has acknowledged ``acked``)."""
        if self.state is Standing.DEGRADED:
            self.released = max(self.released, seq)
        elif seq > acked and (not self.waiting or seq > self.waiting[-1][0]):
            self.waiting.append((seq, now))

    def acked(self, seq: int) -> None:
        while self.waiting and self.waiting[0][0] <= seq:
            self.waiting.popleft()

    def overdue(self, now: float, down_since: float | None) -> str | None:
        """Why the peer is overdue now (None: it is not): the oldest waited-for seq
        unacknowledged for ``timeout``, or the link down (``down_since``) that long."""
        if self.waiting and now - self.waiting[0][1] >= self.timeout:
            seq, since = self.waiting[0]
            return (f"no acknowledgement of seq {seq} within {self.timeout:g} s "
                    f"(waited {now - since:.1f} s)")
        if down_since is not None and now - down_since >= self.timeout:
            return f"peer unreachable for {self.timeout:g} s"
        return None

    def caught_up(self, acked: int, journal_seen: int, streaming: bool, inflight: bool
                  ) -> bool:
        """A degraded peer may hold waiters again: it streams and holds every record the
        journal had when last read and every write acknowledged without it."""
        return (self.state is Standing.DEGRADED and streaming and not inflight
                and acked >= max(journal_seen, self.released))
