"""Sync mode end to end: a real `nbdgw serve` (nbdkit) and a real `nbdgw replicate` on the
primary, a real receiver (`nbdgw replicate` on the secondary), a fault-injecting proxy
between the two peerlink ends (tests/faultproxy.py: stall, fixed delay).  Every write, not
only FLUSH and FUA, is acknowledged only once the sync peer has it durably; a stalled
peer holds writes until the daemon's permission (outdated.json), or degrades by itself
on a node without a failover core; writes in flight wait together."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
import yaml

from blockstore.node_state import write_outdated
from blockstore.volume import Volume, volumes_dir
from nbdgw_common import control_socket as control
from tests.conftest import NBDGW, Served, free_port, run_nbdgw
from tests.faultproxy import ThreadedProxy

SIZE = 64 << 20




class Pair:
    """main (primary: nbdkit + peerlink) -> proxy -> dc (receiver), dc in sync mode."""

    def __init__(self, root: Path, auto: bool, sync_timeout: float,
                 dc_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.auto = auto
        self.procs: list[subprocess.Popen[bytes]] = []
        self.served: Served | None = None
        root.mkdir(parents=True)
        secret = root / "peer.secret"
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)  # config check refuses a secret others can read
        self.main, self.dc = root / "main", root / "dc"
        main_port, dc_port = free_port(), free_port()
        for d in (self.main, self.dc):
            (d / "data").mkdir(parents=True)
        self.write_config(self.dc, "dc", "secondary", dc_port, secret,
                          {"name": "main", "role": "primary", "address": "127.0.0.1",
                           "port": main_port, "mode": "sync"})
        run_nbdgw("-c", str(self.dc / "nbdgw.yaml"), "volume", "create", "v1", "--size",
                  str(SIZE), "--replica")
        self.dc_rep = self.start(self.dc, "replicate", env=dc_env)
        self.proxy = ThreadedProxy(("127.0.0.1", dc_port))
        self.write_config(self.main, "main", "primary", main_port, secret,
                          {"name": "dc", "role": "secondary", "address": "127.0.0.1",
                           "port": self.proxy.port, "mode": "sync",
                           "sync_timeout": sync_timeout})
        run_nbdgw("-c", str(self.main / "nbdgw.yaml"), "volume", "create", "v1", "--size",
                  str(SIZE))
        self.leasing = threading.Event()
        if auto:  # the daemon renews the write lease; here the test does
            threading.Thread(target=self._renew_lease, daemon=True).start()
        self.main_rep = self.start(self.main, "replicate")
        self.served = Served(self.main / "data", [], config=self.main / "nbdgw.yaml")
        self.wait_live(lambda live: live["state"] == "streaming", 30, "dc streaming")

    def write_config(self, site: Path, name: str, role: str, port: int, secret: Path,
                     peer: dict[str, Any]) -> None:
        cfg = {"version": 1,
               "node": {"name": name, "role": role, "data_dir": str(site / "data")},
               "peerlink": {"listen": f"127.0.0.1:{port}", "secret_file": str(secret)},
               "failover": {"auto": self.auto}, "peers": [peer]}
        (site / "nbdgw.yaml").write_text(yaml.safe_dump(cfg))

    def start(self, site: Path, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        log = open(site / f"{args[0]}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen([NBDGW, "-c", str(site / "nbdgw.yaml"), "--log-format", "json",
                              *args], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, env={**os.environ, **(env or {})})
        self.procs.append(p)
        return p

    def _renew_lease(self) -> None:
        from nbd_plugin.lease import LeaseWriter

        writer = LeaseWriter(self.main / "data" / "run" / "write.lease")
        while not self.leasing.is_set():
            # As the node core does, with room: this thread shares the test process
            # with the client's aio loop, and a lease that lapsed while it waited for the
            # GIL failed early writes with ESHUTDOWN (one clean-clone CI run of 0859ea7).
            writer.set(time.monotonic_ns() + 10_000_000_000)
            time.sleep(0.1)

    def live(self) -> dict[str, Any]:
        path = volumes_dir(self.main / "data") / "v1" / "peers" / "dc.live.json"
        try:
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            return {"state": "absent"}

    def wait_live(self, pred: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = self.live()
            if pred(live):
                return live
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}: {self.live()}"
                             f"\n{self.log('main')[-3000:]}")

    def log(self, site: str) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in sorted((self.root / site).glob("replicate-*.log")))

    def connect(self) -> Any:
        assert self.served is not None
        return self.served.connect("v1")

    def close(self) -> None:
        self.leasing.set()
        if self.served is not None and self.served.proc.poll() is None:
            self.served.stop()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        self.proxy.close()


@pytest.fixture
def make_pair(tmp_path: Path) -> Iterator[Any]:
    pairs: list[Pair] = []

    def make(auto: bool = True, sync_timeout: float = 1.0,
             dc_env: dict[str, str] | None = None) -> Pair:
        p = Pair(tmp_path / f"pair{len(pairs)}", auto, sync_timeout, dc_env)
        pairs.append(p)
        return p

    yield make
    for p in pairs:
        with contextlib.suppress(Exception):
            p.close()


def completes(h: Any, cookie: int, within: float) -> bool:
    """Drive libnbd until command ``cookie`` completes or ``within`` seconds pass."""
    deadline = time.monotonic() + within
    while not h.aio_command_completed(cookie):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        h.poll(max(1, int(min(left, 0.05) * 1000)))
    return True


def test_a_plain_write_waits_for_a_stalled_sync_peer(make_pair: Any) -> None:
    """No FLUSH, no FUA: the write itself is not acknowledged while dc cannot acknowledge
    it, for any time (here three sync_timeouts), and is once dc answers again."""
    pair = make_pair(sync_timeout=1.0)
    h = pair.connect()
    h.pwrite(b"a" * 4096, 0)  # streaming: acknowledged at once
    pair.proxy.set_stalled(True)
    cookie = h.aio_pwrite(b"b" * 4096, 4096)
    assert not completes(h, cookie, 3.0)
    live = pair.wait_live(lambda x: x["sync"] == "stalled", 5, "dc stalled")
    assert live["stalled_since"] is not None and live["degraded"] is None
    pair.proxy.set_stalled(False)
    assert completes(h, cookie, 5.0)
    pair.wait_live(lambda x: x["sync"] == "ok", 5, "dc ok again")
    assert "sync_degraded" not in pair.log("main")
    h.shutdown()


def test_a_commit_waits_for_the_replicas_fdatasync(make_pair: Any) -> None:
    """dc's journal sync takes 0.6 s longer (the test hook NBDGW_TEST_SYNC_DELAY, a sleep
    where its fdatasync is): a write, and a FLUSH sent while that write is in flight
    (written on the primary, not answered: NBD has the FLUSH cover it), are neither
    answered before dc's sync returned (its Ack follows the fdatasync, the gate follows
    the Ack), however the sender, the gate and the plugin's own fdatasync overlap their
    work; then both are."""
    delay = 0.6
    pair = make_pair(sync_timeout=30.0, dc_env={"NBDGW_TEST_SYNC_DELAY": f"v1={delay}"})
    h = pair.connect()
    for i in range(3):
        t = time.monotonic()
        write = h.aio_pwrite(os.urandom(4096), i * 4096)
        assert not completes(h, write, 0.2), f"commit {i}: write answered early"
        flush = h.aio_flush()
        assert not completes(h, flush, delay - 0.2 - 0.1), f"commit {i}: FLUSH answered early"
        assert not h.aio_command_completed(write), f"commit {i}: write answered early"
        assert completes(h, write, 10.0) and completes(h, flush, 10.0)
        assert time.monotonic() - t >= delay
    h.shutdown()


def test_every_acknowledged_write_survives_kill_9_of_the_primary(make_pair: Any) -> None:
    """Writes in flight, 16 at a time, each to its own place with its own bytes; the
    primary (nbdkit and its peerlink) is killed with SIGKILL right after the acks.  The
    replica holds every write that was acknowledged, byte for byte."""
    pair = make_pair(sync_timeout=30.0)
    h = pair.connect()
    block = 65536
    data = {i: os.urandom(block) for i in range(600)}
    pending: dict[int, int] = {}
    acked: list[int] = []
    nxt = 0
    while len(acked) < 400:
        while nxt < len(data) and len(pending) < 16:
            pending[h.aio_pwrite(data[nxt], nxt * block)] = nxt
            nxt += 1
        h.poll(100)
        try:
            for cookie in [c for c in pending if h.aio_command_completed(c)]:
                acked.append(pending.pop(cookie))
        except nbd.Error as e:  # say why the server refused (CI saw ESHUTDOWN once)
            assert pair.served is not None
            raise AssertionError(f"{e} after {len(acked)} acks\n"
                                 f"{pair.served.stderr()[-3000:]}\n"
                                 f"{pair.log('main')[-2000:]}") from e
    done = list(acked)  # acknowledged to the client before the kill
    assert pair.served is not None
    os.kill(pair.served.nbdkit_pid(), signal.SIGKILL)
    os.killpg(pair.main_rep.pid, signal.SIGKILL)
    pair.dc_rep.send_signal(signal.SIGTERM)
    assert pair.dc_rep.wait(30) == 0
    vol = Volume.open(pair.dc / "data", "v1")
    try:
        lost = []
        buf = bytearray(block)
        for i in done:
            vol.read_into(buf, i * block)
            if buf != data[i]:
                lost.append(i)
    finally:
        vol.close()
    assert not lost, f"{len(lost)} of {len(done)} acknowledged writes not on the replica"


def test_a_stalled_peer_degrades_once_the_daemon_outdates_it(make_pair: Any) -> None:
    pair = make_pair(sync_timeout=0.5)
    h = pair.connect()
    pair.proxy.set_stalled(True)
    cookie = h.aio_pwrite(b"c" * 4096, 0)
    assert not completes(h, cookie, 1.5)
    live = pair.wait_live(lambda x: x["sync"] == "stalled", 5, "dc stalled")
    assert live["stalled_since"] is not None
    assert not completes(h, cookie, 0.5)  # stalled is not permission
    t = time.monotonic()
    write_outdated(pair.main / "data", 0, ["dc"])
    assert completes(h, cookie, 3.0)
    assert time.monotonic() - t < 1.5
    live = pair.wait_live(lambda x: x["sync"] == "degraded", 5, "dc degraded")
    assert live["state"] == "degraded" and "outdated by the daemon" in live["degraded"]
    h.pwrite(b"d" * 4096, 4096)  # degraded: acknowledged without dc
    pair.proxy.set_stalled(False)
    pair.wait_live(lambda x: x["sync"] == "ok" and x["lag_records"] == 0, 30,
                   "dc caught up and waited for again")
    assert "sync_resumed" in pair.log("main")
    h.shutdown()


def test_without_a_failover_core_the_peer_degrades_by_itself(make_pair: Any) -> None:
    pair = make_pair(auto=False, sync_timeout=1.0)
    h = pair.connect()
    pair.proxy.set_stalled(True)
    t = time.monotonic()
    cookie = h.aio_pwrite(b"e" * 4096, 0)
    assert completes(h, cookie, 10.0)
    assert 0.9 <= time.monotonic() - t < 5.0
    pair.wait_live(lambda x: x["sync"] == "degraded", 5, "dc degraded")
    log = pair.log("main")
    assert "sync_degraded" in log and "no failover core" in log
    pair.proxy.set_stalled(False)
    h.shutdown()


def test_writes_in_flight_complete_in_about_one_round_trip(make_pair: Any) -> None:
    """With 100 ms added each way, 32 writes in flight complete in about one round trip
    of the link (they wait together), not 32."""
    pair = make_pair(sync_timeout=30.0)
    pair.proxy.set_delay(0.1)
    h = pair.connect()
    h.pwrite(b"f" * 4096, 0)
    t = time.monotonic()
    h.pwrite(b"g" * 4096, 0)
    one = time.monotonic() - t
    assert one >= 0.2  # every write waits for dc's ack
    t = time.monotonic()
    cookies = [h.aio_pwrite(os.urandom(4096), i * 4096) for i in range(32)]
    for c in cookies:
        assert completes(h, c, 10.0)
    many = time.monotonic() - t
    assert many < 3 * one, (one, many)
    h.shutdown()


def test_a_write_through_the_fuse_file_waits_too(make_pair: Any, tmp_path: Path) -> None:
    """The iSCSI bridge's path: the FUSE file served inside nbdkit waits as NBD does."""
    from iscsi_bridge.fuse import FuseMount

    pair = make_pair(sync_timeout=1.0)
    m = FuseMount("v1", tmp_path / "mnt", str(volumes_dir(pair.main / "data") / "v1"), False,
                  "nbdkit")
    m.start()
    try:
        fd = os.open(m.file, os.O_RDWR | os.O_DIRECT)
        buf = bytearray(os.urandom(4096))
        aligned = memoryview(__import__("mmap").mmap(-1, 4096))
        aligned[:] = buf
        try:
            assert os.pwrite(fd, aligned, 0) == 4096
            pair.proxy.set_stalled(True)
            done = threading.Event()
            threading.Thread(target=lambda: (os.pwrite(fd, aligned, 8192), done.set()),
                             daemon=True).start()
            assert not done.wait(2.5)
            pair.proxy.set_stalled(False)
            assert done.wait(10)
        finally:
            os.close(fd)
    finally:
        pair.proxy.set_stalled(False)
        m.stop()


def test_nbdkits_workers_keep_their_thread_states_until_close(make_pair: Any) -> None:
    """With a sync peer nbdkit serves a connection's requests on worker threads
    (PARALLEL): each keeps its Python thread state from its first request, and close
    deletes them all, however the client leaves (nbd_plugin/threadstate.py)."""
    pair = make_pair(sync_timeout=30.0)
    assert pair.served is not None
    vdir = volumes_dir(pair.served.data_dir) / "v1"

    def states() -> dict[str, int]:
        return control.request(vdir, {"op": "stats"})["thread_states"]  # type: ignore[no-any-return]

    for n in range(6):
        h = pair.connect()
        blocks = {i: os.urandom(4096) for i in range(32)}
        cookies = [h.aio_pwrite(data, i * 4096) for i, data in blocks.items()]
        for c in cookies:
            assert completes(h, c, 30.0)
        assert all(h.pread(4096, i * 4096) == data for i, data in blocks.items())
        during = states()
        assert during["pinned"] == 1 and during["lost"] == 0, during
        assert 1 <= during["workers"] <= 16, during  # nbdkit's default: 16 per connection
        if n % 2:
            h.shutdown()
        del h  # even rounds: the client just goes
        deadline = time.monotonic() + 10
        while (got := states()) != {"pinned": 0, "workers": 0, "lost": 0}:
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
