"""`nbdgw events` follows a real daemon: the current state first, then each change."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import yaml

from tests.conftest import NBDGW, run_nbdgw


def test_events_stream_starts_with_now_and_follows_snapshots(tmp_path: Path) -> None:
    data, sock = tmp_path / "data", tmp_path / "nbd.sock"
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text(yaml.safe_dump({"version": 1, "node": {"name": "solo",
                                                           "data_dir": str(data)},
                                   "nbd": {"listen": [f"unix:{sock}"]}}))
    run_nbdgw("-c", str(cfg), "volume", "create", "v1", "--size", "32M")
    log = (tmp_path / "daemon.log").open("wb")
    daemon = subprocess.Popen([NBDGW, "-c", str(cfg), "--log-format", "json", "daemon"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (data / "run" / "failover.json").exists():
            assert daemon.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        now = run_nbdgw("-c", str(cfg), "events", "--now").stdout.splitlines()
        first = [json.loads(line) for line in now]
        assert first[0] == {**first[0], "event": "exists", "kind": "node", "state": "primary"}
        assert {"event": "exists", "kind": "volume", "volume": "v1", "role": "primary",
                "snapshots": 0} in first
        follower = subprocess.Popen([NBDGW, "-c", str(cfg), "events", "--timeout", "20"],
                                    stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)
            run_nbdgw("-c", str(cfg), "snapshot", "create", "v1", "--name", "s1")
            seen = []
            assert follower.stdout is not None
            deadline = time.monotonic() + 15
            for line in follower.stdout:
                e = json.loads(line)
                seen.append(e)
                if e.get("event") == "snapshot":
                    break
                assert time.monotonic() < deadline, seen
            assert seen[-1] == {**seen[-1], "event": "snapshot", "volume": "v1", "name": "s1",
                                "change": "created"}
            assert isinstance(seen[-1]["seq"], int) and seen[-1]["time"] > 0
        finally:
            follower.kill()
            follower.wait(10)
        # Piped into a command that stops reading: it ends quietly, not with a traceback.
        ev = subprocess.Popen([NBDGW, "-c", str(cfg), "events", "--timeout", "5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert ev.stdout is not None and ev.stderr is not None
        head = subprocess.run(["head", "-1"], stdin=ev.stdout, capture_output=True,
                              text=True, timeout=30, check=False)
        ev.stdout.close()  # as a shell pipe does: the reader is gone
        err = ev.stderr.read().decode()
        ev.wait(30)
        assert json.loads(head.stdout)["event"] == "exists"
        assert "Traceback" not in err, err
    finally:
        daemon.terminate()
        daemon.wait(30)
