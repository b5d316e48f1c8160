"""Generations (DESIGN.md §5) on real volume files: relation of histories (every pair of
small histories against an independent oracle), the file's migration, promotion of a
replica, demotion of a former primary (its unshipped writes kept as a snapshot and
counted, the volume Inconsistent until resynced), and the split-brain bookkeeping of
gateway/rejoin.py."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest

from blockstore.errors import FormatError, InvalidArgument
from blockstore.generations import (
    Generation,
    History,
    Relation,
    decide,
    describe_fork,
    fork_winner,
    is_split_brain,
    load_history,
    relation,
    save_history,
    unrelated_refusal,
)
from blockstore.meta import write_json
from blockstore.roles import (
    SNAP_ID_GAP,
    demote_volume,
    promote_volume,
    renew_generation,
)
from blockstore.volume import (
    Volume,
    create_volume,
    find_volume,
    volume_status,
)
from gateway import rejoin

G0, G1, G2 = Generation(10, 1, 0), Generation(11, 50, 1), Generation(12, 40, 2)


@pytest.mark.parametrize(("mine", "theirs", "rel"), [
    ((G0,), (G0,), Relation.SAME),
    ((G0, G1), (G0,), Relation.AHEAD),
    ((G0,), (G0, G1), Relation.BEHIND),
    ((G0, G1), (G0, G2), Relation.FORKED),  # two promotions from one point
    ((Generation(1, 1, 0),), (Generation(2, 1, 0),), Relation.UNRELATED),  # another volume
])
def test_relation(mine: tuple[Generation, ...], theirs: tuple[Generation, ...],
                  rel: Relation) -> None:
    assert relation(mine, theirs) is rel


# The generations of a small cluster as a tree (parent, epoch), every history a path from
# a root.  R is the volume's birth; A and B two promotions from it (the fork of the issue:
# a switchover to A's node, then the old primary promoted again as B), C and D two
# promotions from A on one epoch (a split brain), E a promotion after B, Z one whose
# epoch was never recorded (a version 1 file), S another volume's birth.
TREE: dict[str, tuple[str | None, int]] = {
    "R": (None, 0), "A": ("R", 1), "B": ("R", 2), "C": ("A", 3), "D": ("A", 3),
    "E": ("B", 4), "Z": ("R", 0), "S": (None, 0), "T": ("S", 1)}
IDS = {name: 100 + i for i, name in enumerate(TREE)}


def path(name: str) -> list[str]:
    out: list[str] = []
    node: str | None = name
    while node is not None:
        out.append(node)
        node = TREE[node][0]
    return out[::-1]


def history(name: str) -> tuple[Generation, ...]:
    # start_seq counts in the journal of whichever node was promoted: any value will do.
    return tuple(Generation(IDS[n], 7 * len(n) + IDS[n] % 5, TREE[n][1]) for n in path(name))


def oracle(a: str, b: str) -> tuple[Relation, Relation]:
    """(relation, sync source) from the tree itself, not from generation ids."""
    pa, pb = path(a), path(b)
    if a == b:
        return Relation.SAME, Relation.SAME
    if b in pa:
        return Relation.AHEAD, Relation.AHEAD
    if a in pb:
        return Relation.BEHIND, Relation.BEHIND
    if pa[0] != pb[0]:
        return Relation.UNRELATED, Relation.UNRELATED
    ea, eb = TREE[a][1], TREE[b][1]
    if min(ea, eb) == 0 or ea == eb:
        return Relation.FORKED, Relation.FORKED  # cannot be ordered: split brain
    return Relation.FORKED, Relation.AHEAD if ea > eb else Relation.BEHIND


MIRROR = {Relation.AHEAD: Relation.BEHIND, Relation.BEHIND: Relation.AHEAD}


@pytest.mark.parametrize(("a", "b"), list(itertools.product(TREE, TREE)))
def test_relation_table_over_every_pair_of_small_histories(a: str, b: str) -> None:
    mine, theirs = history(a), history(b)
    rel, source = oracle(a, b)
    assert relation(mine, theirs) is rel
    assert decide(mine, theirs) == (source, rel is Relation.FORKED)
    assert relation(theirs, mine) is MIRROR.get(rel, rel)  # the other end agrees
    assert decide(theirs, mine)[0] is MIRROR.get(source, source)
    if rel is Relation.FORKED:
        assert fork_winner(mine, theirs) is source


def test_the_fork_of_the_issue_goes_to_the_newer_epoch() -> None:
    """main switched over to dc (A, epoch 1), dc lost power before main's receiver
    connected, main was promoted again from the older generation (B, epoch 2): main is
    the sync source, dc keeps what only it had and takes main's data."""
    dc, main = history("A"), history("B")
    assert decide(main, dc) == (Relation.AHEAD, True)
    assert decide(dc, main) == (Relation.BEHIND, True)
    assert describe_fork("v1", "main", main, "dc", dc) == (
        "volume 'v1': the histories of 'main' and 'dc' forked after generation "
        "0000000000000064: 'main' went on with generation 0000000000000066 (epoch 2), 'dc' "
        "with 0000000000000065 (epoch 1); 'dc' is on the older epoch: it keeps what only it "
        "had as snapshot diverged-0000000000000065 and takes the data of 'main'")
    stale = describe_fork("v1", "dc", dc, "main", main)
    assert stale == (
        "volume 'v1': the histories of 'dc' and 'main' forked after generation "
        "0000000000000064: 'dc' went on with generation 0000000000000065 (epoch 1), 'main' "
        "with 0000000000000066 (epoch 2); 'dc' is on the older epoch: its copy is stale and "
        "is not sent")
    assert not is_split_brain(stale)


def test_split_brain_refusals_are_exact_and_recognised() -> None:
    one_epoch = describe_fork("v1", "x", history("C"), "y", history("D"))
    assert one_epoch == (
        "volume 'v1': the histories of 'x' and 'y' forked after generation "
        "0000000000000065: 'x' went on with generation 0000000000000067 (epoch 3), 'y' "
        "with 0000000000000068 (epoch 3); neither is newer (both on one epoch: split "
        "brain); refusing to guess")
    unknown = describe_fork("v1", "x", history("Z"), "y", history("B"))
    assert unknown.endswith("; neither is newer (an epoch of 0 was never recorded: split "
                            "brain); refusing to guess")
    unrelated = unrelated_refusal("v1", "x", "y")
    assert unrelated == ("volume 'v1': the generation histories of 'x' and 'y' are "
                         "unrelated (split brain, or another volume); refusing to guess")
    assert all(is_split_brain(r) for r in (one_epoch, unknown, unrelated))
    assert not is_split_brain("volume 'v1': size mismatch (this node 1 bytes, peer 'x' 2 "
                              "bytes)")


def test_history_file_version_1_is_migrated_to_version_2(tmp_path: Path) -> None:
    write_json(tmp_path / "generations.json", {
        "kind": "generations", "version": 1, "logical_uuid": "u",
        "history": [[10, 1], [11, 50]], "promoted_here": [11]})
    h = load_history(tmp_path, "ignored")
    assert h == History("u", (Generation(10, 1, 0), Generation(11, 50, 0)), frozenset({11}))
    save_history(tmp_path, h)
    meta = json.loads((tmp_path / "generations.json").read_text())
    assert (meta["version"], meta["history"]) == (2, [[10, 1, 0], [11, 50, 0]])
    assert load_history(tmp_path, "ignored") == h
    write_json(tmp_path / "generations.json", {**meta, "version": 3})
    with pytest.raises(FormatError, match="generations format version 3 is not supported "
                                          r"\(this nbdgw reads version 2\)"):
        load_history(tmp_path, "ignored")


def test_promotion_records_its_epoch(tmp_path: Path) -> None:
    create_volume(tmp_path, "v1", 4 << 20, replica=True)
    vol = Volume.open(tmp_path, "v1")
    vol.set_consistent(True)
    vol.close()
    assert promote_volume(tmp_path, "v1", epoch=5).epoch == 5
    assert renew_generation(tmp_path, "v1", epoch=9).epoch == 9
    assert renew_generation(tmp_path, "v1").epoch == 10  # no epoch given: one above the past
    info = find_volume(tmp_path, "v1")
    assert [g.epoch for g in load_history(info.path, info.uuid).generations] == [0, 5, 9, 10]


def acked_by(data_dir: Path, peer: str, seq: int) -> None:
    info = find_volume(data_dir, "v1")
    (info.path / "peers").mkdir(exist_ok=True)
    write_json(info.path / "peers" / f"{peer}.json", {
        "kind": "peer", "version": 1, "peer": peer, "volume": "v1",
        "volume_uuid": info.uuid, "acked_seq": seq, "updated": time.time()})


def primary_with_writes(data_dir: Path, n: int) -> int:
    create_volume(data_dir, "v1", 4 << 20)
    vol = Volume.open(data_dir, "v1")
    try:
        for i in range(n):
            vol.write(bytes([i + 1]) * 4096, i * 4096)
        return vol.last_seq
    finally:
        vol.close()


def test_demotion_keeps_unshipped_writes_as_a_snapshot(tmp_path: Path) -> None:
    last = primary_with_writes(tmp_path, 8)
    acked_by(tmp_path, "dc", last - 3)  # dc never got the last three writes
    uuid_before = load_history(find_volume(tmp_path, "v1").path,
                               find_volume(tmp_path, "v1").uuid)
    snap = demote_volume(tmp_path, "v1", "dc")
    assert snap == f"diverged-{uuid_before.current.gen_id:016x}"
    info = find_volume(tmp_path, "v1")
    assert not (info.path / "peers").exists() or not list((info.path / "peers").iterdir())
    up = json.loads((info.path / "peerlink-upstream.json").read_text())
    assert up["upstream_node"] == "dc" and up["upstream_uuid"] == uuid_before.logical_uuid
    vol = Volume.open(tmp_path, "v1")
    try:
        assert vol.replica and vol.inconsistent and vol.upstream_seq == 0
        view = vol.snapshot_view(snap)
        buf = bytearray(4096)
        view.read_into(buf, 7 * 4096)
        assert bytes(buf) == bytes([8]) * 4096  # the last write, preserved
    finally:
        vol.close()
    assert demote_volume(tmp_path, "v1", "dc") is None  # demoted already: nothing twice
    # What dc lacks, counted from the journal: the three records after its ack.
    (entry,) = volume_status(info)["diverged"]
    assert {k: entry[k] for k in ("snapshot", "records", "bytes", "unknown", "from_seq",
                                  "through_seq", "new_primary")} == {
        "snapshot": snap, "records": 3, "bytes": 3 * 4096, "unknown": None,
        "from_seq": last - 2, "through_seq": last, "new_primary": "dc"}


def test_a_demoted_primary_cannot_be_promoted_until_resynced(tmp_path: Path) -> None:
    """It may hold writes the new primary never had (the issue's second trigger: marked
    Consistent at demotion, promoted 4 s later, its diverged writes came back)."""
    last = primary_with_writes(tmp_path, 4)
    acked_by(tmp_path, "dc", last - 1)
    assert demote_volume(tmp_path, "v1", "dc") is not None
    with pytest.raises(InvalidArgument) as ei:
        promote_volume(tmp_path, "v1", epoch=3)
    assert str(ei.value) == (
        "volume v1 is Inconsistent: it was demoted from primary and its resync from dc has "
        "not completed, so it may hold writes the other copies never had; it cannot be "
        "promoted until then")
    # Completing the resync is the receiver's business (tests/integration); the volume
    # then says Consistent and is promotable.
    vol = Volume.open(tmp_path, "v1")
    vol.set_consistent(True)
    vol.close()
    assert promote_volume(tmp_path, "v1", epoch=3).epoch == 3


def test_a_primary_that_never_heard_from_its_successor_counts_nothing(tmp_path: Path) -> None:
    primary_with_writes(tmp_path, 3)
    snap = demote_volume(tmp_path, "v1", "dr")
    (entry,) = volume_status(find_volume(tmp_path, "v1"))["diverged"]
    assert (entry["snapshot"], entry["records"], entry["bytes"], entry["unknown"]) == (
        snap, None, None, "dr never acknowledged anything of this volume")


def test_switchover_demotion_stays_consistent(tmp_path: Path) -> None:
    """preserve=False: the successor acknowledged every record (the drain): a prefix."""
    last = primary_with_writes(tmp_path, 4)
    acked_by(tmp_path, "dc", last)
    assert demote_volume(tmp_path, "v1", "dc", preserve=False) is None
    vol = Volume.open(tmp_path, "v1")
    try:
        assert vol.replica and not vol.inconsistent
    finally:
        vol.close()
    assert volume_status(find_volume(tmp_path, "v1"))["diverged"] == []


def test_demotion_after_a_clean_handover_takes_no_snapshot(tmp_path: Path) -> None:
    last = primary_with_writes(tmp_path, 4)
    acked_by(tmp_path, "dc", last)
    assert rejoin.unshipped(find_volume(tmp_path, "v1"), "dc") is None
    assert demote_volume(tmp_path, "v1", "dc") is None
    vol = Volume.open(tmp_path, "v1")
    try:
        assert vol.replica and (vol.snaps is None or not vol.snaps.index.by_name)
    finally:
        vol.close()


def test_unshipped_says_why(tmp_path: Path) -> None:
    last = primary_with_writes(tmp_path, 5)
    info = find_volume(tmp_path, "v1")
    assert rejoin.unshipped(info, "dr") == "dr never acknowledged anything of it"
    acked_by(tmp_path, "dr", last - 2)
    assert rejoin.unshipped(info, "dr") == (
        f"records {last - 1}..{last} were never acknowledged by dr")


def test_promotion_reserves_snapshot_ids_for_the_old_primary(tmp_path: Path) -> None:
    create_volume(tmp_path, "v1", 4 << 20, replica=True)
    vol = Volume.open(tmp_path, "v1")
    vol.set_consistent(True)
    vol.close()
    gen = promote_volume(tmp_path, "v1", epoch=1)
    info = find_volume(tmp_path, "v1")
    hist = load_history(info.path, info.uuid)
    assert hist.current == gen and len(hist.generations) == 2
    vol = Volume.open(tmp_path, "v1")
    try:
        assert not vol.replica
        snap = vol.snapshot_create("after-promotion")
        assert snap.id >= SNAP_ID_GAP
    finally:
        vol.close()


def test_stale_copy_refusals_go_once_moot_and_quiet(tmp_path: Path) -> None:
    """A stale copy's refusal (peers/<peer>.refused.json) is moot once its node is not the
    primary this node follows (lab schedules: dr kept the demoted main's for good): the
    daemon clears it once that node has not tried for ``quiet_s`` (while it tries, status
    says it is refused).  Split brains, other refusals and the primary's own stay."""
    from blockstore.generations import is_stale_copy, settle_commands, stale_refusal
    from blockstore.peers import clear_stale_refusals, read_refused, write_refused

    primary_with_writes(tmp_path, 1)
    info = find_volume(tmp_path, "v1")
    dc, main = history("A"), history("B")
    stale = stale_refusal("v1", "main", Generation(0xAA, 1, 1), Generation(0xBB, 9, 2))
    assert stale == ("volume 'v1': node 'main' is on generation 00000000000000aa, older "
                     "than this replica's 00000000000000bb (it was demoted by a failover); "
                     "refusing its data")
    fork = describe_fork("v1", "dc", dc, "main", main)
    split = unrelated_refusal("v1", "x", "y")
    assert is_stale_copy(stale) and is_stale_copy(fork)
    assert not is_stale_copy(split) and not is_split_brain(stale)
    assert not is_stale_copy(describe_fork("v1", "main", main, "dc", dc))  # the taker's
    for peer, reason in (("main", stale), ("old", fork), ("x", split), ("dc", stale),
                         ("n", "uuid mismatch")):
        sb = is_split_brain(reason)
        assert write_refused(info, peer, side="receiver", by="this node", reason=reason,
                             split_brain=sb, settle=settle_commands(peer, "y") if sb else None)
    now = time.time()
    assert clear_stale_refusals(info, primary="dc", quiet_s=30, now=now) == []  # trying
    assert clear_stale_refusals(info, primary="dc", quiet_s=30, now=now + 31) == [
        "main", "old"]
    assert sorted(read_refused(info)) == ["dc", "n", "x"]
    assert clear_stale_refusals(info) == ["dc"]  # a handshake with a newer sender


def test_a_refused_split_brain_is_gathered_for_the_daemon(tmp_path: Path) -> None:
    from blockstore.generations import settle_commands
    from blockstore.peers import clear_refused, read_refused, write_refused

    primary_with_writes(tmp_path, 1)
    info = find_volume(tmp_path, "v1")
    assert rejoin.refused_split_brain(tmp_path) is None
    reason = unrelated_refusal("v1", "dr", "main")
    assert write_refused(info, "dr", side="receiver", by="this node", reason=reason,
                         split_brain=True, settle=settle_commands("dr", "main"))
    assert write_refused(info, "dr", side="receiver", by="this node", reason=reason,
                         split_brain=True, settle=settle_commands("dr", "main"))
    rec = read_refused(info)["dr"]
    assert rec["attempts"] == 2 and rec["settle"] == [
        {"keeps": "dr", "command": "nbdgw resolve --discard main"},
        {"keeps": "main", "command": "nbdgw resolve --discard dr"}]
    other, vols = rejoin.refused_split_brain(tmp_path) or ("", {})
    assert other == "dr" and vols["v1"]["why"] == reason
    # A name unfit for a file is not recorded (a peer says what it likes before it is
    # authenticated), and neither are more than a few peers.
    assert not write_refused(info, "../x", side="receiver", by="this node", reason="r",
                             split_brain=False, settle=None)
    for i in range(20):
        write_refused(info, f"n{i}", side="receiver", by="this node", reason="r",
                      split_brain=False, settle=None)
    assert len(read_refused(info)) == 16
    clear_refused(info, "dr")
    assert "dr" not in read_refused(info)


def test_split_brain_record_round_trip(tmp_path: Path) -> None:
    assert rejoin.split_brain(tmp_path) is None
    rec = rejoin.record_split_brain(tmp_path, me="main", my_epoch=0, other="dr",
                                    other_epoch=1, volumes={"v1": {"why": "x",
                                                                    "last_write": None}})
    assert rejoin.split_brain(tmp_path) == rec
    rejoin.clear_split_brain(tmp_path)
    assert rejoin.split_brain(tmp_path) is None


def test_a_peer_ahead_of_a_recovered_journal_is_resynced_from_the_recovery_point(
        tmp_path: Path) -> None:
    """Power cut: the peer applied records through seq 8 that this journal lost (shipped
    before they were durable); recovery left the journal at seq 5 with a hot-extent set;
    writes since took seqs 6.. again.  The peer's 'seq 8' is not this journal's seq 8:
    everything written since seq 5 is resynced as extents, nothing skipped."""
    from blockstore.journal import journal_bounds
    from blockstore.peers import DIRTY_HOT, write_dirty
    from blockstore.resync_plan import plan_resync

    primary_with_writes(tmp_path, 5)  # seqs 1..5 survived the cut
    info = find_volume(tmp_path, "v1")
    write_dirty(info, "dc", reason=DIRTY_HOT, from_seq=0, through_seq=5, shift=16,
                extents=[40])  # what recovery found hot (the lost writes' extents)
    vol = Volume.open(tmp_path, "v1")
    try:
        for i in range(6):  # new writes, seqs 6..11, far from the first ones
            vol.write(b"\x07" * 4096, (20 + i) * 65536)
    finally:
        vol.close()
    first, last = journal_bounds(info.path / "journal")
    plan = plan_resync(info, "dc", 8, first, last)
    assert plan is not None and plan.kind == "dirty"
    assert plan.shift == 16
    assert {40, 20, 21, 22, 23, 24, 25} <= set(plan.extents)
