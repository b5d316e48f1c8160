"""`nbdgw cdp list|export|unexport` on a volume's files, the config's windows written
for every volume (replicas too), and `nbdgw status`'s cdp block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

import blockstore.cdp as cdp_mod
import gateway.cdp as gateway_cdp
from blockstore.cdp import CdpPolicy, read_exports, read_policy, write_policy
from blockstore.volume import Volume, create_volume
from gateway.cdp import apply_policies
from gateway.cli import cli
from gateway.config import ConfigError, parse_config
from gateway.status import volume_report

from .test_cdp import Clock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(cdp_mod, "time", c)
    return c


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, list(args))
    # The CLI configured structlog to cache loggers on first use: a blockstore logger
    # first used after this would keep this configuration and miss later tests' captures.
    structlog.reset_defaults()
    return r.exit_code, r.output


def test_list_export_unexport(tmp_path: Path, clock: Clock) -> None:
    info = create_volume(tmp_path, "v1", 1 << 20)
    write_policy(info.path, CdpPolicy(3600, 1 << 30))
    vol = Volume.open(tmp_path, "v1")
    times = []
    for i in range(3):
        vol.write(bytes([i + 1]) * 4096, 0)
        vol.flush()
        times.append(clock.time_ns())
        clock.tick(10)
    vol.close()
    dd = str(tmp_path)
    code, out = run("cdp", "list", "v1", "--data-dir", dd, "--json")
    assert code == 0, out
    w = json.loads(out)
    flushes = [p for p in w["points"] if p["flush"]]
    assert [p["t_ns"] for p in flushes] == times
    assert w["oldest_point"]["seq"] == w["points"][0]["seq"]
    code, out = run("cdp", "list", "v1", "--data-dir", dd)
    assert code == 0 and "consistency points (3)" in out, out
    at = cdp_mod.format_instant(times[1] + 5 * 10**9)
    code, out = run("cdp", "export", "v1", "--at", at, "--data-dir", dd, "--json")
    assert code == 0, out
    r = json.loads(out)
    assert r["export"] == f"v1@{at}" and r["seq"] == flushes[1]["seq"]
    code, out = run("cdp", "export", "v1", "--before-last-flush", "--data-dir", dd)
    assert code == 0, out
    assert out.splitlines()[0] == f"v1@seq-{flushes[1]['seq']}"
    assert read_exports(info.path) == sorted([f"v1@{at}", f"v1@seq-{flushes[1]['seq']}"])
    code, out = run("cdp", "export", "v1", "--at", "2000-01-01T00:00:00Z", "--data-dir", dd)
    assert code != 0 and "no consistency point at or before 2000-01-01T00:00:00Z" in out
    code, out = run("cdp", "unexport", "v1", f"v1@{at}", "--data-dir", dd)
    assert code == 0, out
    assert read_exports(info.path) == [f"v1@seq-{flushes[1]['seq']}"]
    rep = volume_report(info, 0.0)
    assert rep["cdp"]["window_seconds"] == 3600 and rep["cdp"]["bytes_held"] > 0
    assert rep["cdp"]["oldest_point"]["seq"] == 0


def test_windows_from_the_config(tmp_path: Path) -> None:
    create_volume(tmp_path, "a", 1 << 20)
    create_volume(tmp_path, "r", 1 << 20, replica=True)
    cfg = parse_config({"version": 1, "node": {"data_dir": str(tmp_path)},
                        "cdp": {"window": "7d", "max_bytes": "1G"},
                        "volumes": [{"name": "a", "size": "1M",
                                     "cdp": {"window": "1h"}}]})
    assert sorted(apply_policies(cfg)) == ["a", "r"]
    assert read_policy(tmp_path / "volumes" / "a") == CdpPolicy(3600.0, 200 << 30)
    assert read_policy(tmp_path / "volumes" / "r") == CdpPolicy(7 * 86400.0, 1 << 30)
    assert apply_policies(cfg) == []
    off = parse_config({"version": 1, "node": {"data_dir": str(tmp_path)}})
    assert sorted(apply_policies(off)) == ["a", "r"]
    assert read_policy(tmp_path / "volumes" / "a") is None
    with pytest.raises(ConfigError, match=r"expected a duration .* for cdp.window"):
        parse_config({"version": 1, "cdp": {"window": "soon"}})


def test_restore_on_an_idle_volume(tmp_path: Path, clock: Clock) -> None:
    info = create_volume(tmp_path, "v1", 1 << 20)
    write_policy(info.path, CdpPolicy(3600, 1 << 30))
    vol = Volume.open(tmp_path, "v1")
    vol.write(b"\x01" * 8192, 0)
    vol.flush()
    clock.tick(5)
    vol.write(b"\x02" * 4096, 4096)
    vol.flush()
    vol.close()
    # tests/integration/test_cdp.py runs the real `nbdgw cdp restore`.
    r = gateway_cdp.restore(tmp_path, "v1", before_last_flush=True, snapshot="oops")
    assert r["snapshot"] == "oops" and r["bytes_written"] == 64 << 10
    vol = Volume.open(tmp_path, "v1")
    buf = bytearray(8192)
    vol.read_into(buf, 0)
    assert bytes(buf) == b"\x01" * 8192
    vol.snapshot_view("oops").read_into(buf, 0)
    assert bytes(buf) == b"\x01" * 4096 + b"\x02" * 4096
    vol.close()
