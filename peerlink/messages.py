"""Peerlink messages: a closed set of frozen dataclasses, msgpack-encoded (pure).

A message body is a msgpack array ``[type, field, field, ...]`` with the fields in the
order of the dataclass.  ``decode()`` checks every field's type and range and raises
``PeerProtocolError`` naming the field (``Batch.records[3].data: ...``); an unknown type,
a wrong field count or a stray value is the peer's fault, never silently dropped.

Versioning: ``Hello`` and ``Refuse`` keep their v1 layout in every protocol version, and
``Hello`` may only grow by appending fields (a decoder ignores fields past the ones it
knows), so any two versions can read each other's Hello and refuse cleanly with both
version numbers.  Every other message is exact and may change with ``PROTO_VERSION``.
See PROTOCOL.md for the handshake.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final, NamedTuple, Self, TypeAlias

import msgpack

from blockstore.record import Op

from .auth import NONCE_SIZE, PROOF_SIZE
from .errors import PeerProtocolError

PROTO_VERSION: Final = 2  # 2: Intro, Challenge, Proof both ways, then the Hellos
ROLES: Final = ("primary", "secondary", "dr")
MAX_NAME: Final = 255
MIN_EXTENT_SHIFT: Final = 12
MAX_EXTENT_SHIFT: Final = 40
# Bounds on every list a message carries, so that decoding costs time and memory in
# proportion to what an honest peer sends (PROTOCOL.md "Limits").
MAX_GENERATIONS: Final = 64  # a Hello carries the newest 64 of a history
MAX_CHANGED: Final = 1024  # Hello.changed extents (coarsened to fit: session.py)
# Batch records: twice the sender's default batch_records (a cascade flushes before it
# would pass this).  Unpacking that many holds the GIL for ~20-30 ms, worker thread or not.
MAX_BATCH_RECORDS: Final = 1 << 15
MAX_RESYNC_EXTENTS: Final = 1 << 20  # blockstore.peers.dirty_shift: at most 2^20 extents
MAX_REASON: Final = 2048  # characters of a Refuse reason
_U8: Final = 0xFF
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF


class Generation(NamedTuple):
    """One entry of a generation history: a random 64-bit id and the seq it began at."""

    gen_id: int
    start_seq: int


class Record(NamedTuple):
    """One operation in a batch: a (possibly coalesced) journal record."""

    op: Op
    flags: int  # blockstore.record.Flag bits (MAY_TRIM matters for ZERO)
    offset: int
    length: int
    data: bytes  # WRITE: ``length`` bytes; MARK: the msgpack mark body; else b""


# -- field checks: value and field path in, checked value out ------------------------------

def _show(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, str):
        return repr(v) if len(v) <= 40 else f"a {len(v)}-character string"
    if isinstance(v, bytes):
        return f"{len(v)} bytes"
    return type(v).__name__


def _bad(field: str, what: str, v: Any) -> PeerProtocolError:
    return PeerProtocolError(f"{field}: expected {what}, got {_show(v)}")


def _uint(v: Any, field: str, top: int = _U64, low: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= top:
        what = {_U64: "unsigned 64-bit integer", _U32: "unsigned 32-bit integer",
                _U8: "unsigned 8-bit integer"}.get(top)
        if what is None:
            what = f"integer between {low} and {top}"
        elif low:
            what = f"{what} >= {low}"
        raise _bad(field, what, v)
    return v


def _name(v: Any, field: str) -> str:
    if not isinstance(v, str) or not 1 <= len(v) <= MAX_NAME:
        raise _bad(field, f"non-empty string of at most {MAX_NAME} characters", v)
    return v


def _str(v: Any, field: str) -> str:
    if not isinstance(v, str):
        raise _bad(field, "string", v)
    return v


def _bytes(v: Any, field: str, sizes: tuple[int, ...] = ()) -> bytes:
    if not isinstance(v, bytes) or (sizes and len(v) not in sizes):
        what = " or ".join(f"{n} bytes" for n in sizes) if sizes else "bytes"
        raise _bad(field, what, v)
    return v


def _list(v: Any, field: str, most: int | None = None) -> list[Any]:
    if not isinstance(v, list):
        raise _bad(field, "array", v)
    if most is not None and len(v) > most:
        raise PeerProtocolError(f"{field}: {len(v)} items, over the maximum of {most}")
    return v


def _arity(cls: type, f: list[Any], at_least: bool = False) -> None:
    n = len(fields(cls))
    if len(f) < n or (len(f) > n and not at_least):
        raise PeerProtocolError(f"{cls.__name__}: expected {n} fields, got {len(f)}")


# -- messages -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Message:
    TYPE: ClassVar[int]

    def encode(self) -> bytes:
        """The message body (frame it with ``frames.encode_frame``)."""
        out: bytes = msgpack.packb(
            [self.TYPE, *(getattr(self, f.name) for f in fields(self))], use_bin_type=True)
        return out


@dataclass(frozen=True, slots=True)
class Hello(_Message):
    """First message of each side: who I am, what volume, where I stand, my nonce."""

    TYPE: ClassVar[int] = 1
    proto_version: int
    node: str
    volume: str
    volume_uuid: str
    volume_size: int
    role: str  # one of ROLES: this node's role for this volume
    generations: tuple[Generation, ...]  # oldest first
    last_applied_seq: int  # sender: newest journal seq; receiver: newest durable batch seq
    auth_nonce: bytes
    # Receiver only: an operator resolved a split brain in favour of the sender's side, so
    # this replica takes the sender's data even though the histories are unrelated.
    adopts: bool = False
    # Receiver only, after a failover: the extents (2^shift bytes) it changed since the
    # fork, as a demoted primary knows them; None: unknown (compare everything).
    changed: tuple[int, tuple[int, ...]] | None = None
    # The failover epoch each generation was created at, one per entry of
    # ``generations`` (they stay [gen_id, start_seq] pairs for older decoders); None: not
    # sent (an older node), read as epoch 0, which never wins a fork.
    epochs: tuple[int, ...] | None = None

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        if len(f) < 9:  # later versions append fields (``adopts``, ``changed``, ``epochs``)
            raise PeerProtocolError(f"Hello: expected 9 fields, got {len(f)}")
        adopts = len(f) > 9 and f[9] is True  # anything else: a field of a later version
        changed = None
        if len(f) > 10 and isinstance(f[10], list):  # else nothing, or a later field
            pair = f[10]
            if len(pair) != 2:
                raise PeerProtocolError(
                    f"Hello.changed: expected [extent_shift, extents], got {len(pair)} items")
            shift = _uint(pair[0], "Hello.changed.extent_shift", MAX_EXTENT_SHIFT,
                          MIN_EXTENT_SHIFT)
            ext = _list(pair[1], "Hello.changed.extents", MAX_CHANGED)
            changed = (shift, tuple(_uint(e, f"Hello.changed.extents[{i}]")
                                    for i, e in enumerate(ext)))
        vuuid = _str(f[3], "Hello.volume_uuid")
        try:
            canonical = str(uuid.UUID(vuuid)) == vuuid
        except ValueError:
            canonical = False
        if not canonical:
            raise _bad("Hello.volume_uuid", "canonical UUID string", vuuid)
        role = _str(f[5], "Hello.role")
        if role not in ROLES:
            raise _bad("Hello.role", " or ".join(ROLES), role)
        gens: list[Generation] = []
        for i, g in enumerate(_list(f[6], "Hello.generations", MAX_GENERATIONS)):
            at = f"Hello.generations[{i}]"
            pair = _list(g, at)
            if len(pair) != 2:
                raise PeerProtocolError(
                    f"{at}: expected [gen_id, start_seq], got {len(pair)} items")
            gen = Generation(_uint(pair[0], f"{at}.gen_id"), _uint(pair[1], f"{at}.start_seq"))
            # No order on start_seq: each generation counts in the journal of the node
            # that was promoted, so a later one may start at a lower number.
            if any(g.gen_id == gen.gen_id for g in gens):
                raise PeerProtocolError(
                    f"{at}.gen_id: {gen.gen_id:016x} appears twice (a history never "
                    "repeats a generation)")
            gens.append(gen)
        epochs = None
        if len(f) > 11 and isinstance(f[11], list):  # else nothing, or a later field
            if len(f[11]) != len(gens):  # bounded like the generations list: one each
                raise PeerProtocolError(
                    f"Hello.epochs: {len(f[11])} epochs for {len(gens)} generations")
            epochs = tuple(_uint(e, f"Hello.epochs[{i}]") for i, e in enumerate(f[11]))
        return cls(
            _uint(f[0], "Hello.proto_version", _U32), _name(f[1], "Hello.node"),
            _name(f[2], "Hello.volume"), vuuid, _uint(f[4], "Hello.volume_size"), role,
            tuple(gens), _uint(f[7], "Hello.last_applied_seq"),
            _bytes(f[8], "Hello.auth_nonce", (NONCE_SIZE,)), adopts, changed, epochs,
        )


@dataclass(frozen=True, slots=True)
class HelloOk(_Message):
    """Accept the peer's Hello: where streaming resumes.  ``auth_proof`` is empty in
    version 2 (both sides proved themselves in ``Proof`` before the Hellos)."""

    TYPE: ClassVar[int] = 2
    node: str
    resume_from_seq: int  # first seq of the first Batch (the sender decides, receiver echoes)
    auth_proof: bytes  # empty (version 2); a session refuses any other

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        _arity(cls, f)
        return cls(_name(f[0], "HelloOk.node"), _uint(f[1], "HelloOk.resume_from_seq", low=1),
                   _bytes(f[2], "HelloOk.auth_proof", (0, PROOF_SIZE)))


@dataclass(frozen=True, slots=True)
class Refuse(_Message):
    """The sender of this will not go on, and says why; the connection then closes."""

    TYPE: ClassVar[int] = 3
    reason: str

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        _arity(cls, f, at_least=True)  # layout fixed across versions, like Hello
        reason = _str(f[0], "Refuse.reason")
        if len(reason) > MAX_REASON:
            raise _bad("Refuse.reason", f"at most {MAX_REASON} characters", reason)
        return cls(reason)


@dataclass(frozen=True, slots=True)
class Batch(_Message):
    """Journal records ``first_seq..last_seq`` (coalesced), applied as one unit.
    ``epoch``: the failover epoch of the sending node (of the primary it serves or
    follows), its fencing token (a receiver that follows a newer epoch refuses the
    batch); None from a sender of before the field, checked when its session starts."""

    TYPE: ClassVar[int] = 4
    volume: str
    first_seq: int
    last_seq: int
    records: tuple[Record, ...]
    epoch: int | None = None

    def encode(self) -> bytes:
        body = [self.TYPE, self.volume, self.first_seq, self.last_seq, self.records]
        out: bytes = msgpack.packb(body if self.epoch is None else [*body, self.epoch],
                                   use_bin_type=True)
        return out

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        if len(f) not in (4, 5):
            raise PeerProtocolError(f"Batch: expected 4 or 5 fields, got {len(f)}")
        first = _uint(f[1], "Batch.first_seq", low=1)
        last = _uint(f[2], "Batch.last_seq", low=1)
        if last < first:
            raise PeerProtocolError(f"Batch.last_seq: {last} is below first_seq {first}")
        return cls(_name(f[0], "Batch.volume"), first, last,
                   tuple(_record(r, i) for i, r in enumerate(
                       _list(f[3], "Batch.records", MAX_BATCH_RECORDS))),
                   _uint(f[4], "Batch.epoch") if len(f) == 5 else None)


def _record(r: Any, i: int) -> Record:
    at = f"Batch.records[{i}]"
    items = _list(r, at)
    if len(items) != 5:
        raise PeerProtocolError(
            f"{at}: expected [op, flags, offset, length, data], got {len(items)} items")
    code = _uint(items[0], f"{at}.op", _U8)
    try:
        op = Op(code)
    except ValueError:
        raise _bad(f"{at}.op", "WRITE, TRIM, ZERO or MARK", code) from None
    flags = _uint(items[1], f"{at}.flags", _U8)
    offset = _uint(items[2], f"{at}.offset")
    length = _uint(items[3], f"{at}.length", _U32)
    data = _bytes(items[4], f"{at}.data")
    if op is Op.WRITE and len(data) != length:
        raise PeerProtocolError(f"{at}.data: WRITE of length {length} carries {len(data)} bytes")
    if op in (Op.TRIM, Op.ZERO) and data:
        raise PeerProtocolError(f"{at}.data: {op.name} carries {len(data)} bytes")
    if op is Op.MARK and (offset or length):
        raise PeerProtocolError(f"{at}: MARK with offset {offset} and length {length}")
    return Record(op, flags, offset, length, data)


@dataclass(frozen=True, slots=True)
class Ack(_Message):
    """The receiver has every batch through ``durable_seq`` committed durably."""

    TYPE: ClassVar[int] = 5
    volume: str
    durable_seq: int

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        _arity(cls, f)
        return cls(_name(f[0], "Ack.volume"), _uint(f[1], "Ack.durable_seq"))


@dataclass(frozen=True, slots=True)
class Ping(_Message):
    """Liveness and round-trip time; ``t`` is the sender's monotonic clock in ns."""

    TYPE: ClassVar[int] = 6
    t: int

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        _arity(cls, f)
        return cls(_uint(f[0], "Ping.t"))


@dataclass(frozen=True, slots=True)
class Pong(_Message):
    """Answer to Ping, echoing its ``t``."""

    TYPE: ClassVar[int] = 7
    t: int

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        _arity(cls, f)
        return cls(_uint(f[0], "Pong.t"))


@dataclass(frozen=True, slots=True)
class ResyncExtents(_Message):
    """These extents will be sent whole (ExtentData); the replica is Inconsistent until
    the matching ResyncDone's seq is applied."""

    TYPE: ClassVar[int] = 8
    volume: str
    extent_shift: int
    extents: tuple[int, ...]  # extent indexes, strictly ascending

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        _arity(cls, f)
        shift = _uint(f[1], "ResyncExtents.extent_shift", MAX_EXTENT_SHIFT, MIN_EXTENT_SHIFT)
        extents: list[int] = []
        for i, v in enumerate(_list(f[2], "ResyncExtents.extents", MAX_RESYNC_EXTENTS)):
            e = _uint(v, f"ResyncExtents.extents[{i}]")
            if extents and e <= extents[-1]:
                raise PeerProtocolError(
                    f"ResyncExtents.extents[{i}]: {e} does not follow {extents[-1]} "
                    "(extents must be strictly ascending)")
            extents.append(e)
        return cls(_name(f[0], "ResyncExtents.volume"), shift, tuple(extents))


@dataclass(frozen=True, slots=True)
class ExtentData(_Message):
    """Current contents of ``offset..offset+length`` during a resync.  Empty ``data``
    means the range reads as zeros (the receiver punches a hole: sparseness survives)."""

    TYPE: ClassVar[int] = 9
    volume: str
    offset: int
    length: int
    data: bytes

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        _arity(cls, f)
        length = _uint(f[2], "ExtentData.length", _U32, 1)
        data = _bytes(f[3], "ExtentData.data")
        if data and len(data) != length:
            raise PeerProtocolError(
                f"ExtentData.data: {len(data)} bytes for length {length} (empty means zeros)")
        return cls(_name(f[0], "ExtentData.volume"), _uint(f[1], "ExtentData.offset"),
                   length, data)


@dataclass(frozen=True, slots=True)
class ResyncDone(_Message):
    """Every announced extent was sent; the replica becomes Consistent once it has
    applied batches through ``seq`` (the journal position when the last extent was read)."""

    TYPE: ClassVar[int] = 10
    volume: str
    seq: int

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        _arity(cls, f)
        return cls(_name(f[0], "ResyncDone.volume"), _uint(f[1], "ResyncDone.seq"))


DIGEST_SIZE: Final = 16  # blake2b-128 of one extent's bytes (blockstore.store.digest)
MAX_VERIFY_EXTENTS: Final = 4096


@dataclass(frozen=True, slots=True)
class Verify(_Message):
    """Online verify, in stream order: after applying every batch sent before this, the
    replica compares its digests of these extents with the sender's and answers
    ``VerifyResult``.  ``seq``: the sender's journal position the digests stand for."""

    TYPE: ClassVar[int] = 11
    volume: str
    token: int  # matches the result to the request
    seq: int
    extent_shift: int
    extents: tuple[int, ...]  # strictly ascending
    digests: tuple[bytes, ...]  # one per extent

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        _arity(cls, f)
        shift = _uint(f[3], "Verify.extent_shift", MAX_EXTENT_SHIFT, MIN_EXTENT_SHIFT)
        extents = _list(f[4], "Verify.extents")
        digests = _list(f[5], "Verify.digests")
        if len(extents) > MAX_VERIFY_EXTENTS:
            raise _bad("Verify.extents", f"at most {MAX_VERIFY_EXTENTS} extents",
                       f"{len(extents)} extents")
        if len(digests) != len(extents):
            raise PeerProtocolError(
                f"Verify.digests: {len(digests)} digests for {len(extents)} extents")
        out: list[int] = []
        for i, v in enumerate(extents):
            e = _uint(v, f"Verify.extents[{i}]")
            if out and e <= out[-1]:
                raise PeerProtocolError(
                    f"Verify.extents[{i}]: {e} does not follow {out[-1]} "
                    "(extents must be strictly ascending)")
            out.append(e)
        ds = tuple(_bytes(d, f"Verify.digests[{i}]", (DIGEST_SIZE,))
                   for i, d in enumerate(digests))
        return cls(_name(f[0], "Verify.volume"), _uint(f[1], "Verify.token"),
                   _uint(f[2], "Verify.seq"), shift, tuple(out), ds)


@dataclass(frozen=True, slots=True)
class VerifyResult(_Message):
    """The replica's answer: the seq it had applied when it compared, and the extents
    whose digests differ."""

    TYPE: ClassVar[int] = 12
    volume: str
    token: int
    applied_seq: int
    differing: tuple[int, ...]

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        _arity(cls, f)
        diff = tuple(_uint(v, f"VerifyResult.differing[{i}]")
                     for i, v in enumerate(_list(f[3], "VerifyResult.differing",
                                                 MAX_VERIFY_EXTENTS)))
        return cls(_name(f[0], "VerifyResult.volume"), _uint(f[1], "VerifyResult.token"),
                   _uint(f[2], "VerifyResult.applied_seq"), diff)


@dataclass(frozen=True, slots=True)
class Challenge(_Message):
    """The receiver's first answer (version 2): its nonce, and nothing about itself, until
    the sender has proved that it knows the shared secret (``Proof``)."""

    TYPE: ClassVar[int] = 13
    proto_version: int
    auth_nonce: bytes

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        _arity(cls, f)
        return cls(_uint(f[0], "Challenge.proto_version", _U32),
                   _bytes(f[1], "Challenge.auth_nonce", (NONCE_SIZE,)))


@dataclass(frozen=True, slots=True)
class Proof(_Message):
    """A proof over both nonces (empty when no shared secret is configured): the
    sender's answer to ``Challenge``, then the receiver's answer to the sender's
    ``Proof``, before either side tells anything about its volume."""

    TYPE: ClassVar[int] = 14
    auth_proof: bytes

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        _arity(cls, f)
        return cls(_bytes(f[0], "Proof.auth_proof", (0, PROOF_SIZE)))


@dataclass(frozen=True, slots=True)
class Intro(_Message):
    """The sender's first message (version 2): only what the receiver needs to choose
    the volume and challenge it; the sender's facts (uuid, size, generations, journal
    seq) go in its ``Hello`` once the receiver proved the secret too."""

    TYPE: ClassVar[int] = 15
    proto_version: int
    node: str
    volume: str
    auth_nonce: bytes

    @classmethod
    def _decode(cls, f: list[Any]) -> Self:
        _arity(cls, f, at_least=True)  # later versions may append fields
        return cls(_uint(f[0], "Intro.proto_version", _U32), _name(f[1], "Intro.node"),
                   _name(f[2], "Intro.volume"), _bytes(f[3], "Intro.auth_nonce", (NONCE_SIZE,)))


Message: TypeAlias = (Hello | HelloOk | Refuse | Batch | Ack | Ping | Pong | ResyncExtents
                      | ExtentData | ResyncDone | Verify | VerifyResult | Challenge | Proof
                      | Intro)
_BY_TYPE: Final[dict[int, type[Message]]] = {
    c.TYPE: c for c in (Hello, HelloOk, Refuse, Batch, Ack, Ping, Pong, ResyncExtents,
                        ExtentData, ResyncDone, Verify, VerifyResult, Challenge, Proof,
                        Intro)
}
# msgpack refuses a container whose header declares more elements than the body has
# bytes (each takes one at least) or than any field allows, before reading it (the
# per-field bounds above then name the field).
_MAX_ARRAY: Final = MAX_RESYNC_EXTENTS + 8
_MAX_MAP: Final = 64


def decode(body: bytes) -> Message:
    """Decode and check one message body; raise PeerProtocolError naming what is wrong."""
    try:
        obj = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True,
                              max_array_len=min(len(body), _MAX_ARRAY),
                              max_map_len=min(len(body) // 2, _MAX_MAP), max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        detail = str(e) or type(e).__name__
        raise PeerProtocolError(f"message body is not valid msgpack ({detail})") from None
    if not isinstance(obj, list) or not obj:
        raise _bad("message", "non-empty array", obj)
    code = _uint(obj[0], "message type", _U8)
    cls = _BY_TYPE.get(code)
    if cls is None:
        raise PeerProtocolError(f"unknown message type {code}")
    return cls._decode(obj[1:])


# -- handshake decisions ----------------------------------------------------------------------

def check_hello(local: Hello, remote: Hello,  # noqa: PLR0911 - one return per check
                sending: bool | None = None) -> Refuse | None:
    """Return the Refuse to send when ``remote``'s Hello does not fit ``local``'s, else None.

    Checks identity only (version, names, volume uuid and size, two primaries).  Which
    side is the sync source, and from where, is decided from the generation histories
    (DESIGN.md §5) by the caller once this passes.
    """
    v = local.volume
    if remote.proto_version != local.proto_version:
        return Refuse(
            f"protocol version mismatch: peer {remote.node!r} speaks version "
            f"{remote.proto_version}, this node ({local.node!r}) speaks version "
            f"{local.proto_version}")
    if remote.node == local.node:
        return Refuse(f"peer uses this node's own name {local.node!r} (a loop, or a copied "
                      "config)")
    if remote.volume_uuid != local.volume_uuid:
        return Refuse(
            f"volume {v!r}: uuid mismatch (this node {local.volume_uuid}, peer "
            f"{remote.node!r} {remote.volume_uuid}): a different volume")
    # A replica smaller than its source has a grow still to meet (it grows at once and
    # the stream fills the new space); one larger cannot shrink.  ``sending``: which end
    # this is (None: sizes must match).
    src, dst = ((local, remote) if sending else (remote, local)) if sending is not None \
        else (None, None)
    if src is not None and dst is not None and dst.volume_size > src.volume_size:
        return Refuse(
            f"volume {v!r}: the replica on {dst.node!r} ({dst.volume_size} bytes) is larger "
            f"than its source on {src.node!r} ({src.volume_size} bytes): a volume never "
            "shrinks (another volume, or a grow the source lost)")
    if sending is None and remote.volume_size != local.volume_size:
        return Refuse(
            f"volume {v!r}: size mismatch (this node {local.volume_size} bytes, peer "
            f"{remote.node!r} {remote.volume_size} bytes)")
    if remote.role == local.role == "primary":
        return Refuse(
            f"volume {v!r}: both {local.node!r} and {remote.node!r} are primary (split "
            "brain); refusing to replicate either way")
    return None


def check_resume(applied_seq: int, resume_from_seq: int) -> Refuse | None:
    """Receiver side: refuse a resume point that would re-apply committed batches.

    A resume point past ``applied_seq + 1`` is legal only after a resync (the sender no
    longer holds the journal in between); the receiver is Inconsistent until then.
    """
    if resume_from_seq <= applied_seq:
        return Refuse(
            f"resume from seq {resume_from_seq} would re-apply records this replica "
            f"already has (applied through seq {applied_seq})")
    return None
