"""Contract 5 between real peerlink processes: a sender on a newer generation meets the
old primary (compare resync of only the differing extents), and histories with no common
newest generation are refused by the receiver, with nothing applied."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blockstore.errors import InvalidArgument
from blockstore.generations import load_history, new_generation, save_history
from blockstore.volume import Volume, demote_volume, find_volume, promote_volume
from gateway.rejoin import changed_extents
from tests.conftest import run_nbdgw
from tests.integration import test_peerlink
from tests.integration.test_peerlink import Env, MiB, Writer, checksum

env = test_peerlink.env  # the fixture: a served primary v1 and an empty replica


def synced_then_promoted(env: Env) -> None:
    """The replica catches up, then the primary stops and the replica is promoted."""
    w = Writer(env.served, seed=11, max_ops=40)
    w.start()
    w.finish()
    rx = env.receiver()
    tx = env.sender(rx.port)
    env.wait_caught_up()
    assert (tx.stop(), rx.stop()) == (0, 0)
    env.served.stop()
    promote_volume(env.replica, "v1")


def status(data_dir: Path) -> dict[str, Any]:
    return json.loads(run_nbdgw("status", "--json", "--data-dir", str(data_dir)).stdout)


def status_text(data_dir: Path) -> str:
    return run_nbdgw("status", "--data-dir", str(data_dir)).stdout


def write_blocks(data_dir: Path, offsets: list[int], byte: int) -> None:
    """Write 4 KiB at each offset of a volume nobody serves (its journal records them)."""
    vol = Volume.open(data_dir, "v1")
    try:
        for off in offsets:
            vol.write(bytes([byte]) * 4096, off)
    finally:
        vol.close()


def test_old_primary_gets_only_the_differing_extents(env: Env) -> None:
    synced_then_promoted(env)
    write_blocks(env.primary, [8 * MiB, 8 * MiB + 4096], 0xAA)  # the unshipped tail
    write_blocks(env.replica, [40 * MiB], 0xBB)  # the new primary's own writes
    snap = demote_volume(env.primary, "v1", "r1",
                         changed=lambda i: changed_extents(i, "r1"))
    assert snap is not None and snap.startswith("diverged-")
    # Demoted, it holds writes r1 never had: Inconsistent, never promoted as it is.
    (v,) = status(env.primary)["volumes"]
    assert v["inconsistent"] and v["role"] == "replica"
    with pytest.raises(InvalidArgument, match="its resync from r1 has not completed"):
        promote_volume(env.primary, "v1", epoch=5)
    # The writes lost to the failover, counted and located (status and metrics).
    (d,) = v["diverged"]
    assert (d["snapshot"], d["kept"], d["records"], d["bytes"], d["new_primary"]) == (
        snap, True, 2, 8192, "r1")
    assert (f"  2 records (8192 bytes) of acknowledged writes not on r1: kept in snapshot "
            f"{snap}") in status_text(env.primary)
    rx = env.receiver(data_dir=env.primary, node="p1")
    tx = env.sender(rx.port, data_dir=env.replica, node="r1", peer="p1")
    started = tx.wait_event("compare_started")
    assert started["extents"] == 2, started  # only the extents either side changed
    assert "2 of 1024 extents changed on either side since the fork" in started["why"]
    done = tx.wait_event("compare_done")
    assert done["differing"] == 2, done
    sent = tx.wait_event("resync_extents_sent")
    assert sent["kind"] == "delta" and sent["extents"] == 2, sent
    rx.wait_event("replica_consistent")
    assert (tx.stop(), rx.stop()) == (0, 0)
    assert checksum(env.primary) == checksum(env.replica)
    # The old primary adopted the newer history, and keeps its tail in the snapshot.
    p, r = (find_volume(d, "v1") for d in (env.primary, env.replica))
    hp, hr = load_history(p.path, p.uuid), load_history(r.path, r.uuid)
    assert (hp.logical_uuid, hp.generations) == (hr.logical_uuid, hr.generations)
    vol = Volume.open(env.primary, "v1")
    try:
        buf = bytearray(4096)
        vol.snapshot_view(snap).read_into(buf, 8 * MiB)
        assert bytes(buf) == bytes([0xAA]) * 4096
    finally:
        vol.close()
    assert promote_volume(env.primary, "v1", epoch=5).epoch == 5  # resynced: promotable


def test_without_an_account_of_changes_every_extent_is_compared(env: Env) -> None:
    synced_then_promoted(env)
    assert demote_volume(env.primary, "v1", "r1") is None  # r1 had acked everything
    rx = env.receiver(data_dir=env.primary, node="p1")
    tx = env.sender(rx.port, data_dir=env.replica, node="r1", peer="p1")
    started = tx.wait_event("compare_started")
    assert started["extents"] == 1024 and "every extent compared" in started["why"]
    assert tx.wait_event("compare_done")["differing"] == 0
    rx.wait_event("replica_consistent")
    assert (tx.stop(), rx.stop()) == (0, 0)
    assert checksum(env.primary) == checksum(env.replica)


def test_unrelated_histories_are_refused_and_nothing_applied(env: Env) -> None:
    synced_then_promoted(env)
    # The old primary was promoted on its own too (an independent generation): neither
    # history contains the other's newest generation.
    info = find_volume(env.primary, "v1")
    save_history(info.path, new_generation(load_history(info.path, info.uuid), 1000, 1))
    demote_volume(env.primary, "v1", "r1", preserve=False)
    before = checksum(env.primary)
    rx = env.receiver(data_dir=env.primary, node="p1")
    tx = env.sender(rx.port, data_dir=env.replica, node="r1", peer="p1")
    reason = ("volume 'v1': the generation histories of 'r1' and 'p1' are unrelated (split "
              "brain, or another volume); refusing to guess")
    assert rx.wait_event("peer_refused_by_us")["reason"] == reason
    assert tx.wait_event("refused_by_peer")["reason"] == reason
    assert (tx.stop(), rx.stop()) == (0, 0)
    assert checksum(env.primary) == before


