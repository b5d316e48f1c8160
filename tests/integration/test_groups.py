"""Volume groups in the lab (issue 22): two data sites and a witness for two groups.

The witness shape of `nbdgw lab` (sites main, dc and wit, each in its network namespace
on one bridge, a client namespace) with configs of groups instead: g1 is primary on main
(A) with its secondary dc (B), g2 primary on dc with its secondary main, wit the witness
of both.  Each site runs `nbdgw daemon` (wit: `nbdgw witness`), the parent that runs one
daemon per group; each group has its own ports and service address.  Clients write
through NBD to both groups at once.

- a group's daemon killed: the parent restarts it; the other group's never notices.
- wit powered off: neither group moves and neither client sees an error.
- main powered off: g1 fails over to dc within the lab's bounds with every flushed write
  (g1 replicates synchronously), while g2's client, writing to dc the whole time, sees
  no error and no pause past a bound (g2 is async: its writes wait for nobody); main
  back: it rejoins g1 as a replica of dc and follows dc in g2, each group's volume is
  bit-identical on both sites, and `nbdgw --group g1 switchover --to main` gives g1
  back to main while g2 stays on dc.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import queue
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import lab as lab_mod
from tests.conftest import run_nbdgw
from tests.integration.conftest import CHECKER, STAMPER, client
from tests.statusschema import SCHEMA, check

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (netns)")

SIZE = 64 << 20
BLOCKS = SIZE // 4096
# group -> (primary, secondary, volume, ports, the host index of its service address)
GROUPS = {"g1": ("main", "dc", "v1", {"peerlink": 7801, "heartbeat": 7802, "nbd": 10811}, 8),
          "g2": ("dc", "main", "v2", {"peerlink": 7811, "heartbeat": 7812, "nbd": 10812}, 9)}
FORMED = {"g1": {"main": "primary", "dc": "standby", "wit": "witness"},
          "g2": {"dc": "primary", "main": "standby", "wit": "witness"}}
MAX_GAP_S = 3.0  # the longest pause g2's client may see while main is cut (async: none)
# Failover timers: a longer timeout than the default 2 s.  While main is cut, g2's
# primary dc is backed by the witness alone, and its write lease lasts 0.95 x timeout
# from the send time of its last beat the witness echoed; on this shared 2-core host
# (load average 10 from other labs) a daemon can stall for over a second, and with 2 s
# g2's lease lapsed in 2 of 8 runs (its client got ESHUTDOWN, as designed: a write fails
# rather than risk two writers).  The test is about groups, not lease margins.
FAILOVER = {"interval": 0.5, "timeout": 4.0, "fence_margin": 1.0}
GROUP_TIMEOUT = FAILOVER["timeout"] + FAILOVER["fence_margin"]


class GroupsLab:
    """The lab's witness shape (gateway/lab.py: namespaces, bridge, processes, power
    cuts) with a config of groups on every site."""

    def __init__(self, lab_dir: Path) -> None:
        self.dir = lab_dir
        self.lab = lab_mod.Lab(lab_dir, lab_mod.plan(lab_dir, lab_mod.DEFAULT_SUBNET, "64M",
                                                     shape=lab_mod.WITNESS))
        hosts = list(ipaddress.ip_network(self.lab.state["subnet"]).hosts())
        self.vip = {g: str(hosts[spec[4]]) for g, spec in GROUPS.items()}
        self.summary = self.lab.summary()

    def up(self) -> None:
        self.lab.save()
        lab_mod.build_network(self.lab.state)
        secret = secrets.token_hex(32).encode()
        for node in self.lab.nodes:
            Path(node["data_dir"]).mkdir(parents=True)
            fd = os.open(node["secret"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
            Path(node["config"]).write_text(yaml.safe_dump(self.config(node)))
        for g, primary, secondary, volume in self.volumes():
            self.nbdgw(primary, "--group", g, "volume", "create", volume)
            self.nbdgw(secondary, "--group", g, "volume", "create", volume, "--replica")
        for name in ("dc", "wit", "main"):
            self.lab.start_node(name)
        self.lab.state["state"] = "up"
        self.lab.save()

    def volumes(self) -> list[tuple[str, str, str, str]]:
        """(group, primary, secondary, volume) of each group's one volume."""
        return [(g, p, s, v) for g, (p, s, v, _ports, _vip) in GROUPS.items()]

    def config(self, node: dict[str, Any]) -> dict[str, Any]:
        prefix = self.lab.state["prefixlen"]
        groups = []
        for g, (primary, secondary, volume, ports, _vip) in GROUPS.items():
            # g1's pair replicates synchronously (flushed writes survive the power cut);
            # g2's asynchronously (its writes never wait for the site that is cut).
            mode = "sync" if g == "g1" else "async"
            groups.append({
                "name": g, "primary": primary, "secondary": secondary, "witness": "wit",
                "replicas": [{"site": primary, "mode": mode}, {"site": secondary, "mode": mode}],
                "ports": ports,
                "service": {"address": f"{self.vip[g]}/{prefix}", "interface": "eth0"},
                "volumes": [{"name": volume, "size": "64M"}]})
        return {"version": 1,
                "node": {"name": node["name"], "data_dir": node["data_dir"]},
                "peerlink": {"secret_file": node["secret"]},
                "failover": FAILOVER,
                "sites": [{"name": n["name"], "address": n["address"]} for n in self.lab.nodes],
                "groups": groups}

    def nbdgw(self, site: str, *args: str, check: bool = True
              ) -> subprocess.CompletedProcess[str]:
        return run_nbdgw("-c", self.lab.node(site)["config"], *args, check=check, timeout=60)

    def state(self, group: str, site: str) -> dict[str, Any]:
        """What the site's daemon of ``group`` last published ({} if nothing)."""
        path = Path(self.lab.node(site)["data_dir"]) / "groups" / group / "run" / "failover.json"
        try:
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return {}

    def states(self) -> dict[str, dict[str, str]]:
        return {g: {s: str(self.state(g, s).get("state", "?")) for s in ("main", "dc", "wit")}
                for g in GROUPS}

    def wait_states(self, want: dict[str, dict[str, str]], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            now = self.states()
            if all(now[g][s] == st for g, sites in want.items() for s, st in sites.items()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"states {now}, wanted {want}")
            time.sleep(0.2)

    def wait_heard(self, site: str, since: float, timeout: float = 30) -> None:
        """Until each group's daemon on ``site`` has published (after ``since``, a
        time.time()) that it hears every other site of the group that runs: a restarted
        site is back in its groups, not only its last run's files left behind."""
        deadline = time.monotonic() + timeout
        for g in GROUPS:
            want = {s for s in ("main", "dc", "wit") if s != site and any(
                lab_mod.alive(p) for p in self.lab.node(s)["procs"])}
            while True:
                st = self.state(g, site)
                if st.get("updated", 0) > since and set(st.get("peers", {})) >= want:
                    break
                assert time.monotonic() < deadline, (g, site, st)
                time.sleep(0.2)

    def restart(self, site: str) -> None:
        since = time.time()
        self.lab = lab_mod.Lab.load(self.dir)
        self.lab.start_node(site)
        self.wait_heard(site, since)

    def uri(self, group: str) -> str:
        _p, _s, volume, ports, _v = GROUPS[group]
        return f"nbd://{self.vip[group]}:{ports['nbd']}/{volume}"

    def writer(self, group: str) -> Writer:
        return Writer(client(self.summary, STAMPER, self.uri(group)))

    def checksum(self, group: str, site: str) -> str:
        volume = GROUPS[group][2]
        return self.nbdgw(site, "--group", group, "volume", "checksum", volume
                          ).stdout.split()[0]

    def log(self, site: str) -> str:
        return (Path(self.lab.node(site)["dir"]) / "daemon.log").read_text(errors="replace")


class Writer:
    """STAMPER in the client namespace; its lines, with the time each arrived."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.seen: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line.strip()))

    def drain(self) -> list[tuple[float, str]]:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.seen

    def flushed(self) -> int:
        done = [int(x.split()[1]) for _, x in self.drain() if x.startswith("flushed ")]
        return done[-1] if done else 0

    def errors(self) -> list[str]:
        """Errors other than the end of the volume (STAMPER stops with ENOSPC there)."""
        return [x for _, x in self.drain() if x.startswith("error")
                and self.flushed() < BLOCKS - 8]

    def wait_flushed(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.flushed() < n:
            assert not self.errors(), self.errors()
            assert time.monotonic() < deadline, f"flushed {self.flushed()} of {n}"
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def glab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GroupsLab]:
    lab_dir = tmp_path_factory.mktemp("groups") / "lab"
    lab_dir.mkdir()
    gl = GroupsLab(lab_dir)
    try:
        since = time.time()
        gl.up()
        gl.wait_states(FORMED, 60)
        for site in ("main", "dc", "wit"):
            gl.wait_heard(site, since)
        yield gl
    finally:
        lab_mod.down(lab_dir)


def test_each_site_runs_one_daemon_per_group_from_this_tree(glab: GroupsLab) -> None:
    """The parent logged the groups it runs, with this node's role in each (its code,
    not an installed copy's); each group's daemon says its group in its log lines; the
    witness holds no volume of either group; `status` on dc shows both groups."""
    starts = [json.loads(x) for x in glab.log("wit").splitlines()
              if '"groups_starting"' in x]
    assert starts and starts[0]["groups"] == {"g1": "witness", "g2": "witness"}, starts
    main = [json.loads(x) for x in glab.log("main").splitlines() if '"groups_starting"' in x]
    assert main[0]["groups"] == {"g1": "primary", "g2": "secondary"}
    booted = [json.loads(x) for x in glab.log("main").splitlines() if '"daemon_starting"' in x]
    assert sorted((x["group"], x["role"]) for x in booted) == [("g1", "primary"),
                                                               ("g2", "secondary")]
    wit = Path(glab.lab.node("wit")["data_dir"]) / "groups"
    assert sorted(p.name for p in wit.iterdir()) == ["g1", "g2"]
    assert not any((wit / g / "volumes").exists() for g in GROUPS)
    report = json.loads(glab.nbdgw("dc", "status", "--json").stdout)
    assert [(r["group"], r["status"]["role"]["effective"],
             [v["name"] for v in r["status"]["volumes"]]) for r in report] == [
        ("g1", "secondary", ["v1"]), ("g2", "primary", ["v2"])]
    for r in report:
        check(r["status"], SCHEMA)


def group_pids(glab: GroupsLab, site: str) -> dict[str, int]:
    """The pid of each group's daemon on ``site`` (`nbdgw --group G daemon|witness`)."""
    out = {}
    for pid in lab_mod.netns_pids(glab.lab.node(site)["netns"]):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--group" in argv and argv[-2] in (b"daemon", b"witness"):
            out[argv[argv.index(b"--group") + 1].decode()] = pid
    return out


def test_a_groups_daemon_that_dies_is_restarted_and_the_other_group_never_notices(
        glab: GroupsLab) -> None:
    """kill -9 of the witness's g1 daemon: the parent starts it again (backoff 0.5 s);
    g2's witness daemon keeps its pid, and no group changes state."""
    before = group_pids(glab, "wit")
    assert sorted(before) == ["g1", "g2"], before
    killed = time.time()
    os.kill(before["g1"], 9)
    deadline = time.monotonic() + 15
    while (now := group_pids(glab, "wit")).get("g1") in (None, before["g1"]):
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    assert now["g2"] == before["g2"]
    restarted = [json.loads(x) for x in glab.log("wit").splitlines()
                 if '"child_started"' in x and '"group g1"' in x]
    assert [x["restarts"] for x in restarted] == [0, 1], restarted
    glab.wait_heard("wit", killed)
    glab.wait_states(FORMED, 15)
    transitions = {s: glab.log(s).count('"failover_transition"') for s in ("main", "dc")}
    assert transitions == {"main": 1, "dc": 1}  # each its one primary's boot, no more


def test_the_shared_witness_down_moves_nothing_in_either_group(glab: GroupsLab) -> None:
    writers = {g: glab.writer(g) for g in GROUPS}
    try:
        for w in writers.values():
            w.wait_flushed(40, 60)
        lab_mod.kill(glab.dir, "wit")
        before = {g: w.flushed() for g, w in writers.items()}
        deadline = time.monotonic() + 3 * GROUP_TIMEOUT
        while time.monotonic() < deadline:
            now = glab.states()
            assert (now["g1"]["main"], now["g2"]["dc"]) == ("primary", "primary"), now
            for w in writers.values():
                assert not w.errors(), w.errors()
            time.sleep(0.2)
        for g, w in writers.items():  # both kept writing (or reached the volume's end)
            assert w.flushed() > before[g] or w.flushed() >= BLOCKS - 8, (g, before)
    finally:
        for w in writers.values():
            w.stop()
    glab.restart("wit")
    glab.wait_states(FORMED, 30)
    transitions = {s: glab.log(s).count('"failover_transition"') for s in ("main", "dc")}
    assert transitions == {"main": 1, "dc": 1}  # each its one primary's boot, no more


def test_power_cut_of_main_fails_over_g1_only_and_main_rejoins(glab: GroupsLab) -> None:
    writers = {g: glab.writer(g) for g in GROUPS}
    try:
        writers["g1"].wait_flushed(200, 60)
        writers["g2"].wait_flushed(40, 60)
        t0 = float(lab_mod.kill(glab.dir, "main")["at"])
        cut = time.monotonic()
        writers["g1"].proc.wait(30)  # its server vanished
        flushed = writers["g1"].flushed()
        # reads g1 back through its service address as soon as dc serves it
        checker = client(glab.summary, CHECKER, glab.uri("g1"), str(flushed), str(t0))
        # meanwhile g2's client writes to dc throughout: no error, no pause past MAX_GAP_S
        deadline = cut + 2 * GROUP_TIMEOUT + 5
        while time.monotonic() < deadline:
            assert glab.states()["g2"]["dc"] == "primary", glab.states()
            assert not writers["g2"].errors(), writers["g2"].errors()
            time.sleep(0.2)
        times = [t for t, x in writers["g2"].drain()
                 if t >= cut - 1 and x.startswith("flushed ")]
        gap = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
        reached_end = writers["g2"].flushed() >= BLOCKS - 8
        assert gap < MAX_GAP_S or reached_end, gap
        assert len(times) > 10 or reached_end, times
        glab.wait_states({"g1": {"dc": "primary"}}, 15)
        out, err = checker.communicate(timeout=90)
        assert checker.returncode == 0, err
        result = json.loads(out)
        assert result["bad"] == [], result
        # test_witness's bound (15 s for timeout + fence_margin = 3 s), with our 2 s more
        assert result["first_read_s"] < 15 + GROUP_TIMEOUT - 3.0, result
        print(f"groups: g1 failed over, first read {result['first_read_s']} s after the "
              f"power cut, {flushed} flushed blocks intact; g2's longest pause "
              f"{gap:.2f} s while main was cut")
    finally:
        for w in writers.values():
            w.stop()
    glab.restart("main")
    glab.wait_states({"g1": {"main": "standby", "dc": "primary", "wit": "witness"},
                      "g2": {"main": "standby", "dc": "primary", "wit": "witness"}}, 30)
    assert glab.state("g1", "main")["primary"] == "dc"
    assert glab.state("g1", "main")["epoch"] == 1 and glab.state("g2", "main")["epoch"] == 0
    for g in GROUPS:  # each group's replica bit-identical to its primary's volume
        deadline = time.monotonic() + 90
        while (sums := {s: glab.checksum(g, s) for s in ("main", "dc")})["main"] != sums["dc"]:
            assert time.monotonic() < deadline, (g, sums)
            time.sleep(1)
    # main gets g1 back by a planned switchover, an admin command of one group (--group)
    # (asked again while main is still outdated or its link not yet streaming: a rejoined
    # node that has just finished its resync; the refusal is right, the retry bounded)
    deadline = time.monotonic() + 30
    while True:
        sw = glab.nbdgw("dc", "--group", "g1", "switchover", "--to", "main", check=False)
        if sw.returncode == 0:
            break
        assert ("is not streaming every volume" in sw.stderr
                or "main is outdated" in sw.stderr), sw.stderr
        assert time.monotonic() < deadline, sw.stderr
        time.sleep(0.5)
    assert sw.stdout.startswith("switched over from dc to main"), sw.stdout
    glab.wait_states({"g1": {"main": "primary", "dc": "standby"},
                      "g2": {"dc": "primary", "main": "standby"}}, 30)
    assert glab.state("g2", "dc")["epoch"] == 0  # g2 never moved
