"""iSCSI names and SCSI identities: valid and invalid names, stable derived identities."""

from __future__ import annotations

import pytest

from iscsi_bridge.errors import InvalidName
from iscsi_bridge.names import (
    DISK_LUN,
    TID_LIMIT,
    scsi_id,
    scsi_sn,
    split_export,
    target_iqn,
    target_tid,
    validate_initiator,
    validate_iqn,
)

BASE = "iqn.2026-11.com.example:nbdgw"


@pytest.mark.parametrize("name", [
    "iqn.2026-11.com.example:nbdgw", "iqn.2026-11.com.example", "iqn.1991-05.com.microsoft:sql1",
    "iqn.1998-01.com.vmware:esx1-4f1c2b3a", "iqn.2001-04.com.example:storage:disk2.sys1.xyz",
    "iqn.2008-11.org.linux-kvm"])
def test_valid_iqns(name: str) -> None:
    assert validate_iqn(name) == name


@pytest.mark.parametrize("name", [
    "iqn.2026-11.com.Example:nbdgw", "iqn.2026-00.com.example", "iqn.26-11.com.example",
    "iqn.2026-11.:x", "iqn.2026-11.com.example:a_b", "iqn.2026-11.com.example:", "nbdgw",
    "iqn.2026-11.-com.example", "iqn.2026-11.com example", ""])
def test_invalid_iqns(name: str) -> None:
    with pytest.raises(InvalidName, match="expected an IQN such as"):
        validate_iqn(name)


def test_initiator_names() -> None:
    assert validate_initiator("eui.0123456789ABCDEF") == "eui.0123456789ABCDEF"
    assert validate_initiator("naa.0123456789abcdef0123456789abcdef")
    with pytest.raises(InvalidName, match="expected an initiator name"):
        validate_initiator("eui.0123")


def test_target_names() -> None:
    assert target_iqn(BASE, "sql-data") == f"{BASE}:sql-data"
    assert target_iqn(BASE, "sql-data@daily.3") == f"{BASE}:sql-data:daily.3"
    # the scheduler's snapshot names: lowercased, as IQNs compare case-insensitively
    assert target_iqn(BASE, "v1@hourly-20261122T1400Z") == f"{BASE}:v1:hourly-20261122t1400z"
    assert split_export("v1@s") == ("v1", "s")
    assert split_export("v1") == ("v1", None)


@pytest.mark.parametrize(("export", "message"), [
    ("SQL", "volume name 'SQL' cannot be part of an iSCSI target name"),
    ("sql_data", "volume name 'sql_data' cannot be part of an iSCSI target name"),
    ("v1@daily_1", "snapshot name 'daily_1' cannot be part of an iSCSI target name"),
    ("v1@", "snapshot name '' cannot be part of an iSCSI target name"),
])
def test_names_that_make_no_iqn(export: str, message: str) -> None:
    with pytest.raises(InvalidName) as e:
        target_iqn(BASE, export)
    assert str(e.value).startswith(message)


def test_identities_are_stable_and_distinct() -> None:
    """Pinned values: every node and every release must derive exactly these."""
    iqn = f"{BASE}:v1"
    assert target_tid(iqn) == 53467693
    assert scsi_id(iqn, DISK_LUN) == "645338cbb76eec72348e6670"
    assert scsi_sn(iqn, DISK_LUN) == "ac05c22a0bd1798b"
    others = [f"{BASE}:v2", f"{BASE}:v1:snap", "iqn.2026-11.com.example:other:v1"]
    assert len({target_tid(x) for x in [iqn, *others]}) == 4
    assert len({scsi_id(x, DISK_LUN) for x in [iqn, *others]}) == 4
    assert scsi_id(iqn, 2) != scsi_id(iqn, 1)


def test_tids_fit_tgtd_naa_designator() -> None:
    """tgtd ORs the NAA type into the top nibble of tid << 32: keep that nibble clear."""
    tids = [target_tid(f"{BASE}:vol{i}") for i in range(2000)]
    assert all(1 <= t < TID_LIMIT for t in tids)
    assert len(set(tids)) == len(tids)
