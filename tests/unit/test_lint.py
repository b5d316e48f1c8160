"""Static checks as tests: ruff over the whole tree (packages, tests, benches) and
mypy --strict as configured in pyproject.toml.  A lint or type regression fails the
suite like a bug.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=ROOT, capture_output=True, text=True, timeout=240,
                          check=False)


def test_ruff_whole_tree() -> None:
    p = run(str(VENV_BIN / "ruff"), "check", "--no-cache", ".")
    assert p.returncode == 0, f"ruff found problems:\n{p.stdout}{p.stderr}"
    assert "All checks passed!" in p.stdout


def test_mypy_strict() -> None:
    p = run(str(VENV_BIN / "mypy"))
    assert p.returncode == 0, f"mypy found problems:\n{p.stdout}{p.stderr}"
    assert p.stdout.startswith("Success: no issues found in ")
