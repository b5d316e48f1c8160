"""The audit log's hash chain (gateway/audit.py): every entry carries ``seq``, ``prev``
and ``hash``; an edit, a deletion, a reordering or a cut tail is found and named by the
first line that is wrong; legacy (unchained) entries before the chain are counted and
covered by the chain's first hash."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gateway import audit


def entry(i: int) -> dict[str, object]:
    return {"time": f"2026-12-0{1 + i % 9}T00:00:00Z", "action": "volume create",
            "args": {"name": f"v{i}"}, "outcome": "done", "detail": "", "user": "root",
            "uid": 0, "pid": 100 + i, "from": "local", "sudo_user": None}


def chain(n: int, legacy: bytes = b"") -> tuple[list[bytes], audit.Anchor]:
    """``n`` chained lines after ``legacy``, and the anchor the writer keeps."""
    prev, lines = audit.start_hash(legacy), []
    for i in range(n):
        e = audit.seal(entry(i), prev, i + 1)
        lines.append(audit.encode(e))
        prev = e["hash"]
    return lines, audit.Anchor(n, str(prev))


def check(lines: list[bytes], anchor: audit.Anchor | None,
          legacy: bytes = b"") -> audit.Verdict:
    return audit.verify(legacy + b"".join(lines), anchor)


def test_an_intact_chain_verifies() -> None:
    lines, anchor = chain(5)
    v = check(lines, anchor)
    assert (v.ok, v.entries, v.legacy, v.bad_line, v.problem) == (True, 5, 0, None, "")
    assert check([], audit.Anchor(0, audit.start_hash(b""))).ok
    assert check([], None).ok  # no log, no state: nothing was ever recorded


def test_an_edited_entry_is_named() -> None:
    lines, anchor = chain(5)
    e = json.loads(lines[2])
    e["user"] = "nobody"
    lines[2] = audit.encode(e)
    v = check(lines, anchor)
    assert (v.ok, v.bad_line) == (False, 3)
    assert v.problem == "entry seq 3 does not match its hash (edited)"


def test_an_edited_entry_with_a_recomputed_hash_breaks_the_next_link() -> None:
    lines, anchor = chain(5)
    e = json.loads(lines[1])
    e["outcome"] = "refused"
    lines[1] = audit.encode(audit.seal(
        {k: v for k, v in e.items() if k not in ("seq", "prev", "hash")}, e["prev"], 2))
    v = check(lines, anchor)
    assert (v.ok, v.bad_line) == (False, 3)
    assert v.problem == "entry seq 3 does not follow the entry before it (prev hash differs)"


def test_a_deleted_entry_is_named() -> None:
    lines, anchor = chain(5)
    del lines[1]
    v = check(lines, anchor)
    assert (v.ok, v.bad_line) == (False, 2)
    assert v.problem == "expected entry seq 2, found seq 3 (entries missing or out of order)"


def test_reordered_entries_are_named() -> None:
    lines, anchor = chain(5)
    lines[1], lines[2] = lines[2], lines[1]
    v = check(lines, anchor)
    assert (v.ok, v.bad_line) == (False, 2)
    assert v.problem == "expected entry seq 2, found seq 3 (entries missing or out of order)"


def test_a_cut_tail_is_found_with_the_anchor() -> None:
    lines, anchor = chain(5)
    v = check(lines[:3], anchor)
    assert (v.ok, v.bad_line) == (False, 4)
    assert v.problem == ("the log ends after entry seq 3 but 5 entries were recorded "
                         "(audit.state): 2 missing at the end (truncated)")
    v = check([], anchor)
    assert (v.ok, v.bad_line) == (False, 1)
    # Without the anchor a cut tail is a shorter, valid chain: that is what the state
    # file is for.
    assert check(lines[:3], None).ok


def test_a_missing_anchor_is_reported_when_the_log_has_entries() -> None:
    lines, _ = chain(2)
    v = check(lines, None, b"")
    assert v.ok and v.warning == "no audit.state: a cut tail cannot be detected"


def test_entries_past_the_anchor_are_named() -> None:
    lines, _ = chain(4)
    _, anchor3 = chain(3)
    v = check(lines, anchor3)
    assert (v.ok, v.bad_line) == (False, 4)
    assert v.problem == ("entry seq 4 is past the last recorded entry (seq 3 in "
                         "audit.state): appended by someone else than the writer")


def test_a_forged_line_is_named() -> None:
    lines, anchor = chain(3)
    forged = json.dumps({"action": "promote", "outcome": "done", "user": "root",
                         "from": "10.9.9.9"}).encode() + b"\n"
    v = check([*lines, forged], anchor)
    assert (v.ok, v.bad_line) == (False, 4)
    assert v.problem == "not a chained entry (no seq/prev/hash)"
    v = check([lines[0], forged, *lines[1:]], anchor)
    assert (v.ok, v.bad_line) == (False, 2)
    v = check([lines[0], b"{not json\n", *lines[1:]], anchor)
    assert (v.ok, v.bad_line, v.problem) == (False, 2, "not a JSON object")


def test_legacy_entries_are_counted_and_covered() -> None:
    legacy = b"".join(json.dumps({**entry(i), "user": "alice"}).encode() + b"\n"
                      for i in range(3))
    lines, anchor = chain(2, legacy)
    v = check(lines, anchor, legacy)
    assert (v.ok, v.entries, v.legacy) == (True, 2, 3)
    assert v.warning == "3 unchained legacy entries before line 4"
    # An edit of a legacy line after the chain started breaks the chain's first link.
    v = check(lines, anchor, legacy.replace(b"alice", b"mallory", 1))
    assert (v.ok, v.bad_line) == (False, 4)
    assert v.problem == ("entry seq 1 does not follow the entry before it (prev hash "
                         "differs)")


def test_append_writes_a_root_only_chain_and_its_anchor(tmp_path: Path) -> None:
    for i in range(3):
        audit.append(tmp_path, entry(i), recorded_by="cli")
    log, state = tmp_path / audit.FILE, tmp_path / audit.STATE
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert [e["seq"] for e in audit.read(tmp_path)] == [1, 2, 3]
    assert audit.verify_file(tmp_path).ok
    with log.open("rb+") as f:  # cut the last entry
        f.truncate(len(b"".join(log.read_bytes().splitlines(keepends=True)[:2])))
    v = audit.verify_file(tmp_path)
    assert (v.ok, v.bad_line) == (False, 3)


def test_append_adopts_an_entry_written_just_before_a_crash(tmp_path: Path) -> None:
    """The entry is fsynced before the anchor; a crash between the two leaves one valid
    entry past the anchor, which the next append takes as written."""
    audit.append(tmp_path, entry(0), recorded_by="cli")
    before = (tmp_path / audit.STATE).read_bytes()
    audit.append(tmp_path, entry(1), recorded_by="cli")
    (tmp_path / audit.STATE).write_bytes(before)  # the anchor of entry 2 never written
    audit.append(tmp_path, entry(2), recorded_by="cli")
    assert audit.verify_file(tmp_path).ok
    assert [e["seq"] for e in audit.read(tmp_path)] == [1, 2, 3]


def test_append_drops_a_torn_last_line(tmp_path: Path) -> None:
    audit.append(tmp_path, entry(0), recorded_by="cli")
    with (tmp_path / audit.FILE).open("ab") as f:
        f.write(b'{"time": "2026-')  # power cut in the middle of a write
    audit.append(tmp_path, entry(1), recorded_by="cli")
    assert audit.verify_file(tmp_path).ok
    assert [e["seq"] for e in audit.read(tmp_path)] == [1, 2]


def test_secure_takes_group_write_away(tmp_path: Path) -> None:
    """Logs from before this version were root:control.group 0660."""
    (tmp_path / audit.FILE).write_text("")
    os.chmod(tmp_path / audit.FILE, 0o666)  # noqa: S103 - the state being repaired
    audit.secure(tmp_path)
    st = (tmp_path / audit.FILE).stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (0, 0)


@pytest.mark.parametrize("bad", [{"uid": 0}, {"user": "root"}, {"seq": 9}, {"hash": "x"}])
def test_a_client_cannot_choose_who_it_is(bad: dict[str, object]) -> None:
    """What a client sends for the daemon to record may not carry identity or chain
    fields: those are the daemon's."""
    req = {"op": "audit", "action": "volume create", "args": {"name": "v1"},
           "outcome": "done", "detail": "", "from": "local", "sudo_user": None, **bad}
    with pytest.raises(audit.AuditRequestError, match="not accepted from a client"):
        audit.client_fields(req)
