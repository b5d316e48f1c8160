"""The CDP and clone metric families from the real collector over a real data dir: the
window's bytes, the journal a clone of a point and an open point reader pin (by holder),
and a clone's own bytes."""

from __future__ import annotations

from pathlib import Path

from blockstore.cdp import CdpPolicy, open_point, points, write_policy
from blockstore.clone import delete_clone
from blockstore.volume import Volume, create_volume
from gateway import clones
from gateway.config import default_config
from gateway.metrics import NodeCollector

MiB = 1 << 20


def samples(cfg_dir: Path) -> dict[str, dict[tuple[str, ...], float]]:
    cfg = default_config().with_overrides(data_dir=cfg_dir)
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for fam in NodeCollector(cfg).collect():
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(s.labels.values())] = s.value
    return out


def test_pins_and_clones_are_measured(tmp_path: Path) -> None:
    info = create_volume(tmp_path, "v1", 16 * MiB)
    write_policy(info.path, CdpPolicy(3600, 1 << 30))
    vol = Volume.open(tmp_path, "v1")
    for i in range(8):
        vol.write(bytes([i + 1]) * MiB, i * MiB)
        vol.flush()
    seq = [p for p in points(info.path, 1, False) if p.flush][2].seq
    clone = clones.create(tmp_path, f"v1@seq-{seq}", "drill")
    clone.data.write_bytes(b"x" * 8192)  # as if the clone had written 8 KiB
    view = open_point(vol, f"seq-{seq}")  # an open reader of the point
    try:
        got = samples(tmp_path)
    finally:
        view.close()
        vol.close()
    held = got["nbdgw_cdp_bytes_held"][("v1",)]
    assert held >= 8 * MiB  # the 8 MiB written inside the window, at least
    pinned = got["nbdgw_cdp_pinned_journal_bytes"]
    assert set(pinned) == {("v1", "clone-drill"), ("v1", "reader")}
    assert 8 * MiB <= pinned[("v1", "clone-drill")] <= held
    assert got["nbdgw_clone_allocated_bytes"][("drill", f"v1@seq-{seq}")] >= 8192
    delete_clone(tmp_path, "drill")
    got = samples(tmp_path)
    assert "nbdgw_cdp_pinned_journal_bytes" not in got  # nothing pins now
