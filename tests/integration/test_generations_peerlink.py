"""Contract 5 between real peerlink processes: a sender on a newer generation meets the
old primary (compare resync of only the differing extents; the old primary unpromotable
until then), forked histories converge on the newer epoch (the loser keeps what only it
had as a diverged snapshot), and histories that cannot be ordered are refused by both
ends as a split brain that `nbdgw status` shows with the commands that settle it."""

# The workload's randomness is for coverage (seeded), not secrecy.
# ruff: noqa: S311

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from blockstore.errors import InvalidArgument
from blockstore.generations import (
    Generation,
    History,
    describe_fork,
    diverged_name,
    load_history,
    save_history,
    unrelated_refusal,
)
from blockstore.peers import set_adopt
from blockstore.roles import (
    demote_volume,
    promote_volume,
    renew_generation,
)
from blockstore.volume import (
    Volume,
    find_volume,
)
from gateway.rejoin import changed_extents
from tests.conftest import run_nbdgw
from tests.integration.peerenv import Env, MiB, Writer, checksum, replica_state
from tests.statusschema import VOLUME, check


def synced_then_promoted(env: Env, epoch: int | None = None) -> None:
    """The replica catches up, then the primary stops and the replica is promoted."""
    w = Writer(env.served, seed=11, max_ops=40)
    w.start()
    w.finish()
    rx = env.receiver()
    tx = env.sender(rx.port)
    env.wait_caught_up()
    assert (tx.stop(), rx.stop()) == (0, 0)
    env.served.stop()
    promote_volume(env.replica, "v1", epoch=epoch)


def write_blocks(data_dir: Path, offsets: list[int], byte: int) -> None:
    """Write 4 KiB at each offset of a volume nobody serves (its journal records them)."""
    vol = Volume.open(data_dir, "v1")
    try:
        for off in offsets:
            vol.write(bytes([byte]) * 4096, off)
    finally:
        vol.close()


def history(data_dir: Path) -> Any:
    info = find_volume(data_dir, "v1")
    return load_history(info.path, info.uuid)


def status(data_dir: Path) -> dict[str, Any]:
    return json.loads(run_nbdgw("status", "--json", "--data-dir", str(data_dir)).stdout)


def status_text(data_dir: Path) -> str:
    return run_nbdgw("status", "--data-dir", str(data_dir)).stdout


def snapshot_checksum(data_dir: Path, name: str) -> str:
    """SHA-256 of a snapshot's image, as `nbdgw volume checksum` hashes a volume."""
    vol = Volume.open(data_dir, "v1", readonly=True)
    try:
        view = vol.snapshot_view(name)
        h = hashlib.sha256()
        buf = bytearray(MiB)
        for off in range(0, vol.size, MiB):
            view.read_into(buf, off)
            h.update(buf)
        return h.hexdigest()
    finally:
        vol.close()


def held_extents(data_dir: Path, name: str) -> int:
    vol = Volume.open(data_dir, "v1", readonly=True)
    try:
        (row,) = [r for r in vol.snapshot_list() if r["name"] == name]
        return int(row["extents"])
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


DC_WRITES = [40 * MiB, 40 * MiB + 65536, 41 * MiB]  # dc's writes after the fork
MAIN_WRITES = [8 * MiB, 40 * MiB]  # main's: one where dc wrote too


def forked(env: Env, *, dc_epoch: int, main_epoch: int) -> None:
    """The issue's shape: both copies share G0 (in sync), then the replica ("dc", node
    r1) is promoted to its own generation and takes writes, and the primary ("main",
    node p1) is promoted again from G0 on another epoch and takes writes of its own."""
    synced_then_promoted(env, epoch=dc_epoch)
    write_blocks(env.replica, DC_WRITES, 0xBB)
    renew_generation(env.primary, "v1", epoch=main_epoch)
    write_blocks(env.primary, MAIN_WRITES, 0xAA)
    hd, hm = history(env.replica), history(env.primary)
    assert hd.generations[0] == hm.generations[0]  # they share G0 ...
    assert hd.current != hm.current and len(hd.generations) == len(hm.generations) == 2


@pytest.mark.parametrize("demoted_with_snapshot", [True, False])
def test_a_fork_converges_on_the_newer_epoch(env: Env, demoted_with_snapshot: bool) -> None:
    """main (epoch 2) is the sync source; dc (epoch 1) keeps what only it had as
    diverged-<its generation> (taken by its demotion, or else by its receiver before the
    first resync write) and ends bit-identical to main.  Before this, both ends refused
    ("unrelated ... refusing to guess") every 2 s forever."""
    forked(env, dc_epoch=1, main_epoch=2)
    dc_gen = history(env.replica).current
    main_hist = history(env.primary)
    demote_volume(env.replica, "v1", "p1", preserve=demoted_with_snapshot)
    before = checksum(env.replica)  # dc's image: G0's data and its own writes
    rx = env.receiver(data_dir=env.replica, node="r1")
    tx = env.sender(rx.port, data_dir=env.primary, node="p1", peer="r1")
    started = tx.wait_event("compare_started")
    assert started["why"] == describe_fork(
        "v1", "p1", main_hist.generations, "r1", history(env.replica).generations) + (
        "; every extent compared")
    rx.wait_event("replica_consistent")
    assert (tx.stop(), rx.stop()) == (0, 0)
    assert checksum(env.replica) == checksum(env.primary)
    snap = diverged_name(dc_gen.gen_id)
    assert snapshot_checksum(env.replica, snap) == before  # exactly its pre-resync image
    kept = rx.events("diverged_kept")
    assert [(e["snapshot"], e["records"], e["bytes"]) for e in kept] == [
        (snap, len(DC_WRITES), 4096 * len(DC_WRITES))]
    assert history(env.replica).generations == main_hist.generations  # epochs included
    (v,) = status(env.replica)["volumes"]
    check(v, VOLUME)  # the documented schema, with a diverged entry
    assert not v["inconsistent"]
    (d,) = v["diverged"]
    assert (d["snapshot"], d["kept"], d["records"], d["bytes"], d["new_primary"]) == (
        snap, True, 3, 3 * 4096, "p1")
    assert d["basis"] == f"writes since generation {dc_gen.gen_id:016x} began here (the fork)"
    assert (f"3 records (12288 bytes) of acknowledged writes not on p1: kept in snapshot "
            f"{snap}") in status_text(env.replica)
    (p,) = status(env.primary)["volumes"][0]["peers"]
    assert (p["name"], p["refused"], p["state"]) == ("r1", None, "disconnected")  # stopped


def test_the_older_epoch_of_a_fork_is_refused_as_stale(env: Env) -> None:
    forked(env, dc_epoch=1, main_epoch=2)
    demote_volume(env.primary, "v1", "r1")  # roles reversed: dc (older) sends to main
    before = checksum(env.primary)
    rx = env.receiver(data_dir=env.primary, node="p1")
    tx = env.sender(rx.port, data_dir=env.replica, node="r1", peer="p1")
    reason = describe_fork("v1", "r1", history(env.replica).generations, "p1",
                           history(env.primary).generations)
    assert reason.endswith("; 'r1' is on the older epoch: its copy is stale and is not sent")
    assert rx.wait_event("peer_refused_by_us")["reason"] == reason
    assert tx.wait_event("refused_by_peer")["reason"] == reason
    assert (tx.stop(), rx.stop()) == (0, 0)
    assert checksum(env.primary) == before
    (p,) = status(env.replica)["volumes"][0]["peers"]  # the sender's end
    assert (p["name"], p["state"], p["refused"]["reason"], p["refused"]["by"]) == (
        "p1", "refused", reason, "peer")
    assert p["refused"]["settle"] is None


def split_brain_view(data_dir: Path, peer: str) -> dict[str, Any]:
    (p,) = [p for p in status(data_dir)["volumes"][0]["peers"] if p["name"] == peer]
    return p


def test_unrelated_histories_are_a_split_brain_shown_until_settled(env: Env) -> None:
    synced_then_promoted(env)
    # The old primary's history was rebuilt elsewhere (say, restored from a backup of
    # another cluster's copy): the same volume, no generation in common.
    info = find_volume(env.primary, "v1")
    old = load_history(info.path, info.uuid)
    save_history(info.path, History(old.logical_uuid, (Generation(0x5EED, 1, 0),
                                                       Generation(0x5EEE, 1000, 7))))
    demote_volume(env.primary, "v1", "r1", preserve=False)
    before = checksum(env.primary)
    rx = env.receiver(data_dir=env.primary, node="p1")
    tx = env.sender(rx.port, data_dir=env.replica, node="r1", peer="p1")
    reason = unrelated_refusal("v1", "r1", "p1")
    assert rx.wait_event("peer_refused_by_us")["reason"] == reason
    assert tx.wait_event("refused_by_peer")["reason"] == reason
    assert rx.stop() == 0
    assert checksum(env.primary) == before
    settle = [{"keeps": "r1", "command": "nbdgw resolve --discard p1"},
              {"keeps": "p1", "command": "nbdgw resolve --discard r1"}]
    for data_dir, peer, by in ((env.primary, "r1", "this node"), (env.replica, "p1", "peer")):
        check(status(data_dir)["volumes"][0], VOLUME)  # with a refused peer
        p = split_brain_view(data_dir, peer)
        assert (p["state"], p["refused"]["reason"], p["refused"]["by"]) == (
            "split brain", reason, by)
        assert p["refused"]["split_brain"] and p["refused"]["attempts"] >= 1
        assert sorted(p["refused"]["settle"], key=lambda c: c["keeps"]) == settle[::-1]
        text = status_text(data_dir)
        assert f"  peer {peer}" in text and ": split brain, acked seq 0" in text
        assert reason in text
        assert "'nbdgw resolve --discard p1' keeps r1's data" in text
    # Settled for r1's side (what `nbdgw resolve --discard p1` does on p1): p1's replica
    # takes r1's data; the next handshake succeeds and the record goes on both ends.
    set_adopt(find_volume(env.primary, "v1"), "r1")
    rx = env.receiver(data_dir=env.primary, node="p1")
    tx.stop()
    tx = env.sender(rx.port, data_dir=env.replica, node="r1", peer="p1")
    rx.wait_event("replica_consistent")
    assert (tx.stop(), rx.stop()) == (0, 0)
    assert checksum(env.primary) == checksum(env.replica)
    assert split_brain_view(env.replica, "p1")["refused"] is None
    assert [p["name"] for p in status(env.primary)["volumes"][0]["peers"]] == []


def test_a_fork_on_one_epoch_is_a_split_brain(env: Env) -> None:
    forked(env, dc_epoch=3, main_epoch=3)
    demote_volume(env.replica, "v1", "p1")
    before = checksum(env.replica)
    rx = env.receiver(data_dir=env.replica, node="r1")
    tx = env.sender(rx.port, data_dir=env.primary, node="p1", peer="r1")
    reason = rx.wait_event("peer_refused_by_us")["reason"]
    assert reason == describe_fork("v1", "p1", history(env.primary).generations, "r1",
                                   history(env.replica).generations)
    assert reason.endswith("; neither is newer (both on one epoch: split brain); refusing "
                           "to guess")
    assert (tx.stop(), rx.stop()) == (0, 0)
    assert checksum(env.replica) == before
    assert split_brain_view(env.replica, "p1")["state"] == "split brain"
    assert split_brain_view(env.primary, "r1")["state"] == "split brain"


def test_a_fork_resync_killed_midway_keeps_the_snapshot_and_converges(env: Env) -> None:
    """kill -9 of the losing side while the winner's extents overwrite it: the snapshot
    taken before the first of them still holds exactly the pre-resync image (extents
    written twice are not preserved twice), and the next session converges."""
    forked(env, dc_epoch=1, main_epoch=2)
    rng = random.Random(5)
    vol = Volume.open(env.primary, "v1")
    try:  # 8 MiB more on main, in 64 KiB extents: a resync of a few seconds at 2 MB/s
        for e in rng.sample(range(512), 128):
            vol.write(rng.randbytes(65536), e * 65536)
    finally:
        vol.close()
    demote_volume(env.replica, "v1", "p1", preserve=False)  # the receiver takes it
    snap = diverged_name(history(env.replica).current.gen_id)
    before = checksum(env.replica)
    rx = env.receiver(data_dir=env.replica, node="r1")
    tx = env.sender(rx.port, "--rate-limit", "2M", "--compress", "0", data_dir=env.primary,
                    node="p1", peer="r1")
    rx.wait_event("resync_started")
    time.sleep(1.5)
    rx.kill9()
    assert replica_state(env.replica)["inconsistent"]  # killed mid-resync
    held = held_extents(env.replica, snap)
    assert held > 0  # extents were overwritten, their pre-images preserved first
    assert snapshot_checksum(env.replica, snap) == before
    rx = env.receiver(rx.port, data_dir=env.replica, node="r1")
    rx.wait_event("replica_consistent", timeout=60)
    assert (tx.stop(), rx.stop()) == (0, 0)
    assert checksum(env.replica) == checksum(env.primary)
    assert snapshot_checksum(env.replica, snap) == before
    assert held_extents(env.replica, snap) > held  # the rest preserved once, by the next
    (d,) = status(env.replica)["volumes"][0]["diverged"]
    assert (d["snapshot"], d["records"]) == (snap, len(DC_WRITES))
