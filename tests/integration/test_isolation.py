"""Volumes do not share a fate (DESIGN.md §9): a connection that never finishes its
handshake, or a flush stuck in a slow fdatasync on one volume, holds no request of
another client or another volume.

Real `nbdgw serve` with nbdkit, real libnbd clients; the stranger is a raw socket that
stops at a point of the handshake a port scanner, a TCP health check or a slow TLS
client stops at.  The bound is 200 ms on a request that takes well under a millisecond
when nothing stands in its way.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest

from tests.conftest import Served, run_nbdgw
from tests.integration.tlsfiles import psk_file

MiB = 1 << 20
BOUND = 0.2
HOLD = 2.0  # how long the stranger stays; every probe runs inside this window

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_STARTTLS = 5


def served_tcp(data_dir: Path, *extra: str) -> tuple[Served, tuple[str, int]]:
    s = Served(data_dir, ["--listen", "tcp:127.0.0.1:0", *extra])
    for line in s.lines:
        m = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", line)
        if m:
            return s, ("127.0.0.1", int(m.group(1)))
    s.stop()
    raise AssertionError(f"no TCP listener reported: {s.lines}")


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "server closed the stranger's connection"
        out += chunk
    return out


class Stranger:
    """A connection that stops at ``stage``: "connect" (says nothing at all), "options"
    (sent its flags, then nothing) or "tls" (asked for STARTTLS, then never sends its
    ClientHello: the server waits inside the TLS handshake)."""

    def __init__(self, connect: Callable[[], socket.socket], stage: str) -> None:
        self.s = s = connect()
        s.settimeout(10)
        if stage != "connect":
            greeting = _recv(s, 18)
            assert greeting[:16] == NBDMAGIC + IHAVEOPT
            s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        if stage == "tls":
            s.sendall(IHAVEOPT + struct.pack(">II", OPT_STARTTLS, 0))
            reply = _recv(s, 20)
            assert struct.unpack(">QIII", reply)[2] == 1, reply  # NBD_REP_ACK
        time.sleep(0.1)  # the server is now waiting on this connection

    def leave(self) -> None:
        self.s.close()


def probe(connect: Callable[[nbd.NBD, str], None], export: str) -> float:
    """A new client on ``export``: connect, 4 KiB write, read back; seconds (then a
    FLUSH, untimed).  At 8 MiB: the Writer's blocks are the first MiB."""
    t0 = time.monotonic()
    h = nbd.NBD()
    connect(h, export)
    h.pwrite(b"\x5a" * 4096, 8 * MiB)
    assert h.pread(4096, 8 * MiB) == b"\x5a" * 4096
    took = time.monotonic() - t0
    h.flush()
    h.shutdown()
    return took


class Writer:
    """A client connected before the stranger came, writing 4 KiB blocks and reading
    each back; records the longest gap between two completed requests."""

    def __init__(self, connect: Callable[[nbd.NBD, str], None], export: str) -> None:
        self.h = nbd.NBD()
        connect(self.h, export)
        self.stop = threading.Event()
        self.gaps: list[float] = []
        self.errors: list[str] = []
        self.t = threading.Thread(target=self._run)
        self.t.start()

    def _run(self) -> None:
        i, last = 0, time.monotonic()
        try:
            while not self.stop.is_set():
                self.h.pwrite(bytes([i % 256]) * 4096, (i % 256) * 4096)
                self.h.pread(4096, (i % 256) * 4096)
                now = time.monotonic()
                self.gaps.append(now - last)
                last, i = now, i + 1
        except nbd.Error as e:
            self.errors.append(str(e))

    def reset(self) -> None:
        self.gaps.clear()

    def finish(self) -> float:
        self.stop.set()
        self.t.join(30)
        self.h.shutdown()
        assert not self.errors, self.errors
        assert len(self.gaps) > 50, "the writer hardly wrote"
        return max(self.gaps)


def probing(connect: Callable[[nbd.NBD, str], None], w: Writer,
            leave: Callable[[], None] = lambda: None) -> tuple[list[float], float]:
    """Probe both volumes for HOLD seconds, in a thread so that a probe stuck behind a
    stranger cannot hang the test (``leave`` then lets it go on); returns the probes'
    times and the writer's longest gap meanwhile."""
    w.reset()
    probes: list[float] = []
    failed: list[BaseException] = []

    def run() -> None:
        t_end = time.monotonic() + HOLD
        try:
            while time.monotonic() < t_end:
                probes.extend([probe(connect, "v2"), probe(connect, "v1")])
                time.sleep(0.2)
        except BaseException as e:  # noqa: BLE001 - reported below
            failed.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(HOLD + 5)
    gap = max(w.gaps) if w.gaps else HOLD
    leave()
    t.join(30)
    assert not failed, failed
    assert len(probes) >= 10, probes
    return probes, gap


def check_isolated(connect: Callable[[nbd.NBD, str], None],
                   raw: Callable[[], socket.socket], stages: tuple[str, ...]) -> None:
    w = Writer(connect, "v1")
    try:
        probes, gap = probing(connect, w)
        slack = max(*probes, gap)  # what the machine costs today, with no stranger
        for stage in stages:
            time.sleep(0.2)
            st = Stranger(raw, stage)
            probes, gap = probing(connect, w, st.leave)
            assert max(probes) < slack + BOUND, (stage, slack, probes)
            assert gap < slack + BOUND, (stage, f"the connected writer stalled {gap:.3f} s")
    finally:
        worst = w.finish()
    assert worst < 1.0


@pytest.fixture
def two_volumes(data_dir: Path) -> Path:
    for v in ("v1", "v2"):
        run_nbdgw("volume", "create", v, "--size", "16M", "--data-dir", str(data_dir))
    return data_dir


def test_a_silent_connection_on_the_unix_socket_holds_nobody(two_volumes: Path) -> None:
    s = Served(two_volumes, [])

    def connect(h: nbd.NBD, export: str) -> None:
        h.connect_uri(s.uri(export))

    def raw() -> socket.socket:
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(s.sock))
        return c

    check_isolated(connect, raw, ("connect", "options"))
    s.stop()


def test_a_silent_tcp_connection_holds_nobody(two_volumes: Path) -> None:
    s, addr = served_tcp(two_volumes)

    def connect(h: nbd.NBD, export: str) -> None:
        h.connect_uri(f"nbd://{addr[0]}:{addr[1]}/{export}")

    check_isolated(connect, lambda: socket.create_connection(addr), ("connect", "options"))
    s.stop()


def test_a_tls_client_that_stops_mid_handshake_holds_nobody(two_volumes: Path,
                                                            tmp_path: Path) -> None:
    keys = psk_file(tmp_path / "server.psk")
    s, addr = served_tcp(two_volumes, "--tls", "require", "--tls-psk", str(keys))

    def connect(h: nbd.NBD, export: str) -> None:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(str(keys))
        h.set_tls_username("alice")
        h.connect_uri(f"nbds://{addr[0]}:{addr[1]}/{export}")

    check_isolated(connect, lambda: socket.create_connection(addr),
                   ("connect", "options", "tls"))
    s.stop()


def test_a_slow_fdatasync_on_one_volume_holds_no_read_on_another(
        two_volumes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """v1's journal fdatasync takes 1.5 s (the test hook NBDGW_TEST_SYNC_DELAY, a sleep
    where the fdatasync is, under the same locks); v2's reads meanwhile are not held,
    nor are v1's own reads on another connection."""
    monkeypatch.setenv("NBDGW_TEST_SYNC_DELAY", "v1=1.5")
    s = Served(two_volumes, [])
    slow = nbd.NBD()
    slow.connect_uri(s.uri("v1"))
    slow.pwrite(b"\x01" * 4096, 0)
    readers = {}
    for v in ("v1", "v2"):
        readers[v] = nbd.NBD()
        readers[v].connect_uri(s.uri(v))
    done = threading.Event()
    took: list[float] = []

    def flush() -> None:
        t0 = time.monotonic()
        slow.flush()
        took.append(time.monotonic() - t0)
        done.set()

    t = threading.Thread(target=flush)
    t.start()
    time.sleep(0.2)  # the flush is inside its fdatasync now
    worst = {}
    for v, h in readers.items():
        t0 = time.monotonic()
        for i in range(20):
            h.pread(4096, i * 4096)
        worst[v] = time.monotonic() - t0
    still_flushing = not done.is_set()
    t.join(10)
    assert took and took[0] >= 1.4, took  # the hook did hold the flush
    assert worst["v2"] < BOUND, worst
    assert worst["v1"] < BOUND, worst
    assert still_flushing, "the flush ended before the reads: nothing was tested"
    for h in (slow, *readers.values()):
        h.shutdown()
    s.stop()
