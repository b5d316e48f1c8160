"""`nbdgw fleet events` and `nbdgw fleet place` against a real etcd (one member on
loopback, tests/integration/test_etcd_client.py's): the history of a group written by
the same transactions the node core sends, read back as events, after a compaction too,
and followed as it happens."""

from __future__ import annotations

import json
import select
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.etcdclient import EtcdClient
from gateway.etcdcore import Delete, Put, Txn
from tests.conftest import NBDGW, run_nbdgw
from tests.integration.test_etcd_client import etcd_member

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="etcd-server is not installed (make setup)")

G = "/nbdgw/groups/g/"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[str]:
    with etcd_member(tmp_path) as url:
        yield url


def config(tmp_path: Path, url: str) -> str:
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text(yaml.safe_dump({"version": 1, "coordinator": {
        "kind": "etcd", "endpoints": [url]}}))
    return str(cfg)


def j(**v: object) -> str:
    return json.dumps(v, sort_keys=True)


def member(state: str, epoch: int) -> str:
    return j(state=state, consistent=True, data_epoch=epoch, epoch=epoch, role="x")


def history(c: EtcdClient) -> int:
    """A switchover from a to b, then b's lease ends; returns the revision of a's take."""
    la, _ = c.grant(60)
    lb, _ = c.grant(60)
    _, first, _ = c.txn(Txn((), (Put(G + "primary", j(node="a", epoch=1), True),
                                 Put(G + "state", j(epoch=1, served=0, outdated=[])),
                                 Put(G + "members/a", member("primary", 1), True)), G), la)
    c.txn(Txn((), (Put(G + "members/b", member("standby", 1), True),), G), lb)
    c.txn(Txn((), (Put(G + "state", j(epoch=1, served=1, outdated=["b"])),), G), la)
    c.txn(Txn((), (Put(G + "members/b", member("standby", 1), True),), G), lb)  # no event
    c.txn(Txn((), (Put(G + "state", j(epoch=1, served=1, outdated=[])),), G), la)
    c.txn(Txn((), (Delete(G + "primary"),
                   Put(G + "handover", j(to="b", **{"from": "a"}), True)), G), la)
    c.txn(Txn((), (Put(G + "primary", j(node="b", epoch=2), True), Delete(G + "handover"),
                   Put(G + "state", j(epoch=2, served=1, outdated=[])),
                   Put(G + "members/b", member("primary", 2), True)), G), lb)
    c.call("lease/revoke", {"ID": lb})
    return first


EXPECTED = [("taken", "a"), ("member", "a"), ("member", "b"), ("outdated", "b"),
            ("served", None), ("in_sync", "b"), ("handed_over", "a"), ("taken", "b"),
            ("member", "b"), ("lost", "b"), ("member_gone", "b")]


def events(cfg: str, *args: str) -> list[dict[str, object]]:
    out = run_nbdgw("-c", cfg, "fleet", "events", "--json", *args, timeout=60).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_events_from_the_history(etcd: str, tmp_path: Path) -> None:
    c = EtcdClient([etcd])
    first = history(c)
    cfg = config(tmp_path, etcd)
    got = events(cfg)
    assert [(e["what"], e["node"]) for e in got] == EXPECTED
    assert got[0]["revision"] == first and got[0]["group"] == "g"
    later = events(cfg, "--since", str(first + 1))
    assert [(e["what"], e["node"]) for e in later] == EXPECTED[2:]
    text = run_nbdgw("-c", cfg, "fleet", "events").stdout.splitlines()
    assert text[-4] == f"revision {got[-4]['revision']} group g: b took the primary key " \
                       "on epoch 2 (switchover from a)"


def test_events_after_a_compaction(etcd: str, tmp_path: Path) -> None:
    """History before the compacted revision is gone: the command says so and goes on
    with what etcd keeps (a put whose previous value was compacted reads as new)."""
    c = EtcdClient([etcd])
    first = history(c)
    c.call("kv/compaction", {"revision": str(first + 3)})
    got = events(config(tmp_path, etcd), "--since", str(first))
    assert got[0] == {"compacted": first + 3}
    # from the rewrite of b's record, whose previous value is gone: read as new; the
    # state's next write has no previous value either: its served epoch is no change
    assert [(e["what"], e["node"]) for e in got[1:]] == [("member", "b"), *EXPECTED[5:]]


def test_events_follow(etcd: str, tmp_path: Path) -> None:
    c = EtcdClient([etcd])
    la, _ = c.grant(60)
    now = c.get_prefix("/")[0]
    p = subprocess.Popen([NBDGW, "-c", config(tmp_path, etcd), "fleet", "events", "--follow",
                          "--json", "--since", str(now + 1)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        c.txn(Txn((), (Put(G + "primary", j(node="a", epoch=1), True),), G), la)
        c.txn(Txn((), (Delete(G + "primary"),), G), la)
        assert p.stdout is not None
        lines = []
        for _ in range(2):  # each line is flushed as it comes: readline is bounded
            ready, _, _ = select.select([p.stdout], [], [], 30)
            assert ready, f"no event within 30 s; {lines}"
            lines.append(json.loads(p.stdout.readline())["what"])
        assert lines == ["taken", "released"]
        assert p.poll() is None  # --follow does not end by itself
    finally:
        p.kill()
        p.wait(10)
