"""Readable replicas served by the daemon itself (issue 21): on a secondary, `nbdgw
daemon` runs nbdkit for readers on the node's NBD address while its receiver applies the
primary's writes.  Three real daemons (tests/integration/cluster.py), libnbd clients:
a replica snapshot read from the secondary's socket equals the primary's snapshot while
the primary writes; the replica volume itself is refused there, with the reason; a clone
on the secondary is writable; promoted, the secondary serves the volume writable on the
same address; in the lab, a switchover moves the readers with the roles."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import nbd
import pytest
import yaml

from tests.conftest import run_nbdgw
from tests.integration.cluster import (
    MiB,
    Node,
    Writer,
    hashes,
    hashes_of,
    in_sync,
    opened,
    uri,
    wait_for,
    with_s1,
)
from tests.integration.conftest import addr as lab_addr
from tests.integration.conftest import cfg as lab_cfg
from tests.integration.conftest import run_client, switchover, up, wait_states
from tests.integration.conftest import uri as lab_uri


def names_on(node: Node) -> list[str]:
    names: list[str] = []
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri(node, ""))
    h.opt_list(lambda name, _desc: names.append(name) or 0)
    h.opt_abort()
    return names


def with_cdp_window(node: Node) -> None:
    cfg = yaml.safe_load(node.config.read_text())
    cfg["cdp"] = {"window": "1h"}
    node.config.write_text(yaml.safe_dump(cfg))


def check_snapshot(node: Node, want: list[bytes]) -> None:
    r = opened(node, "v1@s1")
    assert r.is_read_only()
    assert hashes(r) == want
    with pytest.raises(nbd.Error) as e:
        r.pwrite(b"x" * 4096, 0)
    assert e.value.errnum in (errno.EPERM, errno.EROFS), e.value
    r.shutdown()


def check_current_image(dc: Node, dr: Node) -> None:
    """The replica itself on dc: as of its last applied batch when opened, the same image
    for the whole connection, read-only; on dr (no CDP window) not served at all."""
    live = opened(dc, "v1")
    assert live.is_read_only()
    first = hashes(live)
    time.sleep(1)
    assert hashes(live) == first
    with pytest.raises(nbd.Error) as e:
        live.pwrite(b"x" * 4096, 0)
    assert e.value.errnum in (errno.EPERM, errno.EROFS), e.value
    print(f"write to the replica v1 on dc: {e.value}")
    live.shutdown()
    refused = nbd.NBD()
    with pytest.raises(nbd.Error):
        refused.connect_uri(uri(dr, "v1"))
    assert {"v1@s1", "v1"} <= set(names_on(dc)), names_on(dc)
    assert "v1@s1" in names_on(dr) and "v1" not in names_on(dr), names_on(dr)


def check_clone(dc: Node, want: list[bytes]) -> None:
    dc.nbdgw("clone", "create", "v1@s1", "drill")
    c = opened(dc, "drill")
    assert not c.is_read_only()
    c.pwrite(b"\xab" * 65536, 0)
    c.flush()
    assert c.pread(65536, 0) == b"\xab" * 65536
    assert hashlib.blake2b(c.pread(MiB, MiB)).digest() == want[1]
    c.shutdown()


def test_secondary_daemon_serves_replica_snapshots_and_clones(make_cluster: Any) -> None:
    """dc keeps a CDP window (its replica is served as of its last batch too); dr does
    not (its snapshots only)."""
    main, dc, dr = make_cluster("fanout")
    with_cdp_window(dc)
    for n in (dc, dr, main):
        n.start()
    with_s1(main, (dc, dr), 100, 3)
    want = hashes_of(main, "v1@s1")

    writer = Writer(main, 16, 50)
    writer.start()
    try:
        for node in (dc, dr):  # the daemons' own nbdkit: nobody ran `nbdgw serve`
            check_snapshot(node, want)  # while the receiver applies the writer's batches
        check_current_image(dc, dr)
        check_clone(dc, want)
        assert writer.rounds > 0
    finally:
        writer.stop()
    wait_for(lambda: in_sync(main, "dc"), 60, "dc in sync with main")
    now = opened(main, "v1")
    at_main = hashes(now)
    now.shutdown()
    wait_for(lambda: hashes_of(dc, "v1") == at_main, 30, "dc's v1 as of its last batch")
    for n in (main, dc, dr):
        n.stop()
    assert main.checksum() == dc.checksum()


def test_promoted_secondary_serves_the_volume_on_the_same_address(
        make_cluster: Any, tmp_path: Path) -> None:
    main, dc, dr = make_cluster("fanout")
    for n in (dc, dr, main):
        n.start()
    with_s1(main, (dc,), 50, 9)
    wait_for(lambda: in_sync(main, "dc"), 60, "dc in sync")
    reader = opened(dc, "v1@s1")
    reader.shutdown()
    main.stop()
    t0 = time.monotonic()
    dc.nbdgw("promote", "--site", "dc", "--force")
    w = opened(dc, "v1", timeout=60)  # the reader's nbdkit gave way to the primary's
    assert not w.is_read_only()
    print(f"promote to a writable v1 on dc's socket: {time.monotonic() - t0:.2f} s")
    w.pwrite(b"\x5a" * 4096, 0)
    w.flush()
    w.shutdown()
    dc.stop()
    dr.stop()


PROBE = r"""
import json, sys
import nbd
out = {}
for uri in sys.argv[1:]:
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        out[uri] = "read-only" if h.is_read_only() else "writable"
        h.shutdown()
    except nbd.Error as e:
        out[uri] = str(e)
print(json.dumps(out))
"""


def probe(lab: dict[str, Any], *exports: tuple[str, str]) -> list[str]:
    """How each (site, export) opens from the client namespace, at the site's own
    address: read-only, writable, or the error."""
    uris = [lab_uri(lab, export, host=lab_addr(lab, site)) for site, export in exports]
    got = run_client(lab, PROBE, *uris)
    return [str(got[u]) for u in uris]


def probed(lab: dict[str, Any], want: list[str], *exports: tuple[str, str]) -> None:
    deadline = time.monotonic() + 60
    while (got := probe(lab, *exports)) != want:
        assert time.monotonic() < deadline, f"{exports}: {got}, not {want}"
        time.sleep(1)


@pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (netns)")
def test_a_switchover_moves_the_readers_with_the_roles(lab_dir: Path) -> None:
    """Lab (automatic failover, one address per site, NBD on 0.0.0.0:10809): the
    secondary's and DR's daemons serve replica snapshots on their own addresses; after a
    switchover to dc, dc serves v1 writable there and main, demoted, serves readers."""
    lab = up(lab_dir.parent)
    run_nbdgw("-c", lab_cfg(lab, "main"), "snapshot", "create", "v1", "--name", "s1")
    probed(lab, ["read-only", "read-only"], ("dc", "v1@s1"), ("dr", "v1@s1"))
    refused = probe(lab, ("dc", "v1"))[0]  # no CDP window in the lab
    assert "no export named" in refused, refused
    switchover(lab, "main", "dc")
    wait_states(lab, {"dc": "primary", "main": "standby"}, 30)
    probed(lab, ["writable", "read-only", "read-only"], ("dc", "v1"), ("main", "v1@s1"),
           ("dr", "v1@s1"))
