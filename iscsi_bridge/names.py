"""iSCSI names and SCSI identities: pure functions, no processes.

Every node derives the same names from the same config, so a failover shows
initiators the same target (IQN), the same LUN, the same SCSI serial number and the
same device identifiers (VPD page 0x83), which is what multipath software and
cluster disk resources key on.  Nothing here depends on the host or on tgtd state.

- Target IQN: ``<iscsi.iqn>:<volume>`` for a volume, ``<iscsi.iqn>:<volume>:<snapshot>``
  for the read-only export ``VOLUME@SNAP`` (a volume name never contains ':').  Snapshot
  names are lowercased (IQNs compare case-insensitively, RFC 3722; the scheduler's
  names carry an uppercase T and Z); volume names must already be valid.
- tid: tgtd's target id, a hash of the target IQN below 2**28.  tgtd puts
  ``tid << 32 | lun`` in the NAA (locally assigned) designator of VPD page 0x83, with
  its top nibble overwritten by the NAA type, so the tid must be stable and small.
- scsi_id / scsi_sn: hex digests of (target IQN, LUN), as LINSTOR Gateway derives its
  serials; tgtd turns scsi_id into the T10 vendor designator and the 128-bit NAA
  (registered extended) designator, and scsi_sn into VPD page 0x80.
"""

from __future__ import annotations

import hashlib
import re

from .errors import InvalidName

#: LUN 0 is tgtd's own controller LUN; every target's disk is LUN 1.
DISK_LUN = 1
MAX_NAME_BYTES = 223  # RFC 3720 3.2.6.1
TID_LIMIT = 1 << 28
SCSI_ID_HEX = 24  # tgtd's SCSI_ID_LEN
SCSI_SN_HEX = 16

_LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
_IQN_RE = re.compile(
    rf"iqn\.(\d{{4}})-(\d{{2}})\.{_LABEL}(\.{_LABEL})*(:[a-z0-9.:-]*[a-z0-9])?"
)
_EUI_RE = re.compile(r"eui\.[0-9a-fA-F]{16}")
_NAA_RE = re.compile(r"naa\.([0-9a-fA-F]{16}|[0-9a-fA-F]{32})")
_PART_RE = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")
_SNAP_PART_RE = re.compile(r"[a-z0-9]([a-z0-9.:-]*[a-z0-9])?")

IQN_RULE = ("expected an IQN such as iqn.2026-11.com.example:nbdgw (iqn.YYYY-MM. and a "
            "reversed domain name, then optionally ':' and a unique part; lowercase "
            "letters, digits, '.', '-' and ':' only)")


def validate_iqn(name: object) -> str:
    """Return ``name`` if it is a well-formed IQN, else raise InvalidName."""
    if not isinstance(name, str):
        raise InvalidName(f"{IQN_RULE}, got {name!r}")
    m = _IQN_RE.fullmatch(name)
    if m is None or not 1 <= int(m.group(2)) <= 12:
        raise InvalidName(f"{IQN_RULE}, got {name!r}")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidName(f"an iSCSI name is at most {MAX_NAME_BYTES} bytes, "
                          f"{name!r} has {len(name.encode())}")
    return name


def validate_initiator(name: object) -> str:
    """An initiator name: an IQN, or eui./naa. followed by hex digits."""
    if isinstance(name, str) and (_EUI_RE.fullmatch(name) or _NAA_RE.fullmatch(name)):
        return name
    try:
        return validate_iqn(name)
    except InvalidName:
        raise InvalidName(
            "expected an initiator name such as iqn.1991-05.com.microsoft:host1, "
            f"eui.0123456789ABCDEF or naa.0123456789ABCDEF, got {name!r}") from None


def split_export(export: str) -> tuple[str, str | None]:
    """``'v1'`` -> ``('v1', None)``; ``'v1@daily'`` -> ``('v1', 'daily')``."""
    volume, sep, snap = export.partition("@")
    return volume, (snap if sep else None)


def target_iqn(base: str, export: str) -> str:
    """The target IQN of an NBD export (volume, or ``VOLUME@SNAP``); InvalidName if none."""
    volume, snap = split_export(export)
    parts = [("volume", volume)] if snap is None else [("volume", volume),
                                                        ("snapshot", snap.lower())]
    for what, part in parts:
        if not (_PART_RE if what == "volume" else _SNAP_PART_RE).fullmatch(part):
            raise InvalidName(
                f"{what} name {part!r} cannot be part of an iSCSI target name "
                f"(IQNs allow only lowercase letters, digits, '.' and '-' here): "
                f"rename it, or leave it out of the iSCSI export")
    name = ":".join([base, *(part for _, part in parts)])
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidName(f"target name {name!r} is longer than {MAX_NAME_BYTES} bytes")
    return name


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def target_tid(iqn: str) -> int:
    """tgtd's target id for ``iqn``: 1 .. 2**28 - 1, the same on every node."""
    return 1 + int(_digest("tid", iqn), 16) % (TID_LIMIT - 1)


def scsi_id(iqn: str, lun: int) -> str:
    """The device identifier (VPD 0x83 T10 and NAA designators) of LUN ``lun``."""
    return _digest("scsi_id", iqn, str(lun))[:SCSI_ID_HEX]


def scsi_sn(iqn: str, lun: int) -> str:
    """The unit serial number (VPD 0x80) of LUN ``lun``."""
    return _digest("scsi_sn", iqn, str(lun))[:SCSI_SN_HEX]
