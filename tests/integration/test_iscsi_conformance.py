"""libiscsi's conformance suite (iscsi-test-cu) through the bridge, beside tgtd serving a
plain file of the same size from the same tgtd: the bridge must add no failure.

The failures both show are tgtd's own (recorded in README.md, "iSCSI"): persistent
reservation ownership and service-action range checks, RESERVE(6) with two
initiators, GET LBA STATUS past the end, and a DataSN check in the iSCSI family.
WRITE SAME is in a slow test: tgtd's rdwr backend writes one block per pwrite, which
through FUSE and NBD takes about a minute per suite on a 64 MiB LUN.

The opt-in loop route (iscsi.route: loop) fails more, all for one reason: tgtd reads
VERIFY and ORWRITE data into unaligned buffers and passes odd transfer lengths through,
which O_DIRECT on a block device refuses with EINVAL; the test pins that list too.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from iscsi_bridge import Export
from iscsi_bridge.tgt import Tgtadm
from tests.conftest import Served
from tests.integration.iscsienv import IscsiEnv

PLAIN_IQN = "iqn.2026-11.com.example:plain-file"
PLAIN_TID = 1  # names.target_tid never returns 1 for the bridge's targets here
SLOW_SUITES = {"WriteSame10", "WriteSame16"}
TGT_OWN_FAILURES = {
    "GetLBAStatus.BeyondEol", "PrinServiceactionRange.Range", "ProutReserve.OwnershipEA",
    "ProutReserve.OwnershipWE", "ProutReserve.OwnershipEARO", "ProutReserve.OwnershipWERO",
    "Reserve6.2Initiators", "iSCSIdatasn.iSCSIDataSnInvalid"}
# Suites whose tests may fail on the loop route, all for the reason above; which of
# their tests fail varies a little with load and with the data left by earlier tests.
LOOP_ROUTE_SUITES = ("Verify10", "Verify12", "Verify16", "WriteVerify10", "WriteVerify12",
                     "WriteVerify16", "OrWrite", "iSCSIResiduals")


def suites(family: str) -> list[str]:
    out = subprocess.run(["iscsi-test-cu", "--list"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return sorted({m.group(1) for m in re.finditer(rf"^{family}\.(\w+)$", out, re.M)})


def run_suites(url: str, tests: list[str], timeout: float) -> tuple[int, set[str]]:
    """Run ``tests`` (FAMILY.SUITE, comma-joined) once; (tests run, failed SUITE.TEST)."""
    p = subprocess.run(["iscsi-test-cu", "--dataloss", "--normal", f"--test={','.join(tests)}",
                        url], capture_output=True, text=True, errors="replace",
                       timeout=timeout, check=False)
    ran = re.search(r"^\s+tests\s+\d+\s+(\d+)\s+", p.stdout, re.M)
    assert ran is not None, f"no CUnit summary from iscsi-test-cu:\n{p.stdout[-2000:]}{p.stderr}"
    failed = {f"{m.group(1)}.{m.group(2)}" for m in
              re.finditer(r"^Suite (\w+), Test (\w+) had failures", p.stdout, re.M)}
    return int(ran.group(1)), failed


def plain_target(tmp_path: Path, e: IscsiEnv, size: int) -> str:
    f = tmp_path / "plain.img"
    with open(f, "wb") as fh:
        fh.truncate(size)
    adm = Tgtadm(e.cfg.control_port)
    adm.new_target(PLAIN_TID, PLAIN_IQN)
    adm.new_lun(PLAIN_TID, 1, str(f))
    adm.bind(PLAIN_TID, "ALL")
    return f"iscsi://127.0.0.1:{e.port}/{PLAIN_IQN}/1"


def compare(tmp_path: Path, iscsi: Callable[..., IscsiEnv],
            tests: list[str], timeout: float, route: str = "file"
            ) -> tuple[set[str], set[str], int]:
    e = iscsi(exports=[Export("v1")], route=route)
    # the bridge's reconcile would delete a target it does not own: add it afterwards
    plain = plain_target(tmp_path, e, 64 << 20)
    ran, bridge_failed = run_suites(e.url(), tests, timeout)
    ran_plain, plain_failed = run_suites(plain, tests, timeout)
    assert ran == ran_plain
    return bridge_failed, plain_failed, ran


@pytest.mark.parametrize("route", ["file", "loop"])
def test_scsi_and_iscsi_families(tmp_path: Path, iscsi: Callable[..., IscsiEnv],
                                 serve: Callable[..., Served], route: str) -> None:
    tests = [f"SCSI.{s}" for s in suites("SCSI") if s not in SLOW_SUITES]
    tests += [f"iSCSI.{s}" for s in suites("iSCSI")]
    bridge_failed, plain_failed, ran = compare(tmp_path, iscsi, tests, 240, route)
    assert ran > 200
    assert plain_failed == TGT_OWN_FAILURES
    if route == "file":  # the default route adds no failure, hides none
        assert bridge_failed == plain_failed
    else:
        assert plain_failed <= bridge_failed
        extra = bridge_failed - plain_failed
        assert all(t.split(".")[0] in LOOP_ROUTE_SUITES for t in extra), extra
        assert {"Verify10.Simple", "WriteVerify10.Simple", "OrWrite.Verify",
                "iSCSIResiduals.Write10Residuals"} <= extra


@pytest.mark.slow
def test_write_same(tmp_path: Path, iscsi: Callable[..., IscsiEnv]) -> None:
    bridge_failed, plain_failed, ran = compare(
        tmp_path, iscsi, [f"SCSI.{s}" for s in sorted(SLOW_SUITES)], timeout=400)
    assert ran >= 10
    assert bridge_failed == plain_failed == set()
