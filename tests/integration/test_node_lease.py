"""The node's one lease for all its groups (gateway/etcdclient.py ``NodeLease``, the
groups parent's) against a real etcd (one member on loopback, as test_etcd_client.py):
published to every group's file with the group's keys only, kept alive, adopted by a
restarted keeper, and, once its keeper stops, a published deadline that etcd's own
expiry never precedes.  And against three members on loopback with the lab's timings:
the leader lost (killed, or frozen) never lets a keeper's write lease lapse (the shell's
keepalives are hedged across the members)."""

from __future__ import annotations

import itertools
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from etcd3gw.exceptions import Etcd3Exception

from gateway.etcdclient import (
    EtcdClient,
    EtcdUnavailable,
    NodeLease,
    boot_id,
    read_node_lease,
    write_node_lease,
)
from gateway.etcdcore import (
    DRIFT,
    KEEPALIVE_FRACTION,
    MARGIN,
    EtcdReply,
    Put,
    Shared,
    Txn,
)
from gateway.labetcd import LEASE_TTL
from tests.integration.test_etcd_client import etcd_member, free_port

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="etcd-server is not installed (make setup)")

TTL = 3


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[str]:
    with etcd_member(tmp_path) as url:
        yield url


def files(tmp_path: Path) -> dict[str, Path]:
    return {g: tmp_path / f"{g}.json" for g in ("g1", "g2")}


def published(path: Path) -> Shared:
    sh = read_node_lease(path, time.monotonic(), boot_id())
    assert sh is not None, path
    return sh


def wait(cond: object, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not within the limit"
        time.sleep(0.05)


def test_one_lease_published_to_every_group_with_its_own_keys_and_kept_alive(
        etcd: str, tmp_path: Path) -> None:
    client = EtcdClient([etcd])
    keeper = NodeLease(client, TTL, 0.2, "/t", files(tmp_path))
    try:
        f = files(tmp_path)
        wait(lambda: all(p.exists() for p in f.values()) and published(f["g1"]).lease)
        lease = published(f["g1"]).lease
        assert published(f["g2"]).lease == lease
        first = published(f["g1"]).until
        assert first > time.monotonic()
        client.txn(Txn((), (Put("/t/groups/g1/primary", '{"node": "a", "epoch": 1}',
                                leased=True),), "/t/groups/g1/"), lease)
        wait(lambda: [kv.key for kv in published(f["g1"]).kvs] == ["/t/groups/g1/primary"])
        assert published(f["g2"]).kvs == ()
        time.sleep(2 * TTL)  # kept alive: etcd would have expired it by now
        assert published(f["g1"]).until > first + TTL
        assert client.lease_ttl(lease) > 0
        assert published(f["g1"]).until <= time.monotonic() + TTL * (1 - DRIFT) - MARGIN
    finally:
        keeper.stop()


def test_a_stopped_keeper_publishes_a_deadline_etcd_never_expires_before(
        etcd: str, tmp_path: Path) -> None:
    """The parent frozen or dead: its children fence at the last published deadline;
    etcd still has the lease then, so the key cannot be another's before they fence."""
    client = EtcdClient([etcd])
    f = files(tmp_path)
    keeper = NodeLease(client, TTL, 0.2, "/t", f)
    wait(lambda: f["g1"].exists() and published(f["g1"]).lease)
    time.sleep(1.0)
    keeper.stop()
    sh = published(f["g1"])
    wait(lambda: time.monotonic() >= sh.until, TTL)
    assert client.lease_ttl(sh.lease) >= 0  # still etcd's at the deadline
    assert published(f["g1"]).until == sh.until  # nothing extended it
    wait(lambda: client.lease_ttl(sh.lease) == -1, TTL + 2)  # then etcd expires it


def test_a_restarted_keeper_adopts_the_published_lease(etcd: str, tmp_path: Path) -> None:
    client = EtcdClient([etcd])
    f = files(tmp_path)
    keeper = NodeLease(client, TTL, 0.2, "/t", f)
    wait(lambda: f["g1"].exists() and published(f["g1"]).lease)
    lease = published(f["g1"]).lease
    keeper.stop()
    time.sleep(1.0)
    again = NodeLease(client, TTL, 0.2, "/t", f)
    try:
        before = published(f["g1"]).until
        wait(lambda: published(f["g1"]).until > before)
        assert published(f["g1"]).lease == lease
    finally:
        again.stop()


def test_a_file_of_another_boot_is_not_read(tmp_path: Path) -> None:
    """Monotonic times of another boot mean nothing: after a reboot the file is ignored."""
    path = tmp_path / "g.json"
    write_node_lease(path, Shared(0.0, 7, 1e12), "another-boot")
    assert read_node_lease(path, 0.0, boot_id()) is None
    write_node_lease(path, Shared(0.0, 7, 1e12), boot_id())
    assert read_node_lease(path, 0.0, boot_id()) == Shared(0.0, 7, 1e12)


# -- one member of three lost: the lease never lapses -------------------------------------

ELECTION_MS = 500  # the lab's raft timings (gateway/labetcd.py)
HEARTBEAT_MS = 50
KILLS = int(os.environ.get("NBDGW_ETCD_KILLS", "4"))  # more for a measurement


class Cluster:
    """Three etcd members on loopback, each a process the test can kill and restart."""

    def __init__(self, tmp_path: Path) -> None:
        ports = [(free_port(), free_port()) for _ in range(3)]
        self.urls = [f"http://127.0.0.1:{c}" for c, _ in ports]
        initial = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
        self.argv = [["etcd", "--name", f"m{i}", "--data-dir", str(tmp_path / f"m{i}"),
                      "--listen-client-urls", self.urls[i],
                      "--advertise-client-urls", self.urls[i],
                      "--listen-peer-urls", f"http://127.0.0.1:{p}",
                      "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
                      "--initial-cluster", initial, "--initial-cluster-state", "new",
                      "--heartbeat-interval", str(HEARTBEAT_MS),
                      "--election-timeout", str(ELECTION_MS)]
                     for i, (_, p) in enumerate(ports)]
        self.logs = [(tmp_path / f"m{i}.log").open("ab") for i in range(3)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * 3
        for i in range(3):
            self.start(i)
        wait(lambda: self.leader() is not None, 30)

    def start(self, i: int) -> None:
        self.procs[i] = subprocess.Popen(self.argv[i], stdout=self.logs[i],
                                         stderr=subprocess.STDOUT)

    def kill(self, i: int) -> None:
        p = self.procs[i]
        assert p is not None
        p.kill()
        p.wait(10)
        self.procs[i] = None

    def freeze(self, i: int) -> None:
        """A member that takes connections and answers nothing (its host hung, or cut
        off behind a kernel that still completes handshakes)."""
        p = self.procs[i]
        assert p is not None
        p.send_signal(signal.SIGSTOP)

    def thaw(self, i: int) -> None:
        p = self.procs[i]
        assert p is not None
        p.send_signal(signal.SIGCONT)

    def status(self, i: int) -> dict[str, Any] | None:
        try:
            return EtcdClient([self.urls[i]], timeout=0.5).call("maintenance/status", {})
        except (EtcdUnavailable, Etcd3Exception):
            return None

    def leader(self) -> int | None:
        for i in range(3):
            st = self.status(i)
            if st and st.get("leader") and st.get("leader") == \
                    st.get("header", {}).get("member_id"):
                return i
        return None

    def all_up(self) -> bool:
        return all(p is not None for p in self.procs) and self.leader() is not None and \
            all(self.status(i) is not None for i in range(3))

    def close(self) -> None:
        for p in self.procs:
            if p is not None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
                p.wait(30)
        for f in self.logs:
            f.close()


class Keeper(NodeLease):
    """The daemon's ``NodeLease`` itself (its tick every KEEPER_TICK, its answers), with
    only a record added: when a keepalive was answered, and a sampler of its write
    lease's margin (alive_until - now) every 10 ms.  The lease alone: no group files, no
    reads of the groups' keys (``poll`` 0)."""

    def __init__(self, urls: list[str]) -> None:
        # Before the loop starts: its first answer may come at once.
        self.answers: list[float] = []  # when a keepalive was answered (TTL > 0)
        self.low: list[tuple[float, float]] = []  # (when, margin) each 10 ms
        super().__init__(EtcdClient(urls), LEASE_TTL, 0.0, "/t", {})
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()

    def _answer(self, r: EtcdReply) -> None:
        # Grants and keepalives are answered on the shell's one lease thread: between
        # this look and NodeLease's own answer only the tick's drop of a request lost
        # for REQUEST_LOST_AFTER could take it (then one answer too many is recorded).
        with self.lock:
            renewed = r.ok and r.ttl > 0 and self.keeper.owns(r.req_id)
        super()._answer(r)
        if renewed:
            with self.lock:
                self.answers.append(time.monotonic())

    def _sample(self) -> None:
        while not self.stopping.wait(0.01):
            with self.lock:
                until = self.keeper.alive_until
            if until > -math.inf:
                now = time.monotonic()
                self.low.append((now, until - now))

    def window(self, start: float, end: float) -> tuple[float, float]:
        """(the lowest margin, the longest gap between keepalive answers) in it."""
        with self.lock:
            low = min(m for t, m in self.low if start <= t <= end)
            times = [start] + [t for t in self.answers if start <= t <= end] + [end]
        return low, max(b - a for a, b in itertools.pairwise(times))

    def stop(self) -> None:
        super().stop()
        self.sampler.join(1)


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_losing_the_etcd_leader_never_lets_the_write_lease_lapse(
        tmp_path: Path, how: str) -> None:
    """The lab's timings (TTL 3 s, keepalives every 0.75 s, elections after 0.5 s): the
    leader the keeper talks to is lost (``kill``: its port refuses; ``freeze``: it
    answers nothing) at a different moment of the keepalive cycle each time, then comes
    back.  The write lease (alive_until, what nbdkit is told) must stay ahead of the
    clock throughout; the figures are printed (pytest -s)."""
    cluster = Cluster(tmp_path)
    keeper = Keeper(cluster.urls)
    figures = []
    try:
        wait(lambda: len(keeper.answers) >= 3, 15)
        for k in range(KILLS):
            leader = cluster.leader()
            assert leader is not None
            with keeper.shell.client.lock:  # as in the lab's failure: it talks to the leader
                keeper.shell.client.current = leader
            t = keeper.answers[-1] + KEEPALIVE_FRACTION * LEASE_TTL * k / KILLS
            time.sleep(max(0.0, t - time.monotonic()))
            start = time.monotonic()
            (cluster.kill if how == "kill" else cluster.freeze)(leader)
            wait(lambda: cluster.leader() is not None, 15)
            elected = time.monotonic() - start
            time.sleep(LEASE_TTL)  # the lease lives on past the election
            low, gap = keeper.window(start, time.monotonic())
            figures.append((elected, gap, low))
            print(f"{how} {k + 1}: new leader after {elected:.2f} s, longest gap between "
                  f"keepalive answers {gap:.2f} s, lowest write lease margin {low:.2f} s")
            (cluster.start if how == "kill" else cluster.thaw)(leader)
            wait(cluster.all_up, 30)
            time.sleep(1.0)
        lows = [low for _, _, low in figures]
        print(f"{how}: lowest margin over {KILLS} losses: {min(lows):.2f} s; "
              f"longest gap {max(g for _, g, _ in figures):.2f} s")
        assert min(lows) > 0, figures
    finally:
        keeper.stop()
        cluster.close()
