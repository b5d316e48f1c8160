"""The groups parent takes a new group on SIGHUP without stopping the others (what
deploy/add-branch.yml relies on): a real `nbdgw daemon` on a config with groups, each
group a one-site group serving one volume over NBD on its own port (failover off).

SIGHUP after adding g2 to the file: g2's export answers, g1's daemon keeps its pid and
its client its connection; SIGHUP after removing g1: g1's daemon is gone, g2 serves on;
a config that does not validate changes nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import NBDGW, free_port, run_nbdgw

pytest.importorskip("nbd")


def group(name: str, volume: str) -> dict[str, Any]:
    return {"name": name, "primary": "a",
            "ports": {"peerlink": free_port(), "heartbeat": free_port(), "nbd": free_port()},
            "volumes": [{"name": volume, "size": "4M"}]}


def write(path: Path, data_dir: Path, groups: list[dict[str, Any]]) -> None:
    path.write_text(yaml.safe_dump({
        "version": 1, "node": {"name": "a", "data_dir": str(data_dir)},
        "failover": {"auto": False},
        "sites": [{"name": "a", "address": "127.0.0.1"}], "groups": groups}))


def children(parent: int) -> dict[str, int]:
    """The parent's group daemons: group name -> pid (from their argv)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent:
                continue
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if b"--group" in argv:
            out[argv[argv.index(b"--group") + 1].decode()] = int(stat.parent.name)
    return out


def answers(port: int, export: str) -> bool:
    import nbd

    h = nbd.NBD()
    try:
        h.connect_uri(f"nbd://127.0.0.1:{port}/{export}")
    except nbd.Error:
        return False
    h.shutdown()
    return True


def wait(cond: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def parent(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, list[Any]]]:
    cfg, data = tmp_path / "nbdgw.yaml", tmp_path / "data"
    groups = [group("g1", "v1")]
    write(cfg, data, groups)
    run_nbdgw("-c", str(cfg), "--group", "g1", "volume", "create", "v1")
    log = (tmp_path / "daemon.log").open("wb")
    p = subprocess.Popen([NBDGW, "-c", str(cfg), "--log-format", "json", "daemon"],
                         stdout=log, stderr=subprocess.STDOUT)
    yield p, cfg, groups
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)
    log.close()


def test_sighup_starts_an_added_group_and_stops_a_removed_one_only(
        parent: tuple[subprocess.Popen[bytes], Path, list[Any]], tmp_path: Path) -> None:
    import nbd

    p, cfg, groups = parent
    g1 = groups[0]
    wait(lambda: answers(g1["ports"]["nbd"], "v1"), "g1 never served")
    g1_pid = children(p.pid)["g1"]
    client = nbd.NBD()
    client.connect_uri(f"nbd://127.0.0.1:{g1['ports']['nbd']}/v1")
    client.pwrite(b"1" * 4096, 0)

    # A config that does not validate: nothing changes.
    good = cfg.read_text()
    cfg.write_text(good.replace("groups:", "groupz:"))
    p.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert children(p.pid) == {"g1": g1_pid}

    g2 = group("g2", "v2")
    write(cfg, tmp_path / "data", [g1, g2])
    run_nbdgw("-c", str(cfg), "--group", "g2", "volume", "create", "v2")
    p.send_signal(signal.SIGHUP)
    wait(lambda: answers(g2["ports"]["nbd"], "v2"), "g2 was not started on SIGHUP")
    assert children(p.pid)["g1"] == g1_pid  # g1's daemon kept running
    client.pwrite(b"2" * 4096, 4096)  # and its client's connection with it
    client.flush()
    assert client.pread(4096, 0) == b"1" * 4096

    write(cfg, tmp_path / "data", [g2])
    p.send_signal(signal.SIGHUP)
    # g1's process gone from /proc (a zombie has no argv) is not yet the parent done
    # with it: it reaps it, then logs group_removed
    wait(lambda: ("group_removed", "g1") in reloads(tmp_path), "g1 was not stopped on SIGHUP")
    assert "g1" not in children(p.pid)
    assert answers(g2["ports"]["nbd"], "v2")
    assert p.poll() is None
    assert reloads(tmp_path) == [("reload_refused", None), ("group_added", "g2"),
                                 ("group_removed", "g1")]


def reloads(tmp_path: Path) -> list[tuple[str, str | None]]:
    """The parent's reload events in its log, in order."""
    log = [json.loads(x) for x in (tmp_path / "daemon.log").read_text().splitlines()
           if x.startswith("{")]
    return [(e["event"], e.get("group")) for e in log
            if e.get("event") in ("reload_refused", "group_added", "group_removed")]
