"""The node's one lease for all its groups (gateway/etcdclient.py ``NodeLease``, the
groups parent's) against a real etcd (one member on loopback, as test_etcd_client.py):
published to every group's file with the group's keys only, kept alive, adopted by a
restarted keeper, and, once its keeper stops, a published deadline that etcd's own
expiry never precedes."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.etcdclient import (
    EtcdClient,
    NodeLease,
    boot_id,
    read_node_lease,
    write_node_lease,
)
from gateway.etcdcore import DRIFT, MARGIN, Put, Shared, Txn
from tests.integration.test_etcd_client import etcd_member

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
