"""Fan-in (issue 22): a data centre receives many groups on one peerlink port.

The witness shape of `nbdgw lab` with a config of groups in which no group has a
peerlink port of its own: g1 is primary on main, g2 primary on wit, and dc holds the
replica of both, on its shared port (peerlink.listen, 7700).  dc's groups parent runs
the front (peerlink/front.py) that routes each connection by its preamble to the
group's own peerlink process.

- both groups replicate through the one port to identical checksums;
- dc's g1 peerlink SIGSTOPped: g2 goes on replicating, reconnecting through the front
  included, while g1's connections are dropped; once continued, g1 catches up;
- a connection that sends garbage, nothing, or an unknown group is closed and counted;
- a preamble naming another group than the session's fails authentication in the
  receiver of the group it names.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import lab as lab_mod
from tests.integration.conftest import run_client
from tests.integration.test_groups import GroupsLab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (netns)")

SHARED = 7700
# group -> (primary, volume, ports: no peerlink of its own)
FANIN = {"g1": ("main", "v1", {"heartbeat": 7802, "nbd": 10811}),
         "g2": ("wit", "v2", {"heartbeat": 7812, "nbd": 10812})}
CATCH_UP_S = 90.0  # bound on a replica catching up on a loaded 2-core host

# Client in the lab: write blocks [start, start + n) stamped with a seed, flush, print
# JSON; retries the connection while the primary's nbdkit starts.
WRITE = r"""
import json, struct, sys, time, nbd
uri, seed, start, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
deadline = time.monotonic() + 60
while True:
    try:
        h = nbd.NBD(); h.connect_uri(uri); break
    except nbd.Error as e:
        if time.monotonic() > deadline:
            sys.exit(f"no answer: {e}")
        time.sleep(0.2)
for i in range(start, start + n):
    h.pwrite(struct.pack("<QQ", seed, i) * 256, i * 4096)
h.flush()
print(json.dumps({"wrote": n}))
"""

# Client in the lab: three strangers at dc's shared port (garbage, an unknown group,
# silence); how long until the front closed each.
STRANGERS = r"""
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
out = {}
for what, data in (("garbage", b"GET / HTTP/1.0\r\n\r\n"),
                   ("unknown_group", b"NBDGW-GROUP nope\n"), ("silent", b"")):
    s = socket.create_connection((host, port), 5)
    s.settimeout(15)
    t0 = time.monotonic()
    s.sendall(data)
    try:
        closed = s.recv(1) == b""
    except ConnectionResetError:
        closed = True
    out[what] = [closed, round(time.monotonic() - t0, 2)]
    s.close()
print(json.dumps(out))
"""

# Client in the lab: ``n`` connections routed to a group, one after the other (under
# the front's cap per source), closed at the end (a group whose peerlink takes none
# fills its handover queue).
FLOOD = r"""
import json, socket, sys, time
host, port, group, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
conns = []
for _ in range(n):
    conns.append(socket.create_connection((host, port), 5))
    conns[-1].sendall(f"NBDGW-GROUP {group}\n".encode())
    time.sleep(0.05)
time.sleep(1)
for c in conns:
    c.close()
print(json.dumps({"opened": n}))
"""

# Client in the lab: a sender of volume v2 proving a session for group g1 (its
# realm) while its preamble names g2: what the front trusts is only the preamble, so
# the connection reaches g2's receiver, which must refuse the proof.
LIAR = r"""
import asyncio, json, sys
from pathlib import Path
from blockstore.volume import create_volume
from peerlink import front, sender
from peerlink.__main__ import read_secret
data, host, port, secret = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
create_volume(data, "v2", 64 << 20)
sender.preamble = lambda group: front.preamble("g2")  # the lie: route to g2
tx = sender.Sender(data, "v2", node="main", peer="dc", host=host, port=port,
                   secret=read_secret(Path(secret)), route="g1")
async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(8, stop.set)
    await tx.run(stop)
asyncio.run(main())
print(json.dumps({"stats": tx.stats}))
"""


class FaninLab(GroupsLab):
    """GroupsLab's sites with FANIN's groups: dc the secondary of both, on one port."""

    def volumes(self) -> list[tuple[str, str, str, str]]:
        return [(g, p, "dc", v) for g, (p, v, _ports) in FANIN.items()]

    def config(self, node: dict[str, Any]) -> dict[str, Any]:
        return {"version": 1,
                "node": {"name": node["name"], "data_dir": node["data_dir"]},
                "peerlink": {"secret_file": node["secret"], "listen": f"0.0.0.0:{SHARED}"},
                "failover": {"auto": False},
                "sites": [{"name": n["name"], "address": n["address"]} for n in self.lab.nodes],
                "groups": [{"name": g, "primary": p, "secondary": "dc", "ports": ports,
                            "volumes": [{"name": v, "size": "64M"}]}
                           for g, (p, v, ports) in FANIN.items()]}

    def write(self, group: str, seed: int, start: int, n: int) -> None:
        primary, volume, ports = FANIN[group]
        uri = f"nbd://{self.lab.node(primary)['address']}:{ports['nbd']}/{volume}"
        assert run_client(self.summary, WRITE, uri, str(seed), str(start), str(n)) == {
            "wrote": n}

    def sums(self, group: str) -> tuple[str, str]:
        primary, volume, _ports = FANIN[group]
        return tuple(self.nbdgw(site, "--group", group, "volume", "checksum", volume
                                ).stdout.split()[0] for site in (primary, "dc"))  # type: ignore[return-value]

    def wait_identical(self, group: str, timeout: float = CATCH_UP_S) -> float:
        """Seconds until ``group``'s replica on dc has the primary's checksum."""
        t0 = time.monotonic()
        while (sums := self.sums(group))[0] != sums[1]:
            assert time.monotonic() - t0 < timeout, f"{group}: {sums} after {timeout:g} s"
            time.sleep(0.5)
        return time.monotonic() - t0

    def events(self, site: str, event: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log(site).splitlines():
            if f'"{event}"' in line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def replicate_pid(self, site: str, group: str) -> int:
        """The pid of ``group``'s peerlink process on ``site``."""
        want = [b"--group", group.encode(), b"replicate"]
        for pid in lab_mod.netns_pids(self.lab.node(site)["netns"]):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(w in argv for w in want):
                return pid
        raise AssertionError(f"no peerlink process of {group} on {site}")


@pytest.fixture(scope="module")
def flab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaninLab]:
    lab_dir = tmp_path_factory.mktemp("fanin") / "lab"
    lab_dir.mkdir()
    fl = FaninLab(lab_dir)
    try:
        fl.up()
        yield fl
    finally:
        lab_mod.down(lab_dir)


def test_two_groups_replicate_to_one_node_through_one_port(flab: FaninLab) -> None:
    for g in FANIN:
        flab.write(g, seed=1, start=0, n=512)
    for g in FANIN:
        flab.wait_identical(g)
    listening = flab.events("dc", "front_listening")
    assert listening and listening[0]["address"] == f"0.0.0.0:{SHARED}", listening
    assert {e["group"] for e in flab.events("dc", "front_handed")} == {"g1", "g2"}
    # the groups' own peerlink processes listen on no port: all came through the front
    assert not [e for e in flab.events("dc", "listening") if e.get("component") == "peerlink"]


def test_a_stopped_group_does_not_stall_the_front_or_the_other_group(flab: FaninLab) -> None:
    pid = flab.replicate_pid("dc", "g1")
    os.kill(pid, signal.SIGSTOP)
    try:
        # g1's handover queue full: the front drops what g1 cannot take, waits for nothing
        dc = flab.lab.node("dc")["address"]
        run_client(flab.summary, FLOOD, dc, str(SHARED), "g1", "40", timeout=60)
        busy = [e for e in flab.events("dc", "front_dropped") if e["why"] == "group_busy"]
        assert busy and {e["group"] for e in busy} == {"g1"}, busy
        # g2 reconnects through the front while g1's process takes nothing
        handed = len(flab.events("dc", "front_handed"))
        flab.nbdgw("wit", "--group", "g2", "peer", "disconnect", "dc")
        flab.nbdgw("wit", "--group", "g2", "peer", "connect", "dc")
        flab.write("g1", seed=2, start=512, n=256)
        flab.write("g2", seed=2, start=512, n=256)
        took = flab.wait_identical("g2")
        assert len(flab.events("dc", "front_handed")) > handed
        main, dc = flab.sums("g1")
        assert main != dc, "g1's replica caught up while its peerlink was stopped"
    finally:
        os.kill(pid, signal.SIGCONT)
    print(f"g2 caught up in {took:.1f} s with dc's g1 peerlink stopped")
    flab.wait_identical("g1")


def test_garbage_silence_and_unknown_groups_are_dropped_and_counted(flab: FaninLab) -> None:
    dc = flab.lab.node("dc")["address"]
    got = run_client(flab.summary, STRANGERS, dc, str(SHARED), timeout=60)
    assert got["garbage"][0] and got["garbage"][1] < 3, got
    assert got["unknown_group"][0] and got["unknown_group"][1] < 3, got
    assert got["silent"][0] and 4 <= got["silent"][1] < 10, got  # the 5 s deadline
    dropped = {e["why"]: e["count"] for e in flab.events("dc", "front_dropped")}
    assert {"garbage", "unknown_group", "silent"} <= set(dropped), dropped
    # the groups replicate on
    flab.write("g2", seed=3, start=0, n=64)
    flab.wait_identical("g2")


def test_a_preamble_naming_another_group_fails_authentication(
        flab: FaninLab, tmp_path: Path) -> None:
    dc = flab.lab.node("dc")
    run_client(flab.summary, LIAR, str(tmp_path / "liar"), dc["address"], str(SHARED),
               dc["secret"], timeout=60)
    refused = [e for e in flab.events("dc", "peer_refused_by_us")
               if e.get("group") == "g2" and e.get("volume") == "v2"]
    assert refused, "g2's receiver did not refuse the session proved for g1"
    assert all("peer authentication failed" in e["reason"] for e in refused), refused
    # g2's own link is untouched
    flab.write("g2", seed=4, start=64, n=64)
    flab.wait_identical("g2")
