"""The audit log of admin actions: ``<data_dir>/audit.log``, one JSON object per line
(what, when, by whom, from where, the outcome), appended and fsynced.  `nbdgw audit`
prints it; `nbdgw audit --verify` checks it (DESIGN.md §8, "The audit log").

Recorded: volume create/delete/grow/repair, snapshot create/delete/rollback, peer
pause/resume/disconnect/connect, resync, each with outcome ``done``, ``refused`` or
``error``; and promote, switchover and resolve, which the daemon performs.

**Who writes.**  Only root, and only through one writer (``append``): the daemon, for
every request on its control socket.  It records promote/switchover/resolve itself when
it answers them; for what the CLI does itself (volumes, snapshots, peers), the CLI sends
an ``audit`` request and the daemon records it.  Either way ``user``, ``uid``, ``gid``
and ``pid`` are the client's as the kernel reports them (SO_PEERCRED), never what the
client says; ``from`` (SSH_CONNECTION) and ``sudo_user`` (SUDO_USER) are what the
client's environment declares and are shown as such.  Without a daemon (no socket, or
nobody listening on it), a CLI run by root appends itself (``recorded_by: cli``); any
other user cannot record, so a ``done`` action is an error (the action happened; the
trail must say so) and a refusal a warning.  The file is root 0600 and the data
directory is root's: a control.group member can neither append to nor truncate it.

**The chain.**  Each entry carries ``seq`` (1, 2, ...), ``prev`` (the previous entry's
``hash``) and ``hash`` = SHA-256 of ``prev`` + the entry's canonical JSON (sorted keys,
no spaces, ``hash`` left out).  The first entry's ``prev`` is the SHA-256 of every byte
before it: of nothing for a new log, of the legacy (unchained) lines of a log from
before this version, which are thereby fixed too.  ``audit.state`` (root 0600, replaced
atomically after each entry is fsynced) holds the last ``seq`` and ``hash``: the anchor
that makes a cut tail visible.  The chain is not keyed: root can rewrite the whole log
and its state consistently; it protects against everyone else, and makes any partial
change (an edited, inserted, deleted, reordered or cut entry) visible."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import pwd
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from blockstore.errors import BlockstoreError
from blockstore.meta import fsync_dir
from blockstore.modes import make_dir
from nbdgw_common.errors import GatewayError

from .control import AUDIT_FILE, AUDIT_STATE, NoDaemon, ask, control_path

log = structlog.get_logger(component="audit")

FILE: Final = AUDIT_FILE
STATE: Final = AUDIT_STATE
STATE_KIND: Final = "nbdgw-audit-state"
STATE_VERSION: Final = 1

# Performed (and recorded) by the daemon: a client may not record them.
DAEMON_ACTIONS: Final = frozenset({"promote", "switchover", "resolve"})
# Performed by the CLI itself: recorded by the daemon when the CLI asks it to.
CLIENT_ACTIONS: Final = frozenset({
    "volume create", "volume delete", "volume grow", "volume repair",
    "snapshot create", "snapshot delete", "snapshot rollback",
    "clone create", "clone delete", "cdp export", "cdp unexport", "cdp restore",
    "peer pause", "peer resume", "peer disconnect", "peer connect", "resync"})
OUTCOMES: Final = ("done", "refused", "error")
CHAIN_FIELDS: Final = ("seq", "prev", "hash")
WRITER_FIELDS: Final = ("time", "user", "uid", "gid", "pid", "recorded_by")
CLIENT_FIELDS: Final = ("action", "args", "outcome", "detail", "from", "sudo_user")
MAX_REQUEST: Final = 16384  # bytes of JSON a client may have recorded in one entry
TAIL_READ: Final = 1 << 20  # how far back from the end the writer looks for the last line


class AuditRequestError(GatewayError):
    """An ``audit`` request the daemon does not record (and says why)."""


# -- the chain: pure functions over entries and bytes ------------------------------------


@dataclass(frozen=True)
class Anchor:
    """What audit.state says: how many entries were written and the last one's hash."""

    seq: int
    hash: str


@dataclass(frozen=True)
class Verdict:
    ok: bool
    entries: int  # chained entries read
    legacy: int  # unchained entries before the chain
    bad_line: int | None = None  # 1-based line of the first problem
    problem: str = ""
    warning: str = ""


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in entry.items() if k != "hash"}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode()


def start_hash(before: bytes) -> str:
    """The ``prev`` of entry 1: the hash of every byte before it in the file."""
    return hashlib.sha256(before).hexdigest()


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(str(entry["prev"]).encode() + canonical(entry)).hexdigest()


def seal(fields: dict[str, Any], prev: str, seq: int) -> dict[str, Any]:
    """``fields`` as entry ``seq`` of the chain, after the entry whose hash is ``prev``."""
    entry = {k: v for k, v in fields.items() if k not in CHAIN_FIELDS}
    entry["seq"], entry["prev"] = seq, prev
    entry["hash"] = entry_hash(entry)
    return entry


def encode(entry: dict[str, Any]) -> bytes:
    """One line of the log (the form `nbdgw audit --json` has always printed)."""
    return json.dumps(entry, sort_keys=True).encode() + b"\n"


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _chained(e: dict[str, Any] | None) -> bool:
    return e is not None and all(k in e for k in CHAIN_FIELDS)


def verify(data: bytes, anchor: Anchor | None) -> Verdict:
    """Check the log's bytes against its chain and the anchor; name the first bad line.

    Found: an entry edited (its hash), inserted or forged (no chain fields, or a seq or
    prev that does not follow), deleted or reordered (seq), a cut tail (fewer entries than
    the anchor), entries appended past the anchor, a legacy line changed after the chain
    started (entry 1's prev).  Not found without the anchor: a cut tail."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    legacy, first, offset = 0, len(lines), 0
    for i, line in enumerate(lines):
        e = _parse(line)
        if _chained(e):
            first = i
            break
        if line.strip():
            if e is None:
                return Verdict(False, 0, legacy, i + 1, "not a JSON object")
            legacy += 1
        offset += len(line) + 1
    prev, seq = start_hash(data[:offset]), 0
    for i in range(first, len(lines)):
        e = _parse(lines[i])
        problem = _link_problem(e, seq, prev, anchor)
        if problem or e is None:
            return Verdict(False, seq, legacy, i + 1, problem)
        seq, prev = e["seq"], e["hash"]
    problem = _end_problem(seq, prev, anchor)
    if problem:
        return Verdict(False, seq, legacy, len(lines) + 1, problem)
    warnings = [f"no {STATE}: a cut tail cannot be detected"] if anchor is None and seq else []
    if legacy:
        warnings.append(f"{legacy} unchained legacy {'entry' if legacy == 1 else 'entries'} "
                        f"before line {first + 1}")
    return Verdict(True, seq, legacy, warning="; ".join(warnings))


def _link_problem(e: dict[str, Any] | None, seq: int, prev: str,
                  anchor: Anchor | None) -> str:
    """What is wrong with ``e`` as the entry after ``seq`` (hash ``prev``); "" if fine."""
    if e is None:
        return "not a JSON object"
    if not _chained(e):
        return "not a chained entry (no seq/prev/hash)"
    n, a = e["seq"], anchor
    checks = (
        (n != seq + 1, f"expected entry seq {seq + 1}, found seq {n} (entries missing or "
                       "out of order)"),
        (e["prev"] != prev, f"entry seq {n} does not follow the entry before it (prev hash "
                            "differs)"),
        (entry_hash(e) != e["hash"], f"entry seq {n} does not match its hash (edited)"),
        (a is not None and n > a.seq, f"entry seq {n} is past the last recorded entry (seq "
                                      f"{a and a.seq} in {STATE}): appended by someone "
                                      "else than the writer"),
        (a is not None and n == a.seq and e["hash"] != a.hash,
         f"entry seq {n} is not the one recorded in {STATE} (hash differs): the chain was "
         "rewritten"),
    )
    return next((msg for bad, msg in checks if bad), "")


def _end_problem(seq: int, prev: str, anchor: Anchor | None) -> str:
    """What is wrong with a log whose chain ends at ``seq`` (hash ``prev``); "" if fine."""
    if anchor is not None and anchor.seq > seq:
        return (f"the log ends after entry seq {seq} but {anchor.seq} entries were "
                f"recorded ({STATE}): {anchor.seq - seq} missing at the end (truncated)")
    if anchor is not None and anchor.seq == 0 and anchor.hash != prev:
        return f"the log is not the one {STATE} was written for (its start hash differs)"
    return ""


# -- who asked ----------------------------------------------------------------------------


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def peer_identity(conn: socket.socket) -> dict[str, Any]:
    """The client of a unix socket as the kernel saw it connect (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return {"user": _user_name(uid), "uid": uid, "gid": gid, "pid": pid}


def own_identity() -> dict[str, Any]:
    """This process, for the entries a root CLI writes itself (no daemon running)."""
    uid = os.getuid()
    return {"user": _user_name(uid), "uid": uid, "gid": os.getgid(), "pid": os.getpid()}


def declared_context() -> dict[str, Any]:
    """What the CLI's environment says about the session; not verified by anyone."""
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    return {"from": ssh[0] if ssh else "local", "sudo_user": os.environ.get("SUDO_USER")}


def client_fields(req: dict[str, Any]) -> dict[str, Any]:
    """The fields of a client's ``audit`` request the daemon records; AuditRequestError
    for anything else (identity, time and chain fields are the writer's)."""
    for k in req:
        if k in WRITER_FIELDS or k in CHAIN_FIELDS:
            raise AuditRequestError(f"{k} is not accepted from a client: the daemon "
                                    "records who asked, when, and the chain")
        if k != "op" and k not in CLIENT_FIELDS:
            raise AuditRequestError(f"unknown field {k!r} in an audit request")
    action = req.get("action")
    if action in DAEMON_ACTIONS:
        raise AuditRequestError(f"{action} is recorded by the daemon only, when it "
                                "performs it")
    if action not in CLIENT_ACTIONS:
        raise AuditRequestError(f"unknown action {action!r} in an audit request")
    if req.get("outcome") not in OUTCOMES:
        raise AuditRequestError(f"outcome must be one of {', '.join(OUTCOMES)}")
    if not isinstance(req.get("args"), dict) or not isinstance(req.get("detail"), str):
        raise AuditRequestError("args must be an object and detail a string")
    if not isinstance(req.get("from"), str) or not isinstance(req.get("sudo_user"),
                                                              (str, type(None))):
        raise AuditRequestError("from must be a string and sudo_user a string or null")
    fields = {k: req[k] for k in CLIENT_FIELDS}
    if len(json.dumps(fields)) > MAX_REQUEST:
        raise AuditRequestError(f"audit request larger than {MAX_REQUEST} bytes")
    return fields


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- the file: the one writer, the reader ------------------------------------------------


def read_anchor(data_dir: Path) -> Anchor | None:
    try:
        state = json.loads((data_dir / STATE).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        raise GatewayError(f"{data_dir / STATE} is not valid JSON") from None
    if state.get("kind") != STATE_KIND or state.get("version") != STATE_VERSION:
        raise GatewayError(f"{data_dir / STATE}: expected {STATE_KIND} version "
                           f"{STATE_VERSION}, found {state.get('kind')} version "
                           f"{state.get('version')}")
    return Anchor(int(state["seq"]), str(state["hash"]))


def _write_anchor(data_dir: Path, anchor: Anchor) -> None:
    path, tmp = data_dir / STATE, data_dir / (STATE + ".tmp")
    data = json.dumps({"kind": STATE_KIND, "version": STATE_VERSION, **asdict(anchor)},
                      sort_keys=True).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        _root_only(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(data_dir)


def _root_only(fd: int, mode: int) -> None:
    """``mode`` exactly (whatever the umask), and owner and group root when we are root:
    logs of earlier versions were root:control.group 0660."""
    st = os.fstat(fd)
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
        os.fchown(fd, 0, 0)
    if st.st_mode & 0o7777 != mode:
        os.fchmod(fd, mode)


def _tail(fd: int, size: int) -> tuple[bytes, int]:
    """The last complete line (b"" if none) and where the complete lines end (a torn
    last write, with no newline, lies beyond)."""
    start = max(0, size - TAIL_READ)
    data = os.pread(fd, size - start, start)
    end = data.rfind(b"\n")
    if end < 0:
        return b"", start
    begin = data.rfind(b"\n", 0, end) + 1
    return data[begin:end], start + end + 1


def append(data_dir: Path, fields: dict[str, Any], recorded_by: str) -> dict[str, Any]:
    """Append ``fields`` as the next entry of the chain; return the entry.  Only the
    daemon, or a root CLI while no daemon runs, calls this (see the module docstring).

    Under an exclusive lock on the log: a torn last line (a crash during a write: no
    newline) is cut; an entry valid and next after the anchor (a crash between writing
    it and the anchor) is taken as written; anything else that disagrees with the anchor
    is left for --verify to report, and the chain goes on from the anchor."""
    make_dir(data_dir, parents=True, exist_ok=True)
    fd = os.open(data_dir / FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _root_only(fd, 0o600)
        size = os.fstat(fd).st_size
        last, complete = _tail(fd, size)
        if complete < size:
            log.warning("audit_torn_line_cut", path=str(data_dir / FILE), offset=complete,
                        bytes=size - complete)
            os.ftruncate(fd, complete)
        tail = _parse(last)
        anchor = read_anchor(data_dir)
        if anchor is None and tail is not None and _chained(tail):
            anchor = Anchor(int(tail["seq"]), str(tail["hash"]))  # the state file was lost
        elif anchor is None:
            whole = os.pread(fd, complete, 0)
            anchor = Anchor(0, start_hash(whole))
        elif (tail is not None and _chained(tail) and tail["seq"] == anchor.seq + 1
              and tail["prev"] == anchor.hash and entry_hash(tail) == tail["hash"]):
            anchor = Anchor(int(tail["seq"]), str(tail["hash"]))
        entry = seal({**fields, "recorded_by": recorded_by}, anchor.hash, anchor.seq + 1)
        os.write(fd, encode(entry))
        os.fsync(fd)
        _write_anchor(data_dir, Anchor(entry["seq"], entry["hash"]))
        return entry
    finally:
        os.close(fd)  # releases the lock


def secure(data_dir: Path) -> None:
    """The daemon at start: the log root 0600, its state root:root 0600 (logs of
    earlier versions were root:control.group 0660).  A data directory others may write
    to is reported: whoever may rename in it may replace the log."""
    mode = data_dir.stat().st_mode
    if mode & 0o022 and not mode & 0o1000:
        log.warning("audit_log_unprotected", data_dir=str(data_dir), mode=oct(mode & 0o7777),
                    note="group or others may write the data directory: they can replace "
                         "the audit log; make it 0755 root")
    for name, mode in ((FILE, 0o600), (STATE, 0o600)):
        try:
            fd = os.open(data_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            _root_only(fd, mode)
        finally:
            os.close(fd)


def read(data_dir: Path) -> list[dict[str, Any]]:
    """The entries, in order; lines that are not JSON objects are left out (--verify
    names them)."""
    path = data_dir / FILE
    if not path.exists():
        return []
    return [e for e in map(_parse, path.read_bytes().splitlines()) if e is not None]


def verify_file(data_dir: Path) -> Verdict:
    try:
        data = (data_dir / FILE).read_bytes()
    except FileNotFoundError:
        data = b""
    return verify(data, read_anchor(data_dir))


# -- the CLI side ---------------------------------------------------------------------------


def record(data_dir: Path, action: str, args: dict[str, Any], outcome: str,
           detail: str = "") -> None:
    """Have ``action`` recorded (by the daemon, or by this root CLI with no daemon)."""
    try:
        if outcome != "done" and (not data_dir.is_dir() or not any(data_dir.iterdir())):
            return  # refused on a node with nothing yet: it leaves no trace (not even a log)
        _record(data_dir, action, args, outcome, detail)
    except (OSError, GatewayError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if outcome == "done":
            raise GatewayError(f"{action} done, but the audit log {data_dir / FILE} could "
                               f"not be written: {why}") from None
        print(f"nbdgw: warning: audit log {data_dir / FILE} not written ({why})",
              file=sys.stderr)


def _record(data_dir: Path, action: str, args: dict[str, Any], outcome: str,
            detail: str) -> None:
    fields = {"action": action, "args": args, "outcome": outcome, "detail": detail,
              **declared_context()}
    try:
        reply = ask(control_path(data_dir), {"op": "audit", **fields}, 30.0,
                    who="the daemon", unreachable_hint="", closed_hint="without an answer")
    except NoDaemon:
        if os.geteuid() != 0:
            raise GatewayError("no daemon runs to record it, and only root writes the "
                               "audit log") from None
        append(data_dir, {"time": now(), **fields, **own_identity()}, recorded_by="cli")
        return
    if "error" in reply:
        raise GatewayError(f"the daemon did not record it: {reply['error']}")


@contextlib.contextmanager
def action(data_dir: Path, name: str, args: dict[str, Any]) -> Iterator[list[str]]:
    """Record the admin action done in the ``with`` body: ``done`` (with the detail the
    body appends to the yielded list), else ``refused`` for nbdgw's own errors (bad
    input, a busy volume) or ``error`` for anything else; the exception goes on."""
    detail: list[str] = []
    try:
        yield detail
    except (GatewayError, BlockstoreError) as e:
        record(data_dir, name, args, "refused", str(e))
        raise
    except SystemExit as e:  # a CLI refusal (_fail) or "not confirmed"
        if e.code not in (0, None):
            record(data_dir, name, args, "refused", "not confirmed or refused by the CLI")
        raise
    except BaseException as e:
        record(data_dir, name, args, "error", f"{type(e).__name__}: {e}")
        raise
    record(data_dir, name, args, "done", "; ".join(detail))


def audited(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator for a CLI command taking ``obj`` (the CLI context) and ``data_dir``:
    the command runs inside ``action(...)`` with its options as the recorded args.
    ``name`` must be a CLIENT_ACTIONS entry, or the daemon refuses to record it (and the
    command fails after it was done): checked here, at import."""
    if name not in CLIENT_ACTIONS:
        raise ValueError(f"audited({name!r}): not in audit.CLIENT_ACTIONS")

    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def run(obj: Any, *a: Any, **kw: Any) -> None:
            args = {k: v for k, v in kw.items()
                    if k not in ("data_dir", "as_json", "yes") and v is not None}
            # The command itself says when its data directory does not exist.
            with action(obj.data_dir(kw.get("data_dir"), must_exist=False), name, args):
                fn(obj, *a, **kw)
        return run
    return wrap
