"""Contract 5 in the three-site lab: the old primary rejoins after a failover (its
unshipped writes kept as a diverged snapshot, only differing extents resynced), a planned
switchover under load brings service home with no acknowledged write lost, the DR site is
promoted and the main site returns to it, and a forced split brain is detected and
resolved.  Every path ends with the same volume checksum on every node."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from blockstore.volume import Volume
from tests.conftest import run_nbdgw
from tests.integration.conftest import (
    TIMEOUT,
    addr,
    cfg,
    client,
    converge,
    events,
    in_ns,
    lab_cmd,
    one_primary,
    run_client,
    run_cmd,
    states,
    switchover,
    up,
    uri,
    wait_states,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (netns)")

MiB = 1 << 20

# Writes ``count`` blocks of 4 KiB at ``first`` (block numbers), each stamped with its
# number and the tag, flushing every 4.  Reconnects when the server goes away (a
# switchover) and retries the write that got no answer; an error *answer* from a live
# server is recorded.  Prints one JSON line: errors, reconnects, the longest pause.
WRITER = r"""
import json, struct, sys, time, nbd
uri, first, count, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def connect():
    deadline = time.monotonic() + 60
    while True:
        try:
            h = nbd.NBD(); h.connect_uri(uri); return h
        except nbd.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
h = connect(); errors = []; reconnects = 0; pause = 0.0; last = time.monotonic(); i = 0
while i < count:
    b = first + i
    try:
        h.pwrite((struct.pack("<Q", b) + tag.encode().ljust(8, b"-")) * 256, b * 4096)
        if i % 4 == 3:
            h.flush()
        i += 1
        now = time.monotonic(); pause = max(pause, now - last); last = now
        time.sleep(0.002)
    except nbd.Error as e:
        if h.aio_is_dead() or h.aio_is_closed():
            reconnects += 1; h = connect()
        else:
            errors.append(str(e)); i += 1
h.flush()
print(json.dumps({"errors": errors, "reconnects": reconnects, "max_pause_s": round(pause, 3)}))
"""

# Reads blocks and reports those whose stamp is not ``first + i`` with the tag.
READER = r"""
import json, struct, sys, nbd
uri, first, count, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
h = nbd.NBD(); h.connect_uri(uri)
bad = [first + i for i in range(count)
       if h.pread(4096, (first + i) * 4096) !=
       (struct.pack("<Q", first + i) + tag.encode().ljust(8, b"-")) * 256]
print(json.dumps({"bad": bad[:10], "nbad": len(bad)}))
"""


def data_dir(lab: dict[str, Any], node: str) -> Path:
    return Path(next(n["data_dir"] for n in lab["nodes"] if n["name"] == node))


def peerlink_pid(lab: dict[str, Any], node: str) -> int:
    ns = next(n["netns"] for n in lab["nodes"] if n["name"] == node)
    for pid in run_cmd(["ip", "netns", "pids", ns]).split():
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"replicate" in argv:
                return int(pid)
    raise AssertionError(f"no peerlink process in {ns}")


def stamp(lab: dict[str, Any], first: int, count: int, tag: str, host: str | None = None
          ) -> dict[str, Any]:
    r = run_client(lab, WRITER, uri(lab, host=host), str(first), str(count), tag)
    assert r["errors"] == [], r
    return r


def check(lab: dict[str, Any], first: int, count: int, tag: str, export: str = "v1",
          host: str | None = None) -> int:
    return int(run_client(lab, READER, uri(lab, export, host), str(first), str(count),
                          tag)["nbad"])


def test_rejoin_after_failover_then_switchover_home_under_load(lab_dir: Path) -> None:
    lab = up(lab_dir.parent)
    stamp(lab, 0, 64, "base")
    time.sleep(1)  # async: let the base reach both replicas
    # main's replication stalls (heartbeats still flow), then it takes writes that never
    # leave it, and loses power: the tail an async link had not shipped.
    os.kill(peerlink_pid(lab, "main"), signal.SIGSTOP)
    diverged = 32 * MiB // 4096
    stamp(lab, diverged, 16, "lost")
    lab_cmd("kill", "main", "--dir", str(lab_dir))
    wait_states(lab, {"dc": "primary"}, 20)
    newer = 48 * MiB // 4096
    stamp(lab, newer, 16, "new")  # through the service address, now on dc
    lab_cmd("start", "main", "--dir", str(lab_dir))
    wait_states(lab, {"main": "standby"}, 30)
    assert one_primary(lab) == "dc"
    converge(lab)
    rejoined = events(lab_dir, "main", "rejoined")
    assert len(rejoined) == 1, rejoined
    snap = rejoined[0]["diverged_snapshots"]["v1"]
    assert snap.startswith("diverged-")
    compared = events(lab_dir, "dc", "compare_done")
    assert compared, "dc never compared digests with the rejoining nodes"
    # Only what changed moves: the 64 KiB of lost writes and the 64 KiB written on dc,
    # in 64 KiB extents, out of a 64 MiB volume (1024 extents).
    assert max(e["differing"] for e in compared) <= 2, compared
    assert check(lab, 0, 64, "base") == 0
    assert check(lab, newer, 16, "new") == 0
    assert check(lab, diverged, 16, "lost") == 16  # not in the live volume

    # Planned switchover back to main while a client writes: no error, a pause.
    writer = client(lab, WRITER, uri(lab), str(2048), "600", "load")
    time.sleep(1.0)
    sw = switchover(lab, "dc", "main")
    assert "switched over from dc to main" in sw, sw
    out, err = writer.communicate(timeout=180)
    assert writer.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    print(f"switchover under load: {sw.strip()}; client saw {result}")
    assert result["errors"] == [], result
    assert result["max_pause_s"] < 20, result
    wait_states(lab, {"main": "primary", "dc": "standby"}, 30)
    assert check(lab, 2048, 600, "load") == 0
    converge(lab)
    # The writes main took before the power cut are readable from its snapshot, served
    # like any snapshot now that main serves again.
    assert check(lab, diverged, 16, "lost", export=f"v1@{snap}") == 0
    audit = run_nbdgw("-c", cfg(lab, "dc"), "audit", "--json").stdout.splitlines()
    assert [json.loads(x)["action"] for x in audit
            if json.loads(x)["action"] != "volume create"] == ["switchover"]


def test_dr_promotion_and_return_of_the_main_site(lab_dir: Path) -> None:
    lab = up(lab_dir.parent)
    stamp(lab, 0, 64, "base")
    time.sleep(1.5)
    lab_cmd("kill", "main", "--dir", str(lab_dir))
    lab_cmd("kill", "dc", "--dir", str(lab_dir))
    time.sleep(TIMEOUT)
    done = run_nbdgw("-c", cfg(lab, "dr"), "promote", "--site", "dr", check=False)
    assert done.returncode == 0, done.stderr
    wait_states(lab, {"dr": "primary"}, 10)
    stamp(lab, 4096, 32, "at-dr")
    lab_cmd("start", "main", "--dir", str(lab_dir))
    lab_cmd("start", "dc", "--dir", str(lab_dir))
    wait_states(lab, {"main": "standby", "dc": "standby"}, 40)
    converge(lab)
    compared = events(lab_dir, "dr", "compare_done")
    assert compared and max(e["differing"] for e in compared) <= 2, compared
    switchover(lab, "dr", "main")
    wait_states(lab, {"main": "primary", "dc": "standby", "dr": "witness"}, 40)
    assert check(lab, 0, 64, "base") == 0 and check(lab, 4096, 32, "at-dr") == 0
    stamp(lab, 8192, 16, "home")
    converge(lab)


def split_brain(lab_dir: Path) -> dict[str, Any]:
    """A lab where DR was promoted by force while cut off from a living main site, both
    took writes, and the partition healed: main is stale, in split brain with dr."""
    lab = up(lab_dir.parent)
    stamp(lab, 0, 32, "base")
    time.sleep(1.5)
    # Partition DR from the main site (blackhole routes both ways: the client reaches
    # every site, the sites of the two sides no longer reach each other).
    cuts = [("dr", addr(lab, "main")), ("dr", addr(lab, "dc")),
            ("main", addr(lab, "dr")), ("dc", addr(lab, "dr"))]
    for node, dst in cuts:
        in_ns(lab, node, "ip", "route", "add", "blackhole", f"{dst}/32")
    time.sleep(TIMEOUT)
    forced = run_nbdgw("-c", cfg(lab, "dr"), "promote", "--site", "dr", "--force",
                       check=False)
    assert forced.returncode == 0, forced.stderr
    # Each side takes writes through its own address (both claim the service address).
    stamp(lab, 1024, 16, "mainside", host=addr(lab, "main"))
    stamp(lab, 2048, 16, "dr-side", host=addr(lab, "dr"))
    for node, dst in cuts:
        in_ns(lab, node, "ip", "route", "del", "blackhole", f"{dst}/32")
    wait_states(lab, {"main": "stale"}, 20)
    split = data_dir(lab, "main") / "split-brain.json"
    deadline = time.monotonic() + 10
    while not split.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    record = json.loads(split.read_text())
    assert record["other_node"] == "dr" and "v1" in record["volumes"], record
    return lab


def diverged_block(lab: dict[str, Any], node: str, block: int) -> bytes:
    """Block ``block`` of node's diverged snapshot of v1, read offline (node stopped)."""
    vol = Volume.open(data_dir(lab, node), "v1")
    try:
        names = [s for s in vol.snaps.index.by_name if s.startswith("diverged-")] \
            if vol.snaps is not None else []
        assert len(names) == 1, names
        buf = bytearray(4096)
        vol.snapshot_view(names[0]).read_into(buf, block * 4096)
        return bytes(buf)
    finally:
        vol.close()


def test_forced_split_brain_is_refused_then_resolved(lab_dir: Path) -> None:
    lab = split_brain(lab_dir)
    time.sleep(3)
    assert states(lab)["main"] == "stale"  # no automatic sync either way
    wrong = run_nbdgw("-c", cfg(lab, "main"), "resolve", "--discard", "dc", check=False)
    assert "the split brain is between main and dr" in wrong.stderr
    ok = run_nbdgw("-c", cfg(lab, "main"), "resolve", "--discard", "main", check=False)
    assert ok.returncode == 0, ok.stderr
    wait_states(lab, {"main": "standby"}, 20)
    converge(lab)
    assert check(lab, 2048, 16, "dr-side", host=addr(lab, "dr")) == 0
    assert not (data_dir(lab, "main") / "split-brain.json").exists()
    # main's discarded writes are kept in its diverged snapshot.
    lab_cmd("kill", "main", "--dir", str(lab_dir))
    assert diverged_block(lab, "main", 1024) == (struct.pack("<Q", 1024) + b"mainside") * 256
    actions = [json.loads(x)["action"] for x in run_nbdgw(
        "-c", cfg(lab, "main"), "audit", "--json").stdout.splitlines()]
    assert [a for a in actions if a != "volume create"] == ["resolve", "resolve"]


def heartbeat_rtts(lab: dict[str, Any], node: str) -> dict[str, float]:
    """nbdgw_heartbeat_rtt_seconds of a site, scraped over HTTP from the client's side."""
    from prometheus_client.parser import text_string_to_metric_families

    p = client(lab, "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], "
               "timeout=10).read().decode())", f"http://{addr(lab, node)}:9810/metrics")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return {s.labels["peer"]: s.value for fam in text_string_to_metric_families(out)
            if fam.name == "nbdgw_heartbeat_rtt_seconds" for s in fam.samples}


def test_switchover_refusals_and_a_target_that_cannot_catch_up(lab_dir: Path) -> None:
    lab = up(lab_dir.parent)
    stamp(lab, 0, 16, "base")
    rtts = heartbeat_rtts(lab, "main")
    assert set(rtts) == {"dc", "dr"} and all(0 <= v < 1 for v in rtts.values()), rtts
    on_dc = run_nbdgw("-c", cfg(lab, "dc"), "switchover", "--to", "main", check=False)
    assert on_dc.stderr.strip().endswith(
        "switchover: node dc is standby, not the serving primary: run switchover on the "
        "primary (main)"), on_dc.stderr
    nobody = run_nbdgw("-c", cfg(lab, "main"), "switchover", "--to", "nobody", check=False)
    assert "switchover: 'nobody' is not a peer of main (peers: dc, dr)" in nobody.stderr
    # dc's receiver freezes: the drain times out, nothing changes and I/O resumes.
    frozen = peerlink_pid(lab, "dc")
    os.kill(frozen, signal.SIGSTOP)
    try:
        writer = client(lab, WRITER, uri(lab), "512", "2000", "during")
        time.sleep(0.5)
        t0 = time.monotonic()
        sw = run_nbdgw("-c", cfg(lab, "main"), "switchover", "--to", "dc", "--timeout", "2",
                       check=False, timeout=120)
        held = time.monotonic() - t0
        assert sw.returncode == 1
        assert "did not catch up within 2 s" in sw.stderr, sw.stderr
        assert "nothing changed, client I/O resumed" in sw.stderr, sw.stderr
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["errors"] == [] and result["reconnects"] == 0, result
        assert result["max_pause_s"] >= 1.5, result  # held, then released
        print(f"refused switchover held I/O {held:.2f} s; client saw {result}")
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert states(lab) == {"main": "primary", "dc": "standby", "dr": "witness"}
    assert check(lab, 512, 2000, "during") == 0
    outcomes = [json.loads(x)["outcome"] for x in run_nbdgw(
        "-c", cfg(lab, "main"), "audit", "--json").stdout.splitlines()
        if json.loads(x)["action"] != "volume create"]  # the lab's own set-up
    assert outcomes == ["refused", "refused"], outcomes


def test_split_brain_resolved_for_the_stale_side(lab_dir: Path) -> None:
    """The operator keeps main's writes: main serves a newer generation, dr demotes itself
    (its writes kept as its diverged snapshot) and, like dc, takes main's data."""
    lab = split_brain(lab_dir)
    ok = run_nbdgw("-c", cfg(lab, "main"), "resolve", "--discard", "dr", check=False)
    assert ok.returncode == 0, ok.stderr
    wait_states(lab, {"main": "primary", "dc": "standby", "dr": "witness"}, 30)
    converge(lab)
    assert check(lab, 1024, 16, "mainside") == 0  # through the service address: main
    assert check(lab, 2048, 16, "dr-side") == 16
    assert check(lab, 0, 32, "base") == 0
    lab_cmd("kill", "dr", "--dir", str(lab_dir))
    assert diverged_block(lab, "dr", 2048) == (struct.pack("<Q", 2048) + b"dr-side-") * 256
