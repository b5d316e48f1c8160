"""gateway/doctor.py: the one table of host requirements, used by setup.sh and tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gateway import doctor
from gateway.doctor import MissingTool, Requirement, require

ROOT = Path(__file__).resolve().parents[2]


def test_a_missing_tool_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Requirement("no-such-tool-xyz", "nbdgw-fake-pkg", "testing", "tests")
    monkeypatch.setattr(doctor, "REQUIREMENTS", (*doctor.REQUIREMENTS, fake))
    with pytest.raises(MissingTool, match=r"no-such-tool-xyz is missing \(testing\): "
                                          r"apt-get install nbdgw-fake-pkg, or run `make setup`"):
        require("no-such-tool-xyz")
    assert "nbdgw-fake-pkg" in [r.package for r in doctor.missing()]


def test_a_driver_is_checked_by_its_file(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    lib = tmp_path / "block-iscsi.so"
    req = Requirement("drv", "pkg", "p", "tests", str(tmp_path / "block-*.so"))
    assert not req.present()
    lib.write_bytes(b"")
    assert req.present()


def test_setup_installs_what_doctor_lists() -> None:
    """setup.sh takes its package list from the doctor (one table, no second list), and
    bookworm's virtual package nbdfuse (libnbd-bin provides it) is not asked for."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "gateway.doctor --missing-packages" in setup
    assert "nbdfuse" not in {r.package for r in doctor.REQUIREMENTS}
    assert "qemu-block-extra" in {r.package for r in doctor.REQUIREMENTS}


def test_doctor_runs_with_debians_interpreter_before_the_venv() -> None:
    p = subprocess.run(["/usr/bin/python3", "-m", "gateway.doctor", "--missing-packages"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode == 0, p.stderr
    # On a machine after `make setup` nothing is missing.
    assert p.stdout == ""
