"""CDP points and clones of points on a live replica, end to end: a real `nbdgw serve`
primary with a window, real peerlink sender and receiver (the receiver keeps applying a
libnbd writer's batches the whole time), `nbdgw serve` on the replica's data dir.  On
the replica, `nbdgw cdp list` and `cdp export --at` of instants between known FLUSHes
read back exactly over NBD; a clone of a point (on the replica and on the primary) reads
the point and keeps its own writes; a connection open on the oldest point keeps its
base past the replica's window (the receiver, another process, does not drop it) and
the base goes once the client disconnects; the replica equals the primary at the end."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from blockstore.cdp import CdpPolicy, bases_of, format_instant, lasting_pins, write_policy
from iscsi_bridge.names import DISK_LUN
from tests.conftest import NBDGW, Served, free_port, need, run_nbdgw
from tests.integration.iscsienv import BASE, free_control_port, sh
from tests.integration.peerenv import Env, Writer
from tests.integration.test_cdp import REGION, connect, read_export, rounds

MiB = 1 << 20
WINDOW = 20.0  # the replica's window (a base every 5 s)


@pytest.fixture
def cdp_env(tmp_path: Path, data_dir: Path, volume: str,
            serve: Callable[..., Served]) -> Iterator[Env]:
    replica = tmp_path / "replica"
    replica.mkdir()
    run_nbdgw("volume", "create", "v1", "--size", "64M", "--replica", "--data-dir",
              str(replica))
    config = tmp_path / "nbdgw.yaml"
    config.write_text(yaml.safe_dump({"version": 1, "node": {"data_dir": str(data_dir)},
                                      "cdp": {"window": "1h"}}))
    # The replica's own window, as its node's config says (nbdgw serve there writes it
    # again from that config: replica_config).
    write_policy(replica / "volumes/v1", CdpPolicy(WINDOW, 1 << 30))
    (tmp_path / "replica.yaml").write_text(yaml.safe_dump(
        {"version": 1, "node": {"data_dir": str(replica)},
         "cdp": {"window": WINDOW, "max_bytes": "1G"}}))
    e = Env(tmp_path, data_dir, replica, serve(config=config))
    try:
        yield e
    finally:
        e.kill_all()


def replica_cdp(e: Env) -> dict[str, Any]:
    """The replica's v1 ``cdp`` section of `nbdgw status --json`."""
    st = json.loads(run_nbdgw("status", "--json", "--data-dir", str(e.replica)).stdout)
    return next(v for v in st["volumes"] if v["name"] == "v1")["cdp"]


def wait_for(what: str, cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.1)


def test_points_and_clones_of_a_live_replica(  # noqa: PLR0915 - one story, told in order
        cdp_env: Env, serve: Callable[..., Served]) -> None:
    e = cdp_env
    rx = e.receiver()
    e.sender(rx.port)
    h = connect(e.served, "v1")
    done = rounds(h, 3, seed=24)
    h.shutdown()
    e.wait_caught_up()
    rdd = ["--data-dir", str(e.replica)]
    rvol = e.replica / "volumes/v1"
    # The writer keeps the receiver busy from here on (past REGION: the rounds' data
    # stays as it is on the live volume too, not that the points would care).
    w = Writer(e.served, seed=25, pause=0.002, blocks=(64 * MiB) // 4096)
    w.start()
    try:
        w.halt.wait(0.5)
        listed = json.loads(run_nbdgw("cdp", "list", "v1", "--json", *rdd).stdout)
        assert len([p for p in listed["points"] if p["flush"]]) >= 3
        names = []
        for t, _img in done:
            at = format_instant(t + 500_000_000)
            name = run_nbdgw("cdp", "export", "v1", "--at", at, *rdd).stdout.strip()
            assert name == f"v1@{at}"
            names.append(name)
        # nbdgw serve on the replica's node names them among its exports.
        rs = serve(data_dir_=e.replica, config=e.tmp / "replica.yaml")
        assert f"nbdgw: export {names[0]}: " in rs.lines[-1]  # (the rest drained lazily)
        # The oldest point held open by a client from now on.
        h0 = connect(rs, names[0])
        assert h0.is_read_only()
        assert h0.pread(REGION, 0) == done[0][1]
        pinned = bases_of(rvol)[0]
        assert [r["base_seq"] for r in replica_cdp(e)["readers"]] == [pinned.mark_seq]
        for name, (_t, img) in zip(names, done, strict=True):
            assert read_export(rs, name) == img, name

        # A clone of a point on the primary, by option (its own journal's point).
        point = names[1].partition("@")[2]
        run_nbdgw("clone", "create", "v1", "pdrill", "--at", point, "--data-dir",
                  str(e.primary))
        c = connect(e.served, "pdrill")
        assert c.pread(REGION, 0) == done[1][1]
        c.shutdown()

        # Past the replica's window (and a base period) the receiver would have dropped
        # the oldest base; h0's pin (an flock of this other process) keeps it.
        wait_for("the replica's window passes the pinned base",
                 lambda: time.time() - pinned.created > WINDOW + WINDOW / 4 + 2, 60)
        assert w.is_alive() and w.ops > 0
        assert bases_of(rvol)[0].id == pinned.id
        assert h0.pread(REGION, 0) == done[0][1]
        # A clone of a point on the replica: the point, plus its own writes.
        out = run_nbdgw("clone", "create", f"v1@{point}", "drill", *rdd).stdout
        assert "created clone drill of v1@" in out
        assert set(lasting_pins(rvol)) == {"clone-drill"}
        pins = replica_cdp(e)["pins"]
        assert [(p["owner"], p["base_seq"]) for p in pins] == [("clone-drill",
                                                                pinned.mark_seq)]
        assert pins[0]["journal_bytes"] > 0
        st = json.loads(run_nbdgw("status", "--json", *rdd).stdout)
        assert [(c["name"], c["base"]) for c in st["clones"]] == [("drill", f"v1@{point}")]
        assert st["clones"][0]["point_seq"] > pinned.mark_seq
        c = connect(rs, "drill")
        assert not c.is_read_only()
        assert c.pread(REGION, 0) == done[1][1]
        c.pwrite(b"\x77" * 65536, 4096)
        c.flush()
        want = bytearray(done[1][1])
        want[4096:4096 + 65536] = b"\x77" * 65536
        assert c.pread(REGION, 0) == bytes(want)
        c.shutdown()
        h0.shutdown()
        # The clone of the second point reads the same base: its pin (a file) keeps
        # it with no client connected; deleted, the next housekeeping drops the base.
        time.sleep(3)  # three housekeeping periods of the receiver
        assert bases_of(rvol)[0].id == pinned.id
        c = connect(rs, "drill")
        assert c.pread(REGION, 0) == bytes(want)
        c.shutdown()
        run_nbdgw("clone", "delete", "drill", *rdd)
        assert lasting_pins(rvol) == {}
        wait_for("the unpinned base is dropped",
                 lambda: pinned.id not in [b.id for b in bases_of(rvol)], 30)
    finally:
        w.stop()
    run_nbdgw("clone", "delete", "pdrill", "--data-dir", str(e.primary))
    rs.stop()
    e.wait_caught_up()
    for p in e.procs:
        assert p.stop() == 0
    primary, replica = e.checksums()
    assert primary == replica


def test_a_replica_point_and_a_clone_as_iscsi_luns(  # noqa: PLR0915 - one story
        cdp_env: Env, serve: Callable[..., Served], tmp_path: Path) -> None:
    """`nbdgw iscsi serve --snapshot v1@<instant> --clone drill` on the replica's node,
    while the receiver applies a writer's batches: a qemu-img copy of the point's LUN
    is the instant, byte for byte, and the LUN refuses writes; the clone's LUN takes a
    write that its NBD export then reads; iscsi-inq answers on both."""
    for tool in ("tgtd", "iscsi-inq", "qemu iscsi driver", "fusermount3"):
        need(tool)
    e = cdp_env
    rx = e.receiver()
    e.sender(rx.port)
    h = connect(e.served, "v1")
    done = rounds(h, 2, seed=26)
    h.shutdown()
    e.wait_caught_up()
    rdd = ["--data-dir", str(e.replica)]
    at = format_instant(done[0][0] + 500_000_000)
    name = run_nbdgw("cdp", "export", "v1", "--at", at, *rdd).stdout.strip()
    run_nbdgw("clone", "create", name, "drill", *rdd)
    port = free_port()
    cfg = tmp_path / "replica-iscsi.yaml"
    cfg.write_text(yaml.safe_dump({
        "version": 1, "node": {"data_dir": str(e.replica)},
        "cdp": {"window": WINDOW, "max_bytes": "1G"},
        "iscsi": {"enabled": True, "portal": f"127.0.0.1:{port}", "iqn": BASE,
                  "control_port": free_control_port(), "run_dir": str(tmp_path / "iscsi")}}))
    w = Writer(e.served, seed=27, pause=0.002)
    w.start()
    rs = serve(data_dir_=e.replica, config=cfg)
    proc = None
    log = (tmp_path / "iscsi-serve.log").open("w+")
    try:
        proc = subprocess.Popen([NBDGW, "--log-format", "json", "-c", str(cfg), "iscsi",
                                 "serve", "--nbd-socket", str(rs.sock), "--snapshot", name,
                                 "--clone", "drill"],
                                stdout=subprocess.PIPE, stderr=log, text=True)
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]  # the portal, two targets
        point_url = f"iscsi://127.0.0.1:{port}/{BASE}:v1:{at.lower()}/{DISK_LUN}"
        clone_url = f"iscsi://127.0.0.1:{port}/{BASE}:drill/{DISK_LUN}"
        assert f"nbdgw: iscsi target {name}: {point_url}\n" in lines, lines
        assert f"nbdgw: iscsi target drill: {clone_url}\n" in lines, lines
        for url in (point_url, clone_url):
            inq = sh("iscsi-inq", url, check=False)
            assert inq.returncode == 0 and "nbdgw" in inq.stdout.lower(), inq
        out = tmp_path / "point.img"
        sh("qemu-img", "convert", "-f", "raw", "-O", "raw", point_url, str(out), timeout=120)
        with open(out, "rb") as f:
            assert f.read(REGION) == done[0][1]
        p = sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(out), point_url,
               check=False, timeout=120)
        assert p.returncode != 0  # a point is read-only
        sh("qemu-io", "-f", "raw", "-c", f"write -P 0x42 {MiB} {MiB}", clone_url,
           timeout=60)
        c = connect(rs, "drill")
        want = bytearray(done[0][1])
        want[MiB:2 * MiB] = b"\x42" * MiB
        assert c.pread(REGION, 0) == bytes(want)
        c.shutdown()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        w.stop()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        run_nbdgw("-c", str(cfg), "iscsi", "down", check=False)
        log.close()
    rs.stop()
    run_nbdgw("clone", "delete", "drill", *rdd)
    e.wait_caught_up()
    for p_ in e.procs:
        assert p_.stop() == 0
    primary, replica = e.checksums()
    assert primary == replica
