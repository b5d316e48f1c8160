"""The `snapshots:` section of the node config: parsing, defaults, and every error
message word for word."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import Every, SnapshotSchedule, SnapshotsConfig, load_config, parse_config
from tests.unit.conftest import refused

ROOT = Path(__file__).resolve().parents[2]
NAME_RULE = "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
SCHED_RULE = "expected 1-32 letters, digits, '_' or '-', starting with a letter or digit"
EVERY_RULE = "expected 'Nm' (N from 1 to 10080), hourly, daily or weekly"


def sched(**kw: Any) -> dict[str, Any]:
    return {"name": "h", "every": "hourly", "keep": 24, **kw}


def cfg(*schedules: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "snapshots": {"schedules": list(schedules)}}




def test_absent_section_means_no_schedules() -> None:
    assert parse_config({"version": 1}).snapshots == SnapshotsConfig()
    assert parse_config({"version": 1, "snapshots": None}).snapshots == SnapshotsConfig()


def test_schedules_parse() -> None:
    got = parse_config(cfg(sched(name="q", every="15m", keep=8, volumes=["a", "b"]),
                           sched(name="d", every="daily", keep=14),
                           sched(name="w", every="weekly", keep=4))).snapshots.schedules
    assert got == (SnapshotSchedule("q", Every.MINUTES, 15, 8, ("a", "b")),
                   SnapshotSchedule("d", Every.DAILY, 1440, 14),
                   SnapshotSchedule("w", Every.WEEKLY, 10080, 4))


def test_example_config_documents_the_section() -> None:
    example = ROOT / "examples" / "nbdgw.yaml"
    s = load_config(example).snapshots.schedules
    assert [(x.name, x.every, x.keep, x.volumes) for x in s] == [
        ("quarter-hourly", Every.MINUTES, 8, ("sql-data", "sql-log")),
        ("daily", Every.DAILY, 14, ())]
    text = example.read_text()
    for key in ("snapshots", "schedules", "every", "keep", "volumes"):
        assert f"{key}:" in text


@pytest.mark.parametrize(("raw", "message"), [
    ({"version": 1, "snapshots": []}, "expected a mapping for snapshots"),
    ({"version": 1, "snapshots": {"plans": []}},
     "unknown key 'plans' in snapshots (known: schedules)"),
    ({"version": 1, "snapshots": {"schedules": {}}},
     "expected a list for snapshots.schedules"),
    (cfg("hourly"), "expected a mapping for snapshots.schedules[0]"),
    (cfg(sched(colour=1)), "unknown key 'colour' in snapshots.schedules[0] "
                           "(known: every, keep, name, volumes)"),
    (cfg({"every": "hourly", "keep": 1}), "missing key 'name' in snapshots.schedules[0]"),
    (cfg({"name": "h", "keep": 1}), "missing key 'every' in snapshots.schedules[0]"),
    (cfg({"name": "h", "every": "daily"}), "missing key 'keep' in snapshots.schedules[0]"),
    (cfg(sched(name="a b")), f"{SCHED_RULE}, for snapshots.schedules[0].name"),
    (cfg(sched(name="x" * 33)), f"{SCHED_RULE}, for snapshots.schedules[0].name"),
    (cfg(sched(name=7)), f"{SCHED_RULE}, for snapshots.schedules[0].name"),
    (cfg(sched(), sched()), "schedule h is listed twice in snapshots.schedules"),
    (cfg(sched(every="0m")), f"{EVERY_RULE} for snapshots.schedules[0].every"),
    (cfg(sched(every="10081m")), f"{EVERY_RULE} for snapshots.schedules[0].every"),
    (cfg(sched(every="2h")), f"{EVERY_RULE} for snapshots.schedules[0].every"),
    (cfg(sched(every=15)), f"{EVERY_RULE} for snapshots.schedules[0].every"),
    (cfg(sched(keep=0)), "expected integer between 1 and 512 for snapshots.schedules[0].keep"),
    (cfg(sched(keep=513)),
     "expected integer between 1 and 512 for snapshots.schedules[0].keep"),
    (cfg(sched(keep="7")), "expected integer between 1 and 512 for snapshots.schedules[0].keep"),
    (cfg(sched(volumes="a")), "expected a list for snapshots.schedules[0].volumes"),
    (cfg(sched(volumes=[])), "expected at least one volume in snapshots.schedules[0].volumes "
                             "(leave the key out for every volume)"),
    (cfg(sched(volumes=["ok", "b@d"])),
     f"invalid volume name 'b@d': {NAME_RULE} in snapshots.schedules[0].volumes[1]"),
    (cfg(sched(volumes=["a", "a"])), "volume a is listed twice in snapshots.schedules[0].volumes"),
    (cfg(sched(name="a", keep=300), sched(name="b", keep=300, volumes=["v"])),
     "snapshots.schedules keep 600 snapshots of volume v together (at most 512)"),
    (cfg(sched(name="a", keep=300), sched(name="b", keep=213)),
     "snapshots.schedules keep 513 snapshots of every volume together (at most 512)"),
])
def test_messages(raw: Any, message: str) -> None:
    assert refused(raw) == message
