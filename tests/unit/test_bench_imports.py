"""The benchmarks (bench/, scripts without a .py suffix, so no linter reads them) import
from the product inside functions: every such import must name what the product still
has (a refactor moved demote_volume, the iSCSI settings and the control-socket client,
and three benchmarks failed only when run)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("blockstore", "gateway", "iscsi_bridge", "nbd_plugin", "nbdgw_common", "peerlink",
            "tests")
SCRIPTS = sorted(p for p in (ROOT / "bench").iterdir()
                 if p.is_file() and p.suffix in ("", ".py") and p.name != "README.md")


def product_imports(path: Path) -> list[tuple[str, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.split(".")[0] in PACKAGES:
            out += [(node.module, a.name) for a in node.names]
    return out


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_product_import_resolves(script: Path) -> None:
    missing = []
    for module, name in product_imports(script):
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"from {module} import {name}")
    assert missing == []


def test_the_scripts_are_found() -> None:
    assert {"replication", "resync", "peers", "iscsi"} <= {p.name for p in SCRIPTS}
