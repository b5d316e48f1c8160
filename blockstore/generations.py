"""Generation histories (DESIGN.md §5, after DRBD's generation identifiers).

Every promotion starts a new generation: a random 64-bit id, the local journal seq it
begins at, and the failover epoch it was created at (an integer that rises with every
promotion across the cluster, one winner per epoch).  A volume's history is the list of
generations it has lived through, oldest first, kept in ``volumes/<V>/generations.json``
(``kind: generations``, ``version: 2``; version 1 files, without epochs, are read as
epoch 0) with the volume's *logical* uuid: the uuid of the volume as replication knows
it, the same on every node (a replica adopts its upstream's; a promoted replica keeps it).

When two nodes meet, ``relation()`` of their histories decides:

- SAME: the same newest generation: stream on.
- AHEAD / BEHIND: one history contains the other's newest generation: that one is the
  sync source, the other takes a resync from it (or, if it is the one behind and wants
  to send, stops).
- FORKED: they share a generation but each went on with generations of its own (two
  promotions from one point, e.g. a second failure right after a switchover).  The side
  whose newest generation has the higher epoch is the sync source (``fork_winner``); the
  other keeps what only it had as a ``diverged-<gen>`` snapshot and takes a resync.  Equal
  epochs, or an epoch that was never recorded (0 after a fork), cannot be ordered: split
  brain, refused.
- UNRELATED: no generation in common (another volume, or a history rebuilt elsewhere):
  refused, never guessed.

A volume without the file has one generation derived from its uuid, at epoch 0.  The
refusal texts of both ends of a link are built here, so that they are the same on both.
"""

from __future__ import annotations

import enum
import re
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FormatError
from .meta import read_json, write_json

GEN_KIND = "generations"
GEN_VERSION = 2
GEN_FILE = "generations.json"
DIVERGED_PREFIX = "diverged-"  # the snapshot of what a demoted or forked copy alone had


class Relation(enum.Enum):
    SAME = "same"  # both on the same newest generation
    AHEAD = "ahead"  # mine is newer and includes theirs: they must resync from me
    BEHIND = "behind"  # theirs is newer and includes mine: I am stale
    FORKED = "forked"  # a common generation, then each its own: the newer epoch wins
    UNRELATED = "unrelated"  # no generation in common: refuse


@dataclass(frozen=True)
class Generation:
    gen_id: int
    start_seq: int
    epoch: int  # the failover epoch it was created at (0: before epochs were recorded)


@dataclass(frozen=True)
class History:
    logical_uuid: str
    generations: tuple[Generation, ...]
    # Generations this node started itself (their start_seq counts in its own journal);
    # kept locally, never sent: a history adopted from a peer has none.
    local: frozenset[int] = frozenset()

    @property
    def current(self) -> Generation:
        return self.generations[-1]


def initial_generation(volume_uuid: str) -> Generation:
    """The generation a volume is born with (stable: derived from its uuid)."""
    return Generation(int.from_bytes(uuid.UUID(volume_uuid).bytes[:8], "little"), 1, 0)


def diverged_name(gen_id: int) -> str:
    """The snapshot that keeps what a copy alone had on generation ``gen_id``."""
    return f"{DIVERGED_PREFIX}{gen_id:016x}"


def common_generation(mine: tuple[Generation, ...], theirs: tuple[Generation, ...]
                      ) -> Generation | None:
    """The newest generation of ``mine`` that ``theirs`` holds too (None: none)."""
    their_ids = {g.gen_id for g in theirs}
    return next((g for g in reversed(mine) if g.gen_id in their_ids), None)


def relation(mine: tuple[Generation, ...], theirs: tuple[Generation, ...]) -> Relation:
    """How two histories relate (module docstring), judged by their generation ids."""
    my_ids = [g.gen_id for g in mine]
    their_ids = [g.gen_id for g in theirs]
    if my_ids and their_ids and my_ids[-1] == their_ids[-1]:
        return Relation.SAME
    if their_ids and their_ids[-1] in my_ids:
        return Relation.AHEAD
    if my_ids and my_ids[-1] in their_ids:
        return Relation.BEHIND
    if common_generation(mine, theirs) is not None:
        return Relation.FORKED
    return Relation.UNRELATED


def fork_winner(mine: tuple[Generation, ...], theirs: tuple[Generation, ...]) -> Relation:
    """For FORKED histories, which side is the sync source: AHEAD (mine: my newest
    generation has the higher epoch), BEHIND (theirs), or FORKED when neither can be told
    newer: equal epochs (two promotions on one epoch) or an epoch of 0 (a generation
    after a fork was created by a promotion, so its epoch is at least 1; 0 means it was
    recorded before epochs were, by an older version): a split brain."""
    a, b = mine[-1].epoch, theirs[-1].epoch
    if 0 in (a, b) or a == b:
        return Relation.FORKED
    return Relation.AHEAD if a > b else Relation.BEHIND


def decide(mine: tuple[Generation, ...], theirs: tuple[Generation, ...]
           ) -> tuple[Relation, bool]:
    """(who is the sync source, forked?): ``relation()`` with a FORKED pair settled by
    ``fork_winner`` into AHEAD or BEHIND; FORKED stays only for a split brain."""
    rel = relation(mine, theirs)
    if rel is not Relation.FORKED:
        return rel, False
    return fork_winner(mine, theirs), True


# -- refusal texts (both ends of a link build them here: the same words on both) ----------

def unrelated_refusal(volume: str, a: str, b: str) -> str:
    return (f"volume {volume!r}: the generation histories of {a!r} and {b!r} are unrelated "
            "(split brain, or another volume); refusing to guess")


def describe_fork(volume: str, sender: str, sent: tuple[Generation, ...], receiver: str,
                  received: tuple[Generation, ...]) -> str:
    """What became of FORKED histories, in the words both ends use: who is stale (the
    sender on the older epoch: the refusal), who takes whose data (the receiver on the
    older epoch: a resync, logged), or a split brain (the refusal).  ``sent`` is the
    sender's history, ``received`` the receiver's."""
    common = common_generation(sent, received)
    assert common is not None, "describe_fork of histories that did not fork"
    s, r = sent[-1], received[-1]
    head = (f"volume {volume!r}: the histories of {sender!r} and {receiver!r} forked after "
            f"generation {common.gen_id:016x}: {sender!r} went on with generation "
            f"{s.gen_id:016x} (epoch {s.epoch}), {receiver!r} with {r.gen_id:016x} "
            f"(epoch {r.epoch})")
    side = fork_winner(sent, received)
    if side is Relation.BEHIND:
        return f"{head}; {sender!r} is on the older epoch: its copy is stale and is not sent"
    if side is Relation.AHEAD:
        return (f"{head}; {receiver!r} is on the older epoch: it keeps what only it had as "
                f"snapshot {diverged_name(r.gen_id)} and takes the data of {sender!r}")
    why = "both on one epoch" if s.epoch == r.epoch else "an epoch of 0 was never recorded"
    return f"{head}; neither is newer ({why}: split brain); refusing to guess"


_SPLIT_RE = re.compile(
    r"^volume '.*': (the generation histories of '.*' and '.*' are unrelated \(split brain, "
    r"or another volume\)|the histories of '.*' and '.*' forked after generation [0-9a-f]{16}"
    r": .*; neither is newer \(.*: split brain\)); refusing to guess$", re.DOTALL)


def is_split_brain(reason: str) -> bool:
    """Is ``reason`` (a Refuse a peer sent) one of the split-brain refusals above?"""
    return _SPLIT_RE.match(reason) is not None


def stale_refusal(volume: str, sender: str, sent: Generation, received: Generation) -> str:
    """Why a replica refuses a sender whose newest generation is older than its own (the
    sender was demoted by a failover)."""
    return (f"volume {volume!r}: node {sender!r} is on generation {sent.gen_id:016x}, "
            f"older than this replica's {received.gen_id:016x} (it was demoted by a "
            "failover); refusing its data")


_STALE_RE = re.compile(
    r"^volume '.*': (node '.*' is on generation [0-9a-f]{16}, older than this replica's "
    r"[0-9a-f]{16} \(it was demoted by a failover\); refusing its data|the histories of "
    r"'.*' and '.*' forked after generation [0-9a-f]{16}: .*; '.*' is on the older epoch: "
    r"its copy is stale and is not sent)$", re.DOTALL)


def is_stale_copy(reason: str) -> bool:
    """Is ``reason`` a refusal of a sender as a stale copy (``stale_refusal``, or the
    sender on the older epoch of a fork, ``describe_fork``)?  Such a refusal is moot once
    the replica has taken a sender on its own generation or a newer one."""
    return _STALE_RE.match(reason) is not None


def settle_commands(a: str, b: str) -> list[dict[str, str]]:
    """The commands that settle a split brain between nodes ``a`` and ``b``, either way:
    the discarded side keeps its writes since the split as a ``diverged-*`` snapshot."""
    return [{"keeps": a, "command": f"nbdgw resolve --discard {b}"},
            {"keeps": b, "command": f"nbdgw resolve --discard {a}"}]


# -- the file ------------------------------------------------------------------------------

def migrate_v1(meta: dict[str, Any]) -> dict[str, Any]:
    """A version 1 file's content as version 2: every generation at epoch 0 (not
    recorded then; ``fork_winner`` never orders a fork by it)."""
    return {**meta, "version": GEN_VERSION,
            "history": [[int(g), int(s), 0] for g, s in meta["history"]]}


def load_history(vpath: Path, volume_uuid: str, upstream_uuid: str | None = None) -> History:
    """The volume's history; without the file, one generation born with its logical
    uuid: ``upstream_uuid`` for a replica bound to an upstream, else its own.  A version
    1 file is migrated in memory (and written as version 2 by the next save)."""
    path = vpath / GEN_FILE
    if not path.exists():
        logical = upstream_uuid or volume_uuid
        return History(logical, (initial_generation(logical),))
    try:
        meta = read_json(path, GEN_KIND, GEN_VERSION)
    except FormatError as e:
        try:
            meta = migrate_v1(read_json(path, GEN_KIND, 1))
        except FormatError:
            raise e from None
    return History(str(meta["logical_uuid"]),
                   tuple(Generation(int(g), int(s), int(ep)) for g, s, ep in meta["history"]),
                   frozenset(int(g) for g in meta.get("promoted_here", [])))


def save_history(vpath: Path, history: History) -> None:
    write_json(vpath / GEN_FILE, {
        "kind": GEN_KIND, "version": GEN_VERSION, "logical_uuid": history.logical_uuid,
        "history": [[g.gen_id, g.start_seq, g.epoch] for g in history.generations],
        "promoted_here": sorted(history.local)})


def new_generation(history: History, start_seq: int, epoch: int) -> History:
    """The history after a promotion at ``start_seq`` on failover epoch ``epoch``: a
    fresh random id appended."""
    gen = Generation(secrets.randbits(64) or 1, start_seq, epoch)
    return History(history.logical_uuid, (*history.generations, gen),
                   history.local | {gen.gen_id})


def own_generation_after(history: History, theirs: Generation) -> Generation | None:
    """This node's newest generation, if it started it itself right after ``theirs``
    (the newest generation of a peer that this node superseded) and has been in it ever
    since: then its journal from that generation's start_seq holds every change made
    since the two histories forked.  None otherwise."""
    gens = history.generations
    if len(gens) >= 2 and gens[-2].gen_id == theirs.gen_id and gens[-1].gen_id in history.local:
        return gens[-1]
    return None
