"""Volume groups on etcd with the node's one lease (DESIGN.md §6b): a real `nbdgw
daemon` groups parent of two groups, each group's daemon its child, against a real etcd
(one member on loopback, as test_etcd_client.py).  The node's other sites are addresses
nobody answers (TEST-NET): this node is the installed primary of both groups and takes
both keys.

- both groups' keys are bound to one lease, the only lease in etcd: the parent's;
- the parent frozen (SIGSTOP), its children running: nothing extends the lease, and
  every group's daemon fences by its own clock at the deadline the parent published,
  before etcd expires the lease; the parent thawed: both groups serve again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.etcdclient import EtcdClient
from gateway.etcdcore import DRIFT, MARGIN
from tests.conftest import free_port, run_nbdgw
from tests.integration.test_etcd_client import etcd_member

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="binds the groups' ports as root")

TTL = 3
LEASE_SPAN = TTL * (1 - DRIFT) - MARGIN
GROUPS = ("g1", "g2")


def config(tmp: Path, url: str) -> Path:
    secret = tmp / "peer.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    cfg = {
        "version": 1, "node": {"name": "main", "data_dir": str(tmp / "data")},
        "peerlink": {"secret_file": str(secret)},
        "sites": [{"name": "main", "address": "127.0.0.1"},
                  {"name": "dc", "address": "192.0.2.2"},
                  {"name": "dr", "address": "192.0.2.3"}],
        "coordinator": {"kind": "etcd", "endpoints": [url], "lease_ttl": TTL,
                        "poll_interval": 0.25},
        "groups": [{"name": g, "primary": "main", "secondary": "dc", "dr": "dr",
                    "replicas": [{"site": "main", "mode": "async"},
                                 {"site": "dc", "mode": "async"}],
                    "ports": {"peerlink": free_port(), "heartbeat": free_port(),
                              "nbd": free_port()},
                    "volumes": [{"name": f"v{g}", "size": "16M"}]} for g in GROUPS]}
    path = tmp / "nbdgw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def state(tmp: Path, group: str) -> dict[str, Any]:
    try:
        return json.loads((tmp / "data" / "groups" / group / "run" / "failover.json")
                          .read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def wait_states(tmp: Path, want: str, limit: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if all(state(tmp, g).get("state") == want for g in GROUPS):
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not {want} within {limit} s: "
                         f"{ {g: state(tmp, g).get('state') for g in GROUPS} }")


@pytest.fixture
def parent(tmp_path: Path) -> Iterator[tuple[Path, EtcdClient, subprocess.Popen[bytes]]]:
    with etcd_member(tmp_path) as url:
        path = config(tmp_path, url)
        for g in GROUPS:
            run_nbdgw("-c", str(path), "--group", g, "volume", "create", f"v{g}")
        log = (tmp_path / "daemon.log").open("wb")
        p = subprocess.Popen([sys.executable, "-m", "gateway.cli", "-c", str(path),
                              "--log-format", "json", "daemon"], stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield tmp_path, EtcdClient([url]), p
        finally:
            os.killpg(p.pid, signal.SIGCONT)
            p.terminate()
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
            log.close()


def keys(client: EtcdClient) -> dict[str, int]:
    """Each key under /nbdgw/groups/ -> the lease it is bound to."""
    _, kvs = client.get_prefix("/nbdgw/groups/")
    return {kv.key: kv.lease for kv in kvs}


def test_one_lease_for_both_groups_and_a_frozen_parent_fences_them_before_etcd_expires(
        parent: tuple[Path, EtcdClient, subprocess.Popen[bytes]]) -> None:
    tmp, client, p = parent
    wait_states(tmp, "primary", 60)
    bound = {k: lease for k, lease in keys(client).items() if lease}
    assert set(bound) >= {f"/nbdgw/groups/{g}/{k}" for g in GROUPS
                          for k in ("primary", "members/main")}, bound
    leases = set(bound.values())
    assert len(leases) == 1, bound
    lease = leases.pop()
    listed = client.call("lease/leases", {}).get("leases", [])
    assert [int(x["ID"]) for x in listed] == [lease]  # no lease of a group's own

    os.kill(p.pid, signal.SIGSTOP)  # the parent only: its children run on
    fenced = wait_states(tmp, "fenced", TTL + 2)
    assert fenced <= LEASE_SPAN + 0.5, fenced
    assert client.lease_ttl(lease) >= 0  # etcd has not expired it: nobody could take over
    assert all(f"/nbdgw/groups/{g}/primary" in keys(client) for g in GROUPS)
    time.sleep(1.0)
    os.kill(p.pid, signal.SIGCONT)
    wait_states(tmp, "primary", 30)
