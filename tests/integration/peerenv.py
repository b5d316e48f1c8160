"""Peerlink test environment (tests/integration/test_peerlink*.py and others): a real
`nbdgw serve` primary with `python -m peerlink` sender and receiver processes on
loopback (``Env``; the ``env`` fixture is in conftest.py), libnbd writers that log every
request, and the check that a replica is exactly a prefix of them."""

# The workload's randomness is for coverage (seeded), not secrecy.
# ruff: noqa: S311

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd

from blockstore.journal import journal_bounds
from blockstore.volume import Volume
from tests.conftest import ROOT, Served, run_nbdgw

MiB = 1 << 20
VOL_SIZE = 64 * MiB
BLOCK = 4096
SECRET = b"a shared secret of 32 bytes....."


# -- processes ----------------------------------------------------------------------------

def stop_process(proc: subprocess.Popen[str], logf: Any, what: str) -> int:
    """SIGTERM, a bounded wait (a process that ignores it is killed and the test fails),
    the log file closed; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"{what} ignored SIGTERM") from None
    logf.close()
    return proc.returncode


class PeerProc:
    """One `python -m peerlink ...` process: first stdout line awaited, JSON logs kept."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.logf = open(log, "ab")  # noqa: SIM115 - closed in stop()/kill9()
        self.proc = subprocess.Popen([sys.executable, "-m", "peerlink", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=self.logf, bufsize=0)
        self.first_line = self._read_line(20)

    def _read_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise AssertionError(f"peerlink {self.args[0]} printed nothing in {timeout} s:"
                                     f"\n{self.log.read_text()}")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"peerlink {self.args[0]} exited early "
                                     f"({self.proc.wait()}):\n{self.log.read_text()}")
            buf += chunk
        return buf.decode().strip()

    @property
    def port(self) -> int:
        assert self.first_line.startswith("peerlink: listening on 127.0.0.1:"), self.first_line
        return int(self.first_line.rsplit(":", 1)[1])

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                ev = json.loads(line)
                if name is None or ev["event"] == name:
                    out.append(ev)
        return out

    def wait_event(self, name: str, timeout: float = 20,
                   where: Callable[[dict[str, Any]], bool] = lambda e: True) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [e for e in self.events(name) if where(e)]
            if hits:
                return hits[0]
            time.sleep(0.05)
        raise AssertionError(f"no {name} event in {timeout} s:\n{self.log.read_text()[-4000:]}")

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.logf.close()

    def stop(self) -> int:
        return stop_process(self.proc, self.logf, f"peerlink {self.args[0]}")


@dataclass
class Env:
    """A served primary volume v1, an unserved replica v1, and the peerlink processes."""

    tmp: Path
    primary: Path
    replica: Path
    served: Served
    procs: list[PeerProc] = field(default_factory=list)
    logs: int = 0

    def kill_all(self) -> None:
        """Kill every peerlink process still running (teardown, also after a failure)."""
        for p in self.procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(10)
            p.logf.close()

    def _log(self, what: str) -> Path:
        self.logs += 1
        return self.tmp / f"{self.logs:02d}-{what}.log"

    def receiver(self, port: int = 0, *extra: str, data_dir: Path | None = None,
                 node: str = "r1") -> PeerProc:
        p = PeerProc(["receive", "--data-dir", str(data_dir or self.replica), "--volume", "v1",
                      "--node", node, "--listen", f"127.0.0.1:{port}", "--timeout", "3",
                      *extra], self._log("receiver"))
        self.procs.append(p)
        return p

    def sender(self, port: int, *extra: str, data_dir: Path | None = None,
               node: str = "p1", peer: str = "r1") -> PeerProc:
        p = PeerProc(["send", "--data-dir", str(data_dir or self.primary), "--volume", "v1",
                      "--node", node, "--peer", f"{peer}=127.0.0.1:{port}", "--timeout", "3",
                      "--max-backoff", "0.5", *extra], self._log("sender"))
        self.procs.append(p)
        return p

    def last_seq(self) -> int:
        return journal_bounds(self.primary / "volumes/v1/journal")[1]

    def acked(self, peer: str = "r1") -> int:
        path = self.primary / f"volumes/v1/peers/{peer}.json"
        return int(json.loads(path.read_text())["acked_seq"]) if path.exists() else -1

    def wait_caught_up(self, timeout: float = 40) -> int:
        """Poll until the persisted ack is the primary's last journal seq; return it."""
        last = self.last_seq()
        deadline = time.monotonic() + timeout
        while self.acked() != last:
            if time.monotonic() > deadline:
                raise AssertionError(f"replica acked {self.acked()}, primary journal ends at "
                                     f"{last}, after {timeout} s")
            time.sleep(0.05)
        return last

    def checksums(self) -> tuple[str, str]:
        """Checksum both volumes (serving stopped first: nothing moves any more)."""
        self.served.stop()
        return (checksum(self.primary), checksum(self.replica))


def checksum(data_dir: Path) -> str:
    return run_nbdgw("volume", "checksum", "v1", "--data-dir", str(data_dir)).stdout.split()[0]


def replica_state(data_dir: Path) -> dict[str, Any]:
    return json.loads((data_dir / "volumes/v1/state.json").read_text())


# -- writers ------------------------------------------------------------------------------

class Writer(threading.Thread):
    """libnbd writes in a background thread until stopped or ``max_ops`` are done.

    Random writes of 1-16 blocks, with an occasional trim or zero.  ``stamped``: every
    block written carries (counter, block index), the counter rising by one per request
    in issue order, and the request is logged before it is issued (single writer, one
    request at a time), so a replica can be checked against the log's prefixes.
    """

    def __init__(self, served: Served, seed: int, *, max_ops: int = 1_000_000,
                 blocks: int = VOL_SIZE // BLOCK, stamped: bool = False,
                 pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.uri = served.uri("v1")
        self.rng = random.Random(seed)
        self.max_ops = max_ops
        self.blocks = blocks
        self.stamped = stamped
        self.pause = pause
        self.halt = threading.Event()
        self.log: list[tuple[int, int, int]] = []  # (counter, first block, block count)
        self.ops = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            try:
                while not self.halt.is_set() and self.ops < self.max_ops:
                    self._one(h)
                    self.ops += 1
                    if self.pause:
                        time.sleep(self.pause)
                h.flush()
            finally:
                with contextlib.suppress(nbd.Error):
                    h.shutdown()
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def _one(self, h: Any) -> None:
        n = self.rng.randint(1, 4 if self.stamped else 16)
        first = self.rng.randrange(0, self.blocks - n + 1)
        if self.stamped:
            counter = len(self.log)
            self.log.append((counter, first, n))
            h.pwrite(b"".join(stamp(counter, b) for b in range(first, first + n)), first * BLOCK)
            return
        kind = self.rng.random()
        if kind < 0.05:
            h.trim(n * BLOCK, first * BLOCK)
        elif kind < 0.10:
            h.zero(n * BLOCK, first * BLOCK)
        else:
            h.pwrite(self.rng.randbytes(n * BLOCK), first * BLOCK)

    def stop(self) -> None:
        """Stop now (after the request in progress and a flush)."""
        self.halt.set()
        self.finish()

    def finish(self) -> None:
        """Wait until ``max_ops`` are done (bounded), and report the writer's error."""
        self.join(60)
        assert not self.is_alive(), "writer did not stop"
        if self.error is not None:
            raise self.error


def stamp(counter: int, block: int) -> bytes:
    """Block contents for request ``counter``: the stamp, then bytes derived from it."""
    head = struct.pack("<QQ", counter, block)
    return head + hashlib.shake_128(head).digest(BLOCK - len(head))


def check_prefix(data_dir: Path, log: list[tuple[int, int, int]], blocks: int) -> int:
    """Assert the replica holds exactly the state after the first n logged requests, for
    some n; return n.  n is fixed by the highest stamp found (that request is the last of
    the prefix, so its blocks show it), then every block is compared with the log."""
    vol = Volume.open(data_dir, "v1")  # recovers as the receiver would on restart
    try:
        image = bytearray(blocks * BLOCK)
        vol.read_into(image, 0)
    finally:
        vol.close()
    seen = [struct.unpack_from("<QQ", image, b * BLOCK) for b in range(blocks)]
    stamped = [c for (c, blk), b in zip(seen, range(blocks), strict=True)
               if image[b * BLOCK:(b + 1) * BLOCK] != bytes(BLOCK) and blk == b]
    n = max(stamped) + 1 if stamped else 0
    assert n <= len(log), f"replica holds request {n - 1}, only {len(log)} were issued"
    want: dict[int, int] = {}
    for counter, first, count in log[:n]:
        for b in range(first, first + count):
            want[b] = counter
    wrong = []
    for b in range(blocks):
        block = bytes(image[b * BLOCK:(b + 1) * BLOCK])
        expected = stamp(want[b], b) if b in want else bytes(BLOCK)
        if block != expected:
            wrong.append((b, seen[b], want.get(b)))
    assert not wrong, (f"replica is not the prefix of {n} requests: {len(wrong)} blocks differ, "
                       f"first (block, (stamp, index), expected stamp): {wrong[:5]}")
    return n
