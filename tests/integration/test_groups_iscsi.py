"""The iSCSI bridge inside volume groups: each group served over iSCSI gets a tgtd of its
own on its primary, on the group's portal port (groups[].ports.iscsi), with the node's
IQN and access settings.  A write over one group's LUN is read back over that group's
NBD port; the other group's portal serves only its own volume; stopping the groups
parent withdraws every target."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import free_port, need, run_nbdgw
from tests.integration.iscsienv import (
    BASE,
    daemon,
    free_control_port,
    sh,
    wait_target,
    written_over_iscsi_reads_back_over_nbd,
)


def test_each_group_serves_its_volumes_on_its_own_portal(tmp_path: Path) -> None:

    for tool in ("tgtd", "iscsi-inq", "qemu iscsi driver"):  # iscsi-ls: libiscsi-bin too
        need(tool)
    p1 = free_control_port()
    p2 = next(n for n in iter(free_control_port, None) if n != p1)
    ports = {g: {"peerlink": free_port(), "heartbeat": free_port(), "nbd": free_port(),
                 "iscsi": p} for g, p in (("g1", p1), ("g2", p2))}
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text(yaml.safe_dump({
        "version": 1, "node": {"name": "solo", "data_dir": str(tmp_path / "data")},
        "failover": {"auto": False},
        "iscsi": {"enabled": True, "iqn": BASE, "run_dir": str(tmp_path / "iscsi")},
        "sites": [{"name": "solo", "address": "127.0.0.1"}],
        "groups": [{"name": g, "primary": "solo", "ports": ports[g]} for g in ("g1", "g2")],
    }))
    run_nbdgw("-c", str(cfg), "--group", "g1", "volume", "create", "v1", "--size", "32M")
    run_nbdgw("-c", str(cfg), "--group", "g2", "volume", "create", "v2", "--size", "32M")
    url1 = f"iscsi://127.0.0.1:{p1}/{BASE}:v1/1"
    url2 = f"iscsi://127.0.0.1:{p2}/{BASE}:v2/1"
    with daemon(cfg, tmp_path / "daemon.log") as proc:
        for url in (url1, url2):
            wait_target(url, proc, tmp_path / "daemon.log")
        # Each portal lists its own group's target only.
        assert f"{BASE}:v1" in sh("iscsi-ls", f"iscsi://127.0.0.1:{p1}").stdout
        listed = sh("iscsi-ls", f"iscsi://127.0.0.1:{p2}").stdout
        assert f"{BASE}:v2" in listed and f"{BASE}:v1" not in listed
        written_over_iscsi_reads_back_over_nbd(
            url1, f"nbd://127.0.0.1:{ports['g1']['nbd']}/v1", tmp_path)
    for url in (url1, url2):
        assert sh("iscsi-inq", url, check=False).returncode != 0  # withdrawn with the daemon
