"""The fan-in shape of volume groups (`nbdgw lab up --branches 3`): three branch sites,
each in its own subnet and primary of its own group, one data centre ``dc`` holding the
replicas of all three, ``dr`` fed by dc (cascade), clients in a fourth subnet that find
each group's primary by its DNS name only.

- three branches write at once: every group's replicas equal its primary, bit for bit;
- a power cut of one branch moves only its group: the other groups' writers see no
  error meanwhile, the group's clients follow its name to dc and find their data; the
  branch returns as a replica and gets its role back by a switchover;
- the data centre fails: every branch keeps serving (dr still votes) and dc catches up
  when it returns.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_nbdgw

from .conftest import client, lab_cmd, run_client

pytestmark = pytest.mark.root

BLOCK = 4096

# Resolve the group's name on every try (no cache), connect, check the blocks [0, n)
# written so far, write block n; until ``limit`` seconds.  Prints one JSON line.
FOLLOW = r"""
import json, socket, struct, sys, time
import nbd
name, port, export, want = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
n, limit = int(sys.argv[5]), float(sys.argv[6])
t0 = time.monotonic(); err = ""; seen = None
while time.monotonic() - t0 < limit:
    try:
        seen = socket.gethostbyname(name)
    except OSError as e:
        err = f"resolve: {e}"; time.sleep(0.2); continue
    if want and seen != want:
        err = f"{name} is {seen}"; time.sleep(0.2); continue
    h = nbd.NBD()
    try:
        h.connect_uri(f"nbd://{name}:{port}/{export}")
        bad = [i for i in range(n) if h.pread(4096, i * 4096) != struct.pack("<Q", i) * 512]
        h.pwrite(struct.pack("<Q", n) * 512, n * 4096)
        h.flush()
        h.shutdown()
        print(json.dumps({"address": seen, "bad": bad, "seconds": time.monotonic() - t0}))
        sys.exit(0)
    except nbd.Error as e:
        err = f"nbd: {e}"; time.sleep(0.2)
print(json.dumps({"address": seen, "error": err, "seconds": time.monotonic() - t0}))
"""

# One connection by name, writing and flushing block after block (from ``first``) until
# stdin closes; every failed request is counted.  Prints one JSON line at the end.
STEADY = r"""
import json, select, struct, sys, time
import nbd
uri, first = sys.argv[1], int(sys.argv[2])
h = nbd.NBD(); h.connect_uri(uri)
i, errors, worst, last = first, [], 0.0, time.monotonic()
print("writing", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    try:
        h.pwrite(struct.pack("<Q", i) * 512, (i % 4096) * 4096); h.flush()
        now = time.monotonic(); worst = max(worst, now - last); last = now
        i += 1
    except nbd.Error as e:
        errors.append(str(e)); time.sleep(0.1)
    time.sleep(0.01)
print(json.dumps({"written": i - first, "errors": errors, "longest_gap_s": round(worst, 3)}))
"""


def up_branches(tmp_path: Path, *extra: str) -> dict[str, Any]:
    p = run_nbdgw("lab", "up", "--dir", str(tmp_path / "lab"), "--size", "32M",
                  "--branches", "3", *extra, check=False, timeout=240)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def group(lab: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(next(g for g in lab["groups"] if g["name"] == name))


def site(lab: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(next(n for n in lab["nodes"] if n["name"] == name))


def follow(lab: dict[str, Any], g: dict[str, Any], want: str, n: int, limit: float = 60
           ) -> dict[str, Any]:
    out = run_client(lab, FOLLOW, g["dns_name"], str(g["ports"]["nbd"]), g["volume"], want,
                     str(n), str(limit), timeout=limit + 30)
    assert "error" not in out, out
    assert out["bad"] == [], out
    return out


def checksum(lab: dict[str, Any], at: str, g: dict[str, Any]) -> str:
    out = run_nbdgw("-c", site(lab, at)["config"], "--group", g["name"], "volume",
                    "checksum", g["volume"]).stdout
    return out.split()[0]


def converge_group(lab: dict[str, Any], g: dict[str, Any], timeout: float = 90) -> str:
    """Until the group's volume has one checksum on every data site of it."""
    sites = [g["primary"], g["secondary"], *([g["dr"]] if "dr" in g else [])]
    deadline = time.monotonic() + timeout
    while True:
        sums = {s: checksum(lab, s, g) for s in sites}
        if len(set(sums.values())) == 1:
            return next(iter(sums.values()))
        assert time.monotonic() < deadline, f"group {g['name']}: replicas differ: {sums}"
        time.sleep(1)


def group_state(lab: dict[str, Any], at: str, g: dict[str, Any]) -> str:
    path = Path(site(lab, at)["data_dir"]) / "groups" / g["name"] / "run" / "failover.json"
    try:
        return str(json.loads(path.read_text()).get("state"))
    except (OSError, ValueError):
        return "?"


def wait_group_state(lab: dict[str, Any], g: dict[str, Any], want: dict[str, str],
                     timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        now = {s: group_state(lab, s, g) for s in want}
        if now == want:
            return
        assert time.monotonic() < deadline, f"group {g['name']}: {now}, wanted {want}"
        time.sleep(0.2)


class Steady:
    """STEADY writing to one group by its name, from the clients' subnet."""

    def __init__(self, lab: dict[str, Any], g: dict[str, Any], first: int) -> None:
        uri = f"nbd://{g['dns_name']}:{g['ports']['nbd']}/{g['volume']}"
        self.p: subprocess.Popen[str] = client(lab, STEADY, uri, str(first),
                                               stdin=subprocess.PIPE)
        assert self.p.stdout is not None
        line = self.p.stdout.readline().strip()
        assert line == "writing", (line, self.p.stderr.read() if self.p.stderr else "")

    def finish(self) -> dict[str, Any]:
        out, err = self.p.communicate("stop\n", timeout=60)
        assert self.p.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_three_branches_write_at_once_and_every_replica_is_identical(
        tmp_path: Path, lab_dir: Path) -> None:
    lab = up_branches(tmp_path)
    assert [g["name"] for g in lab["groups"]] == ["b1", "b2", "b3"]
    assert len(set(lab["subnets"].values())) == 5  # core, three branches, clients
    # Distinct first values: two writers that wrote as many blocks from the same start
    # would leave identical volumes (CI saw b1 == b3 once).
    writers = [Steady(lab, g, k << 40) for k, g in enumerate(lab["groups"], 1)]
    time.sleep(5)
    results = [w.finish() for w in writers]
    for g, r in zip(lab["groups"], results, strict=True):
        assert r["errors"] == [] and r["written"] > 10, (g["name"], r)
    sums = {g["name"]: converge_group(lab, g) for g in lab["groups"]}
    assert len(set(sums.values())) == 3, sums  # three groups, three different volumes


def test_a_power_cut_of_one_branch_moves_only_its_group(tmp_path: Path,
                                                        lab_dir: Path) -> None:
    lab = up_branches(tmp_path)
    b1, b2, b3 = (group(lab, n) for n in ("b1", "b2", "b3"))
    for i in range(3):
        follow(lab, b1, site(lab, "branch1")["address"], i)
    converge_group(lab, b1)
    others = [Steady(lab, b2, 0), Steady(lab, b3, 0)]

    lab_cmd("kill", "branch1", "--dir", str(lab_dir))
    t0 = time.monotonic()
    out = follow(lab, b1, site(lab, "dc")["address"], 3)
    took = time.monotonic() - t0
    assert took < 30 + lab["dns"]["ttl"], out
    wait_group_state(lab, b1, {"dc": "primary"}, 10)
    for w, g in zip(others, (b2, b3), strict=True):
        r = w.finish()
        assert r["errors"] == [], (g["name"], r)  # the other groups never noticed
        assert r["longest_gap_s"] < 5, (g["name"], r)
    for g in (b2, b3):
        assert group_state(lab, g["primary"], g) == "primary"
        assert group_state(lab, "dc", g) != "primary"

    # branch1 returns: a replica of its group now; a switchover gives its role back.
    lab_cmd("start", "branch1", "--dir", str(lab_dir))
    converge_group(lab, b1)
    deadline = time.monotonic() + 60
    while True:
        sw = run_nbdgw("-c", site(lab, "dc")["config"], "--group", "b1", "switchover",
                       "--to", "branch1", check=False, timeout=180)
        if sw.returncode == 0:
            break
        assert ("is not streaming every volume" in sw.stderr
                or "branch1 is outdated" in sw.stderr), sw.stderr
        assert time.monotonic() < deadline, sw.stderr
        time.sleep(0.5)
    wait_group_state(lab, b1, {"branch1": "primary"}, 60)
    follow(lab, b1, site(lab, "branch1")["address"], 4)
    for g in (b1, b2, b3):
        converge_group(lab, g)
    print(json.dumps({"b1_client_failover_s": round(took, 2)}))


def test_the_data_centre_fails_and_every_branch_keeps_serving(tmp_path: Path,
                                                              lab_dir: Path) -> None:
    lab = up_branches(tmp_path)
    writers = [Steady(lab, g, 0) for g in lab["groups"]]
    lab_cmd("kill", "dc", "--dir", str(lab_dir))
    time.sleep(8)  # longer than the failover timeout: nothing may move
    for g, w in zip(lab["groups"], writers, strict=True):
        r = w.finish()
        assert r["errors"] == [] and r["written"] > 10, (g["name"], r)
        assert group_state(lab, g["primary"], g) == "primary"
    lab_cmd("start", "dc", "--dir", str(lab_dir))
    for g in lab["groups"]:
        converge_group(lab, g)
