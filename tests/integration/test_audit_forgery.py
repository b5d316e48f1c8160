"""Issue 20: the audit log could be forged.  The CLI wrote it itself into a file the
daemon made root:control.group 0660, so a member appended ``promote ... done by root from
10.9.9.9`` and `nbdgw audit` showed it as genuine; members could truncate it too.

Now the daemon (root) writes every entry, naming the Unix user the kernel reports for
the control socket's client (SO_PEERCRED); the file is root-only for writing; entries
are hash-chained and `nbdgw audit --verify` names the first bad line.  Real daemons;
the member is user nobody with the control group as a supplementary group."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NBDGW, run_nbdgw
from tests.integration.conftest import GROUP, as_nobody, group_node

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switches to user nobody")

FORGED = json.dumps({"time": "2026-12-01T00:00:00Z", "action": "promote",
                     "args": {"site": "main", "force": False}, "outcome": "done",
                     "detail": "", "user": "root", "uid": 0, "sudo_user": None,
                     "from": "10.9.9.9", "pid": 1})


def as_nobody_py(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Python as user nobody, member of the control group."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=60, check=False, user="nobody",
                          group="nogroup", extra_groups=[GROUP], cwd="/")


@pytest.fixture
def node() -> Iterator[Path]:
    """A node config with control.group, volume v1 created (by root, no daemon yet), and
    its daemon running; yields the config path."""
    path = group_node("nbdgw-audit-")
    base = path.parent
    sock = base / "data" / "run" / "daemon.sock"
    log = (base / "daemon.log").open("wb")
    proc = subprocess.Popen([NBDGW, "-c", str(path), "--log-format", "json", "daemon"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (sock.exists() and sock.stat().st_mode & 0o070):
            assert proc.poll() is None and time.monotonic() < deadline, \
                (base / "daemon.log").read_text()
            time.sleep(0.1)
        yield path
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(40)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def entries(config: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in
            run_nbdgw("-c", str(config), "audit", "--json").stdout.splitlines()]


def verify(config: Path) -> subprocess.CompletedProcess[str]:
    return run_nbdgw("-c", str(config), "audit", "--verify", check=False)


def test_a_member_cannot_forge_or_cut_the_log_undetected(node: Path) -> None:
    log = node.parent / "data" / "audit.log"
    member = as_nobody(node, "promote", "--site", "main", groups=(GROUP,))
    assert member.returncode == 1  # refused by the daemon, and recorded by it
    appended = as_nobody_py(
        "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')", str(log), FORGED)
    cut = as_nobody_py("import os, sys; os.truncate(sys.argv[1], 0)", str(log))
    assert (appended.returncode, cut.returncode) == (1, 1), \
        f"a control.group member could write the audit log:\n{log.read_text()}"
    assert "PermissionError" in appended.stderr and "PermissionError" in cut.stderr
    v = verify(node)
    assert (v.returncode, v.stderr) == (0, ""), v.stderr
    st = log.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    assert "10.9.9.9" not in log.read_text()


def test_entries_name_the_user_the_kernel_saw(node: Path) -> None:
    data = node.parent / "data"
    member = as_nobody(node, "promote", "--site", "main", groups=(GROUP,))
    assert member.stderr == ("nbdgw: error: promote main: node main is primary: only a "
                             "standby or witness site can be promoted\n")
    # A member's own client that claims to be root, or asks the daemon to record a
    # promote it did not ask the daemon for: refused, nothing recorded.
    claim = ("import json, socket, sys\n"
             "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
             "s.sendall(json.dumps(json.loads(sys.argv[2])).encode() + b'\\n')\n"
             "print(s.makefile().readline(), end='')\n")
    sock = str(data / "run" / "daemon.sock")
    claims_root = as_nobody_py(claim, sock, json.dumps(
        {"op": "audit", "action": "volume create", "args": {"name": "v9"},
         "outcome": "done", "detail": "", "from": "10.9.9.9", "sudo_user": None,
         "user": "root", "uid": 0}))
    assert "not accepted from a client" in json.loads(claims_root.stdout)["error"]
    fake_promote = as_nobody_py(claim, sock, json.dumps(
        {"op": "audit", "action": "promote", "args": {"site": "main"}, "outcome": "done",
         "detail": "", "from": "local", "sudo_user": None}))
    assert "recorded by the daemon only" in json.loads(fake_promote.stdout)["error"]
    # What the member's CLI does itself is recorded by the daemon, as nobody.
    snap = as_nobody(node, "snapshot", "create", "v1", "--name", "s1", groups=(GROUP,))
    assert snap.returncode == 1
    # And root's, as root.
    run_nbdgw("-c", str(node), "snapshot", "create", "v1", "--name", "s2")

    got = entries(node)
    assert [(e["action"], e["user"]) for e in got] == [
        ("volume create", "root"), ("promote", "nobody"), ("snapshot create", "nobody"),
        ("snapshot create", "root")]
    assert [e["outcome"] for e in got] in (["done", "refused", "refused", "done"],
                                           ["done", "refused", "error", "done"])
    assert [e["recorded_by"] for e in got] == ["cli", "daemon", "daemon", "daemon"]
    assert got[1]["uid"] == got[2]["uid"] == int(
        subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True,
                       check=True).stdout)
    assert got[1]["args"] == {"site": "main", "force": False}
    assert all(isinstance(e["pid"], int) and e["pid"] > 1 for e in got)
    assert [e["seq"] for e in got] == [1, 2, 3, 4]
    text = run_nbdgw("-c", str(node), "audit").stdout.splitlines()
    assert text[1].endswith("promote {\"force\": false, \"site\": \"main\"} refused: node "
                            "main is primary: only a standby or witness site can be "
                            "promoted by nobody from local")
    ok = verify(node)
    assert (ok.returncode, ok.stdout) == (
        0, f"audit log {data / 'audit.log'}: 4 entries, chain intact\n")


def test_verify_names_the_first_bad_line(node: Path) -> None:
    """What root can still do to the file (nothing stops root) is found: a line
    inserted, an entry removed at the end."""
    data = node.parent / "data"
    log = data / "audit.log"
    for name in ("s1", "s2", "s3"):
        run_nbdgw("-c", str(node), "snapshot", "create", "v1", "--name", name)
    good = log.read_bytes()
    lines = good.splitlines(keepends=True)
    log.write_bytes(b"".join([*lines[:2], FORGED.encode() + b"\n", *lines[2:]]))
    v = verify(node)
    assert v.returncode == 1
    assert v.stderr == (f"nbdgw: error: audit log {log} fails verification at line 3: "
                        "not a chained entry (no seq/prev/hash)\n")
    log.write_bytes(b"".join(lines[:-1]))
    v = verify(node)
    assert v.returncode == 1
    assert v.stderr == (f"nbdgw: error: audit log {log} fails verification at line 4: "
                        "the log ends after entry seq 3 but 4 entries were recorded "
                        "(audit.state): 1 missing at the end (truncated)\n")
    # `nbdgw audit` still shows what is there (it does not verify).
    assert len(entries(node)) == 3
