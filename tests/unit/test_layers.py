"""Who may know what: the journal's on-disk format has one owner (blockstore), and no
package outside it spells a segment file name."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Every package but blockstore, and the benches (tests may build files by hand).
NOT_THE_OWNER = ("gateway", "peerlink", "nbd_plugin", "iscsi_bridge", "bench")
SEGMENT_NAME = re.compile(r"seg-|\.jnl\b")


def test_only_blockstore_spells_segment_file_names() -> None:
    """Segment names, bounds and retained extents are read through blockstore.journal
    (segment_firsts, segment_files, journal_bounds, retained_extents, ...)."""
    found = []
    for pkg in NOT_THE_OWNER:
        for path in sorted((ROOT / pkg).rglob("*")):
            if not path.is_file() or path.suffix not in {"", ".py"}:
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if SEGMENT_NAME.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "journal file names outside blockstore:\n" + "\n".join(found)
