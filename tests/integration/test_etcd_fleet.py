"""`nbdgw fleet events` and `nbdgw fleet place` against a real etcd (one member on
loopback, tests/integration/test_etcd_client.py's): the history of a group written by
the same transactions the node core sends, read back as events, after a compaction too,
and followed as it happens."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.etcdclient import EtcdClient
from gateway.etcdcore import Cmp, Delete, Put, Txn, parse_group
from gateway.fleet import PlaceError, switch_primary
from tests.conftest import NBDGW, run_nbdgw
from tests.integration.conftest import check_blocks, node, up, wait_states
from tests.integration.test_etcd_client import etcd_member
from tests.integration.test_etcd_failover import last_flush, writer

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
        out = p.stdout
        got: queue.Queue[str] = queue.Queue()
        # A reader thread, not select() on the pipe: both lines may arrive in one read,
        # and the second then waits in the file object's buffer where select cannot see
        # it (the test failed so, every run, on a loaded machine).
        threading.Thread(target=lambda: [got.put(line) for line in out], daemon=True).start()
        lines = []
        for _ in range(2):  # each line is flushed as it comes: the wait is bounded
            try:
                lines.append(json.loads(got.get(timeout=30))["what"])
            except queue.Empty:
                raise AssertionError(f"no event within 30 s; {lines}") from None
        assert lines == ["taken", "released"]
        assert p.poll() is None  # --follow does not end by itself
    finally:
        p.kill()
        p.wait(10)


def place(cfg: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_nbdgw("-c", cfg, "fleet", "place", "g", *args, check=False, timeout=120)


def test_place_records_the_placement_and_names_the_config_changes(etcd: str,
                                                                  tmp_path: Path) -> None:
    """A group no node runs: recorded, and each node's config change named (exit 2);
    a group whose primary is already there: nothing to switch (exit 0)."""
    c = EtcdClient([etcd])
    cfg = config(tmp_path, etcd)
    p = place(cfg, "--primary", "a", "--replicas", "b,c")
    assert p.returncode == 2, p.stderr
    assert p.stdout.splitlines()[1:] == [
        "switchover: none: no node runs the group yet", "no node runs g: etcd cannot start it",
        "config needed: add group g to a's config and reload it",
        "config needed: add group g to b's config and reload it",
        "config needed: add group g to c's config and reload it"]
    placed = json.loads(c.get_prefix(G + "placement")[1][0].value)
    assert (placed["primary"], placed["replicas"]) == ("a", ["b", "c"])
    la, _ = c.grant(60)
    c.txn(Txn((), (Put(G + "primary", j(node="a", epoch=1), True),
                   Put(G + "state", j(epoch=1, served=1, outdated=[])),
                   Put(G + "members/a", member("primary", 1), True),
                   Put(G + "members/b", member("standby", 1), True)), G), la)
    p = place(cfg, "--primary", "a", "--replicas", "b", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["switchover"] == "none: a is the primary already" and r["known"]
    got = events(cfg)
    assert [e["what"] for e in got if e["what"] == "placement"] == ["placement"] * 2


def test_place_asks_the_primary_and_reports_its_refusal(etcd: str, tmp_path: Path) -> None:
    """The ask is written comparing the primary key as read; the primary's answer (here
    written by the test, as the core does) ends the command; an ask not yet answered
    stops another."""
    c = EtcdClient([etcd])
    cfg = config(tmp_path, etcd)
    la, _ = c.grant(60)
    c.txn(Txn((), (Put(G + "primary", j(node="a", epoch=1), True),
                   Put(G + "state", j(epoch=1, served=1, outdated=[])),
                   Put(G + "members/a", member("primary", 1), True),
                   Put(G + "members/b", member("standby", 1), True)), G), la)
    p = subprocess.Popen([NBDGW, "-c", cfg, "fleet", "place", "g", "--primary", "b",
                          "--replicas", "a"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 30
        while not c.get_prefix(G + "switchover")[1]:
            assert time.monotonic() < deadline and p.poll() is None, p.stderr
            time.sleep(0.1)
        kv = c.get_prefix(G + "switchover")[1][0]
        asked = json.loads(kv.value)
        assert (asked["to"], asked["from"], asked.get("answer")) == ("b", "a", None)
        second = place(cfg, "--primary", "b", "--replicas", "a")
        assert second.returncode == 1
        assert "a switchover to b is asked of a and not answered yet" in second.stderr
        c.txn(Txn((Cmp(G + "switchover", "mod", kv.mod_revision),),
                  (Put(G + "switchover", json.dumps({**asked, "answer": "refused: b is "
                                                     "not streaming"})),), G), 0)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 1
        assert "switchover a -> b refused: b is not streaming" in err
    finally:
        p.kill()
        p.wait(10)


def test_an_ask_on_a_stale_read_is_refused_by_the_transaction(etcd: str) -> None:
    """Never read-modify-write: the primary key changed after the read, the ask's
    transaction (comparing its mod_revision) fails and nothing is written."""
    c = EtcdClient([etcd])
    la, _ = c.grant(60)
    c.txn(Txn((), (Put(G + "primary", j(node="a", epoch=1), True),
                   Put(G + "state", j(epoch=1, served=1, outdated=[]))), G), la)
    revision, kvs = c.get_prefix(G)
    c.txn(Txn((), (Put(G + "primary", j(node="a", epoch=1), True),), G), la)  # a rebinds
    with pytest.raises(PlaceError, match=f"the group changed since revision {revision}"):
        switch_primary(c, G, kvs, parse_group(G, revision, kvs), "b", 5)
    assert c.get_prefix(G + "switchover")[1] == ()


@pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (netns)")
def test_place_switches_the_lab_over_from_another_node(lab_dir: Path) -> None:
    """`nbdgw fleet place` run on the DR site (not the primary): main drains and hands
    the key to dc, which serves every acknowledged write; `fleet events` tells it."""
    lab = up(lab_dir.parent, "--coordinator", "etcd", "--mode", "sync")
    group = lab["etcd"]["group"]
    w = writer(lab)
    time.sleep(1.0)
    dr = node(lab, "dr")
    deadline = time.monotonic() + 30
    while True:  # asked again while dc is not yet streaming (conftest's switchover too)
        p = subprocess.run(["ip", "netns", "exec", dr["netns"], NBDGW, "-c", dr["config"],
                            "fleet", "place", group, "--primary", "dc", "--replicas",
                            "main,dr"], capture_output=True, text=True, timeout=180,
                           check=False)
        if p.returncode == 0 or "not streaming every volume" not in p.stderr \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "switchover: main -> dc on epoch 1" in p.stdout, p.stdout
    flushed, _, _ = last_flush(w, 30)  # its connection died with main's nbdkit
    wait_states(lab, {"dc": "primary", "main": "standby"}, 20)
    assert check_blocks(lab, flushed, time.time())["bad"] == []
    out = subprocess.run(["ip", "netns", "exec", dr["netns"], NBDGW, "-c", dr["config"],
                          "fleet", "events", "--json"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    whats = [(e.get("what"), e.get("node")) for e in map(json.loads, out.splitlines())]
    assert whats.index(("handed_over", "main")) < whats.index(("taken", "dc")), whats
    assert ("switchover_answered", "dc") in whats, whats
