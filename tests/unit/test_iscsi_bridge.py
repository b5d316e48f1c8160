"""The bridge's pure parts: the plan (targets from exports), CHAP secrets, exports."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.exports import exports_from_config
from iscsi_bridge import Bridge, BridgeError, Export
from iscsi_bridge.bridge import read_secret
from iscsi_bridge.settings import ChapConfig, IscsiConfig

BASE = "iqn.2026-11.com.example:nbdgw"


def bridge(tmp_path: Path, **kw: object) -> Bridge:
    cfg = IscsiConfig(enabled=True, iqn=BASE, run_dir=tmp_path / "run", **kw)  # type: ignore[arg-type]
    return Bridge(cfg, lambda e: f"nbd+unix:///{e}?socket=/x")


def test_plan(tmp_path: Path) -> None:
    targets, failed = bridge(tmp_path).plan(
        [Export("v1"), Export("arch", read_only=True), Export("v1@daily"), Export("Bad_Name"),
         Export("v1@Daily")])
    by_name = {t.export.name: t for t in targets.values()}
    assert sorted(by_name) == ["arch", "v1", "v1@daily"]
    assert by_name["v1"].iqn == f"{BASE}:v1"
    assert by_name["v1"].read_only is False
    assert by_name["arch"].read_only is True
    assert by_name["v1@daily"].read_only is True  # snapshots are always read-only
    assert by_name["v1@daily"].iqn == f"{BASE}:v1:daily"
    assert list(failed) == ["Bad_Name", "v1@Daily"]
    assert failed["v1@Daily"] == (f"target name {BASE}:v1:daily is also v1@daily's "
                                  "(IQNs ignore case)")
    assert failed["Bad_Name"].startswith("volume name 'Bad_Name' cannot be part of")
    for tid, t in targets.items():
        assert tid == t.tid


def test_bridge_needs_an_iqn_to_name_targets_only(tmp_path: Path) -> None:
    """Targets need iscsi.iqn; status and stop (tgtd's control port and run_dir) do not."""
    bridge = Bridge(IscsiConfig(control_port=32001, run_dir=tmp_path), lambda e: "")
    with pytest.raises(BridgeError, match=r"iscsi\.iqn is not set"):
        bridge.plan([Export("v1")])
    with pytest.raises(BridgeError, match=r"iscsi\.iqn is not set"):
        bridge.withdraw("v1")
    assert bridge.status() == {"tgtd": "down", "control_port": 32001, "targets": []}


def test_secrets(tmp_path: Path) -> None:
    f = tmp_path / "chap"
    f.write_text("0123456789ab\n")
    assert read_secret(ChapConfig("u", f), "iscsi.chap") == "0123456789ab"
    f.write_text("short\n")
    with pytest.raises(BridgeError) as e:
        read_secret(ChapConfig("u", f), "iscsi.chap")
    assert str(e.value) == (
        f"the CHAP secret in {f} (iscsi.chap.secret_file) must be 12 to 255 characters "
        "without spaces (Windows initiators accept at most 16)")
    with pytest.raises(BridgeError) as e:
        read_secret(ChapConfig("u", tmp_path / "nope"), "iscsi.mutual_chap")
    assert str(e.value) == (f"cannot read iscsi.mutual_chap.secret_file {tmp_path / 'nope'}: "
                            "No such file or directory")


def test_mutual_secret_must_differ(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("samesecret1234\n")
    b.write_text("samesecret1234\n")
    br = bridge(tmp_path, chap=ChapConfig("in", a), mutual_chap=ChapConfig("out", b))
    with pytest.raises(BridgeError, match="must use different secrets"):
        br._secrets()


def test_exports_from_config() -> None:
    cfg = parse_config({"version": 1, "volumes": [
        {"name": "a", "size": "1G"}, {"name": "b", "size": "1G", "read_only": True}]})
    assert exports_from_config(cfg) == [Export("a"), Export("b", read_only=True)]
    assert exports_from_config(cfg, primary=False, snapshots=["a@s1"]) == [
        Export("a@s1", read_only=True)]
    secondary = parse_config({"version": 1, "node": {"role": "secondary"},
                              "volumes": [{"name": "a", "size": "1G"}]})
    assert exports_from_config(secondary) == []  # only the primary exports writable LUNs
