"""Peerlink end to end: real `nbdgw serve` primary, real `python -m peerlink` sender and
receiver processes on loopback, libnbd writers, kill -9 and a fault-injecting proxy.

Every test ends with the DESIGN.md §3 outcome compared bit for bit: once the sender's
persisted ack reaches the primary's last journal seq, `nbdgw volume checksum` is the same
on both sides.  The prefix test checks the stronger property at every kill: the replica
holds exactly the state after some prefix of the primary's write sequence.
"""

# The workload's randomness is for coverage (seeded), not secrecy.
# ruff: noqa: S311

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest

from blockstore.generations import is_split_brain, settle_commands, unrelated_refusal
from blockstore.journal import journal_bounds
from blockstore.meta import write_json
from blockstore.peers import read_refused, write_refused
from blockstore.volume import find_volume
from tests.conftest import Served, run_nbdgw
from tests.faultproxy import ThreadedProxy
from tests.integration.peerenv import (
    SECRET,
    VOL_SIZE,
    Env,
    MiB,
    Writer,
    check_prefix,
    replica_state,
)

# -- tests --------------------------------------------------------------------------------

def test_replicates_while_writing(env: Env) -> None:
    rx = env.receiver()
    tx = env.sender(rx.port)
    assert tx.first_line == f"peerlink: sending volume v1 to r1 at 127.0.0.1:{rx.port}"
    w = Writer(env.served, seed=1, max_ops=3000)
    w.start()
    w.finish()
    last = env.wait_caught_up()
    assert last >= 3000
    assert (tx.stop(), rx.stop()) == (0, 0)
    state = replica_state(env.replica)
    assert (state["upstream_seq"], state["inconsistent"], state["clean"]) == (last, False, True)
    bound = json.loads((env.replica / "volumes/v1/peerlink-upstream.json").read_text())
    assert bound["upstream_uuid"] == json.loads(
        (env.primary / "volumes/v1/volume.json").read_text())["uuid"]
    p, r = env.checksums()
    assert p == r
    assert rx.events("protocol_error") == tx.events("protocol_error") == []


def test_receiver_kill9_while_writing(env: Env) -> None:
    rng = random.Random(2)
    rx = env.receiver()
    port = rx.port
    tx = env.sender(port)
    w = Writer(env.served, seed=2, pause=0.0005)
    w.start()
    for _ in range(4):
        time.sleep(rng.uniform(0.3, 1.0))
        rx.kill9()
        rx = env.receiver(port)
        opened = rx.wait_event("volume_opened")
        assert opened["unclean"] is True
    time.sleep(0.5)
    w.stop()
    last = env.wait_caught_up()
    assert last > 200
    resumes = [e["resume_from"] for e in tx.events("streaming")]
    assert len(resumes) >= 2 and resumes == sorted(resumes) and resumes[0] == 1
    assert (tx.stop(), rx.stop()) == (0, 0)
    assert replica_state(env.replica)["upstream_seq"] == last
    p, r = env.checksums()
    assert p == r


def test_sender_kill9_resumes(env: Env) -> None:
    rng = random.Random(3)
    rx = env.receiver()
    tx = env.sender(rx.port)
    w = Writer(env.served, seed=3, pause=0.0005)
    w.start()
    for _ in range(3):
        time.sleep(rng.uniform(0.3, 1.0))
        tx.kill9()
        before = env.acked()
        tx = env.sender(rx.port)
        ev = tx.wait_event("streaming")
        # Resumes where the replica stands: past what was persisted, never from scratch.
        assert ev["resume_from"] > max(before, 1)
    w.stop()
    last = env.wait_caught_up()
    assert (tx.stop(), rx.stop()) == (0, 0)
    assert replica_state(env.replica)["upstream_seq"] == last
    applied = rx.events("session_ended")
    assert len(applied) >= 3
    p, r = env.checksums()
    assert p == r


def test_replica_is_always_a_prefix(env: Env) -> None:
    """kill -9 the receiver at random; each time the replica is exactly a prefix."""
    rng = random.Random(4)
    blocks = 2048  # 8 MiB: blocks are rewritten often, so a wrong order would show
    rx = env.receiver()
    port = rx.port
    tx = env.sender(port)
    w = Writer(env.served, seed=4, stamped=True, blocks=blocks, pause=0.0003)
    w.start()
    prefixes = []
    for _ in range(4):
        time.sleep(rng.uniform(0.3, 1.2))
        rx.kill9()
        prefixes.append(check_prefix(env.replica, w.log, blocks))
        rx = env.receiver(port)
    w.stop()
    env.wait_caught_up()
    assert (tx.stop(), rx.stop()) == (0, 0)
    assert check_prefix(env.replica, w.log, blocks) == len(w.log)
    assert prefixes == sorted(prefixes) and prefixes[-1] > 0
    p, r = env.checksums()
    assert p == r


def test_link_faults_through_proxy(env: Env) -> None:
    rx = env.receiver()
    with ThreadedProxy(("127.0.0.1", rx.port)) as proxy:
        tx = env.sender(proxy.port, "--batch-bytes", str(256 * 1024))
        w = Writer(env.served, seed=5, pause=0.001)
        w.start()
        tx.wait_event("streaming")

        def sessions() -> int:
            return len(tx.events("streaming"))

        def wait_sessions(n: int, timeout: float = 20) -> None:
            deadline = time.monotonic() + timeout
            while sessions() < n:
                assert time.monotonic() < deadline, f"link did not come back ({sessions()})"
                time.sleep(0.05)

        # Cut: both sides see a reset; the sender reconnects and resumes.
        time.sleep(0.5)
        assert proxy.cut() == 1
        wait_sessions(2)
        # Stall past the liveness timeout (3 s): the first side to notice drops the link
        # (the proxy passes the reset on), then the sender reconnects.
        time.sleep(0.5)
        proxy.stall(4.5)
        timed_out = rx.events("link_timeout") + tx.events("link_timeout")
        assert timed_out, "nobody noticed a 4.5 s stall"
        assert timed_out[0]["reason"].startswith("no frame from the peer for ")
        wait_sessions(3)
        # Throttle to 1 MiB/s for 2 s: slow, but no timeout with 256 KiB batches.
        timeouts = len(tx.events("link_timeout") + rx.events("link_timeout"))
        proxy.throttle(1 * MiB)
        time.sleep(2)
        proxy.throttle(None)
        assert len(tx.events("link_timeout") + rx.events("link_timeout")) == timeouts
        assert sessions() == 3
        # One flipped byte inside a batch: the receiver drops the link, nothing of the
        # frame is applied, the sender reconnects and resends.
        proxy.corrupt_next_body(min_body=1024)
        ev = rx.wait_event("protocol_error")
        assert proxy.flipped() == 1
        assert ev["reason"].startswith("frame checksum mismatch (crc32c of ")
        wait_sessions(4)
        w.stop()
        env.wait_caught_up()
        assert proxy.proxy.errors == []
    assert (tx.stop(), rx.stop()) == (0, 0)
    p, r = env.checksums()
    assert p == r


def test_wrong_secret_is_refused_and_nothing_applied(env: Env) -> None:
    good = env.tmp / "good.secret"
    bad = env.tmp / "bad.secret"
    good.write_bytes(SECRET + b"\n")
    bad.write_bytes(b"not the secret, but long enough\n")
    w = Writer(env.served, seed=6, max_ops=50)
    w.start()
    w.finish()
    rx = env.receiver(0, "--secret-file", str(good))
    tx = env.sender(rx.port, "--secret-file", str(bad))
    # The receiver logs why; the sender, not authenticated, is told a code only.
    reason = ("peer authentication failed: the sender proof from 'p1' does not match (wrong "
              "shared secret, or a proof made for another handshake); volume 'v1' (a sender "
              "that knows node 'r1' by another name fails this way too)")
    told = "auth-failed: peer authentication failed (the reason is logged on the receiving node)"
    assert rx.wait_event("peer_refused_by_us")["reason"] == reason
    assert tx.wait_event("refused_by_peer")["reason"] == told
    assert tx.stop() == 0
    # A sender without any secret is refused the same way.
    tx = env.sender(rx.port)
    assert tx.wait_event("refused_by_peer")["reason"] == told
    assert tx.stop() == 0
    assert rx.stop() == 0
    state = replica_state(env.replica)
    assert (state["upstream_seq"], state["inconsistent"]) == (0, True)
    assert not (env.replica / "volumes/v1/peerlink-upstream.json").exists()
    # The right secret then works.
    rx = env.receiver(0, "--secret-file", str(good))
    tx = env.sender(rx.port, "--secret-file", str(good))
    env.wait_caught_up()
    assert (tx.stop(), rx.stop()) == (0, 0)
    p, r = env.checksums()
    assert p == r


def test_a_deposed_primarys_batches_are_refused_by_their_epoch(env: Env) -> None:
    """Every Batch carries its sender's epoch (the fencing token): once the replica's
    node follows a newer primary (node-state.json's epoch, raised by its node core on
    hearing one or seeing it hold the etcd key), the old primary's batches are refused,
    the sender is told why, and nothing of them is applied."""
    rx = env.receiver()
    tx = env.sender(rx.port)
    w = Writer(env.served, seed=9, max_ops=200)
    w.start()
    w.finish()
    before = env.wait_caught_up()
    write_json(env.replica / "node-state.json", {"kind": "node-state", "version": 2,
                                                 "epoch": 1})
    w = Writer(env.served, seed=10, max_ops=50)
    w.start()
    w.finish()
    why = ("carries epoch 0, but this node follows epoch 1: its sender is no longer the "
           "primary")
    assert why in rx.wait_event("batch_fenced")["reason"]
    assert why in tx.wait_event("refused_by_peer")["reason"]
    assert tx.stop() == 0
    assert env.last_seq() > before
    assert env.acked() == before  # nothing after the fence was applied (or acked)
    # The token is the epoch of the sending node, not of the volume's generation: the
    # primary of epoch 1 ships a volume created after its promotion (a generation of
    # epoch 0) and the replica takes it.
    write_json(env.primary / "node-state.json", {"kind": "node-state", "version": 2,
                                                 "epoch": 1})
    tx = env.sender(rx.port)
    env.wait_caught_up()
    assert (tx.stop(), rx.stop()) == (0, 0)
    p, r = env.checksums()
    assert p == r


def test_stale_copy_refusals_go_once_the_replica_takes_a_newer_sender(env: Env) -> None:
    """Lab schedules: dr refused a demoted primary's sender as a stale copy, and the
    refusal (peers/main.refused.json, on dr and on main) stayed for good, since main
    never shipped to dr again: `nbdgw status` kept showing main `refused` after the heal.
    A replica that takes a sender (on its generation or a newer one: the current
    primary) drops every stale-copy refusal of its volume, whichever end made it: the
    node refused was on an older generation, it is no primary any more (one that tries
    again is refused and recorded again).  Split brains and other refusals stay."""
    info = find_volume(env.replica, "v1")
    stale = ("volume 'v1': node 'main' is on generation 00000000000000aa, older than this "
             "replica's 00000000000000bb (it was demoted by a failover); refusing its data")
    fork = ("volume 'v1': the histories of 'old' and 'r1' forked after generation "
            "00000000000000aa: 'old' went on with generation 00000000000000cc (epoch 2), "
            "'r1' with 00000000000000bb (epoch 3); 'old' is on the older epoch: its copy is "
            "stale and is not sent")
    split = unrelated_refusal("v1", "other", "r1")
    blocked = ("volume 'v1': 'r1' must keep what only it had as snapshot diverged-x before "
               "it takes 'new''s data, but it has 64 snapshots (the maximum): delete one "
               "there")
    for peer, side, by, reason in (("main", "receiver", "this node", stale),
                                   ("old", "receiver", "this node", fork),
                                   ("dr", "sender", "peer", stale),
                                   ("other", "receiver", "this node", split),
                                   ("new", "receiver", "this node", blocked)):
        sb = is_split_brain(reason)
        assert write_refused(info, peer, side=side, by=by, reason=reason, split_brain=sb,
                             settle=settle_commands(peer, "r1") if sb else None)
    rx = env.receiver()
    tx = env.sender(rx.port)
    w = Writer(env.served, seed=11, max_ops=50)
    w.start()
    w.finish()
    env.wait_caught_up()
    assert sorted(read_refused(info)) == ["new", "other"]
    cleared = rx.wait_event("stale_refusals_cleared")
    assert sorted(cleared["peers"]) == ["dr", "main", "old"], cleared
    assert (tx.stop(), rx.stop()) == (0, 0)


def test_replica_of_another_volume_is_refused(env: Env) -> None:
    w = Writer(env.served, seed=7, max_ops=20)
    w.start()
    w.finish()
    rx = env.receiver()
    tx = env.sender(rx.port)
    last = env.wait_caught_up()
    assert tx.stop() == 0
    # Another primary with its own volume v1 (another uuid) tries the same replica.
    other = env.tmp / "other"
    other.mkdir()
    run_nbdgw("volume", "create", "v1", "--size", "64M", "--data-dir", str(other))
    ours = json.loads((env.primary / "volumes/v1/volume.json").read_text())["uuid"]
    theirs = json.loads((other / "volumes/v1/volume.json").read_text())["uuid"]
    tx2 = env.sender(rx.port, data_dir=other, node="p2")
    reason = (f"volume 'v1': uuid mismatch (this node {ours}, peer 'p2' {theirs}): a "
              "different volume")
    assert rx.wait_event("peer_refused_by_us")["reason"] == reason
    assert tx2.wait_event("refused_by_peer")["reason"] == reason
    assert (tx2.stop(), rx.stop()) == (0, 0)
    assert replica_state(env.replica)["upstream_seq"] == last


def _sequential_burst(served: Served, total: int, chunk: int = MiB) -> float:
    """Write ``total`` bytes sequentially in ``chunk`` requests (random data), flush;
    return the seconds it took."""
    h = nbd.NBD()
    h.connect_uri(served.uri("v1"))
    data = [random.Random(i).randbytes(chunk) for i in range(8)]
    t0 = time.monotonic()
    try:
        for i in range(total // chunk):
            h.pwrite(data[i % 8], (i * chunk) % VOL_SIZE)
        h.flush()
    finally:
        h.shutdown()
    return time.monotonic() - t0


@pytest.mark.slow
def test_measure_catch_up_and_throughput(env: Env) -> None:
    """Numbers, not a gate: catch-up after a 256 MiB burst written while replicating,
    and link throughput shipping a 256 MiB backlog.  Checksums must still match."""
    total = 256 * MiB
    rx = env.receiver()
    tx = env.sender(rx.port)
    tx.wait_event("streaming")
    t_write = _sequential_burst(env.served, total)
    t0 = time.monotonic()
    env.wait_caught_up(timeout=120)
    catch_up = time.monotonic() - t0
    assert tx.stop() == 0
    # Backlog: another 256 MiB written with the sender stopped, then shipped.
    t_write2 = _sequential_burst(env.served, total)
    t1 = time.monotonic()
    tx = env.sender(rx.port)
    env.wait_caught_up(timeout=120)
    ship = time.monotonic() - t1
    stats = tx.stop(), tx.events("stopped")[-1]
    assert rx.stop() == 0
    print(f"\nburst 256 MiB written in {t_write:.2f} s ({total / MiB / t_write:.0f} MiB/s) "
          f"while replicating; replica caught up {catch_up:.2f} s after the flush")
    print(f"backlog 256 MiB (written in {t_write2:.2f} s) shipped and applied in {ship:.2f} s "
          f"= {total / MiB / ship:.0f} MiB/s; sender stats {stats[1]}")
    p, r = env.checksums()
    assert p == r


def test_resync_when_the_journal_was_released(tmp_path: Path, data_dir: Path, volume: str,
                                              serve: Callable[..., Served]) -> None:
    """A new replica, and later one left behind, of a primary whose journal was released
    past them: allocated extents are copied while writes go on, then streaming resumes;
    the replica is Inconsistent until then, and an interrupted resync starts over."""
    cfg = tmp_path / "small-journal.yaml"
    cfg.write_text("version: 1\njournal:\n  segment_bytes: 1M\n  max_bytes: 12M\n")
    replica = tmp_path / "replica"
    replica.mkdir()
    run_nbdgw("volume", "create", "v1", "--size", "64M", "--replica", "--data-dir", str(replica))
    env = Env(tmp_path, data_dir, replica, serve(config=cfg))
    try:
        _resync_scenario(env)
    finally:
        env.kill_all()


def _resync_scenario(env: Env) -> None:
    w = Writer(env.served, seed=8, max_ops=1000)
    w.start()
    w.finish()
    first, _ = journal_bounds(env.primary / "volumes/v1/journal")
    assert first > 1, "the journal should have been released past seq 1"
    # 1. A new replica: extents copied while a writer keeps going.
    rx = env.receiver()
    port = rx.port
    w = Writer(env.served, seed=9, pause=0.005)
    w.start()
    tx = env.sender(port)
    assert tx.wait_event("resync")["replica_seq"] == 0
    sent = tx.wait_event("resync_extents_sent")
    assert sent["extents"] >= 1 and sent["data_bytes"] > 0
    rx.wait_event("replica_consistent", where=lambda e: e["reason"] == "resync complete")
    w.stop()
    env.wait_caught_up()
    assert tx.stop() == 0
    # 2. Left behind: more writes (and a whole extent trimmed) while the sender is down.
    h = nbd.NBD()
    h.connect_uri(env.served.uri("v1"))
    h.trim(4 * MiB, 8 * MiB)  # extent 2: a hole on the primary, data on the replica
    h.flush()
    h.shutdown()
    w = Writer(env.served, seed=10, max_ops=1000)
    w.start()
    w.finish()
    # Interrupt the resync: a slow link, and the receiver killed once it has begun.
    with ThreadedProxy(("127.0.0.1", port)) as proxy:
        proxy.throttle(4 * MiB)
        tx = env.sender(proxy.port)
        assert tx.wait_event("resync")["replica_seq"] > 0
        rx.wait_event("resync_started")
        time.sleep(0.5)
        rx.kill9()
        tx.wait_event("link_down")
    state = replica_state(env.replica)
    marker = json.loads((env.replica / "volumes/v1/peerlink-upstream.json").read_text())
    assert (state["inconsistent"], marker["resync"]["done"]) == (True, False)
    # The receiver restarts; a sender straight to it (the proxy is gone) resyncs again.
    assert tx.stop() == 0
    rx = env.receiver(port)
    tx = env.sender(port)
    assert tx.wait_event("resync")["replica_seq"] > 0
    rx.wait_event("replica_consistent", where=lambda e: e["reason"] == "resync complete")
    env.wait_caught_up()
    assert (tx.stop(), rx.stop()) == (0, 0)
    state = replica_state(env.replica)
    marker = json.loads((env.replica / "volumes/v1/peerlink-upstream.json").read_text())
    assert (state["inconsistent"], marker["resync"]) == (False, None)
    p, r = env.checksums()
    assert p == r
