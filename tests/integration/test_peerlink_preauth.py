"""What a stranger can make a peerlink receiver do before proving the shared secret (issue
20, points 1 and 2), against real processes: a ``ReceiverServer`` process (the daemon's
receiving side) or `python -m peerlink receive`, an honest `python -m peerlink send`
streaming from a served primary meanwhile, and hostile clients on raw sockets.

- A decompression bomb (a few hundred bytes of zstd that expand to a Hello of 8 M
  ``changed`` extents) must not stall the receiver's event loop: a second connection's
  handshake is answered within 50 ms.
- 32 unauthenticated connections announcing 64 MiB frames, then holding the largest
  frame allowed before authentication, must not grow the receiver by more than 64 MiB,
  and honest replication goes on and ends bit for bit equal.
- Before the proof a receiver answers with its protocol version and a nonce only: no
  volume uuid, size, generations or seq, no node or volume name, and the same answer
  for a volume it holds and one it does not.
- And the other way: a sender tells a listener at its peer address that has not proved
  the secret (a forged proof, none, or a Hello without one) nothing of its volume: no
  uuid, size, generation ids or journal seq.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
from crc32c import crc32c

from peerlink.frames import NEED_DATA, FrameDecoder, encode_frame
from peerlink.messages import PROTO_VERSION, Message, decode
from tests.conftest import run_nbdgw
from tests.integration.conftest import RxServer
from tests.integration.peerenv import SECRET, Env, Writer

MiB = 1 << 20
KiB = 1 << 10
STALL_LIMIT = 0.050  # seconds: the longest the receiver's loop may be kept from a peer
RSS_LIMIT = 64 * MiB  # growth over idle allowed with 32 hostile connections


def secret_file(env: Env) -> Path:
    path = env.tmp / "secret"
    path.write_bytes(SECRET + b"\n")
    return path


def hello_body(volume: str = "v1", vuuid: str | None = None,
               gens: list[list[int]] | None = None, changed: Any = None,
               node: str = "stranger", size: int = 64 * MiB, last: int = 0) -> bytes:
    """A Hello body as a stranger would build it (raw msgpack: any field it likes)."""
    fields: list[Any] = [PROTO_VERSION, node, volume, vuuid or str(uuid.uuid4()), size,
                         "primary", gens if gens is not None else [[secrets.randbits(63), 1]],
                         last, secrets.token_bytes(32), False, changed]
    return msgpack.packb([1, *fields], use_bin_type=True)


def intro_body(volume: str = "v1", node: str = "stranger") -> bytes:
    """An Intro body (the sender's first message in version 2)."""
    return msgpack.packb([15, PROTO_VERSION, node, volume, secrets.token_bytes(32)],
                         use_bin_type=True)


def raw_frame(body: bytes, compress: int = 0) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(body, compress))


def header(body_len: int) -> bytes:
    """A frame header announcing ``body_len`` bytes (its CRC cannot be known yet)."""
    head = struct.pack("<4sBBHI", b"NGPL", 1, 0, 0, body_len)
    return head + struct.pack("<I", crc32c(head))


@contextlib.contextmanager
def connect(port: int, source: str = "127.0.0.1") -> Iterator[socket.socket]:
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    try:
        yield s
    finally:
        s.close()


def read_msgs(s: socket.socket, timeout: float = 10) -> list[Message]:
    """Every message the receiver sends until it closes the connection (or ``timeout``)."""
    d, out = FrameDecoder(), []
    s.settimeout(timeout)
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := s.recv(65536):
            d.feed(chunk)
            while (body := d.next_frame()) is not NEED_DATA:
                out.append(decode(body))
    return out


def first_answer_after(s: socket.socket, t0: float, timeout: float = 30) -> float:
    """Seconds from ``t0`` until the first byte the receiver sends on ``s``."""
    s.settimeout(timeout)
    assert s.recv(1), "closed without an answer"
    return time.monotonic() - t0


def start_streaming(env: Env, port: int, peer: str, seed: int) -> Writer:
    """An honest sender (with the secret) and a writer on the primary, caught up once."""
    w = Writer(env.served, seed=seed, pause=0.002)
    w.start()
    env.sender(port, "--secret-file", str(secret_file(env)), peer=peer)
    deadline = time.monotonic() + 60
    while env.acked(peer) < 1:
        assert time.monotonic() < deadline, "the honest sender never got an ack"
        time.sleep(0.05)
    return w


def finish_streaming(env: Env, w: Writer, peer: str) -> None:
    """Stop writing; the replica catches up and equals the primary bit for bit."""
    w.stop()
    last = env.last_seq()
    deadline = time.monotonic() + 60
    while env.acked(peer) != last:
        assert time.monotonic() < deadline, f"acked {env.acked(peer)}, journal ends at {last}"
        time.sleep(0.05)
    for p in env.procs:
        assert p.stop() == 0
    p_sum, r_sum = env.checksums()
    assert p_sum == r_sum


# -- 1: a decompression bomb ------------------------------------------------------------------


def test_a_decompression_bomb_does_not_stall_the_receiver(
        env: Env, rx_server: Callable[..., RxServer]) -> None:
    """A 360-byte zstd Hello of 8 M ``changed`` extents, three times; right after each,
    a second connection's Hello is answered within 50 ms (median of the three: one
    scheduling hiccup on a loaded machine is not a stall), and the honest link streams on."""
    rx = rx_server(env.replica, "r1", secret_file(env))
    w = start_streaming(env, rx.port, "r1", seed=31)
    bomb = raw_frame(hello_body(changed=[16, [0] * 8_000_000]), compress=19)
    assert len(bomb) < 2048
    waits = []
    for _ in range(3):
        with connect(rx.port) as b, connect(rx.port) as probe:
            b.sendall(bomb)
            time.sleep(0.05)  # the bomb is being read
            t0 = time.monotonic()
            probe.sendall(raw_frame(intro_body()))
            waits.append(first_answer_after(probe, t0))
    print(f"answer after a bomb: {[round(x * 1000, 1) for x in waits]} ms")
    assert sorted(waits)[1] < STALL_LIMIT, f"receiver stalled: {waits}"
    finish_streaming(env, w, "r1")
    assert rx.stop() == 0


# -- 1: memory held for strangers ---------------------------------------------------------------


def test_unauthenticated_connections_do_not_grow_the_receiver(
        env: Env, rx_server: Callable[..., RxServer]) -> None:
    """32 connections (8 from each of 4 source addresses) announce 64 MiB frames and send
    63 MiB of them round robin; then 32 hold the largest frame allowed before
    authentication (16 KiB) one byte short.  RSS stays within 64 MiB of idle throughout
    (the test stops sending as soon as it does not), and the honest link streams on."""
    rx = rx_server(env.replica, "r1", secret_file(env))
    w = start_streaming(env, rx.port, "r1", seed=32)
    time.sleep(1)
    idle = rx.rss()
    peak = idle
    sources = [f"127.0.0.{i}" for i in range(2, 6)]

    def check() -> None:
        nonlocal peak
        peak = max(peak, rx.rss())
        assert peak - idle < RSS_LIMIT, (
            f"receiver grew from {idle >> 20} MiB to {peak >> 20} MiB for strangers")

    socks: list[socket.socket] = []
    try:
        for i in range(32):
            s = socket.create_connection(("127.0.0.1", rx.port), timeout=5,
                                         source_address=(sources[i % 4], 0))
            socks.append(s)
        live = {s: 0 for s in socks}
        for s in socks:
            with contextlib.suppress(OSError):
                s.sendall(header(64 * MiB))
        chunk = b"\xa5" * MiB
        sent = 0
        for _ in range(63):
            for s in list(live):
                try:
                    s.sendall(chunk)
                except OSError:
                    del live[s]  # the receiver closed it: good
                    continue
                sent += MiB
                if sent % (16 * MiB) == 0:
                    check()
            if not live:
                break
        time.sleep(0.5)
        check()
        print(f"64 MiB frames: {len(live)} of 32 connections still open, "
              f"{sent >> 20} MiB sent, RSS {idle >> 20} -> {peak >> 20} MiB")
    finally:
        for s in socks:
            s.close()
    # The largest frame allowed before authentication, one byte short, held open.
    socks = []
    try:
        for i in range(32):
            s = socket.create_connection(("127.0.0.1", rx.port), timeout=5,
                                         source_address=(sources[i % 4], 0))
            socks.append(s)
            with contextlib.suppress(OSError):
                s.sendall(header(16 * KiB) + b"\x5a" * (16 * KiB - 1))
        time.sleep(1)
        check()
    finally:
        for s in socks:
            s.close()
    print(f"RSS idle {idle >> 20} MiB, peak {peak >> 20} MiB")
    finish_streaming(env, w, "r1")
    assert rx.stop() == 0


# -- 2: what a receiver tells before the proof --------------------------------------------------


def _identifiers(env: Env, node: str) -> list[str]:
    """What must not reach a stranger: the volume's uuid, name and size, the node name."""
    vuuid = json.loads((env.primary / "volumes/v1/volume.json").read_text())["uuid"]
    return [vuuid, node, "'v1'", "volume v1", str(64 * MiB)]


def _history(env: Env) -> list[list[int]]:
    p = env.primary / "volumes/v1/generations.json"
    if p.exists():
        return [[g, s] for g, s, _ in json.loads(p.read_text())["history"]]
    vuuid = json.loads((env.primary / "volumes/v1/volume.json").read_text())["uuid"]
    return [[int.from_bytes(uuid.UUID(vuuid).bytes[:8], "little"), 1]]


def _probe(port: int, body: bytes) -> list[Message]:
    """Send an Intro (or an older Hello), then (if challenged) a made-up proof; every
    answer."""
    with connect(port) as s:
        s.sendall(raw_frame(body))
        s.settimeout(10)
        d = FrameDecoder()
        first: list[Message] = []
        while not first:
            chunk = s.recv(65536)
            if not chunk:
                return first
            d.feed(chunk)
            while (b := d.next_frame()) is not NEED_DATA:
                first.append(decode(b))
        if type(first[0]).__name__ == "Challenge":
            s.sendall(raw_frame(msgpack.packb([14, bytes(32)], use_bin_type=True)))
        return first + read_msgs(s)


def _assert_tells_nothing(answers: list[Message], secrets_: list[str]) -> None:
    names = [type(m).__name__ for m in answers]
    assert "Hello" not in names, f"the receiver sent its Hello to a stranger: {answers}"
    assert names[:1] == ["Challenge"], answers
    text = " ".join(m.reason for m in answers if type(m).__name__ == "Refuse")  # type: ignore[union-attr]
    for s in secrets_:
        assert s not in text, f"{s!r} told to a stranger: {answers}"


def test_a_stranger_learns_nothing_about_the_replica(env: Env) -> None:
    """`python -m peerlink receive` with a secret, bound to the primary's volume (it
    streamed): a stranger's Intro gets the protocol version and a nonce, then
    "auth-failed"; one opening with a Hello that offers the right uuid and generation
    history (the layout before version 2) gets the version code only."""
    node = "dc-hidden-node"
    sf = secret_file(env)
    rx = env.receiver(0, "--secret-file", str(sf), node=node)
    w = start_streaming(env, rx.port, node, seed=33)
    vuuid = json.loads((env.primary / "volumes/v1/volume.json").read_text())["uuid"]
    answers = _probe(rx.port, intro_body())
    _assert_tells_nothing(answers, _identifiers(env, node))
    assert [type(m).__name__ for m in answers] == ["Challenge", "Refuse"], answers
    assert answers[1].reason.startswith("auth-failed"), answers  # type: ignore[union-attr]
    old = _probe(rx.port, hello_body(vuuid=vuuid, gens=_history(env), last=10**9))
    assert [getattr(m, "reason", None) for m in old] == [
        "protocol-version: this node speaks peerlink protocol version 2"], old
    refused = rx.events("peer_refused_by_us")
    assert any("sender proof from 'stranger' does not match" in e["reason"] for e in refused)
    finish_streaming(env, w, node)


def test_a_stranger_cannot_tell_which_volumes_exist(
        env: Env, rx_server: Callable[..., RxServer]) -> None:
    """A ReceiverServer answers an Intro for a volume it holds and one it does not alike:
    Challenge, then "auth-failed"; it logs the detail."""
    node = "dc-hidden-node"
    run_nbdgw("volume", "create", "v2", "--size", "64M", "--replica", "--data-dir",
              str(env.replica))
    rx = rx_server(env.replica, node, secret_file(env), ("v1", "v2"))
    held = _probe(rx.port, intro_body(volume="v2"))
    unknown = _probe(rx.port, intro_body(volume="no-such-volume"))
    secrets_ = [*_identifiers(env, node), "v2", "no-such-volume", "replica"]
    for answers in (held, unknown):
        _assert_tells_nothing(answers, secrets_)
    assert [type(m).__name__ for m in held] == [type(m).__name__ for m in unknown]
    assert held[-1] == unknown[-1]  # the same Refuse
    assert rx.stop() == 0
    assert {"v2", "no-such-volume"} <= {e.get("volume") for e in rx.events("peer_refused_by_us")}


# -- what was refused cleanly before stays so -------------------------------------------------


def test_junk_and_slow_connections_are_refused_and_replication_goes_on(
        env: Env, rx_server: Callable[..., RxServer]) -> None:
    """Random bytes, HTTP, a 4 GiB length, a wrong frame version, a version 1 Hello and
    300 connections that send nothing: each closed (the version 1 sender told the
    version spoken here, nothing else); past 8 from one address and 64 in all at once,
    the others at the handshake deadline; the honest sender streams on."""
    rx = rx_server(env.replica, "r1", secret_file(env))
    w = start_streaming(env, rx.port, "r1", seed=34)
    for junk in (secrets.token_bytes(64), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                 header((4 << 30) - 1), b"NGPL\x07" + bytes(11)):
        with connect(rx.port) as s:
            s.sendall(junk)
            assert read_msgs(s) == [], junk
    v1 = msgpack.packb([1, 1, "old", "v1", str(uuid.uuid4()), 64 * MiB, "primary", [], 0,
                        bytes(32)], use_bin_type=True)
    with connect(rx.port) as s:
        s.sendall(raw_frame(v1))
        answers = read_msgs(s)
    assert [getattr(m, "reason", None) for m in answers] == [
        "protocol-version: this node speaks peerlink protocol version 2"]
    def still_open(socks: list[socket.socket]) -> int:
        n = 0
        for s in socks:
            s.settimeout(0.05)
            try:
                n += s.recv(1) != b""
            except TimeoutError:
                n += 1
            except ConnectionResetError:
                pass
        return n

    slow: list[socket.socket] = []
    try:
        slow = [socket.create_connection(("127.0.0.1", rx.port), timeout=5,
                                         source_address=("127.0.2.1", 0)) for _ in range(10)]
        time.sleep(0.5)
        assert still_open(slow) == 8  # per source address
        slow += [socket.create_connection(("127.0.0.1", rx.port), timeout=5,
                                          source_address=(f"127.0.1.{i % 40 + 1}", 0))
                 for i in range(290)]
        assert still_open(slow) <= 64  # in all (some may have reached their deadline)
        time.sleep(3.5)  # past the handshake deadline (the receiver's timeout, 3 s)
        assert still_open(slow) == 0
    finally:
        for s in slow:
            s.close()
    assert rx.proc.poll() is None
    finish_streaming(env, w, "r1")
    assert rx.stop() == 0
    dropped = [e["reason"] for e in rx.events("peer_dropped")]
    assert dropped.count("8 unauthenticated connections from 127.0.2.1 already (at most 8)") \
        == 2
    assert "64 unauthenticated connections already (at most 64)" in dropped
    assert "the peer did not authenticate within 3 s of connecting" in dropped


# -- 3: what a sender tells a listener that has not proved the secret ------------------------

IMPOSTOR_ANSWERS = ("a forged proof", "no proof", "a Hello without a proof")


class FakeListener(threading.Thread):
    """A plain socket server on the sender's peer address that does not know the secret:
    it answers the first message with a Challenge, the sender's next with one of
    ``IMPOSTOR_ANSWERS`` (one per connection, in turn), and records every byte and every
    message the sender sends it."""

    def __init__(self, vuuid: str, gens: list[list[int]]) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.vuuid, self.gens = vuuid, gens
        self.raw: list[bytes] = []
        self.told: list[list[Message]] = []  # per connection
        self.done = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(30)
        with self.sock:
            for answer in IMPOSTOR_ANSWERS:
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    break
                with conn:
                    self.told.append(self._serve(conn, answer))
        self.done.set()

    def _serve(self, conn: socket.socket, answer: str) -> list[Message]:
        d, msgs = FrameDecoder(), []
        conn.settimeout(5)
        replies = [msgpack.packb([13, PROTO_VERSION, secrets.token_bytes(32)],
                                 use_bin_type=True)]
        if answer == "a forged proof":
            replies.append(msgpack.packb([14, secrets.token_bytes(32)], use_bin_type=True))
        elif answer == "no proof":
            replies.append(msgpack.packb([14, b""], use_bin_type=True))
        else:
            replies.append(msgpack.packb(
                [1, PROTO_VERSION, "r1", "v1", str(uuid.uuid4()), 64 * MiB, "secondary",
                 [[secrets.randbits(63), 1]], 0, secrets.token_bytes(32)], use_bin_type=True))
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                self.raw.append(chunk)
                d.feed(chunk)
                while (body := d.next_frame()) is not NEED_DATA:
                    msgs.append(decode(body))
                    if replies:
                        conn.sendall(raw_frame(replies.pop(0)))
        return msgs


def _ints(v: Any) -> set[int]:
    if isinstance(v, (tuple, list)):
        return {x for item in v for x in _ints(item)}
    if hasattr(v, "__dataclass_fields__") or hasattr(v, "_fields"):
        names = getattr(v, "_fields", None) or v.__dataclass_fields__
        return {x for n in names for x in _ints(getattr(v, n))}
    return {v} if isinstance(v, int) and not isinstance(v, bool) else set()


def test_a_sender_tells_a_listener_that_cannot_prove_nothing_of_its_volume(env: Env) -> None:
    """`python -m peerlink send` with a secret, its peer address taken by a listener
    without it: over three connections (a forged proof, no proof, a Hello without a
    proof) it sends its version, names and nonce and its own proof only: not the volume
    uuid (as text or bytes), nor its size, generation ids or journal seq; it never
    streams, and says why in its own log."""
    w = Writer(env.served, seed=35, pause=0.002, max_ops=50)
    w.start()
    w.join(60)
    vuuid = json.loads((env.primary / "volumes/v1/volume.json").read_text())["uuid"]
    gens = _history(env)
    last = env.last_seq()
    assert last > 0
    fake = FakeListener(vuuid, gens)
    fake.start()
    tx = env.sender(fake.port, "--secret-file", str(secret_file(env)), peer="r1")
    assert fake.done.wait(60), f"the sender connected {len(fake.told)} times only"
    assert tx.stop() == 0
    raw = b"".join(fake.raw)
    assert raw, "the sender sent nothing"
    assert vuuid.encode() not in raw and uuid.UUID(vuuid).bytes not in raw
    facts = {64 * MiB, last, *(g for g, _ in gens)}
    for answer, msgs in zip(IMPOSTOR_ANSWERS, fake.told, strict=True):
        names = [type(m).__name__ for m in msgs]
        assert "Hello" not in names and "Batch" not in names, (answer, msgs)
        assert names[1:2] == ["Proof"], (answer, msgs)  # it did prove itself
        for m in msgs:
            assert vuuid not in repr(m), (answer, m)
            assert not facts & _ints(m), (answer, m)
    failed = [e.get("reason", "") for e in tx.events()
              if e.get("event") in ("auth_failed", "protocol_error", "peer_refused_by_us")]
    assert failed, tx.log.read_text()[-4000:]
