"""The bridge's settings, as the node config's ``iscsi`` section gives them: the keys
are declared once here (`ISCSI`, `CHAP`; nbdgw_common/settings.py), gateway/config.py
reads and checks them, examples/nbdgw.yaml documents each key."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from pathlib import Path

from nbdgw_common.settings import Keys, Kind, Setting, default_of


class IscsiRoute(enum.Enum):
    FILE = "file"  # tgtd on the FUSE file (O_DIRECT): full conformance
    LOOP = "loop"  # tgtd on a direct-I/O loop device over it


class IscsiFuse(enum.Enum):
    NBDKIT = "nbdkit"  # served inside the volume's nbdkit (nbd_plugin/fusefile.py)
    NBDGW = "nbdgw"  # iscsi_bridge/fused.py over NBD: parallel direct writes
    NBDFUSE = "nbdfuse"  # libnbd's nbdfuse: FUSE serialises its writes


CHAP = Keys(
    Setting("user", Kind.STRING, help="the CHAP user name, without spaces", required=True),
    Setting("secret_file", Kind.PATH, required=True,
            help="file holding the secret: one line of 12-255 characters, mode 0600"),
)

ISCSI = Keys(
    Setting("enabled", Kind.BOOLEAN, False, "serve every volume as an iSCSI target"),
    Setting("portal", Kind.HOST_PORT, ("0.0.0.0", 3260), "where tgtd listens"),
    Setting("readers_portal", Kind.HOST_PORT, None, "where tgtd listens on a secondary "
            "or DR node for the replicas' snapshots, points and clones (the daemon); "
            "none: portal, if this node has its address"),
    Setting("iqn", Kind.TEXT, help="base IQN, identical on every node; required when "
            "enabled (targets are <iqn>:VOLUME)"),
    Setting("chap", Kind.SECTION, keys=CHAP, help="initiators authenticate to the target"),
    Setting("mutual_chap", Kind.SECTION, keys=CHAP,
            help="the target authenticates to initiators; needs chap"),
    Setting("initiators", Kind.LIST, (), "initiator names allowed; empty: any"),
    Setting("allow", Kind.LIST, (), "initiator addresses (CIDRs) allowed; empty: any; "
            "not with initiators"),
    Setting("control_port", Kind.INTEGER, 3260, "tgtd's management socket "
            "/var/run/tgtd/socket.<N>", minimum=1, maximum=32767),
    Setting("run_dir", Kind.PATH, Path("/run/nbdgw/iscsi"), "FUSE mounts, tgtd pid and log"),
    Setting("route", Kind.CHOICE, IscsiRoute.FILE, "how tgtd reaches the FUSE file"),
    Setting("fuse", Kind.CHOICE, IscsiFuse.NBDKIT,
            "which FUSE server shows each export as a file"),
)


@dataclass(frozen=True)
class ChapConfig:
    """One CHAP identity: the user name and the file holding its secret."""

    user: str
    secret_file: Path


@dataclass(frozen=True)
class IscsiConfig:
    """The iSCSI bridge (iscsi_bridge/): tgtd in front of the NBD exports."""

    enabled: bool = default_of(ISCSI, "enabled")
    portal_host: str = default_of(ISCSI, "portal")[0]
    portal_port: int = default_of(ISCSI, "portal")[1]
    readers_portal: tuple[str, int] | None = default_of(ISCSI, "readers_portal")
    iqn: str | None = default_of(ISCSI, "iqn")
    chap: ChapConfig | None = None  # initiators authenticate to the target
    mutual_chap: ChapConfig | None = None  # the target authenticates to initiators
    initiators: tuple[str, ...] = default_of(ISCSI, "initiators")
    allow: tuple[str, ...] = default_of(ISCSI, "allow")
    control_port: int = default_of(ISCSI, "control_port")
    route: IscsiRoute = default_of(ISCSI, "route")
    fuse: IscsiFuse = default_of(ISCSI, "fuse")
    run_dir: Path = default_of(ISCSI, "run_dir")

    @property
    def portal(self) -> str:
        host = f"[{self.portal_host}]" if ":" in self.portal_host else self.portal_host
        return f"{host}:{self.portal_port}"

    def for_readers(self) -> IscsiConfig:
        """The bridge in front of a secondary's readers' nbdkit: on readers_portal."""
        if self.readers_portal is None:
            return self
        return replace(self, portal_host=self.readers_portal[0],
                       portal_port=self.readers_portal[1])
