"""The daemon's control socket: only root and control.group may use it; a user outside
the group is refused in one line that says who may; a command that needs the daemon
and finds none says so in one line."""

from __future__ import annotations

import grp
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NBDGW, run_nbdgw
from tests.integration.conftest import GROUP, as_nobody, group_node

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switches to user nobody")


@pytest.fixture
def node() -> Iterator[Path]:
    path = group_node("nbdgw-access-")
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)



def test_no_daemon_one_line(node: Path) -> None:
    p = run_nbdgw("-c", str(node), "promote", "--site", "main", check=False)
    sock = node.parent / "data" / "run" / "daemon.sock"
    assert p.returncode == 1
    assert p.stderr == (f"nbdgw: error: cannot reach the daemon at {sock} (No such file or "
                        "directory): is `nbdgw daemon` running on this node?\n")


def test_control_socket_group(node: Path) -> None:
    data = node.parent / "data"
    sock = data / "run" / "daemon.sock"
    log = (node.parent / "daemon.log").open("wb")
    proc = subprocess.Popen([NBDGW, "-c", str(node), "--log-format", "json", "daemon"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (sock.exists() and sock.stat().st_mode & 0o070):
            assert proc.poll() is None and time.monotonic() < deadline, \
                (node.parent / "daemon.log").read_text()
            time.sleep(0.1)
        st = sock.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (
            0, grp.getgrnam(GROUP).gr_gid, 0o660)

        refused = as_nobody(node, "promote", "--site", "main")
        assert refused.returncode == 1
        assert refused.stderr.splitlines()[-1] == (
            f"nbdgw: error: permission denied on {sock}: only root and members of group "
            f"{GROUP} may use the daemon (control.group in the node config)")

        member = as_nobody(node, "promote", "--site", "main", groups=(GROUP,))
        assert member.returncode == 1  # it got through: the daemon itself refuses
        assert member.stderr == ("nbdgw: error: promote main: node main is primary: only a "
                                 "standby or witness site can be promoted\n")
        entries = run_nbdgw("audit", "--json", "--data-dir", str(data)).stdout
        assert '"user": "nobody"' in entries and '"outcome": "refused"' in entries
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(40)
        log.close()


def test_a_group_member_reads_status(node: Path) -> None:
    """`nbdgw status` reads files only: a control.group member needs no write access to
    the volumes (it failed with 'Permission denied: .../volumes/v1/lock'), with or without
    the daemon serving them."""
    data = node.parent / "data"
    p = as_nobody(node, "status", groups=(GROUP,))
    assert (p.returncode, p.stderr) == (0, ""), p.stderr
    assert "volume v1: 8388608 bytes, primary, idle" in p.stdout
    log = (node.parent / "daemon.log").open("wb")
    proc = subprocess.Popen([NBDGW, "-c", str(node), "--log-format", "json", "daemon"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while '"in_use": true' not in run_nbdgw("-c", str(node), "status", "--json").stdout:
            assert proc.poll() is None and time.monotonic() < deadline, \
                (node.parent / "daemon.log").read_text()
            time.sleep(0.2)
        p = as_nobody(node, "status", "--json", groups=(GROUP,))
        assert (p.returncode, p.stderr) == (0, ""), p.stderr
        assert '"in_use": true' in p.stdout
        assert not list(data.rglob("*.json.tmp"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(40)
        log.close()
