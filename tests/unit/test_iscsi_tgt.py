"""Parsing `tgtadm --mode target --op show` (text captured from tgt 1.0.85)."""

from __future__ import annotations

from iscsi_bridge.tgt import parse_show

SHOW = """\
Target 5: iqn.2026-11.com.example:nbdgw:v1
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 1
            Initiator: iqn.2008-11.org.linux-kvm alias: none
            Connection: 0
                IP Address: 127.0.0.1
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00050000
            SCSI SN: beaf50
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags:
        LUN: 1
            Type: disk
            SCSI ID: 645338cbb76eec72348e6670
            SCSI SN: ac05c22a0bd1798b
            Size: 67 MB, Block size: 512
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: Yes
            SWP: No
            Thin-provisioning: No
            Backing store type: rdwr
            Backing store path: /run/nbdgw/iscsi/mnt/v1/disk
            Backing store flags: direct
    Account information:
        alice
        tgtuser (outgoing)
    ACL information:
        ALL
Target 9: iqn.2026-11.com.example:nbdgw:v2
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00090000
            SCSI SN: beaf90
            Readonly: No
            Backing store type: null
            Backing store path: None
            Backing store flags:
    Account information:
    ACL information:
        iqn.1991-05.com.microsoft:sql1
        192.0.2.0/24
"""


def test_parse_show() -> None:
    targets = parse_show(SHOW)
    assert sorted(targets) == [5, 9]
    t = targets[5]
    assert t.name == "iqn.2026-11.com.example:nbdgw:v1"
    lun = t.luns[1]
    assert (lun.type, lun.scsi_id, lun.scsi_sn, lun.readonly, lun.bstype, lun.path,
            lun.bsoflags) == ("disk", "645338cbb76eec72348e6670", "ac05c22a0bd1798b", True,
                              "rdwr", "/run/nbdgw/iscsi/mnt/v1/disk", "direct")
    assert t.luns[0].type == "controller"
    assert (t.accounts, t.outgoing, t.acl) == ({"alice"}, {"tgtuser"}, {"ALL"})
    assert [(n.initiator, n.addresses) for n in t.nexuses] == [
        ("iqn.2008-11.org.linux-kvm", ["127.0.0.1"])]
    t9 = targets[9]
    assert list(t9.luns) == [0]
    assert (t9.accounts, t9.outgoing, t9.nexuses) == (set(), set(), [])
    assert t9.acl == {"iqn.1991-05.com.microsoft:sql1", "192.0.2.0/24"}


def test_parse_nothing() -> None:
    assert parse_show("") == {}
