"""The peerlink protocol's rules for one connection, without I/O (sans-IO).

``SenderSession`` and ``ReceiverSession`` are fed the messages their peer sent (and, where
the protocol needs facts only the shell can read from disk, the shell's answers) and
return what to do next as a list of outputs: send this message, refuse with this reason,
plan a resync, take the replica over, stream.  They own the handshake order (the sender's
Intro, the receiver's Challenge, the sender's Proof checked before the receiver reads or
tells anything about its replica, the receiver's Proof checked before the sender tells
anything about its volume, then the sender's Hello, the receiver's Hello, the resume
point both ways), what may be told to a peer that has not authenticated (refusals by
code only, either way), the resume and refusal rules, the phases of a
resync and of streaming as a transition table, the sender's window of unacknowledged
batches and the verify tokens.  The asyncio ``Sender`` and ``Receiver`` read the journal and the
volume, perform the outputs and reconnect; the rules are tested here, end against end,
with no socket (tests/unit/test_peerlink_session.py).

A session that refused, or that raised ``PeerProtocolError`` (``PeerAuthError`` for a
failed proof), is closed: every later input raises.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

from blockstore.generations import Generation as BGeneration
from blockstore.generations import (
    History,
    Relation,
    decide,
    describe_fork,
    stale_refusal,
    unrelated_refusal,
)
from peerlink.auth import Prover, Transcript, proof, verify
from peerlink.batch import check_batch, payload_bytes
from peerlink.errors import Fenced, PeerAuthError, PeerProtocolError, PeerRefused
from peerlink.messages import (
    MAX_CHANGED,
    MAX_EXTENT_SHIFT,
    MAX_GENERATIONS,
    PROTO_VERSION,
    Ack,
    Batch,
    Challenge,
    ExtentData,
    Generation,
    Hello,
    HelloOk,
    Intro,
    Message,
    Proof,
    Refuse,
    ResyncDone,
    ResyncExtents,
    Verify,
    VerifyResult,
    check_hello,
    check_resume,
)


class Phase(enum.Enum):
    """Where a session stands.  Sender: CHALLENGE → PROOF → FACTS → PLAN → RESUME →
    STREAM.  Receiver: INTRO → PROOF → HELLO → FACTS → RESUME → ADMIT → OPEN | ANNOUNCE,
    then the resync and stream phases below.  Each side's peer is authenticated once
    its Proof checked: the receiver's from HELLO on, the sender's from FACTS on; no
    Hello (uuid, size, generations, seq) goes out before."""

    INTRO = "intro"  # receiver: waiting for the sender's Intro
    CHALLENGE = "challenge"  # sender: its Intro sent, waiting for the receiver's Challenge
    PROOF = "proof"  # its Challenge (receiver) or Proof (sender) sent: the peer's Proof
    HELLO = "hello"  # receiver: both proved; its Proof sent, waiting for the sender's Hello
    FACTS = "facts"  # receiver: the sender's Hello came; the shell reads the replica
    #                  sender: its Hello sent, waiting for the receiver's Hello
    PLAN = "plan"  # sender: the peer's Hello is accepted; the shell plans the resync
    RESUME = "resume"  # its Hello (receiver) or HelloOk (sender) sent: the peer's HelloOk
    ADMIT = "admit"  # receiver: the resume point came; the shell takes the replica over
    OPEN = "open"  # receiver: a resync (ResyncExtents) or the first Batch may come
    ANNOUNCE = "announce"  # receiver: a resync must begin (Verify may come before it)
    EXTENTS = "extents"  # receiver: ExtentData of the announced extents until ResyncDone
    STREAM = "stream"  # Batches (and Verify); sender: batches out, Acks in
    CLOSED = "closed"  # refused or failed: nothing more


# What a receiver accepts in each phase, and the phase it moves to.  The handshake phases
# accept one message each (Intro, Proof, Hello, HelloOk; a Hello first is an older
# version's, refused by code); FACTS and ADMIT accept nothing (the shell must call
# ``offer`` or ``decline``, then ``admitted``, first).
RECEIVER_TABLE: Final[dict[Phase, dict[type[Message], Phase]]] = {
    Phase.INTRO: {Intro: Phase.PROOF, Hello: Phase.CLOSED},
    Phase.PROOF: {Proof: Phase.HELLO},
    Phase.HELLO: {Hello: Phase.FACTS},
    Phase.FACTS: {},
    Phase.RESUME: {HelloOk: Phase.ADMIT},
    Phase.ADMIT: {},
    Phase.OPEN: {ResyncExtents: Phase.EXTENTS, Batch: Phase.STREAM, Verify: Phase.STREAM},
    Phase.ANNOUNCE: {Verify: Phase.ANNOUNCE, ResyncExtents: Phase.EXTENTS},
    Phase.EXTENTS: {ExtentData: Phase.EXTENTS, ResyncDone: Phase.STREAM},
    Phase.STREAM: {Batch: Phase.STREAM, Verify: Phase.STREAM},
    Phase.CLOSED: {},
}

# What a sender accepts: the receiver's Challenge, Proof, Hello and HelloOk, then Acks
# and VerifyResults.
SENDER_TABLE: Final[dict[Phase, dict[type[Message], Phase]]] = {
    Phase.CHALLENGE: {Challenge: Phase.PROOF},
    Phase.PROOF: {Proof: Phase.FACTS},
    Phase.FACTS: {Hello: Phase.PLAN},
    Phase.PLAN: {},
    Phase.RESUME: {HelloOk: Phase.STREAM},
    Phase.STREAM: {Ack: Phase.STREAM, VerifyResult: Phase.STREAM},
    Phase.CLOSED: {},
}

# What each phase waits for, for the error when something else comes.
RECEIVER_EXPECTS: Final = {
    Phase.INTRO: "Intro to open the connection", Phase.PROOF: "Proof after Challenge",
    Phase.HELLO: "Hello after Proof", Phase.RESUME: "HelloOk after Hello",
    Phase.OPEN: "Batch while streaming", Phase.ANNOUNCE: "ResyncExtents to begin a resync",
    Phase.EXTENTS: "ExtentData during a resync", Phase.STREAM: "Batch while streaming"}
SENDER_EXPECTS: Final = {
    Phase.CHALLENGE: "Challenge in answer to Intro", Phase.PROOF: "Proof after Proof",
    Phase.FACTS: "Hello after Hello", Phase.RESUME: "HelloOk after HelloOk",
    Phase.STREAM: "Ack while streaming"}

# What a side tells a peer that has not proved the secret when it refuses it: a code and
# no identifier of this node (its name, volumes, uuids, sizes); the reason with the
# details is logged here.  PROTOCOL.md lists the codes.
REFUSE_VERSION: Final = "protocol-version"
REFUSE_AUTH: Final = "auth-failed"
PREAUTH_REFUSALS: Final = {  # the receiver's
    REFUSE_VERSION: f"{REFUSE_VERSION}: this node speaks peerlink protocol version "
                    f"{PROTO_VERSION}",
    REFUSE_AUTH: f"{REFUSE_AUTH}: peer authentication failed (the reason is logged on the "
                 "receiving node)",
}
SENDER_PREAUTH_REFUSALS: Final = {
    REFUSE_AUTH: f"{REFUSE_AUTH}: peer authentication failed (the reason is logged on the "
                 "sending node)",
}


# -- outputs ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``msg`` to the peer."""

    msg: Message


@dataclass(frozen=True, slots=True)
class Refusal:
    """Log ``reason``, send ``Refuse(wire or reason)`` and close.  ``wire``: what a peer
    that has not authenticated is told instead (a code).  ``history``: a refusal by
    generation history (kept for `nbdgw status`); ``split_brain``: histories with no
    common future."""

    reason: str
    history: bool = False
    split_brain: bool = False
    wire: str | None = None

    @property
    def told(self) -> str:
        """What the peer is sent."""
        return self.wire if self.wire is not None else self.reason


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The peer proved itself (its Proof checked, either side): the shell lifts the
    link's limits for strangers."""


@dataclass(frozen=True, slots=True)
class PlanResync:
    """Sender: the peer is accepted; decide whether it needs a resync (journal and dirty
    sets: the shell's to read) and call ``SenderSession.planned``.  ``rel`` AHEAD: the
    peer follows an older generation (compare digests); ``fork``: the histories forked."""

    theirs: Hello
    rel: Relation
    fork: bool
    applied: int


@dataclass(frozen=True, slots=True)
class Established:
    """Sender: both proofs checked; stream from ``resume`` (the replica had ``applied``)."""

    resume: int
    applied: int
    peer: str


@dataclass(frozen=True, slots=True)
class TakeOver:
    """Receiver: the sender proved itself.  Retire any other session, grow the replica to
    ``size`` if it is smaller, then call ``ReceiverSession.admitted``."""

    size: int


@dataclass(frozen=True, slots=True)
class Admitted:
    """Receiver: stream from ``resume_from``.  ``newer``: the sender is on a newer
    generation (this copy is compared and resynced); ``fork_lost``: the histories forked
    and this copy lost (keep what only it had first); ``resync``: a resync must come."""

    resume_from: int
    newer: bool
    fork_lost: bool
    resync: bool


Output = Send | Refusal | Authenticated | PlanResync | Established | TakeOver | Admitted


def wire_generations(history: History) -> tuple[Generation, ...]:
    """A history as a Hello carries it: its newest MAX_GENERATIONS generations (a peer
    more promotions behind than that finds no common generation and is refused)."""
    return tuple(Generation(g.gen_id, g.start_seq)
                 for g in history.generations[-MAX_GENERATIONS:])


def wire_epochs(history: History) -> tuple[int, ...]:
    return tuple(g.epoch for g in history.generations[-MAX_GENERATIONS:])


def wire_changed(shift: int, extents: tuple[int, ...]) -> tuple[int, tuple[int, ...]] | None:
    """``Hello.changed`` within MAX_CHANGED extents: coarser extents (each covering the
    ones it merges) until they fit; None (unknown: every extent is compared) when even
    2^MAX_EXTENT_SHIFT-byte extents are too many."""
    out = tuple(sorted(set(extents)))
    while len(out) > MAX_CHANGED:
        if shift >= MAX_EXTENT_SHIFT:
            return None
        shift += 1
        out = tuple(sorted({e >> 1 for e in out}))
    return shift, out


def from_wire(gens: tuple[Generation, ...], epochs: tuple[int, ...] | None
              ) -> tuple[BGeneration, ...]:
    """A Hello's history as ``blockstore.generations`` entries (epoch 0 when not sent)."""
    eps = epochs if epochs is not None else (0,) * len(gens)
    return tuple(BGeneration(g.gen_id, g.start_seq, e) for g, e in zip(gens, eps, strict=True))


class _Session:
    """What both ends share: the phase, the table, closing on any failure."""

    TABLE: dict[Phase, dict[type[Message], Phase]]
    EXPECTS: dict[Phase, str]
    PREAUTH: dict[str, str]  # what this side tells a peer that has not proved itself

    def __init__(self, node: str, volume: str, secret: bytes | None,
                 next_secret: bytes | None = None, realm: str = "") -> None:
        if next_secret is not None and secret is None:
            raise ValueError("a next secret without a current one")
        self.node = node
        self.volume = volume
        self.realm = realm  # the group, on a node's shared port: both proofs cover it
        self.secret = secret  # this side proves itself with it
        self.next_secret = next_secret  # during a rotation: the peer's proof may use it
        self.phase = Phase.INTRO

    def _verify(self, prover: Prover, t: Transcript, presented: bytes) -> None:
        """Raise PeerAuthError unless ``presented`` is ``prover``'s proof under the
        current secret or, while a rotation configures one, the next (SECURITY.md
        "Rotating the peer secret"): a peer one step ahead in the rotation proves itself
        with the secret that is next here."""
        assert self.secret is not None
        try:
            verify(self.secret, prover, t, presented)
        except PeerAuthError:
            if self.next_secret is None:
                raise
            verify(self.next_secret, prover, t, presented)

    def _enter(self, msg: Message) -> Phase:
        """The phase ``msg`` leads to; raises (and closes) when it is out of place: a
        Refuse is the peer's refusal, anything else not in the table a protocol error."""
        if self.phase is Phase.CLOSED:
            raise PeerProtocolError("the session is closed")
        nxt = self.TABLE[self.phase].get(type(msg))
        if nxt is not None:
            return nxt
        expected = self.EXPECTS.get(self.phase, f"nothing in phase {self.phase.value}")
        self.phase = Phase.CLOSED
        if isinstance(msg, Refuse):
            raise PeerRefused(msg.reason)
        raise PeerProtocolError(f"expected {expected}, got {type(msg).__name__}")

    def _refuse(self, reason: str, history: bool = False, split_brain: bool = False
                ) -> list[Output]:
        self.phase = Phase.CLOSED
        return [Refusal(reason, history, split_brain)]

    def _guarded(self, code: str, reason: str) -> list[Output]:
        """Refuse a peer that has not authenticated: ``reason`` is logged, the code sent."""
        self.phase = Phase.CLOSED
        return [Refusal(reason, wire=self.PREAUTH[code])]


    def _fail(self, e: PeerProtocolError) -> PeerProtocolError:
        self.phase = Phase.CLOSED
        return e


class SenderSession(_Session):
    """The sending end of one connection.

    ``mine`` is the Hello this node sends (built by the shell from the journal's end and
    the volume's history) once the receiver proved itself; before, only an Intro (its
    version, node and volume names and nonce) and its own Proof go out.  ``peer``: the
    node this sender ships to."""

    TABLE = SENDER_TABLE
    EXPECTS = SENDER_EXPECTS
    PREAUTH = SENDER_PREAUTH_REFUSALS

    def __init__(self, mine: Hello, history: History, *, peer: str, secret: bytes | None,
                 next_secret: bytes | None = None, window_bytes: int = 1 << 62,
                 window_batches: int = 1 << 62, realm: str = "") -> None:
        super().__init__(mine.node, mine.volume, secret, next_secret, realm)
        self.mine = mine
        self.history = history
        self.peer = peer
        self.theirs: Hello | None = None
        self.applied = 0
        self.resume = 0
        self.window_bytes = window_bytes
        self.window_batches = window_batches
        self.inflight: deque[tuple[int, int]] = deque()  # (last seq, wire bytes) unacked
        self.inflight_bytes = 0
        self.resync_ack: int | None = None  # the Ack that says a resync is durable
        self.tokens: set[int] = set()  # Verify requests sent and not answered
        self.their_nonce: bytes | None = None  # from the Challenge

    def start(self) -> list[Output]:
        """The Intro: version, names and nonce; the facts wait for the receiver's Proof."""
        self.phase = Phase.CHALLENGE
        m = self.mine
        return [Send(Intro(m.proto_version, m.node, m.volume, m.auth_nonce))]

    # -- the handshake --------------------------------------------------------------------

    def receive(self, msg: Message) -> list[Output]:
        """The peer's Challenge, Proof, Hello, HelloOk, Ack or VerifyResult (a Pong is the
        shell's)."""
        nxt = self._enter(msg)
        if isinstance(msg, Challenge):
            return self._challenge(msg, nxt)
        if isinstance(msg, Proof):
            return self._their_proof(msg, nxt)
        if isinstance(msg, Hello):
            return self._hello(msg)
        if isinstance(msg, HelloOk):
            return self._hello_ok(msg, nxt)
        if isinstance(msg, Ack):
            self.on_ack(msg)
            return []
        assert isinstance(msg, VerifyResult)
        self.on_verify_result(msg)
        return []

    def _challenge(self, ch: Challenge, nxt: Phase) -> list[Output]:
        """Prove this side over both nonces; the receiver tells nothing before."""
        if ch.proto_version != PROTO_VERSION:
            raise self._fail(PeerProtocolError(
                f"Challenge for protocol version {ch.proto_version}, this node speaks "
                f"{PROTO_VERSION}"))
        self.their_nonce, self.phase = ch.auth_nonce, nxt
        return [Send(Proof(proof(self.secret, Prover.SENDER, self._transcript())
                           if self.secret else b""))]

    def _their_proof(self, msg: Proof, nxt: Phase) -> list[Output]:
        """The receiver's Proof, checked before this side tells anything of its volume:
        then its Hello.  A wrong proof raises PeerAuthError (the shell logs it and drops
        the link, telling nothing); a proof where this node has no secret is refused by
        code."""
        if self.secret is not None:
            try:
                self._verify(Prover.RECEIVER, self._transcript(), msg.auth_proof)
            except PeerAuthError as e:
                raise self._fail(e) from None
        elif msg.auth_proof:
            return self._guarded(REFUSE_AUTH, (
                "peer authentication failed: the peer sent a proof but node "
                f"{self.node!r} has no shared secret configured"))
        self.phase = nxt
        return [Authenticated(), Send(self.mine)]

    def _hello(self, theirs: Hello) -> list[Output]:
        if theirs.auth_nonce != self.their_nonce:
            raise self._fail(PeerProtocolError(
                "Hello.auth_nonce: not the nonce of the Challenge"))
        refusal = check_hello(self.mine, theirs, sending=True)
        if refusal is None and theirs.node != self.peer:
            refusal = Refuse(f"connected to node {theirs.node!r}, but this sender ships to "
                             f"peer {self.peer!r} (wrong address?)")
        if refusal is not None:
            return self._refuse(refusal.reason)
        rel, fork, gen_refusal, split = self._generations(theirs)
        if gen_refusal is not None:
            return self._refuse(gen_refusal, history=True, split_brain=split)
        applied = 0 if rel is Relation.AHEAD else theirs.last_applied_seq
        last = self.mine.last_applied_seq
        if applied > last:
            return self._refuse(
                f"volume {self.volume!r}: replica {theirs.node!r} has applied through seq "
                f"{applied} but the journal of {self.node!r} ends at seq {last} "
                "(diverged histories; refusing to guess)")
        self.theirs, self.applied, self.phase = theirs, applied, Phase.PLAN
        return [PlanResync(theirs, rel, fork, applied)]

    def _generations(self, theirs: Hello) -> tuple[Relation, bool, str | None, bool]:
        """Contract 5 at the handshake: who is the sync source (``decide``: a fork goes to
        the newer epoch), whether the histories forked, and why this node must not send
        (stale, a split brain, or unrelated histories) with whether that is a split
        brain."""
        history = self.history
        theirs_gens = from_wire(theirs.generations, theirs.epochs)
        rel, fork = decide(history.generations, theirs_gens)
        if rel is Relation.BEHIND and fork:
            return rel, fork, describe_fork(self.volume, self.node, history.generations,
                                            theirs.node, theirs_gens), False
        if rel is Relation.BEHIND:
            return rel, fork, (
                f"volume {self.volume!r}: {theirs.node!r} is on a newer generation "
                f"({theirs.generations[-1].gen_id:016x}) than this node "
                f"({history.current.gen_id:016x}): a failover happened and this copy is "
                "stale; refusing to send it"), False
        if rel in (Relation.UNRELATED, Relation.FORKED) and theirs.adopts:
            # It takes this node's data (a resolved split brain), compared everywhere.
            return Relation.AHEAD, False, None, False
        if rel is Relation.FORKED:
            return rel, fork, describe_fork(self.volume, self.node, history.generations,
                                            theirs.node, theirs_gens), True
        if rel is Relation.UNRELATED and theirs.last_applied_seq:
            return rel, fork, unrelated_refusal(self.volume, self.node, theirs.node), True
        return rel, fork, None, False

    def planned(self, resync: bool, last: int) -> list[Output]:
        """The shell's plan: ``resync`` (extents instead of records, then records from
        ``last + 1``: everything through ``last`` is in the store) or none (records from
        the seq after the replica's)."""
        if self.phase is not Phase.PLAN:
            raise self._fail(PeerProtocolError(f"planned in phase {self.phase.value}"))
        assert self.theirs is not None
        self.resume = last + 1 if resync else self.applied + 1
        self.phase = Phase.RESUME
        # The proofs went in Proof both ways; HelloOk carries the resume point only.
        return [Send(HelloOk(self.node, self.resume, b""))]

    def _transcript(self) -> Transcript:
        """Both proofs cover the receiver's name as this sender knows it (``peer``): the
        receiver does not name itself before the sender proved itself."""
        assert self.their_nonce is not None
        return Transcript(PROTO_VERSION, self.node, self.peer, self.mine.auth_nonce,
                          self.their_nonce, self.realm)

    def _hello_ok(self, ok: HelloOk, nxt: Phase) -> list[Output]:
        theirs = self.theirs
        assert theirs is not None
        if ok.auth_proof:
            raise self._fail(PeerProtocolError(
                "HelloOk.auth_proof: a receiver proves itself in Proof, not in HelloOk"))
        if ok.node != theirs.node or ok.resume_from_seq != self.resume:
            raise self._fail(PeerProtocolError(
                f"HelloOk: node {ok.node!r} resume {ok.resume_from_seq}, expected node "
                f"{theirs.node!r} resume {self.resume}"))
        self.phase = nxt
        return [Established(self.resume, self.applied, theirs.node)]

    # -- streaming: the window and verify tokens -------------------------------------------

    @property
    def room(self) -> bool:
        """Whether another batch may be sent (the window is not full)."""
        return (self.inflight_bytes < self.window_bytes
                and len(self.inflight) < self.window_batches)

    def sent(self, last_seq: int, wire_bytes: int) -> None:
        """A batch through ``last_seq`` went out."""
        self._streaming("send a batch")
        self.inflight.append((last_seq, wire_bytes))
        self.inflight_bytes += wire_bytes

    def resync_sent(self, seq: int) -> None:
        """A resync's extents went out, then ResyncDone: the replica acknowledges ``seq``
        once it holds them durably (it may repeat its own seq when nothing newer came)."""
        self._streaming("resync")
        self.resync_ack = seq

    def on_ack(self, ack: Ack) -> tuple[int, bool]:
        """An Ack: (the seq now durable on the replica, whether it settled a resync).
        Raises for an Ack of another volume or of no batch in flight."""
        self._streaming("take an Ack")
        if ack.volume != self.volume:
            raise self._fail(PeerProtocolError(
                f"Ack for volume {ack.volume!r} on the stream of {self.volume!r}"))
        d = ack.durable_seq
        settled = d == self.resync_ack
        if settled:
            self.resync_ack = None
        elif not any(last == d for last, _ in self.inflight):
            sent = self.inflight[-1][0] if self.inflight else None
            raise self._fail(PeerProtocolError(
                f"Ack of seq {d} matches no batch in flight (in flight through {sent})"))
        while self.inflight and self.inflight[0][0] <= d:
            self.inflight_bytes -= self.inflight.popleft()[1]
        return d, settled

    def verify_sent(self, token: int) -> None:
        """A Verify request with ``token`` went out."""
        self._streaming("verify")
        self.tokens.add(token)

    def on_verify_result(self, msg: VerifyResult) -> int:
        """A VerifyResult: its token (one this session sent and not yet answered)."""
        self._streaming("take a VerifyResult")
        if msg.token not in self.tokens or msg.volume != self.volume:
            raise self._fail(PeerProtocolError(
                f"VerifyResult token {msg.token} for volume {msg.volume!r} matches no "
                "request"))
        self.tokens.discard(msg.token)
        return msg.token

    def _streaming(self, what: str) -> None:
        if self.phase is not Phase.STREAM:
            raise self._fail(PeerProtocolError(
                f"cannot {what} in phase {self.phase.value} (not authenticated yet)"))


@dataclass(frozen=True, slots=True)
class ReplicaFacts:
    """What a receiver knows of its replica when a connection opens (the shell reads it).

    ``uuid``: the volume uuid it answers to (its binding, else its own); ``fresh``: never
    received anything (then it answers to whatever uuid the sender offers);
    ``adopt_for``: the node an operator resolved a split brain for; ``changed``: a demoted
    primary's account of the extents it changed (``{"peer", "generation",
    "extent_shift", "extents"}``); ``diverged_blocked``: the diverged snapshot this copy
    would have to keep before taking a fork's winner, when there is no room for it."""

    node: str
    volume: str
    role: str
    size: int
    uuid: str
    history: History
    applied: int
    fresh: bool
    adopt_for: str | None = None
    changed: dict[str, Any] | None = None
    diverged_blocked: str | None = None
    max_snapshots: int = 0


class ReceiverSession(_Session):
    """The receiving end of one connection: the handshake, then every message checked
    against the phase before the shell queues it for the applier.

    Until the sender's Proof checks, the session knows nothing of the replica (no facts
    are read for a stranger) and tells the peer its protocol version and a nonce only;
    then it proves itself (``Proof``), the sender's Hello comes, and the shell reads the
    replica's facts (``offer``) or declines the volume (``decline``: this node holds no
    replica of it)."""

    TABLE = RECEIVER_TABLE
    EXPECTS = RECEIVER_EXPECTS
    PREAUTH = PREAUTH_REFUSALS

    def __init__(self, node: str, volume: str, *, secret: bytes | None, nonce: bytes,
                 next_secret: bytes | None = None, realm: str = "") -> None:
        super().__init__(node, volume, secret, next_secret, realm)
        self.nonce = nonce
        self.facts: ReplicaFacts | None = None
        self.intro: Intro | None = None
        self.theirs: Hello | None = None
        self.mine: Hello | None = None
        self.rel = Relation.SAME
        self.fork = False
        self.adopts = False
        self.resume_from = 0
        self.expect_seq = 0
        self.announced: frozenset[int] = frozenset()
        self.extent_shift = 0
        self.size = 0  # the volume's size once the batches admitted are applied

    @property
    def sender_history(self) -> tuple[BGeneration, ...]:
        assert self.theirs is not None
        return from_wire(self.theirs.generations, self.theirs.epochs)

    def receive(self, msg: Message) -> list[Output]:
        """Intro, Proof, Hello, HelloOk; once admitted, ``admit`` (it also returns the
        payload size)."""
        nxt = self._enter(msg)
        if isinstance(msg, Intro):
            return self._intro(msg, nxt)
        if isinstance(msg, Hello):
            return self._hello(msg, nxt)
        if isinstance(msg, Proof):
            return self._proof(msg, nxt)
        if isinstance(msg, HelloOk):
            return self._hello_ok(msg, nxt)
        raise self._fail(PeerProtocolError(
            f"{type(msg).__name__} must go through admit()"))  # pragma: no cover

    # -- the handshake --------------------------------------------------------------------

    def _intro(self, intro: Intro, nxt: Phase) -> list[Output]:
        """The sender's Intro: only its version is judged before it proves itself."""
        self.intro = intro
        if intro.proto_version != PROTO_VERSION:
            return self._guarded(REFUSE_VERSION, (
                f"protocol version mismatch: peer {intro.node!r} speaks version "
                f"{intro.proto_version}, this node ({self.node!r}) speaks version "
                f"{PROTO_VERSION}"))
        self.phase = nxt
        return [Send(Challenge(PROTO_VERSION, self.nonce))]

    def _transcript(self) -> Transcript:
        assert self.intro is not None
        return Transcript(PROTO_VERSION, self.intro.node, self.node, self.intro.auth_nonce,
                          self.nonce, self.realm)

    def _proof(self, msg: Proof, nxt: Phase) -> list[Output]:
        """The sender's Proof; once it checks, this side proves itself in turn."""
        intro = self.intro
        assert intro is not None
        if self.secret is not None:
            try:
                self._verify(Prover.SENDER, self._transcript(), msg.auth_proof)
            except PeerAuthError as e:
                return self._guarded(REFUSE_AUTH, (
                    f"{e}; volume {intro.volume!r} (a sender that knows node "
                    f"{self.node!r} by another name fails this way too)"))
        elif msg.auth_proof:
            return self._guarded(REFUSE_AUTH, (
                "peer authentication failed: the peer sent a proof but node "
                f"{self.node!r} has no shared secret configured"))
        self.phase = nxt
        return [Authenticated(), Send(Proof(proof(self.secret, Prover.RECEIVER,
                                                  self._transcript())
                                            if self.secret else b""))]

    def _hello(self, theirs: Hello, nxt: Phase) -> list[Output]:
        """The sender's Hello: first (an older version's opening), refused by code; after
        both proofs, its facts, which must match its Intro."""
        intro = self.intro
        if intro is None:
            return self._guarded(REFUSE_VERSION, (
                f"protocol version mismatch: peer {theirs.node!r} opened with a Hello "
                f"(protocol version {theirs.proto_version}, or an unreleased layout of "
                f"version 2), this node ({self.node!r}) speaks version {PROTO_VERSION}"))
        if (theirs.proto_version, theirs.node, theirs.volume, theirs.auth_nonce) != (
                intro.proto_version, intro.node, intro.volume, intro.auth_nonce):
            raise self._fail(PeerProtocolError(
                f"Hello: version {theirs.proto_version}, node {theirs.node!r}, volume "
                f"{theirs.volume!r} or nonce differ from the Intro's (version "
                f"{intro.proto_version}, node {intro.node!r}, volume {intro.volume!r})"))
        self.theirs, self.phase = theirs, nxt
        return []

    def decline(self, reason: str) -> list[Output]:
        """The authenticated sender asked for a volume this node holds no replica of (or
        one stopped): refuse it, saying why."""
        self._facts_phase("decline")
        return self._refuse(reason)

    def _facts_phase(self, what: str) -> None:
        if self.phase is not Phase.FACTS:
            raise self._fail(PeerProtocolError(f"{what} in phase {self.phase.value}"))

    def offer(self, facts: ReplicaFacts) -> list[Output]:
        """The replica as it stands (read by the shell once the sender proved itself):
        refuse the sender, or send this side's Hello."""
        self._facts_phase("offer")
        self.facts, self.size = facts, facts.size
        theirs = self.theirs
        assert theirs is not None
        gens = self.sender_history
        self.rel, self.fork, self.adopts = self._verdict(gens)
        uuid = theirs.volume_uuid if facts.fresh else facts.uuid
        mine = Hello(PROTO_VERSION, self.node, self.volume, uuid, facts.size, facts.role,
                     wire_generations(facts.history), 0 if self.adopts else facts.applied,
                     self.nonce, self.adopts, self._changed(), wire_epochs(facts.history))
        refusal = check_hello(mine, theirs, sending=False)
        if refusal is not None:
            return self._refuse(refusal.reason)
        why = self._history_refusal(gens)
        if why is not None:
            return self._refuse(why, history=True,
                                split_brain=self.rel in (Relation.FORKED, Relation.UNRELATED))
        self.mine, self.phase = mine, Phase.RESUME
        return [Send(mine)]

    def _verdict(self, theirs: tuple[BGeneration, ...]) -> tuple[Relation, bool, bool]:
        """How the sender's history relates to this replica's: (rel, fork, adopts).  A
        split brain an operator resolved for the sender's side is adopted: its data is
        taken, compared then resynced, as if it were on a newer generation."""
        f = self.facts
        assert f is not None and self.theirs is not None
        if f.fresh:
            return Relation.BEHIND, False, False
        rel, fork = decide(f.history.generations, theirs)
        if rel in (Relation.UNRELATED, Relation.FORKED) and f.adopt_for == self.theirs.node:
            return Relation.BEHIND, fork, True
        return rel, fork, False

    def _history_refusal(self, theirs: tuple[BGeneration, ...]) -> str | None:
        f, node = self.facts, self.theirs.node if self.theirs else "?"
        assert f is not None
        if self.fork and self.rel in (Relation.AHEAD, Relation.FORKED):
            return describe_fork(self.volume, node, theirs, self.node, f.history.generations)
        if self.rel is Relation.AHEAD:
            return stale_refusal(self.volume, node, theirs[-1], f.history.current)
        if self.rel is Relation.UNRELATED:
            return unrelated_refusal(self.volume, node, self.node)
        if self.fork and f.diverged_blocked is not None:
            return (f"volume {self.volume!r}: {self.node!r} must keep what only it had as "
                    f"snapshot {f.diverged_blocked} before it takes {node!r}'s data, but it "
                    f"has {f.max_snapshots} snapshots (the maximum): delete one there")
        return None

    def _changed(self) -> tuple[int, tuple[int, ...]] | None:
        """For a sender on a newer generation: the extents this demoted primary changed
        that the sender may lack (recorded at demotion for that node and generation),
        within MAX_CHANGED extents (``wire_changed``)."""
        f = self.facts
        assert f is not None and self.theirs is not None
        rec = f.changed
        if self.rel is not Relation.BEHIND or f.fresh or not isinstance(rec, dict):
            return None
        if rec.get("peer") != self.theirs.node or \
                rec.get("generation") != f.history.current.gen_id:
            return None
        return wire_changed(int(rec["extent_shift"]), tuple(int(e) for e in rec["extents"]))

    def _hello_ok(self, ok: HelloOk, nxt: Phase) -> list[Output]:
        theirs = self.theirs
        assert theirs is not None
        if ok.node != theirs.node:
            raise self._fail(PeerProtocolError(
                f"HelloOk.node: {ok.node!r} is not the node that said Hello ({theirs.node!r})"))
        if ok.auth_proof:
            raise self._fail(PeerProtocolError(
                "HelloOk.auth_proof: a sender proves itself in Proof, not in HelloOk"))
        self.resume_from, self.phase = ok.resume_from_seq, nxt
        return [TakeOver(theirs.volume_size)]

    def admitted(self, applied: int, fresh: bool, resync_pending: bool) -> list[Output]:
        """The replica is this session's (any other retired, grown to the sender's size):
        check the resume point against what it holds now, then prove this side and
        stream.  ``resync_pending``: an interrupted resync must be redone."""
        if self.phase is not Phase.ADMIT:
            raise self._fail(PeerProtocolError(f"admitted in phase {self.phase.value}"))
        # A sender on a newer generation (a failover or switchover happened, or it won a
        # fork): this replica's seq numbers belong to another node's journal, so the
        # sender compares digests and resyncs; any resume point is its to choose.
        newer = self.rel is Relation.BEHIND and not fresh
        refusal = None if newer else check_resume(applied, self.resume_from)
        if refusal is not None:
            return self._refuse(refusal.reason)
        # The sender skips records (it resyncs extents instead), or this replica was
        # interrupted in a resync and needs another one: a resync must come.  Else
        # batches from applied + 1, or first a resync of some extents (hot extents of a
        # primary restart when this replica already has every record).
        resync = newer or self.resume_from > applied + 1 or resync_pending
        self.phase = Phase.ANNOUNCE if resync else Phase.OPEN
        self.expect_seq = self.resume_from
        return [Send(HelloOk(self.node, self.resume_from, b"")),
                Admitted(self.resume_from, newer, self.fork and newer, resync)]

    # -- streaming --------------------------------------------------------------------------

    def admit(self, msg: Message, volume_size: int, epoch_floor: int = 0) -> int:
        """Check ``msg`` against the phase (the replica is ``volume_size`` bytes now);
        return its payload bytes.  Raises PeerProtocolError for anything out of place
        (nothing of it may be applied), Fenced for a Batch of an epoch below
        ``epoch_floor`` (the epoch of the primary this node follows: its sender was
        deposed), PeerRefused for the sender's Refuse."""
        nxt = self._enter(msg)
        try:
            if isinstance(msg, Batch) and msg.epoch is not None and msg.epoch < epoch_floor:
                raise Fenced(f"batch {msg.first_seq}..{msg.last_seq} of volume {msg.volume} "
                             f"carries epoch {msg.epoch}, but this node follows epoch "
                             f"{epoch_floor}: its sender is no longer the primary")
            n = self._check(msg, volume_size)
        except PeerProtocolError as e:
            raise self._fail(e) from None
        self.phase = nxt
        return n

    def _check(self, msg: Message, volume_size: int) -> int:
        if isinstance(msg, Verify):
            count = (volume_size + (1 << msg.extent_shift) - 1) >> msg.extent_shift
            if msg.volume != self.volume or (msg.extents and msg.extents[-1] >= count):
                raise PeerProtocolError(f"Verify for volume {msg.volume!r} names extents "
                                        f"outside volume {self.volume!r}")
            return 0
        if isinstance(msg, ResyncExtents):
            if msg.volume != self.volume:
                raise PeerProtocolError(f"ResyncExtents for volume {msg.volume!r} on the "
                                        f"stream of volume {self.volume!r}")
            count = (volume_size + (1 << msg.extent_shift) - 1) >> msg.extent_shift
            if msg.extents and msg.extents[-1] >= count:
                raise PeerProtocolError(
                    f"ResyncExtents: extent {msg.extents[-1]} is past the volume end "
                    f"({count} extents of 2^{msg.extent_shift} bytes)")
            self.announced, self.extent_shift = frozenset(msg.extents), msg.extent_shift
            return 0
        if isinstance(msg, ResyncDone):
            if msg.volume != self.volume:
                raise PeerProtocolError(f"ResyncDone for volume {msg.volume!r} on the "
                                        f"stream of volume {self.volume!r}")
            return 0
        if isinstance(msg, ExtentData):
            end = msg.offset + msg.length
            if msg.volume != self.volume or end > volume_size or any(
                    e not in self.announced for e in range(
                        msg.offset >> self.extent_shift,
                        ((end - 1) >> self.extent_shift) + 1)):
                raise PeerProtocolError(
                    f"ExtentData of {msg.length} bytes at {msg.offset} for volume "
                    f"{msg.volume!r} lies outside the announced extents")
            return len(msg.data)
        assert isinstance(msg, Batch)
        # Checked against the size the replica will have when it applies this batch: a
        # grow MARK in a batch still queued counts.
        self.size = check_batch(msg, volume=self.volume,
                                volume_size=max(self.size, volume_size),
                                expect_first_seq=self.expect_seq)
        self.expect_seq = msg.last_seq + 1
        return payload_bytes(msg.records)
