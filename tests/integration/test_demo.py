"""`make demo` is the README's main job: it must finish and report intact, replicated data."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_demo_runs_to_data_intact() -> None:
    p = subprocess.run([sys.executable, "-m", "gateway.demo"], cwd=ROOT, capture_output=True,
                       text=True, timeout=240, check=False)
    assert p.returncode == 0, f"demo failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    lines = p.stdout.strip().splitlines()
    assert lines[-1] == "demo complete: data intact, replica identical"
    assert "   every acknowledged write is there after the crash: True" in lines
    assert "   replica identical to the primary: True" in lines
