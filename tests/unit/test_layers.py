"""Who may know what.  The packages are layered (DESIGN.md, "Layers"; the contracts are
``[tool.importlinter]`` in pyproject.toml, checked here with lint-imports), and the
journal's on-disk format has one owner (blockstore): no package outside it spells a
segment file name."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")
PACKAGES = ("nbdgw_common", "blockstore", "peerlink", "nbd_plugin", "iscsi_bridge", "gateway")
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


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


def test_import_layers_hold() -> None:
    """No import upward (the plugin and peerlink never load the gateway) or sideways
    (peerlink, nbd_plugin and iscsi_bridge import none of one another)."""
    p = lint_imports(ROOT)
    assert p.returncode == 0, f"lint-imports:\n{p.stdout}{p.stderr}"
    assert "Contracts: 2 kept, 0 broken." in p.stdout


def test_import_contracts_catch_violations(tmp_path: Path) -> None:
    """The contracts are not vacuous: on a copy of the tree, an upward import (even one
    inside a function) and a sideways one each break them, named by module and line."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "nbd_plugin" / "iostats.py", "a") as f:
        f.write("\n\ndef _upward() -> None:\n    from gateway import errors  # noqa: F401\n")
    with open(tmp_path / "peerlink" / "batch.py", "a") as f:
        f.write("\nimport iscsi_bridge.names  # noqa: E402, F401\n")
    p = lint_imports(tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Contracts: 0 kept, 2 broken." in p.stdout, p.stdout
    assert "nbd_plugin.iostats -> gateway.errors" in p.stdout, p.stdout
    assert "peerlink.batch -> iscsi_bridge.names" in p.stdout, p.stdout
