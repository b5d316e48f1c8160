"""Every admin action on volumes and snapshots lands in the audit log, with its outcome,
who did it and from where; refused attempts too."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_nbdgw


def test_admin_actions_are_audited(tmp_path: Path) -> None:
    dd = str(tmp_path / "data")
    run_nbdgw("volume", "create", "v1", "--size", "16M", "--data-dir", dd)
    run_nbdgw("snapshot", "create", "v1", "--name", "s1", "--data-dir", dd)
    run_nbdgw("snapshot", "rollback", "v1", "s1", "--yes", "--data-dir", dd)
    run_nbdgw("snapshot", "delete", "v1", "s1", "--data-dir", dd)
    bad = run_nbdgw("snapshot", "delete", "v1", "nope", "--data-dir", dd, check=False)
    assert bad.returncode == 1
    unconfirmed = run_nbdgw("volume", "delete", "v1", "--data-dir", dd, check=False,
                            input_="n\n")
    assert unconfirmed.returncode == 1
    run_nbdgw("volume", "delete", "v1", "--yes", "--data-dir", dd)

    entries = [json.loads(x) for x in
               run_nbdgw("audit", "--json", "--data-dir", dd).stdout.splitlines()]
    assert [(e["action"], e["outcome"]) for e in entries] == [
        ("volume create", "done"), ("snapshot create", "done"),
        ("snapshot rollback", "done"), ("snapshot delete", "done"),
        ("snapshot delete", "refused"), ("volume delete", "refused"),
        ("volume delete", "done")]
    assert entries[0]["args"] == {"name": "v1", "size": "16M", "replica": False}
    assert entries[2]["args"] == {"volume": "v1", "name": "s1"}
    assert "nope" in entries[4]["detail"]
    assert all(e["user"] == "root" and e["from"] == "local" and e["time"].endswith("Z")
               for e in entries)
    text = run_nbdgw("audit", "--data-dir", dd).stdout.splitlines()
    assert text[-1].endswith(' volume delete {"name": "v1"} done by root from local')
