"""The bridge's settings, as the node config's ``iscsi`` section gives them
(gateway/config.py parses and checks them; examples/nbdgw.yaml documents each key)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path


class IscsiRoute(enum.Enum):
    FILE = "file"  # tgtd on the FUSE file (O_DIRECT): full conformance
    LOOP = "loop"  # tgtd on a direct-I/O loop device over it


class IscsiFuse(enum.Enum):
    NBDKIT = "nbdkit"  # served inside the volume's nbdkit (nbd_plugin/fusefile.py)
    NBDGW = "nbdgw"  # iscsi_bridge/fused.py over NBD: parallel direct writes
    NBDFUSE = "nbdfuse"  # libnbd's nbdfuse: FUSE serialises its writes


@dataclass(frozen=True)
class ChapConfig:
    """One CHAP identity: the user name and the file holding its secret."""

    user: str
    secret_file: Path


@dataclass(frozen=True)
class IscsiConfig:
    """The iSCSI bridge (iscsi_bridge/): tgtd in front of the NBD exports."""

    enabled: bool = False
    portal_host: str = "0.0.0.0"
    portal_port: int = 3260
    iqn: str | None = None  # base IQN, identical on every node; required when enabled
    chap: ChapConfig | None = None  # initiators authenticate to the target
    mutual_chap: ChapConfig | None = None  # the target authenticates to initiators
    initiators: tuple[str, ...] = ()  # initiator names allowed; empty = any
    allow: tuple[str, ...] = ()  # initiator addresses (CIDRs) allowed; empty = any
    control_port: int = 3260  # tgtd's management socket /var/run/tgtd/socket.<N>
    route: IscsiRoute = IscsiRoute.FILE  # how tgtd reaches the FUSE file
    fuse: IscsiFuse = IscsiFuse.NBDKIT  # which FUSE server shows each export as a file
    run_dir: Path = Path("/run/nbdgw/iscsi")  # FUSE mounts, tgtd pid and log

    @property
    def portal(self) -> str:
        host = f"[{self.portal_host}]" if ":" in self.portal_host else self.portal_host
        return f"{host}:{self.portal_port}"
