"""`nbdgw daemon` runs the iSCSI bridge in front of its nbdkit: a write over iSCSI is
read back over NBD, and stopping the daemon withdraws every target."""

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


def test_daemon_serves_iscsi_and_withdraws_on_stop(tmp_path: Path) -> None:
    for tool in ("tgtd", "iscsi-inq", "qemu iscsi driver"):
        need(tool)
    port, data, sock = free_port(), tmp_path / "data", tmp_path / "nbd.sock"
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text(yaml.safe_dump({
        "version": 1, "node": {"name": "solo", "data_dir": str(data)},
        "nbd": {"listen": [f"unix:{sock}"]},
        "iscsi": {"enabled": True, "portal": f"127.0.0.1:{port}", "iqn": BASE,
                  "control_port": free_control_port(), "run_dir": str(tmp_path / "iscsi")},
    }))
    run_nbdgw("-c", str(cfg), "volume", "create", "v1", "--size", "32M")
    url = f"iscsi://127.0.0.1:{port}/{BASE}:v1/1"
    with daemon(cfg, tmp_path / "daemon.log") as proc:
        wait_target(url, proc, tmp_path / "daemon.log")
        written_over_iscsi_reads_back_over_nbd(url, f"nbd+unix:///v1?socket={sock}", tmp_path)
    assert sh("iscsi-inq", url, check=False).returncode != 0  # withdrawn with the daemon
    assert "iscsi_serving" in (tmp_path / "daemon.log").read_text()
