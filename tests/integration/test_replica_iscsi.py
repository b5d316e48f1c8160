"""iSCSI LUNs of a readable replica, served by the daemon itself (issue 21): on a
secondary with an ``iscsi`` section, `nbdgw daemon` runs the bridge (tgtd + FUSE inside
the readers' nbdkit) and exports the replica's snapshots read-only and its clones
writable, while its receiver goes on applying the primary's writes.  Real daemons
(tests/integration/cluster.py), real tgtd, libiscsi and qemu-img as the initiator."""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port, need
from tests.integration.cluster import (
    SIZE,
    MiB,
    Node,
    Writer,
    hashes_of,
    opened,
    peer_state,
    wait_for,
    with_s1,
)
from tests.integration.iscsienv import (
    BASE,
    free_control_port,
    sh,
    wait_target,
    written_over_iscsi_reads_back_over_nbd,
)


def with_iscsi(node: Node, port: int, readers_portal: bool) -> None:
    """iscsi on 127.0.0.1:``port``; with ``readers_portal`` as iscsi.readers_portal, the
    portal being an address no node here has (as the service address is a secondary's)."""
    cfg = yaml.safe_load(node.config.read_text())
    portal = {"portal": "192.0.2.10:3260", "readers_portal": f"127.0.0.1:{port}"} \
        if readers_portal else {"portal": f"127.0.0.1:{port}"}
    cfg["iscsi"] = {"enabled": True, **portal, "iqn": BASE,
                    "control_port": free_control_port(), "run_dir": str(node.dir / "iscsi")}
    node.config.write_text(yaml.safe_dump(cfg))


def acked(main: Node, peer: str) -> int:
    return int(peer_state(main, peer).get("acked_seq", -1))


@pytest.fixture
def pair_with_s1(make_cluster: Any
                 ) -> Iterator[Callable[[int, bool], tuple[Node, Node, int]]]:
    """Factory: main (primary) and dc (secondary, iscsi on its own portal port) running,
    main's snapshot s1 taken after ``blocks`` writes and on dc; dr is not started.  On
    teardown dc's tgtd and FUSE mounts go too, even after a failure (`iscsi down`)."""
    made: list[Node] = []

    def make(blocks: int, readers_portal: bool) -> tuple[Node, Node, int]:
        main, dc, port = _pair(make_cluster, blocks, readers_portal)
        made.append(dc)
        return main, dc, port

    yield make
    for dc in made:
        if dc.proc is not None:
            dc.stop(signal.SIGKILL)
        dc.nbdgw("iscsi", "down", check=False)


def _pair(make_cluster: Any, blocks: int, readers_portal: bool) -> tuple[Node, Node, int]:
    for tool in ("tgtd", "iscsi-inq", "qemu iscsi driver", "fusermount3"):
        need(tool)
    main, dc, _dr = make_cluster("fanout")
    port = free_port()
    with_iscsi(dc, port, readers_portal)
    dc.start()
    main.start()
    with_s1(main, (dc,), blocks, 3)
    return main, dc, port


def test_secondary_daemon_serves_replica_snapshot_and_clone_luns(
        pair_with_s1: Callable[[int, bool], tuple[Node, Node, int]], tmp_path: Path) -> None:
    main, dc, port = pair_with_s1(100, True)  # on iscsi.readers_portal
    want = hashes_of(main, "v1@s1")

    url = f"iscsi://127.0.0.1:{port}/{BASE}:v1:s1/1"
    log = dc.dir / "daemon-0.log"
    assert dc.proc is not None
    writer = Writer(main, 8, 70, pause=0.05)  # a trickle, not the 2-core machine
    writer.start()
    try:
        wait_target(url, dc.proc, log)
        before = acked(main, "dc")
        lun = tmp_path / "lun.img"
        sh("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(lun), timeout=120)
        with open(lun, "rb") as f:
            got = [hashlib.blake2b(f.read(MiB)).digest() for _ in range(SIZE // MiB)]
        assert hashes_of(dc, "v1@s1") == want  # the same snapshot, over NBD from dc's socket
        assert got == want, [i for i, (a, b) in enumerate(zip(got, want, strict=True))
                             if a != b][:5]
        p = sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(lun), url,
               check=False, timeout=120)
        assert p.returncode != 0  # a snapshot's LUN is read-only
        wait_for(lambda: acked(main, "dc") > before, 30, "dc acks newer writes")
        after = acked(main, "dc")
        print(f"dc's acked seq went {before} -> {after} while its LUN v1@s1 was read "
              f"({writer.rounds} rounds written to main)")

        # A clone made on the replica: a writable LUN (reconciled in, no restart).
        dc.nbdgw("clone", "create", "v1@s1", "drill")
        clone_url = f"iscsi://127.0.0.1:{port}/{BASE}:drill/1"
        wait_target(clone_url, dc.proc, log, timeout=60)
        written_over_iscsi_reads_back_over_nbd(
            clone_url, f"nbd+unix:///drill?socket={dc.sock}", tmp_path)
        c = opened(dc, "drill")
        assert hashlib.blake2b(c.pread(MiB, MiB)).digest() == want[1]  # the base beyond
        c.shutdown()
        assert writer.rounds > 0
    finally:
        writer.stop()
    dc.stop()
    assert sh("iscsi-inq", url, check=False).returncode != 0  # withdrawn with the daemon
    text = dc.log_text()
    assert '"readers": true' in text or '"readers":true' in text, text[-3000:]
    main.stop()


def test_promotion_swaps_the_readers_luns_for_the_volume(
        pair_with_s1: Callable[[int, bool], tuple[Node, Node, int]], tmp_path: Path) -> None:
    """Promoted, dc withdraws the replica's LUNs before it kills the readers' nbdkit,
    then serves v1 itself as a writable LUN in front of the primary's nbdkit."""
    main, dc, port = pair_with_s1(20, False)  # on iscsi.portal, before and after
    snap_url = f"iscsi://127.0.0.1:{port}/{BASE}:v1:s1/1"
    vol_url = f"iscsi://127.0.0.1:{port}/{BASE}:v1/1"
    log = dc.dir / "daemon-0.log"
    assert dc.proc is not None
    wait_target(snap_url, dc.proc, log)
    assert sh("iscsi-inq", vol_url, check=False).returncode != 0  # never the replica
    main.stop()
    dc.nbdgw("promote", "--site", "dc", "--force")
    wait_target(vol_url, dc.proc, log, timeout=60)
    written_over_iscsi_reads_back_over_nbd(vol_url, f"nbd+unix:///v1?socket={dc.sock}",
                                           tmp_path)
    assert sh("iscsi-inq", snap_url, check=False).returncode != 0  # the primary's: volumes
    events = [json.loads(line) for line in log.read_text().splitlines()
              if line.startswith("{")]
    order = [(e["event"], e.get("child", e.get("readers"))) for e in events
             if e["event"] in ("iscsi_withdrawn", "child_stopped", "iscsi_serving")]
    withdrawn = order.index(("iscsi_withdrawn", None))
    # readers' LUNs, withdrawn, then the readers' nbdkit killed, then the volume's LUN
    assert order.index(("iscsi_serving", True)) < withdrawn, order
    assert order.index(("child_stopped", "nbdkit")) > withdrawn, order
    assert order.index(("iscsi_serving", False)) > withdrawn, order
    def at(event: str, child: str | None = None) -> datetime:
        return next(datetime.fromisoformat(e["timestamp"]) for e in events
                    if (e["event"], e.get("child")) == (event, child))

    began, out = at("operator_promote"), at("iscsi_withdrawn")
    print(f"promotion: readers' targets withdrawn {(out - began).total_seconds():.3f} s "
          f"after the request, their nbdkit killed "
          f"{(at('child_stopped', 'nbdkit') - out).total_seconds():.3f} s after that")
    dc.stop()
