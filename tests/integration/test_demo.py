"""`make demo` is the README's main job: it must finish and report intact data.  As root
it is the three-site lab with a failover; the loopback fallback (no namespaces) is
checked too, forced with --loopback."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.skipif(os.geteuid() != 0, reason="the three-site demo needs root (netns)")
def test_make_demo_three_sites_to_data_intact() -> None:
    # As an operator types it: not as a sub-make of `make test` (whose MAKEFLAGS and
    # MAKELEVEL would add "make[1]: Leaving directory" after the demo's last line).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL",
                                                             "MFLAGS")}
    p = subprocess.run(["make", "demo"], cwd=ROOT, capture_output=True, text=True,
                       timeout=150, check=False, env=env)
    assert p.returncode == 0, f"demo failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    lines = p.stdout.strip().splitlines()
    assert re.fullmatch(r"demo complete: data intact after failover \(main -> dc in "
                        r"\d+\.\d s\), snapshot kept, \d+ s in all", lines[-1]), lines[-1]
    assert "   dc: in sync, acknowledged seq 16 of 16, lag 0 bytes" in lines
    assert "   snapshot 'before-failover' on dc: present" in lines
    assert any(ln.startswith("   SHA-256 ") and ln.endswith(" matches") for ln in lines)
    assert "== Tearing the lab down (processes, namespaces, data)" in lines


def test_demo_loopback_fallback_to_data_intact() -> None:
    p = subprocess.run([sys.executable, "-m", "gateway.demo", "--loopback"], cwd=ROOT,
                       capture_output=True, text=True, timeout=240, check=False)
    assert p.returncode == 0, f"demo failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    lines = p.stdout.strip().splitlines()
    assert lines[0] == ("== No three-site lab here: --loopback was given. Running the "
                        "single-node demo on loopback instead")
    assert lines[-1] == "demo complete: data intact, replica identical"
    assert "   every acknowledged write is there after the crash: True" in lines
    assert "   replica identical to the primary: True" in lines


@pytest.mark.skipif(os.geteuid() != 0, reason="the fan-in story needs root (netns)")
def test_make_demo_branches_moves_one_group_and_brings_it_home() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL",
                                                             "MFLAGS")}
    p = subprocess.run(["make", "demo-branches"], cwd=ROOT, capture_output=True, text=True,
                       timeout=240, check=False, env=env)
    assert p.returncode == 0, f"demo failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    lines = p.stdout.strip().splitlines()
    assert re.fullmatch(r"demo complete: branch1's group failed over to dc in \d+\.\d s "
                        r"and came home, the other branches untouched, \d+ s in all",
                        lines[-1]), lines[-1]
    assert any(ln.startswith("   b1's clients: b1.nbdgw.lab -> 192.0.2.1 (dc)")
               and ln.endswith(" matches") for ln in lines), lines
    for g in ("b2", "b3"):
        assert any(ln.startswith(f"   {g}'s clients: ") and ln.endswith("untouched")
                   for ln in lines), lines
