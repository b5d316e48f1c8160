"""Heartbeats between the sites: sealed UDP datagrams, a replay guard, and one I/O thread.

A beat is ``MAGIC + msgpack([VERSION, node, boot, counter, body]) + MAC`` where MAC is
HMAC-SHA256 (truncated to 16 bytes) over everything before it, keyed with a key derived
from ``peerlink.secret_file`` (never the secret itself: the same secret proves peers on
the replication links); while the secret is rotated, a beat under the key of
``peerlink.next_secret_file`` is accepted too (``BeatKeys``; the daemon re-reads both on
SIGHUP).  A secret is required whenever failover is automatic
(gateway/config.py refuses the config otherwise): an unauthenticated beat could fence a
primary or elect a node that does not exist.

``boot`` is a random nonce chosen at each daemon start and ``counter`` the sender's beat
number, which must increase per (sender, boot): ``BeatGuard`` drops a beat that repeats
or goes back (a capture played again), that names no configured peer, or that comes from
an address that is not one of the peer's configured addresses.  Whatever gets past the
guard is a ``BeatIn`` for the node core, which in addition counts a beat as evidence of
life only if it echoes a beat of this node's current boot (so nothing recorded before
this node started can pass for its peer alive) and anchors the primary's lease at its own
send times (gateway/nodecore.py).  Rejected beats are counted per reason (metrics) and
logged at a bounded rate.  Every time is the monotonic clock.

The body (``nodecore.BeatBody``) is a msgpack map with short keys; decoding checks every
type and bounds every count, so a hostile datagram ends in ``BadBeat``, never an
exception from deep inside.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import math
import queue
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import structlog

from .nodecore import BeatBody, BeatIn, Echo

log = structlog.get_logger(component="heartbeat")

MAGIC: Final = b"NGH2"
VERSION: Final = 2
MAC_SIZE: Final = 16
BOOT_SIZE: Final = 16
MAX_BEAT: Final = 4096
MAX_NAME: Final = 255
MAX_PEERS: Final = 64  # entries in any per-peer map or list of a beat
BOOTS_KEPT: Final = 8  # per sender: boots whose highest counter is remembered
KEY_LABEL: Final = b"nbdgw heartbeat key v2"
LOG_EVERY: Final = 10.0  # at most one log line per reason this often


class BadBeat(ValueError):
    """A datagram refused: ``reason`` is a short code (metrics label), the message says
    what was wrong."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def derive_key(secret: bytes) -> bytes:
    return hmac.new(secret, KEY_LABEL, hashlib.sha256).digest()


# -- the body --------------------------------------------------------------------------------


def body_to_wire(b: BeatBody) -> dict[str, Any]:
    return {
        "st": b.state, "e": b.epoch, "p": b.primary, "ve": b.vote_epoch, "vf": b.vote_for,
        "sv": b.serving, "c": b.consistent, "ca": b.campaign, "de": b.data_epoch,
        "pc": b.precampaign, "pv": list(b.prevotes),
        "sd": b.served_epoch,
        "o": list(b.outdated),
        "h": b.handover_to, "d": b.discarding,
        "ec": {k: [v.boot, v.seq, v.held, v.fresh] for k, v in b.echo.items()},
        "se": {k: (v if math.isfinite(v) else -1.0) for k, v in b.sees.items()},
        "sy": list(b.sync),
    }


def _name(v: Any, what: str, optional: bool = False) -> Any:
    if v is None and optional:
        return None
    if not isinstance(v, str) or not 1 <= len(v) <= MAX_NAME:
        raise BadBeat("malformed", f"{what}: expected a name, got {type(v).__name__}")
    return v


def _uint(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 63:
        raise BadBeat("malformed", f"{what}: expected an unsigned integer")
    return v


def _num(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise BadBeat("malformed", f"{what}: expected a number")
    return float(v)


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise BadBeat("malformed", f"{what}: expected true or false")
    return v


def _map(v: Any, what: str) -> dict[Any, Any]:
    if not isinstance(v, dict) or len(v) > MAX_PEERS:
        raise BadBeat("malformed", f"{what}: expected a map of at most {MAX_PEERS} entries")
    return v


def _names(v: Any, what: str) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > MAX_PEERS:
        raise BadBeat("malformed", f"{what}: expected a list of at most {MAX_PEERS} names")
    return tuple(_name(x, what) for x in v)


def body_from_wire(m: Any) -> BeatBody:
    m = _map(m, "body")
    try:
        echo = {}
        for k, v in _map(m["ec"], "echo").items():
            if not isinstance(v, list) or len(v) != 4 or not isinstance(v[0], bytes) \
                    or len(v[0]) != BOOT_SIZE:
                raise BadBeat("malformed", "echo: expected [boot, seq, held, fresh]")
            echo[_name(k, "echo")] = Echo(v[0], _uint(v[1], "echo seq"),
                                          _num(v[2], "echo held"), _bool(v[3], "echo fresh"))
        sees = {_name(k, "sees"): (x if (x := _num(v, "sees")) >= 0 else math.inf)
                for k, v in _map(m["se"], "sees").items()}
        return BeatBody(
            state=_name(m["st"], "state"), epoch=_uint(m["e"], "epoch"),
            primary=_name(m["p"], "primary", True), vote_epoch=_uint(m["ve"], "vote_epoch"),
            vote_for=_name(m["vf"], "vote_for", True), serving=_bool(m["sv"], "serving"),
            consistent=_bool(m["c"], "consistent"), campaign=_uint(m["ca"], "campaign"),
            data_epoch=_uint(m["de"], "data_epoch"), served_epoch=_uint(m["sd"], "served"),
            precampaign=_uint(m["pc"], "precampaign"), prevotes=_names(m["pv"], "prevotes"),
            outdated=_names(m["o"], "outdated"), handover_to=_name(m["h"], "handover_to", True),
            discarding=_name(m["d"], "discarding", True), echo=echo, sees=sees,
            sync=_names(m["sy"], "sync"))
    except KeyError as e:
        raise BadBeat("malformed", f"body: missing field {e.args[0]!r}") from None


# -- the envelope ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sealed:
    node: str
    boot: bytes
    counter: int
    body: BeatBody


def seal(key: bytes, node: str, boot: bytes, counter: int, body: BeatBody) -> bytes:
    payload: bytes = msgpack.packb([VERSION, node, boot, counter, body_to_wire(body)],
                                   use_bin_type=True)
    head = MAGIC + payload
    return head + hmac.new(key, head, hashlib.sha256).digest()[:MAC_SIZE]


def unseal(key: bytes, data: bytes, next_key: bytes | None = None) -> Sealed:
    """The beat in ``data`` if its MAC is under ``key`` or, during a rotation of the peer
    secret, under ``next_key``; else BadBeat."""
    if len(data) > MAX_BEAT or len(data) < len(MAGIC) + MAC_SIZE + 1:
        raise BadBeat("size", f"a datagram of {len(data)} bytes is no heartbeat")
    if not data.startswith(MAGIC):
        raise BadBeat("magic", "not a heartbeat (bad magic)")
    head, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
    if not any(hmac.compare_digest(mac, hmac.new(k, head, hashlib.sha256).digest()[:MAC_SIZE])
               for k in (key, next_key) if k is not None):
        raise BadBeat("mac", "heartbeat authentication failed (another secret, or forged)")
    try:
        fields = msgpack.unpackb(head[len(MAGIC):], raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        # TypeError: a map key msgpack cannot hash (an array), which Python refuses
        raise BadBeat("malformed", f"heartbeat is not msgpack: {e}") from None
    if not isinstance(fields, list) or len(fields) != 5:
        raise BadBeat("malformed", "heartbeat: expected [version, node, boot, counter, body]")
    if fields[0] != VERSION:
        raise BadBeat("version", f"heartbeat version {fields[0]!r}, this node speaks {VERSION}")
    boot = fields[2]
    if not isinstance(boot, bytes) or len(boot) != BOOT_SIZE:
        raise BadBeat("malformed", "heartbeat: bad boot nonce")
    return Sealed(_name(fields[1], "node"), boot, _uint(fields[3], "counter"),
                  body_from_wire(fields[4]))


@dataclass(frozen=True)
class BeatKeys:
    """The keys of one node's beats: sealed under ``current`` (from
    ``peerlink.secret_file``), accepted under ``current`` or, while a rotation of the
    secret configures ``peerlink.next_secret_file``, ``next`` (SECURITY.md)."""

    current: bytes
    next: bytes | None = None

    @classmethod
    def derive(cls, secret: bytes, next_secret: bytes | None = None) -> BeatKeys:
        return cls(derive_key(secret), None if next_secret is None else derive_key(next_secret))

    def seal(self, node: str, boot: bytes, counter: int, body: BeatBody) -> bytes:
        return seal(self.current, node, boot, counter, body)

    def unseal(self, data: bytes) -> Sealed:
        return unseal(self.current, data, self.next)


class BeatGuard:
    """Admit a sealed beat only from a configured peer, from one of its addresses, with
    a counter above every counter seen from that sender's boot (pure; the model test
    puts it between simulated nodes)."""

    def __init__(self, peers: Mapping[str, frozenset[str]]) -> None:
        self.peers = {n: frozenset(_canon(a) for a in addrs) for n, addrs in peers.items()}
        self.high: dict[str, dict[bytes, int]] = {}

    def admit(self, s: Sealed, src: str | None) -> None:
        addrs = self.peers.get(s.node)
        if addrs is None:
            raise BadBeat("unknown_peer", f"heartbeat from {s.node!r}, not a configured peer")
        if src is not None and addrs and _canon(src) not in addrs:
            raise BadBeat("address", f"heartbeat of {s.node!r} from {src}, not one of its "
                                     f"addresses ({', '.join(sorted(addrs))})")
        boots = self.high.setdefault(s.node, {})
        if s.counter <= boots.get(s.boot, 0):
            raise BadBeat("replay", f"heartbeat of {s.node!r} repeats counter {s.counter} "
                                    f"(a replay, or a duplicate)")
        if s.boot not in boots and len(boots) >= BOOTS_KEPT:
            boots.pop(next(iter(boots)))
        boots[s.boot] = s.counter


def _canon(addr: str) -> str:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


# -- the I/O thread --------------------------------------------------------------------------


class Heartbeat:
    """Receive beats on a thread and hand what the guard admits to ``deliver``; send
    what the main loop asks.  No decision is made here."""

    def __init__(self, *, me: str, keys: BeatKeys, bind: tuple[str, int],
                 targets: Mapping[str, list[tuple[str, int]]],
                 deliver: Callable[[BeatIn], None]) -> None:
        self.me = me
        self.keys = keys  # replaced whole on reload (set_keys): one read per use
        self.targets = targets
        self.deliver = deliver
        self.guard = BeatGuard({p: frozenset(a for a, _ in addrs)
                                for p, addrs in targets.items()})
        self.rejected: Counter[str] = Counter()
        self._logged: dict[str, float] = {}
        self.stop_event = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        self.sock.setblocking(False)
        self.send_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        self.sock.close()

    def set_keys(self, keys: BeatKeys) -> None:
        """A reload changed the peer secrets: seal and check with these from now on."""
        self.keys = keys

    def send(self, boot: bytes, counter: int, body: BeatBody) -> None:
        data = self.keys.seal(self.me, boot, counter, body)
        with self.send_lock:
            for addrs in self.targets.values():
                for addr in addrs:
                    # Unreachable now (link down): that is what heartbeats detect.
                    with contextlib.suppress(OSError):
                        self.sock.sendto(data, addr)

    def _reject(self, e: BadBeat, src: str) -> None:
        self.rejected[e.reason] += 1
        now = time.monotonic()
        if now - self._logged.get(e.reason, -math.inf) >= LOG_EVERY:
            self._logged[e.reason] = now
            log.warning("heartbeat_rejected", reason=e.reason, detail=str(e), source=src,
                        count=self.rejected[e.reason])

    def _receive(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(MAX_BEAT + 1)
            except OSError:
                return
            src = str(addr[0])
            try:
                s = self.keys.unseal(data)
                self.guard.admit(s, src)
            except BadBeat as e:
                self._reject(e, src)
                continue
            self.deliver(BeatIn(time.monotonic(), s.node, s.boot, s.counter, s.body))

    def _run(self) -> None:
        while not self.stop_event.is_set():
            with contextlib.suppress(OSError, ValueError):
                r, _, _ = select.select([self.sock], [], [], 0.2)
                if r:
                    self._receive()


def queue_deliver(q: queue.Queue[Any]) -> Callable[[BeatIn], None]:
    return q.put
