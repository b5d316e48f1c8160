"""The peerlink sessions end against end, with no socket: a ``SenderSession`` talks to a
``ReceiverSession`` through encoded frames, through every handshake outcome (resume,
fresh replica, resync after a failover, forked and unrelated histories, wrong node,
missing or wrong secrets, what a peer is told before it proved the secret), the
receiver's resync and stream phases, and the sender's window and verify tokens."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack
import pytest

from blockstore.generations import Generation as BGen
from blockstore.generations import History, Relation
from blockstore.record import Op
from peerlink.auth import NONCE_SIZE, Prover, Transcript, make_nonce, proof
from peerlink.errors import Fenced, PeerAuthError, PeerProtocolError, PeerRefused
from peerlink.frames import NEED_DATA, FrameDecoder, encode_frame
from peerlink.messages import (
    MAX_CHANGED,
    PROTO_VERSION,
    Ack,
    Batch,
    Challenge,
    ExtentData,
    Hello,
    HelloOk,
    Intro,
    Message,
    Ping,
    Proof,
    Record,
    Refuse,
    ResyncDone,
    ResyncExtents,
    Verify,
    VerifyResult,
    decode,
)
from peerlink.session import (
    PREAUTH_REFUSALS,
    RECEIVER_TABLE,
    SENDER_TABLE,
    Admitted,
    Authenticated,
    Established,
    Output,
    Phase,
    PlanResync,
    ReceiverSession,
    Refusal,
    ReplicaFacts,
    Send,
    SenderSession,
    TakeOver,
    wire_changed,
    wire_epochs,
    wire_generations,
)

SECRET = b"correct horse battery staple"
UUID = "0b7e3a52-8f3c-4c4e-9a51-2f1d0c6a9e10"
OTHER_UUID = "5d1c0f0e-7a1b-4c2d-9e3f-102030405060"
G0 = BGen(0x1111, 1, 0)
G1 = BGen(0x2222, 500, 1)  # a failover on the sender's side after G0
G1B = BGen(0x3333, 480, 1)  # another branch on the same epoch: a split brain
G2 = BGen(0x4444, 520, 2)  # a newer epoch's branch
SIZE = 1 << 30


def wire(msg: Message) -> Message:
    """Through the codec, as on the link."""
    d = FrameDecoder()
    d.feed(b"".join(bytes(b) for b in encode_frame(msg.encode(), True)))
    body = d.next_frame()
    assert body is not NEED_DATA
    return decode(body)


def sender(history: tuple[BGen, ...] = (G0,), last: int = 900, *, peer: str = "dc2",
           secret: bytes | None = SECRET, role: str = "primary", size: int = SIZE,
           **kw: Any) -> SenderSession:
    h = History(UUID, history)
    mine = Hello(PROTO_VERSION, "dc1", "v1", UUID, size, role, wire_generations(h), last,
                 make_nonce(), epochs=wire_epochs(h))
    return SenderSession(mine, h, peer=peer, secret=secret, **kw)


class Receiver(ReceiverSession):
    """A receiver session with the facts its shell would read once the sender proved
    itself (``given``)."""

    def __init__(self, facts: ReplicaFacts, secret: bytes | None,
                 next_secret: bytes | None = None) -> None:
        super().__init__(facts.node, facts.volume, secret=secret, nonce=make_nonce(),
                         next_secret=next_secret)
        self.given = facts


def receiver(history: tuple[BGen, ...] = (G0,), applied: int = 640, *,
             secret: bytes | None = SECRET, next_secret: bytes | None = None,
             fresh: bool = False, **kw: Any) -> Receiver:
    facts = ReplicaFacts(node="dc2", volume="v1", role="secondary", size=SIZE, uuid=UUID,
                         history=History(UUID, history), applied=applied, fresh=fresh)
    return Receiver(replace(facts, **kw), secret, next_secret)


class Refused(Exception):
    def __init__(self, side: str, out: Refusal) -> None:
        super().__init__(f"{side}: {out.reason}")
        self.side, self.out = side, out


def sends(outs: list[Output]) -> list[Message]:
    return [wire(o.msg) for o in outs if isinstance(o, Send)]


def one(outs: list[Output], kind: type[Any]) -> Any:
    found = [o for o in outs if isinstance(o, kind)]
    assert len(found) == 1, outs
    return found[0]


def refused(side: str, outs: list[Output]) -> None:
    if any(isinstance(o, Refusal) for o in outs):
        raise Refused(side, one(outs, Refusal))


def to_proof(s: SenderSession, r: Receiver) -> list[Output]:
    """Intro, Challenge, Proof: what the receiver does with the proof."""
    intro = sends(s.start())
    assert [type(m) for m in intro] == [Intro]
    outs = r.receive(intro[0])
    refused("receiver", outs)
    challenge = sends(outs)
    assert [type(m) for m in challenge] == [Challenge]
    return r.receive(sends(s.receive(challenge[0]))[0])


def receiver_proved(s: SenderSession, nonce: bytes, secret: bytes | None = SECRET
                    ) -> list[Output]:
    """Drive ``s`` through Intro, Challenge (``nonce``) and a good receiver Proof:
    what it does then (its Hello)."""
    s.start()
    s.receive(Challenge(PROTO_VERSION, nonce))
    t = Transcript(PROTO_VERSION, s.node, s.peer, s.mine.auth_nonce, nonce)
    return s.receive(Proof(proof(secret, Prover.RECEIVER, t) if secret else b""))


def both_proved(s: SenderSession, r: Receiver) -> None:
    """Intro, Challenge, Proof both ways, the sender's Hello: the receiver in FACTS."""
    outs = to_proof(s, r)
    assert one(outs, Authenticated)
    assert r.receive(sends(s.receive(one(sends(outs), Proof)))[0]) == []
    assert r.phase is Phase.FACTS


def handshake(s: SenderSession, r: Receiver, *, resync: bool = False,
              applied_now: int | None = None, pending: bool = False
              ) -> tuple[Established, Admitted, PlanResync]:
    """Run the handshake the way the shells do; raise Refused where a side refuses."""
    outs = to_proof(s, r)
    refused("receiver", outs)
    assert one(outs, Authenticated) and r.facts is None  # nothing read before the proof
    outs = s.receive(one(sends(outs), Proof))  # the receiver's proof, checked
    refused("sender", outs)
    assert isinstance(outs[0], Authenticated)
    told = sends(outs)
    assert [type(m) for m in told] == [Hello]  # the sender's facts, only now
    assert r.receive(told[0]) == [] and r.facts is None
    outs = r.offer(r.given)
    refused("receiver", outs)
    outs = s.receive(sends(outs)[0])
    if any(isinstance(o, Refusal) for o in outs):
        raise Refused("sender", one(outs, Refusal))
    plan = one(outs, PlanResync)
    outs = r.receive(sends(s.planned(resync, s.mine.last_applied_seq))[0])
    if any(isinstance(o, Refusal) for o in outs):
        raise Refused("receiver", one(outs, Refusal))
    take = one(outs, TakeOver)
    assert take.size == s.mine.volume_size
    outs = r.admitted(r.facts.applied if applied_now is None else applied_now,
                      r.facts.fresh, pending)
    if any(isinstance(o, Refusal) for o in outs):
        raise Refused("receiver", one(outs, Refusal))
    admitted = one(outs, Admitted)
    ok = sends(outs)[0]
    assert isinstance(ok, HelloOk) and ok.auth_proof == b""  # the proofs went in Proof
    outs = s.receive(ok)
    return one(outs, Established), admitted, plan


# -- the handshake ----------------------------------------------------------------------


def test_resume_after_the_last_applied_seq() -> None:
    s, r = sender(), receiver()
    est, adm, plan = handshake(s, r)
    assert (est.resume, est.applied, est.peer) == (641, 640, "dc2")
    assert (adm.resume_from, adm.newer, adm.fork_lost, adm.resync) == (641, False, False,
                                                                       False)
    assert plan.rel is Relation.SAME and not plan.fork
    assert s.phase is Phase.STREAM and r.phase is Phase.OPEN


def test_a_resync_skips_to_the_journal_end() -> None:
    s, r = sender(), receiver()
    est, adm, _ = handshake(s, r, resync=True)
    assert est.resume == adm.resume_from == 901
    assert adm.resync and r.phase is Phase.ANNOUNCE


def test_a_fresh_replica_takes_the_senders_uuid() -> None:
    s = sender()
    r = receiver((G0,), 0, fresh=True, uuid=OTHER_UUID)
    est, adm, plan = handshake(s, r)
    assert r.mine is not None and r.mine.volume_uuid == UUID
    assert est.resume == adm.resume_from == 1 and not adm.newer and not adm.resync
    assert plan.rel is Relation.SAME  # the empty copy sent the history it will follow
    assert r.rel is Relation.BEHIND  # which makes the sender its source


def test_a_replica_of_a_superseded_generation_is_compared_and_resynced() -> None:
    """After a failover the new primary (G0, G1) meets the old one (G0 only): its seq
    numbers mean nothing here, so the sender plans a compare resync from 0."""
    s, r = sender((G0, G1), 900), receiver((G0,), 750)
    est, adm, plan = handshake(s, r, resync=True)
    assert plan.rel is Relation.AHEAD and plan.applied == 0
    assert adm.newer and adm.resync and not adm.fork_lost
    assert est.resume == 901 and est.applied == 0


def test_a_stale_sender_is_refused_by_both_ends() -> None:
    s = sender((G0,), 900)
    with pytest.raises(Refused) as ei:
        handshake(s, receiver((G0, G1), 100))
    assert ei.value.side == "receiver" and ei.value.out.history
    assert "older than this replica's" in ei.value.out.reason
    # The sender's own check, for a receiver that would not refuse (any version).
    s = sender((G0,), 900)
    nonce = make_nonce()
    receiver_proved(s, nonce)
    theirs = Hello(PROTO_VERSION, "dc2", "v1", UUID, SIZE, "secondary",
                   wire_generations(History(UUID, (G0, G1))), 100, nonce)
    out = one(s.receive(theirs), Refusal)
    assert "a failover happened and this copy is stale" in out.reason
    assert s.phase is Phase.CLOSED


def test_a_fork_on_one_epoch_is_a_split_brain_refused() -> None:
    s, r = sender((G0, G1), 900), receiver((G0, G1B), 700)
    with pytest.raises(Refused) as ei:
        handshake(s, r)
    assert ei.value.out.split_brain and ei.value.out.history
    assert "forked after generation 0000000000001111" in ei.value.out.reason


def test_a_fork_won_by_the_newer_epoch_resyncs_the_loser() -> None:
    s, r = sender((G0, G2), 900), receiver((G0, G1B), 700)
    _est, adm, plan = handshake(s, r, resync=True)
    assert plan.rel is Relation.AHEAD and plan.fork
    assert adm.newer and adm.fork_lost


def test_a_fork_loser_with_no_room_for_its_diverged_snapshot_refuses() -> None:
    s = sender((G0, G2), 900)
    r = receiver((G0, G1B), 700, diverged_blocked="diverged-0000000000003333",
                 max_snapshots=512)
    with pytest.raises(Refused) as ei:
        handshake(s, r)
    assert ei.value.out.reason.endswith(
        "but it has 512 snapshots (the maximum): delete one there")


def test_unrelated_histories_are_refused_unless_adopted() -> None:
    other = (BGen(0x9999, 1, 0),)
    with pytest.raises(Refused) as ei:
        handshake(sender(other, 900), receiver((G0,), 700))
    assert ei.value.out.split_brain
    assert "are unrelated" in ei.value.out.reason
    # An operator resolved the split brain for dc1's side: the replica takes its data.
    _est, adm, plan = handshake(sender(other, 900), receiver((G0,), 700, adopt_for="dc1"),
                               resync=True)
    assert plan.rel is Relation.AHEAD and plan.applied == 0
    assert adm.newer and adm.resync


def test_the_wrong_node_answering_is_refused_by_the_sender() -> None:
    """With a secret the proofs name the receiver as the sender knows it: the wrong node
    fails the sender's proof.  Without one the sender refuses it by name."""
    with pytest.raises(Refused) as ei:
        handshake(sender(peer="dr1"), receiver())
    assert ei.value.side == "receiver" and ei.value.out.wire == PREAUTH_REFUSALS["auth-failed"]
    assert "a sender that knows node 'dc2' by another name" in ei.value.out.reason
    with pytest.raises(Refused) as ei:
        handshake(sender(peer="dr1", secret=None), receiver(secret=None))
    assert ei.value.side == "sender"
    assert ei.value.out.reason == ("connected to node 'dc2', but this sender ships to peer "
                                   "'dr1' (wrong address?)")


def test_a_replica_ahead_of_the_journal_is_refused() -> None:
    with pytest.raises(Refused) as ei:
        handshake(sender(last=500), receiver(applied=640))
    assert "has applied through seq 640 but the journal of 'dc1' ends at seq 500" in (
        ei.value.out.reason)


def test_the_resume_point_is_checked_again_after_the_takeover() -> None:
    """Another session applied more while this one waited for the takeover: resuming at
    the seq planned earlier would re-apply records, so the receiver refuses."""
    with pytest.raises(Refused) as ei:
        handshake(sender(), receiver(applied=640), applied_now=700)
    assert ei.value.out.reason == ("resume from seq 641 would re-apply records this "
                                   "replica already has (applied through seq 700)")


def test_an_interrupted_resync_must_be_redone() -> None:
    _, adm, _ = handshake(sender(), receiver(), pending=True)
    assert adm.resync


# -- authentication ---------------------------------------------------------------------


def test_a_wrong_sender_secret_is_refused_before_the_takeover() -> None:
    with pytest.raises(Refused) as ei:
        handshake(sender(secret=b"an impostor's secret key"), receiver())
    assert ei.value.side == "receiver"
    assert ei.value.out.reason.startswith("peer authentication failed: the sender proof ")
    # The peer is told a code, nothing of this node (its name, its volume).
    assert ei.value.out.told == ("auth-failed: peer authentication failed (the reason is "
                                 "logged on the receiving node)")


def test_an_unauthenticated_sender_is_refused() -> None:
    with pytest.raises(Refused) as ei:
        handshake(sender(secret=None), receiver())
    assert ei.value.out.reason.startswith("peer authentication failed: the sender proof ")


def test_a_wrong_receiver_secret_fails_at_the_sender_before_any_data() -> None:
    s, r = sender(), receiver(secret=b"an impostor's secret key")
    # The impostor cannot check the sender's proof: it refuses.
    assert isinstance(one(to_proof(s, r), Refusal), Refusal)
    # One that skips the check and answers with a proof of its own fails at the sender,
    # which never tells its facts nor streams.
    s, r = sender(), receiver(secret=None)
    s.start()
    s.receive(Challenge(PROTO_VERSION, r.nonce))
    forged = Proof(b"\x00" * 32)
    with pytest.raises(PeerAuthError, match=r"^peer authentication failed: the receiver "):
        s.receive(forged)
    assert s.phase is Phase.CLOSED
    with pytest.raises(PeerProtocolError, match="not authenticated yet"):
        s.sent(700, 4096)


def test_a_proof_where_no_secret_is_configured_is_refused() -> None:
    with pytest.raises(Refused) as ei:
        handshake(sender(), receiver(secret=None))
    assert ei.value.out.reason == ("peer authentication failed: the peer sent a proof but "
                                   "node 'dc2' has no shared secret configured")


def test_without_secrets_on_both_ends_the_handshake_completes() -> None:
    est, _, _ = handshake(sender(secret=None), receiver(secret=None))
    assert est.resume == 641


# -- rotating the secret (SECURITY.md "Rotating the peer secret") ----------------------

NEW = b"the next secret, at least 16 bytes"
STRANGER = b"an impostor's secret key"
# What a node holds, (secret_file, next_secret_file), at each step of a rotation: before,
# after step 1 (the new secret as next), after step 2 (swapped), after step 3 (next gone).
BEFORE, STEP1, STEP2, AFTER = (SECRET, None), (SECRET, NEW), (NEW, SECRET), (NEW, None)
Keys = tuple[bytes, bytes | None]


def rotating(s: Keys, r: Keys) -> tuple[SenderSession, Receiver]:
    return sender(secret=s[0], next_secret=s[1]), receiver(secret=r[0], next_secret=r[1])


# Each step is done on one node after the other: a node one step ahead of another.
@pytest.mark.parametrize(("a", "b"), [
    (BEFORE, BEFORE), (BEFORE, STEP1), (STEP1, STEP1), (STEP1, STEP2), (STEP2, STEP2),
    (STEP2, AFTER), (AFTER, AFTER)])
def test_nodes_one_step_apart_in_a_rotation_authenticate_both_ways(a: Keys, b: Keys) -> None:
    for s_keys, r_keys in ((a, b), (b, a)):
        est, _, _ = handshake(*rotating(s_keys, r_keys))
        assert est.resume == 641


def test_a_step_done_before_the_previous_one_finished_everywhere_fails() -> None:
    """Step 2 on a node whose peer has not had step 1: its proof is under a secret the
    peer does not know yet (the procedure says to finish each step everywhere first)."""
    with pytest.raises(Refused) as ei:
        handshake(*rotating(STEP2, BEFORE))
    assert ei.value.side == "receiver"
    with pytest.raises(PeerAuthError, match=r"^peer authentication failed: the receiver "):
        handshake(*rotating(BEFORE, STEP2))


def test_a_proof_under_the_next_secret_counts_only_while_it_is_configured() -> None:
    # The sender's proof, at the receiver: under its next secret, its current one, then
    # once next_secret_file is removed there.
    for r in (receiver(secret=SECRET, next_secret=NEW), receiver(secret=NEW)):
        assert one(to_proof(sender(secret=NEW), r), Authenticated)
    out = one(to_proof(sender(secret=NEW), receiver(secret=SECRET)), Refusal)
    assert out.reason.startswith("peer authentication failed: the sender proof ")
    # The receiver's proof (under NEW, its current), at the sender, alike.
    handshake(sender(secret=SECRET, next_secret=NEW), receiver(secret=NEW, next_secret=SECRET))
    with pytest.raises(PeerAuthError, match=r"^peer authentication failed: the receiver "):
        handshake(sender(secret=SECRET), receiver(secret=NEW, next_secret=SECRET))


def test_an_unrelated_secret_is_still_refused_during_a_rotation() -> None:
    with pytest.raises(Refused) as ei:
        handshake(sender(secret=STRANGER), receiver(secret=SECRET, next_secret=NEW))
    assert ei.value.out.told == ("auth-failed: peer authentication failed (the reason is "
                                 "logged on the receiving node)")
    s = sender(secret=SECRET, next_secret=NEW)
    with pytest.raises(PeerAuthError, match=r"^peer authentication failed: the receiver "):
        handshake(s, receiver(secret=STRANGER, next_secret=SECRET))
    assert s.phase is Phase.CLOSED


def test_both_provers_use_the_current_secret_not_the_next() -> None:
    s, r = rotating(STEP1, STEP2)
    challenge = sends(r.receive(sends(s.start())[0]))[0]
    sender_proof = sends(s.receive(challenge))[0]
    t = Transcript(PROTO_VERSION, "dc1", "dc2", s.mine.auth_nonce, r.nonce)
    assert isinstance(sender_proof, Proof)
    assert sender_proof.auth_proof == proof(SECRET, Prover.SENDER, t)
    outs = r.receive(sender_proof)
    assert outs[0] == Authenticated()
    receiver_proof = one(sends(outs), Proof)
    assert receiver_proof.auth_proof == proof(NEW, Prover.RECEIVER, t)
    assert isinstance(s.receive(receiver_proof)[0], Authenticated)


def test_a_next_secret_without_a_current_one_is_misuse() -> None:
    with pytest.raises(ValueError, match="a next secret without a current one"):
        sender(secret=None, next_secret=NEW)
    with pytest.raises(ValueError, match="a next secret without a current one"):
        receiver(secret=None, next_secret=NEW)


def test_nothing_is_admitted_before_the_sender_proved_itself() -> None:
    """Data, or a HelloOk out of turn, before the proof."""
    s, r = sender(), receiver()
    batch = Batch("v1", 641, 641, (Record(Op.WRITE, 0, 0, 4096, b"x" * 4096),))
    with pytest.raises(PeerProtocolError, match=r"^expected Intro to open the connection"):
        r.admit(batch, SIZE)
    r = receiver()
    r.receive(sends(s.start())[0])
    with pytest.raises(PeerProtocolError, match=r"^expected Proof after Challenge, got Batch"):
        r.admit(batch, SIZE)
    assert r.phase is Phase.CLOSED
    r = receiver()
    r.receive(sends(sender().start())[0])
    with pytest.raises(PeerProtocolError, match=r"^expected Proof after Challenge, got HelloOk"):
        r.receive(HelloOk("dc1", 641, b""))
    r = receiver()
    r.receive(sends(sender().start())[0])
    with pytest.raises(PeerProtocolError, match=r"^offer in phase proof$"):
        r.offer(r.given)  # the shell reads nothing for a peer that did not prove itself
    s, r = sender(), receiver()
    r.receive(sends(s.start())[0])
    with pytest.raises(PeerProtocolError, match=r"^expected Proof after Challenge, got Hello"):
        r.receive(s.mine)  # its facts before its proof


def test_before_the_proof_a_receiver_tells_its_version_and_nonce_only() -> None:
    """Whatever a stranger offers (the right uuid and history included), the receiver
    answers with a Challenge; a wrong proof, or a wrong version, gets a code."""
    s, r = sender(), receiver()
    outs = r.receive(sends(s.start())[0])
    assert sends(outs) == [Challenge(PROTO_VERSION, r.nonce)]
    stranger = Intro(1, "x", "v1", make_nonce())
    outs = receiver().receive(stranger)
    out = one(outs, Refusal)
    assert out.told == "protocol-version: this node speaks peerlink protocol version 2"
    assert out.reason == ("protocol version mismatch: peer 'x' speaks version 1, this node "
                          "('dc2') speaks version 2")
    r = receiver()
    r.receive(replace(stranger, proto_version=PROTO_VERSION))
    out = one(r.receive(Proof(bytes(32))), Refusal)
    assert "dc2" not in out.told and "v1" not in out.told and UUID not in out.told
    # An older sender opens with its Hello: the version code, nothing else.
    for version in (1, PROTO_VERSION):
        old = Hello(version, "x", "v1", UUID, SIZE, "primary", (), 1, make_nonce())
        out = one(receiver().receive(old), Refusal)
        assert out.told == PREAUTH_REFUSALS["protocol-version"]
        assert "opened with a Hello" in out.reason


def test_a_node_without_the_volume_declines_only_after_the_proof() -> None:
    """ReceiverServer's rule for a volume it holds no replica of: the same Challenge, then
    the reason for an authenticated sender, a code for anyone else."""
    s = sender()
    r = ReceiverSession("dc2", "v9", secret=SECRET, nonce=make_nonce())
    both_proved(s, r)  # type: ignore[arg-type]
    out = one(r.decline("node 'dc2' holds no replica of volume v9"), Refusal)
    assert out.told == out.reason and r.phase is Phase.CLOSED
    r = ReceiverSession("dc2", "v9", secret=SECRET, nonce=make_nonce())
    out = one(to_proof(sender(secret=b"not the secret at all!!"), r), Refusal)  # type: ignore[arg-type]
    assert out.told == PREAUTH_REFUSALS["auth-failed"]


def test_the_sender_streams_nothing_before_the_receivers_hello_ok() -> None:
    def planned() -> SenderSession:
        s, r = sender(), receiver()
        both_proved(s, r)
        s.receive(sends(r.offer(r.given))[0])
        s.planned(False, 900)
        assert s.phase is Phase.RESUME
        return s

    s = planned()
    with pytest.raises(PeerProtocolError, match="not authenticated yet"):
        s.sent(641, 100)
    assert s.phase is Phase.CLOSED  # and the shell drops the link
    with pytest.raises(PeerProtocolError, match=r"^expected HelloOk after HelloOk, got Ack"):
        planned().receive(Ack("v1", 641))


def test_the_receivers_hello_must_carry_the_challenges_nonce() -> None:
    s = sender()
    receiver_proved(s, make_nonce())
    theirs = Hello(PROTO_VERSION, "dc2", "v1", UUID, SIZE, "secondary",
                   wire_generations(History(UUID, (G0,))), 640, make_nonce())
    with pytest.raises(PeerProtocolError, match="not the nonce of the Challenge"):
        s.receive(theirs)


def test_the_senders_hello_must_match_its_intro() -> None:
    """After both proofs the sender's Hello must say what its Intro said (version, node,
    volume, nonce)."""
    for change in ({"node": "dc9"}, {"volume": "v9"}, {"auth_nonce": make_nonce()}):
        s, r = sender(), receiver()
        outs = to_proof(s, r)
        hello = sends(s.receive(one(sends(outs), Proof)))[0]
        with pytest.raises(PeerProtocolError, match=r"differ from the Intro's"):
            r.receive(replace(hello, **change))
        assert r.phase is Phase.CLOSED


def test_a_sender_without_a_secret_refuses_a_receivers_proof_by_code() -> None:
    """Nothing can be proved without a secret (the facts go out after an empty Proof, as
    before); a proof where none is configured is refused with a code, the reason logged."""
    s = sender(secret=None)
    out = one(receiver_proved(s, make_nonce(), SECRET), Refusal)
    assert out.told == "auth-failed: peer authentication failed (the reason is logged on " \
        "the sending node)"
    assert "node 'dc1' has no shared secret configured" in out.reason
    assert s.phase is Phase.CLOSED
    outs = receiver_proved(sender(secret=None), make_nonce(), None)
    assert isinstance(outs[0], Authenticated) and isinstance(one(sends(outs), Hello), Hello)


def test_changed_extents_are_coarsened_to_fit_a_hello() -> None:
    """A demoted primary's changed extents, too many for a Hello: coarser extents that
    cover them all; None (compare everything) past the coarsest extent."""
    extents = tuple(range(3000))  # 3000 extents of 64 KiB: 750 of 256 KiB
    shift, coarse = wire_changed(16, extents)  # type: ignore[misc]
    assert len(coarse) <= MAX_CHANGED and shift == 18
    assert {e >> 2 for e in extents} == set(coarse)
    assert wire_changed(16, (1, 5)) == (16, (1, 5))
    assert wire_changed(40, tuple(range(MAX_CHANGED + 1))) is None


def test_a_refuse_from_the_peer_ends_the_session() -> None:
    s = sender()
    s.start()
    with pytest.raises(PeerRefused, match=r"^peer refused: no thanks$"):
        s.receive(Refuse("no thanks"))
    assert s.phase is Phase.CLOSED
    with pytest.raises(PeerProtocolError, match="the session is closed"):
        s.receive(Refuse("again"))


# -- the receiver's phases ----------------------------------------------------------------


def batch(first: int, last: int, offset: int = 0) -> Batch:
    return Batch("v1", first, last, tuple(Record(Op.WRITE, 0, offset, 512, b"x" * 512)
                                          for _ in range(first, last + 1)))


def streaming_receiver(resync: bool = False) -> ReceiverSession:
    s, r = sender(), receiver()
    handshake(s, r, resync=resync)
    return r


def test_batches_in_sequence_then_a_gap_is_refused() -> None:
    r = streaming_receiver()
    assert r.admit(batch(641, 643), SIZE) == 3 * 512
    assert r.phase is Phase.STREAM
    with pytest.raises(PeerProtocolError):
        r.admit(batch(645, 645), SIZE)
    assert r.phase is Phase.CLOSED


def test_a_batch_of_an_epoch_older_than_the_one_followed_is_fenced() -> None:
    """The fencing token: a batch carrying an epoch below the one this node follows
    (its sender was deposed) is refused and closes the session; the same epoch or a
    newer one passes, and a batch without one (an older sender) is checked at the
    session's start only."""
    r = streaming_receiver()
    assert r.admit(replace(batch(641, 641), epoch=3), SIZE, epoch_floor=3) == 512
    assert r.admit(replace(batch(642, 642), epoch=4), SIZE, epoch_floor=3) == 512
    assert r.admit(batch(643, 643), SIZE, epoch_floor=3) == 512  # epoch None
    with pytest.raises(Fenced, match=r"^batch 644\.\.644 of volume v1 carries epoch 2, but "
                                     r"this node follows epoch 3"):
        r.admit(wire(replace(batch(644, 644), epoch=2)), SIZE, epoch_floor=3)
    assert r.phase is Phase.CLOSED


def test_the_epoch_of_a_batch_crosses_the_wire_and_an_older_batch_has_none() -> None:
    with_epoch = replace(batch(1, 2), epoch=7)
    assert wire(with_epoch) == with_epoch and wire(batch(1, 2)).epoch is None
    body = msgpack.unpackb(batch(1, 1).encode())
    assert len(body) == 5  # type, volume, first, last, records: the older layout
    with pytest.raises(PeerProtocolError, match="Batch: expected 4 or 5 fields, got 6"):
        decode(msgpack.packb([*body, 7, 8]))


def test_a_resync_is_announced_then_its_extents_then_done() -> None:
    r = streaming_receiver(resync=True)
    with pytest.raises(PeerProtocolError,
                       match=r"^expected ResyncExtents to begin a resync, got Batch"):
        r.admit(batch(901, 901), SIZE)
    r = streaming_receiver(resync=True)
    verify = Verify("v1", 1, 900, 16, (0, 1), (b"\0" * 32, b"\0" * 32))
    assert r.admit(verify, SIZE) == 0 and r.phase is Phase.ANNOUNCE
    assert r.admit(ResyncExtents("v1", 16, (0, 3)), SIZE) == 0
    assert r.phase is Phase.EXTENTS
    assert r.admit(ExtentData("v1", 0, 65536, b"y" * 65536), SIZE) == 65536
    with pytest.raises(PeerProtocolError, match="lies outside the announced extents"):
        r.admit(ExtentData("v1", 65536, 4096, b"z" * 4096), SIZE)  # extent 1: not announced
    r = streaming_receiver(resync=True)
    r.admit(ResyncExtents("v1", 16, (0, 3)), SIZE)
    r.admit(ExtentData("v1", 3 << 16, 4096, b"z" * 4096), SIZE)
    r.admit(ResyncDone("v1", 900), SIZE)
    assert r.phase is Phase.STREAM
    assert r.admit(batch(901, 901), SIZE) == 512


def test_an_open_stream_takes_a_resync_or_a_batch() -> None:
    r = streaming_receiver()
    r.admit(ResyncExtents("v1", 16, (1,)), SIZE)
    assert r.phase is Phase.EXTENTS
    with pytest.raises(PeerProtocolError, match="is past the volume end"):
        streaming_receiver().admit(ResyncExtents("v1", 16, (SIZE >> 16,)), SIZE)
    with pytest.raises(PeerProtocolError, match="on the stream of volume 'v1'"):
        streaming_receiver().admit(ResyncExtents("v2", 16, (1,)), SIZE)


def test_every_phase_refuses_what_its_table_does_not_name() -> None:
    """Each receiver phase, fed each message type the table does not allow, closes with a
    protocol error (or the peer's refusal for Refuse) and admits nothing."""
    samples: list[Message] = [
        Hello(PROTO_VERSION, "dc1", "v1", UUID, SIZE, "primary", (), 1, b"n" * NONCE_SIZE),
        HelloOk("dc1", 641, b""), batch(641, 641), ResyncExtents("v1", 16, (0,)),
        ExtentData("v1", 0, 512, b"x" * 512), ResyncDone("v1", 900),
        Verify("v1", 1, 900, 16, (0,), (b"\0" * 32,)), Ack("v1", 1), Ping(1),
        Refuse("no"), Challenge(PROTO_VERSION, bytes(32)), Proof(b""),
        Intro(PROTO_VERSION, "dc1", "v1", bytes(32))]
    for phase in (Phase.OPEN, Phase.ANNOUNCE, Phase.EXTENTS, Phase.STREAM):
        for msg in samples:
            if type(msg) in RECEIVER_TABLE[phase]:
                continue
            r = streaming_receiver()
            r.phase = phase
            with pytest.raises((PeerProtocolError, PeerRefused)):
                r.admit(msg, SIZE)
            assert r.phase is Phase.CLOSED
    for phase in (Phase.CHALLENGE, Phase.PROOF, Phase.FACTS, Phase.RESUME, Phase.STREAM):
        for msg in samples:
            if type(msg) in SENDER_TABLE[phase]:
                continue
            s = sender()
            s.phase = phase
            with pytest.raises((PeerProtocolError, PeerRefused)):
                s.receive(msg)
            assert s.phase is Phase.CLOSED


# -- the sender's window and verify tokens --------------------------------------------------


def streaming_sender(**kw: Any) -> SenderSession:
    s = sender(**kw)
    handshake(s, receiver())
    return s


def test_the_window_fills_and_acks_free_it() -> None:
    s = streaming_sender(window_batches=2, window_bytes=10_000)
    assert s.room
    s.sent(650, 4000)
    s.sent(660, 4000)
    assert not s.room  # two batches
    assert s.on_ack(Ack("v1", 650)) == (650, False)
    assert s.room and s.inflight_bytes == 4000
    s.sent(670, 7000)
    assert not s.room  # bytes
    assert s.on_ack(Ack("v1", 670)) == (670, False)  # acks cover every batch through it
    assert s.inflight_bytes == 0 and not s.inflight


def test_an_ack_of_no_batch_in_flight_is_a_protocol_error() -> None:
    s = streaming_sender()
    s.sent(650, 100)
    with pytest.raises(PeerProtocolError, match=r"^Ack of seq 649 matches no batch in flight"):
        s.on_ack(Ack("v1", 649))
    s = streaming_sender()
    with pytest.raises(PeerProtocolError, match="on the stream of 'v1'"):
        s.on_ack(Ack("v2", 650))


def test_a_resync_is_settled_by_its_own_ack() -> None:
    s = streaming_sender()
    s.resync_sent(900)
    assert s.on_ack(Ack("v1", 900)) == (900, True)
    assert s.resync_ack is None


def test_verify_results_must_answer_a_request() -> None:
    s = streaming_sender()
    s.verify_sent(7)
    result = VerifyResult("v1", 7, 900, ())
    assert s.receive(wire(result)) == []
    with pytest.raises(PeerProtocolError, match="token 7 for volume 'v1' matches no request"):
        s.on_verify_result(result)  # answered once only


# -- what a sender tells a receiver that has not proved the secret (issue 20) -----------


def leaves(v: Any) -> list[Any]:
    """Every value a message carries, nested tuples and dataclasses opened."""
    if isinstance(v, (tuple, list)):
        return [x for item in v for x in leaves(item)]
    if hasattr(v, "__dataclass_fields__") or hasattr(v, "_fields"):
        names = getattr(v, "_fields", None) or v.__dataclass_fields__
        return [x for n in names for x in leaves(getattr(v, n))]
    return [v]


def assert_no_facts(told: list[Message], s: SenderSession) -> None:
    """None of the sender's facts (volume uuid, size, generations, journal last seq) in
    anything it sent: not a Hello, not a field value, not the uuid's bytes anywhere."""
    facts = {s.mine.volume_size, s.mine.last_applied_seq,
             *(g.gen_id for g in s.mine.generations)}
    for msg in told:
        assert not isinstance(msg, Hello), f"the sender told its facts: {msg}"
        assert s.mine.volume_uuid.encode() not in msg.encode(), msg
        assert not facts & {x for x in leaves(msg) if isinstance(x, int)
                            and not isinstance(x, bool)}, msg


def impostor_answers(r_nonce: bytes) -> dict[str, list[Message]]:
    """What a listener that cannot prove the secret may answer a sender's Proof with."""
    theirs = Hello(PROTO_VERSION, "dc2", "v1", UUID, SIZE, "secondary",
                   wire_generations(History(UUID, (G0,))), 640, r_nonce)
    return {"a forged proof": [Proof(b"\x00" * 32)], "no proof": [Proof(b"")],
            "its Hello, skipping the proof": [theirs],
            "a forged HelloOk": [theirs, HelloOk("dc2", 641, b"\x00" * 32)]}


@pytest.mark.parametrize("answer", ["a forged proof", "no proof",
                                    "its Hello, skipping the proof", "a forged HelloOk"])
def test_a_sender_tells_no_facts_to_a_receiver_that_cannot_prove(answer: str) -> None:
    """A listener at the peer address without the secret: whatever it answers, every
    message the sender sends (inspected Send by Send) holds none of its facts, and the
    session ends without streaming."""
    s = sender(last=987_654_321, history=(G0, G1))
    told: list[Message] = []

    def feed(outs: list[Output]) -> None:
        told.extend(sends(outs))

    feed(s.start())
    r_nonce = make_nonce()
    try:
        feed(s.receive(Challenge(PROTO_VERSION, r_nonce)))
        for msg in impostor_answers(r_nonce)[answer]:
            outs = s.receive(msg)
            feed(outs)
            if any(isinstance(o, PlanResync) for o in outs):
                feed(s.planned(False, s.mine.last_applied_seq))
    except (PeerAuthError, PeerProtocolError):
        pass
    assert_no_facts(told, s)
    assert s.phase is not Phase.STREAM


def test_a_sender_tells_no_facts_to_a_receiver_with_the_wrong_secret() -> None:
    """A real receiver session under another secret: it refuses the sender's proof; the
    sender told it nothing but its version, name, the volume's name and a nonce."""
    s, r = sender(last=987_654_321, history=(G0, G1)), receiver(secret=STRANGER)
    told = sends(s.start())
    outs = r.receive(told[0])
    told += sends(s.receive(sends(outs)[0]))
    assert isinstance(one(r.receive(told[-1]), Refusal), Refusal)
    assert_no_facts(told, s)
