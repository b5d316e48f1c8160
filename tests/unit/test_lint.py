"""Static checks as tests: ruff over the whole tree (packages, tests, benches) and
mypy --strict as configured in pyproject.toml.  A lint or type regression fails the
suite like a bug.
"""

from __future__ import annotations

import os
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


def bench_scripts() -> list[str]:
    """The benchmarks: extensionless scripts (ruff and mypy look only at *.py unless
    named) and their .py helpers."""
    bench = ROOT / "bench"
    return sorted(str(p.relative_to(ROOT)) for p in bench.iterdir()
                  if p.is_file() and (p.suffix == ".py" or (
                      not p.suffix and p.read_bytes().startswith(b"#!"))))


def test_bench_scripts_lint_and_type_check() -> None:
    """The benches import the product: a refactor that renames what they use (NbdServer's
    process moved into its ChildProcess) broke four of them unseen until they ran."""
    scripts = bench_scripts()
    assert "bench/datapath" in scripts and "bench/_common.py" in scripts, scripts
    p = run(str(VENV_BIN / "ruff"), "check", "--no-cache", *scripts)
    assert p.returncode == 0, f"ruff found problems:\n{p.stdout}{p.stderr}"
    p = subprocess.run([str(VENV_BIN / "mypy"), "--strict", "--scripts-are-modules",
                        "--ignore-missing-imports", *scripts], cwd=ROOT, capture_output=True,
                       text=True, timeout=240, check=False,
                       env={**os.environ, "MYPYPATH": str(ROOT / "bench")})
    assert p.returncode == 0, f"mypy found problems:\n{p.stdout}{p.stderr}"
