"""`nbdgw events` follows a failover in the three-site lab, as a monitoring script would:
the current state first, then the secondary's promotion, then the old primary's rejoin."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NBDGW
from tests.integration.conftest import cfg, lab_cmd, up, wait_states

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (netns)")


def follow(lab: dict[str, Any], site: str, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen([NBDGW, "-c", cfg(lab, site), "events", "--timeout",
                             str(seconds)], stdout=subprocess.PIPE, text=True)


def lines_until(p: subprocess.Popen[str], want: Any, timeout: float) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    assert p.stdout is not None
    for line in p.stdout:
        seen.append(json.loads(line))
        if want(seen[-1]):
            return seen
        assert time.monotonic() < deadline, seen
    raise AssertionError(f"the stream ended: {seen}")


def test_events_follow_a_failover_and_a_rejoin(lab_dir: Path) -> None:
    lab = up(lab_dir.parent)
    dc = follow(lab, "dc", 90)
    main_events = None
    try:
        first = lines_until(dc, lambda e: e.get("kind") == "peer" or (
            e.get("event") == "exists" and e.get("kind") == "volume"), 20)
        assert first[0]["event"] == "exists" and first[0]["kind"] == "node"
        assert first[0]["state"] == "standby" and first[0]["primary"] == "main"
        lab_cmd("kill", "main", "--dir", str(lab_dir))
        seen = lines_until(dc, lambda e: e.get("event") == "node"
                           and e.get("state") == "primary", 30)
        promoted = seen[-1]
        assert (promoted["primary"], promoted["epoch"]) == ("dc", 1)
        assert isinstance(promoted["seq"], int) and promoted["time"] > 0
        # DR is re-planned to follow dc: its link shows up as a peer of dc's volume.
        lines_until(dc, lambda e: e.get("event") == "peer" and e.get("peer") == "dr"
                    and e.get("state") in ("in sync", "streaming", "resync", "comparing"), 30)
        lab_cmd("start", "main", "--dir", str(lab_dir))
        main_events = follow(lab, "main", 60)
        rejoined = lines_until(main_events, lambda e: (e.get("event") == "node"
                               and e.get("state") == "standby")
                               or (e.get("event") == "exists" and e.get("kind") == "node"
                                   and e.get("state") == "standby"), 40)
        assert rejoined[-1]["primary"] == "dc"
        wait_states(lab, {"main": "standby", "dc": "primary", "dr": "witness"}, 30)
    finally:
        for p in (dc, main_events):
            if p is not None:
                p.kill()
                p.wait(10)
