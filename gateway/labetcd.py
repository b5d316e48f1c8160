"""The lab's etcd cluster (`nbdgw lab up --coordinator etcd`): three members, each in
a network namespace of its own on the lab's bridge (``nbdgw-<id>-etcd1`` ...), listening
on its own address only, started before the sites and stopped with the lab.

A member is recorded in lab.json like a site (name, netns, address, dir, procs), so the
lab's verbs work on it: `nbdgw lab kill etcd2` is a member's power cut, `nbdgw lab start
etcd2` boots it again (it rejoins with its data).  Short raft timings (heartbeat 50 ms,
election 500 ms) and a 3 s lease TTL in the sites' configs keep a failover within a
few seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Final

from nbdgw_common.errors import CommandError
from nbdgw_common.proc import output, run

MEMBERS: Final = ("etcd1", "etcd2", "etcd3")
CLIENT_PORT: Final = 2379
PEER_PORT: Final = 2380
# s: the sites' coordinator.lease_ttl in the lab.  Writes stop 0.95 x 3 - 0.5 = 2.35 s
# after the last keepalive etcd answered, keepalives go every 0.75 s: the 1.6 s between
# outlast a leader election (ELECTION_MS), a split first vote included, as keepalives are
# hedged across the members (gateway/etcdclient.py EtcdShell; the leader lost 20 times in
# tests/integration/test_node_lease.py: 0.31 s to spare at the least).  Should the lease
# run out all the same, the late renewal holds writes for a moment
# (nbd_plugin/lease.py RENEWAL_WAIT) instead of failing them, so losing any one member
# changes nothing a client sees.
LEASE_TTL: Final = 3
HEARTBEAT_MS: Final = 50
ELECTION_MS: Final = 500
POLL: Final = 0.25  # s: the sites' coordinator.poll_interval in the lab
GROUP: Final = "lab"
HEALTH_TIMEOUT: Final = 30.0


def plan(prefix: str, lab_dir: Path, lab_id: str, addresses: list[str]) -> dict[str, Any]:
    """The members' records (shaped like the lab's sites) and the cluster's endpoints."""
    cluster = ",".join(f"{n}=http://{a}:{PEER_PORT}" for n, a in zip(MEMBERS, addresses,
                                                                       strict=True))
    members = []
    for name, addr in zip(MEMBERS, addresses, strict=True):
        d = lab_dir / name
        argv = ["etcd", "--name", name, "--data-dir", str(d / "data"),
                "--listen-client-urls", f"http://{addr}:{CLIENT_PORT}",
                "--advertise-client-urls", f"http://{addr}:{CLIENT_PORT}",
                "--listen-peer-urls", f"http://{addr}:{PEER_PORT}",
                "--initial-advertise-peer-urls", f"http://{addr}:{PEER_PORT}",
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"nbdgw-lab-{lab_id}",
                "--heartbeat-interval", str(HEARTBEAT_MS),
                "--election-timeout", str(ELECTION_MS),
                "--logger", "zap", "--log-outputs", "stderr"]
        members.append({"name": name, "role": "etcd", "netns": f"{prefix}-{name}",
                        "address": addr, "veth": f"v-{name}", "dir": str(d),
                        "procs": [{"name": "etcd", "log": str(d / "etcd.log"), "argv": argv,
                                   "pid": None, "start_time": None, "log_offset": 0}]})
    return {"members": members, "lease_ttl": LEASE_TTL, "group": GROUP,
            "endpoints": endpoints(members)}


def endpoints(members: list[dict[str, Any]]) -> list[str]:
    return [f"http://{m['address']}:{CLIENT_PORT}" for m in members]


def coordinator_config(etcd: dict[str, Any]) -> dict[str, Any]:
    """The ``coordinator:`` section of every site's config."""
    return {"kind": "etcd", "endpoints": list(etcd["endpoints"]),
            "lease_ttl": etcd["lease_ttl"], "poll_interval": POLL, "group": etcd["group"]}


def healthy(netns: str, endpoint: str) -> bool:
    try:
        run(["ip", "netns", "exec", netns, "etcdctl", "--endpoints", endpoint,
             "--command-timeout=2s", "endpoint", "health"], timeout=10)
    except CommandError:
        return False
    return True


def wait_healthy(member: dict[str, Any], alive: Any, tail: Any,
                 timeout: float = HEALTH_TIMEOUT) -> None:
    """Until ``member`` answers a linearizable read (it has a leader and a quorum)."""
    from .lab import LabError

    deadline = time.monotonic() + timeout
    endpoint = f"http://{member['address']}:{CLIENT_PORT}"
    p = member["procs"][0]
    while not healthy(member["netns"], endpoint):
        if not alive(p):
            raise LabError(f"etcd member {member['name']} exited; {p['log']}: "
                           f"{tail(Path(p['log']))}")
        if time.monotonic() > deadline:
            raise LabError(f"etcd member {member['name']} not healthy within {timeout:g} s; "
                           f"{p['log']}: {tail(Path(p['log']))}")
        time.sleep(0.2)


def leader(netns: str, eps: list[str]) -> str | None:
    """The client URL of the member that leads now (None: no leader, or no answer)."""
    _, out, _ = output(["ip", "netns", "exec", netns, "etcdctl", "--endpoints",
                        ",".join(eps), "--command-timeout=2s", "endpoint", "status",
                        "-w", "json"], timeout=10)
    try:
        rows = json.loads(out or "[]")
    except ValueError:
        return None
    for r in rows:
        st = r.get("Status", {})
        if st.get("leader") and st.get("header", {}).get("member_id") == st.get("leader"):
            return str(r.get("Endpoint"))
    return None
