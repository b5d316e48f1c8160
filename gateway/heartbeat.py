"""Heartbeats between the sites: one UDP datagram per peer (and per second path) every
``interval``, on a thread of its own so that a daemon busy promoting keeps beating.

A beat is ``MAGIC + HMAC-SHA256(secret, body)[:16] + body`` with a msgpack body
``[version, node, state, epoch, {peer: seconds since heard}, seq, known_epoch,
handover_to, discarding, {peer: [last seq heard from it, seconds held]}]`` (the fields
after ``seq`` were appended over time; a shorter beat is read with their defaults).
The echo gives each peer its round-trip time: now - (when it sent that seq) - held.
Without a shared secret the MAC is over an empty key (integrity only).  A beat that does
not verify, or comes from a node that is not a configured peer, is dropped and counted; it
never changes the view.  Receiving updates ``View.heard`` and ``View.reports`` under a lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import structlog

from .failover import Report, State, View

log = structlog.get_logger(component="heartbeat")

MAGIC: Final = b"NGHB"
MAC_SIZE: Final = 16
VERSION: Final = 1
MAX_BEAT: Final = 2048
RTT_WINDOW: Final = 64  # beats whose send time is kept to match echoes


class BadBeat(ValueError):
    """A datagram that is not a valid heartbeat from a configured peer."""


@dataclass(frozen=True)
class Beat:
    """One decoded heartbeat."""

    node: str
    state: State
    epoch: int
    sees: dict[str, float]  # peer -> seconds since heard (inf: never)
    seq: int
    known_epoch: int
    handover_to: str | None = None  # a switchover's successor
    discarding: str | None = None  # a split brain's loser (resolve --discard)
    # peer -> (the last seq heard from it, seconds held since): the peer's round trip
    echo: dict[str, tuple[int, float]] = field(default_factory=dict)


def encode_beat(secret: bytes, node: str, state: State, epoch: int,
                sees: dict[str, float], seq: int, known_epoch: int = 0,
                handover_to: str | None = None, discarding: str | None = None,
                echo: dict[str, tuple[int, float]] | None = None) -> bytes:
    body: bytes = msgpack.packb([VERSION, node, state.value, epoch,
                                 {k: (v if math.isfinite(v) else -1.0)
                                  for k, v in sees.items()}, seq, known_epoch, handover_to,
                                 discarding, {k: list(v) for k, v in (echo or {}).items()}])
    mac = hmac.new(secret, body, hashlib.sha256).digest()[:MAC_SIZE]
    return MAGIC + mac + body


def decode_beat(secret: bytes, data: bytes) -> Beat:
    if len(data) > MAX_BEAT or not data.startswith(MAGIC):
        raise BadBeat("not a heartbeat")
    mac, body = data[4:4 + MAC_SIZE], data[4 + MAC_SIZE:]
    if not hmac.compare_digest(mac, hmac.new(secret, body, hashlib.sha256).digest()[:MAC_SIZE]):
        raise BadBeat("heartbeat authentication failed")
    try:
        fields = msgpack.unpackb(body)
        if fields[0] != VERSION:
            raise BadBeat(f"heartbeat version {fields[0]}, this node speaks {VERSION}")
        _, node, state, epoch, sees, seq, known = fields[:7]
        # Appended in later releases: a switchover's successor, a split brain's loser,
        # the echo of the peers' sequence numbers (round-trip times).
        handover = fields[7] if len(fields) > 7 else None
        discarding = fields[8] if len(fields) > 8 else None
        echo = fields[9] if len(fields) > 9 and isinstance(fields[9], dict) else {}
        return Beat(str(node), State(state), int(epoch),
                    {str(k): (float(v) if v >= 0 else math.inf) for k, v in sees.items()},
                    int(seq), int(known), None if handover is None else str(handover),
                    None if discarding is None else str(discarding),
                    {str(k): (int(v[0]), float(v[1])) for k, v in echo.items()})
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise BadBeat(f"malformed heartbeat: {e}") from None


class Heartbeat:
    """Send and receive beats; ``state_fn`` gives this node's current state and epoch."""

    def __init__(self, view: View, *, bind: tuple[str, int],
                 targets: dict[str, list[tuple[str, int]]], secret: bytes | None,
                 interval: float, state_fn: Any) -> None:
        self.view = view
        self.targets = targets
        self.secret = secret or b""
        self.interval = interval
        self.state_fn = state_fn
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        self.sock.setblocking(False)
        self.seq = 0
        self.dropped = 0
        self.sent: dict[int, float] = {}  # seq -> when sent (the last RTT_WINDOW beats)
        self.last_rx: dict[str, tuple[int, float]] = {}  # peer -> (its seq, when heard)
        self.rtt: dict[str, float] = {}  # peer -> the latest round-trip time, seconds
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        self.sock.close()

    def sees(self, now: float) -> dict[str, float]:
        with self.lock:
            return {p: now - self.view.heard[p] if p in self.view.heard else math.inf
                    for p in self.view.peers}

    def _send(self) -> None:
        state, epoch = self.state_fn()
        self.seq += 1
        now = time.monotonic()
        self.sent[self.seq] = now
        self.sent.pop(self.seq - RTT_WINDOW, None)
        with self.lock:
            echo = {p: (s, round(now - at, 6)) for p, (s, at) in self.last_rx.items()}
        beat = encode_beat(self.secret, self.view.me, state, epoch, self.sees(now),
                           self.seq, max(epoch, self.view.known_epoch),
                           self.view.handover_to, self.view.discarding, echo)
        for addrs in self.targets.values():
            for addr in addrs:
                # Unreachable now (link down): that is what heartbeats detect.
                with contextlib.suppress(OSError):
                    self.sock.sendto(beat, addr)

    def _receive(self) -> None:
        while True:
            try:
                data, _ = self.sock.recvfrom(MAX_BEAT + 1)
            except BlockingIOError:
                return
            except OSError:
                return
            try:
                b = decode_beat(self.secret, data)
                if b.node not in self.view.peers:
                    raise BadBeat(f"heartbeat from {b.node!r}, not a configured peer")
            except BadBeat as e:
                self.dropped += 1
                if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                    log.warning("heartbeat_dropped", reason=str(e), dropped=self.dropped)
                continue
            now = time.monotonic()
            mine = b.echo.get(self.view.me)
            with self.lock:
                self.view.heard[b.node] = now
                self.view.reports[b.node] = Report(b.state, b.epoch, b.sees, now,
                                                   b.known_epoch, b.handover_to, b.discarding)
                self.last_rx[b.node] = (b.seq, now)
                if mine is not None and mine[0] in self.sent:
                    self.rtt[b.node] = max(0.0, now - self.sent[mine[0]] - mine[1])

    def _run(self) -> None:
        next_send = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            if now >= next_send:
                self._send()
                next_send = now + self.interval
            r, _, _ = select.select([self.sock], [], [], max(0.0, min(0.05, next_send - now)))
            if r:
                self._receive()
