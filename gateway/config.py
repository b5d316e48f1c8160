"""The node config: one YAML file per node, validated into frozen dataclasses.

Every key is declared once, in the `Keys` table of its section (nbdgw_common/settings.py):
its type, range, default and help.  The table gives the keys a section accepts, the
defaults of the section's dataclass, the checks by type (`_Section.value`) and
`nbdgw config keys`; checks across keys are code after them.  Messages name the key by
its dotted path and say what was expected, word for word as tests/unit/test_config.py
checks them::

    expected integer >= 1 for activity_log.extents
    unknown key 'colour' in nbd (known: allow, default_export, listen, tls)

`examples/nbdgw.yaml` documents every key (tests/unit/test_config_keys.py).
"""

from __future__ import annotations

import enum
import grp
import ipaddress
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import yaml

from blockstore.cdp import parse_duration
from blockstore.errors import InvalidArgument
from blockstore.volume import parse_size, validate_name
from iscsi_bridge.errors import InvalidName
from iscsi_bridge.names import target_iqn, validate_initiator, validate_iqn
from iscsi_bridge.settings import CHAP, ISCSI, ChapConfig, IscsiConfig
from nbdgw_common.settings import Keys, Kind, Setting, default_of, size_text
from peerlink.front import handoff_path
from peerlink.ratelimit import RateWindow, parse_rate
from peerlink.ratelimit import window as rate_window

from .dnsname import DnsError, load_key, parse_server
from .errors import ConfigError

CONFIG_VERSION = 1
DEFAULT_CONFIG_PATH = Path("/etc/nbdgw/nbdgw.yaml")
DEFAULT_DATA_DIR = Path("/var/lib/nbdgw")
DEFAULT_LISTEN = "tcp:0.0.0.0:10809"


class TlsMode(enum.Enum):
    OFF = "off"
    ON = "on"  # TLS offered, plaintext still allowed
    REQUIRE = "require"  # plaintext clients refused


@dataclass(frozen=True)
class Listen:
    """One NBD listen address: ``tcp:HOST:PORT`` or ``unix:PATH``."""

    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_listen(text: str, where: str = "listen") -> Listen:
    if not isinstance(text, str):
        raise ConfigError(f"expected string 'tcp:HOST:PORT' or 'unix:PATH' for {where}")
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ConfigError(f"expected an absolute socket path after 'unix:' for {where}")
        return Listen("unix", path=path)
    if text.startswith("tcp:"):
        rest = text[4:]
        host, sep, port_s = rest.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
            raise ConfigError(
                f"expected 'tcp:HOST:PORT' with PORT 0-65535 for {where}, got {text!r}"
            )
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"expected an IP address as HOST in {text!r} for {where}") from None
        return Listen("tcp", host=host, port=int(port_s))
    raise ConfigError(f"expected 'tcp:HOST:PORT' or 'unix:PATH' for {where}, got {text!r}")


NBD_TLS = Keys(
    Setting("mode", Kind.CHOICE, TlsMode.OFF,
            "off | on (TLS offered, plaintext allowed) | require (plaintext refused)"),
    Setting("psk_file", Kind.PATH, None, "nbdkit --tls-psk file (mode 0600); with mode on "
            "or require, exactly one of psk_file and certificates_dir"),
    Setting("certificates_dir", Kind.PATH, None,
            "directory with ca-cert.pem, server-cert.pem, server-key.pem (mode 0600)"),
    Setting("verify_peer", Kind.BOOLEAN, False,
            "clients present a certificate signed by the CA; needs certificates_dir"),
)


@dataclass(frozen=True)
class TlsConfig:
    mode: TlsMode = default_of(NBD_TLS, "mode")
    psk_file: Path | None = default_of(NBD_TLS, "psk_file")
    certificates_dir: Path | None = default_of(NBD_TLS, "certificates_dir")
    verify_peer: bool = default_of(NBD_TLS, "verify_peer")


NBD = Keys(
    Setting("listen", Kind.LIST, (parse_listen(DEFAULT_LISTEN),),
            "where nbdkit listens: tcp:HOST:PORT (HOST an IP address) and unix:/PATH"),
    Setting("default_export", Kind.STRING, None,
            "the volume a client naming no export gets; none: such a client is refused"),
    Setting("allow", Kind.LIST, (), "client addresses or CIDRs; empty: anyone"),
    Setting("tls", Kind.SECTION, keys=NBD_TLS, help="TLS for NBD clients"),
)


@dataclass(frozen=True)
class NbdConfig:
    listen: tuple[Listen, ...] = default_of(NBD, "listen")
    tls: TlsConfig = TlsConfig()
    allow: tuple[str, ...] = default_of(NBD, "allow")
    default_export: str | None = default_of(NBD, "default_export")


JOURNAL = Keys(
    Setting("max_bytes", Kind.SIZE, 1 << 30, "journal bytes kept per volume, at least "
            "segment_bytes; past it the oldest segments go (then a dirty-extent resync)"),
    Setting("segment_bytes", Kind.SIZE, 64 << 20, "one journal segment; the store is "
            "checkpointed as each fills", minimum=1 << 20, maximum=1 << 30),
)


@dataclass(frozen=True)
class JournalConfig:
    max_bytes: int = default_of(JOURNAL, "max_bytes")
    segment_bytes: int = default_of(JOURNAL, "segment_bytes")


ACTIVITY_LOG = Keys(
    Setting("extents", Kind.INTEGER, 1024, "4 MiB extents kept hot (resent to the peers "
            "after a crash)", minimum=1, maximum=65536),
)

CDP = Keys(
    Setting("window", Kind.TEXT, 0, "history kept: a duration (30m, 24h, 7d; 0: none); "
            "any instant inside it can be exported read-only (nbdgw cdp)"),
    Setting("max_bytes", Kind.SIZE, 200 << 30, "history kept at most (journal bytes and "
            "bases); past it the oldest goes first, with a warning event"),
)


@dataclass(frozen=True)
class CdpConfig:
    """A continuous-data-protection window (blockstore/cdp.py); 0 seconds: off."""

    window: float = 0.0
    max_bytes: int = default_of(CDP, "max_bytes")


VOLUME = Keys(
    Setting("name", Kind.STRING, required=True,
            help="1-63 of letters, digits, '.', '_', '-'; starts with a letter or digit"),
    Setting("size", Kind.SIZE, required=True, help="a multiple of 4096"),
    Setting("read_only", Kind.BOOLEAN, False, "served read-only"),
    Setting("cdp", Kind.SECTION, keys=CDP, help="this volume's own history window, "
            "instead of the top-level cdp"),
)


@dataclass(frozen=True)
class VolumeConfig:
    name: str
    size: int
    read_only: bool = default_of(VOLUME, "read_only")
    cdp: CdpConfig | None = None  # None: the node's (top-level) cdp


class Role(enum.Enum):
    """A site's role (the default role of the node's volumes)."""

    PRIMARY = "primary"
    SECONDARY = "secondary"
    DR = "dr"
    # A third voter that holds no data: heartbeats, votes and outdated marks only (no
    # volume, nbdkit, peerlink or iSCSI); never primary, never shipped to.
    WITNESS = "witness"


class Topology(enum.Enum):
    FANOUT = "fanout"  # the primary ships to every other site
    CASCADE = "cascade"  # primary -> secondary -> DR (a DR link reachable from the DC only)


class PeerMode(enum.Enum):
    ASYNC = "async"
    SYNC = "sync"  # every write completes only once this peer has it durable


class Compression(enum.Enum):
    ZSTD = "zstd"
    NONE = "none"


DEFAULT_PEER_PORT = 7789


SERVICE_DNS = Keys(
    Setting("name", Kind.STRING, required=True, help="the name clients use "
            "(db.branch1.example.com); the primary publishes its address under it"),
    Setting("zone", Kind.STRING, required=True, help="the zone that holds the name, "
            "updated dynamically (RFC 2136)"),
    Setting("servers", Kind.LIST, None, "the zone's primary server(s), IP[:PORT]; the "
            "first that answers takes the update", required=True),
    Setting("key_file", Kind.PATH, required=True, help="the TSIG key as tsig-keygen "
            "writes it (mode 0600); the server's update-policy must grant it the name"),
    Setting("address", Kind.ADDRESS, required=True, help="this node's address to "
            "publish (the one its clients reach it by)"),
    Setting("ttl", Kind.INTEGER, 30, "the record's TTL in seconds: clients follow a "
            "failover within failover time + TTL", minimum=1, maximum=86400),
)

SERVICE = Keys(
    Setting("address", Kind.STRING, None, "the address clients use, with its prefix length "
            "(192.0.2.10/24); it moves to the primary on failover"),
    Setting("interface", Kind.STRING, None, "the interface the address is added to"),
    Setting("dns", Kind.SECTION, keys=SERVICE_DNS, help="a DNS name that follows the "
            "primary across subnets (RFC 2136 updates signed with TSIG)"),
)


@dataclass(frozen=True)
class ServiceDnsConfig:
    """A DNS name the primary publishes its address under (gateway/dnsname.py)."""

    name: str
    zone: str
    servers: tuple[str, ...]
    key_file: Path
    address: str
    ttl: int = default_of(SERVICE_DNS, "ttl")


@dataclass(frozen=True)
class ServiceConfig:
    """The address clients use; it moves to the new primary on failover."""

    address: str | None = default_of(SERVICE, "address")  # interface form, "192.0.2.10/24"
    interface: str | None = default_of(SERVICE, "interface")
    dns: ServiceDnsConfig | None = None


PEERLINK_TLS = Keys(
    Setting("cert_file", Kind.PATH, required=True, help="this node's certificate"),
    Setting("key_file", Kind.PATH, required=True, help="its private key (mode 0600)"),
    Setting("ca_file", Kind.PATH, required=True, help="the CA that signs every peer's"),
)


@dataclass(frozen=True)
class PeerlinkTlsConfig:
    cert_file: Path
    key_file: Path
    ca_file: Path


PEERLINK = Keys(
    Setting("listen", Kind.HOST_PORT, ("0.0.0.0", DEFAULT_PEER_PORT),
            "where this node's replication receiver listens (HOST an IP address)"),
    Setting("topology", Kind.CHOICE, Topology.FANOUT, "fanout: the primary ships to every "
            "peer; cascade: primary -> secondary -> dr"),
    Setting("secret_file", Kind.PATH, None, "shared secret (>= 16 bytes, mode 0600) both "
            "ends prove before any data; authenticates heartbeats"),
    Setting("tls", Kind.SECTION, keys=PEERLINK_TLS,
            help="mutual TLS between peers: all three files or none"),
    Setting("next_secret_file", Kind.PATH, None, "while the secret is rotated: proofs under "
            "this secret are accepted too (mode 0600); needs secret_file"),
    Setting("insecure", Kind.BOOLEAN, False,
            "true: peers with neither secret_file nor tls are accepted (a closed lab only)"),
)


@dataclass(frozen=True)
class PeerlinkConfig:
    listen_host: str = default_of(PEERLINK, "listen")[0]
    listen_port: int = default_of(PEERLINK, "listen")[1]
    topology: Topology = default_of(PEERLINK, "topology")
    secret_file: Path | None = default_of(PEERLINK, "secret_file")
    tls: PeerlinkTlsConfig | None = None
    insecure: bool = default_of(PEERLINK, "insecure")
    next_secret_file: Path | None = default_of(PEERLINK, "next_secret_file")
    # A group on its node's shared port (no groups[].ports.peerlink): its peerlink takes
    # its connections from the groups parent's front, and listens on no port itself.
    front: bool = False


RATE_WINDOW = Keys(
    Setting("days", Kind.TEXT, "daily", "mon-fri, sat,sun, fri-mon, daily"),
    Setting("from", Kind.TEXT, required=True, help="HH:MM, local time"),
    Setting("to", Kind.TEXT, required=True, help="HH:MM (24:00: midnight); before "
            "`from`: the window runs past midnight"),
    Setting("rate", Kind.RATE, required=True, help="the cap inside the window; 0: unlimited"),
)

RPO = Keys(
    Setting("seconds", Kind.SECONDS, None, "alert when the peer's data-loss window (the "
            "age of its oldest unacknowledged write) passes this"),
    Setting("bytes", Kind.SIZE, None, "alert when the bytes it lacks pass this"),
)


@dataclass(frozen=True)
class RpoConfig:
    """A recovery-point bound on one link: passing it is an event, a metric and a log
    line, never a change in what the primary does."""

    seconds: float | None = None
    bytes: int | None = None


PEER = Keys(
    Setting("name", Kind.STRING, required=True, help="the peer's node.name"),
    Setting("role", Kind.CHOICE, choices=Role, required=True, help="the peer's node.role"),
    Setting("address", Kind.ADDRESS, required=True,
            help="the IP address of the peer's peerlink.listen"),
    Setting("port", Kind.INTEGER, DEFAULT_PEER_PORT, "the port of the peer's peerlink.listen",
            minimum=1, maximum=65535),
    Setting("heartbeat_addresses", Kind.LIST, (),
            "IP addresses of second paths for heartbeats only"),
    Setting("mode", Kind.CHOICE, PeerMode.ASYNC, "sync: a write completes once this peer "
            "has it durable (the main-site pair only)"),
    Setting("sync_timeout", Kind.SECONDS, 5.0,
            "how long a sync peer may leave a write unacknowledged before it is stalled"),
    Setting("rate_limit", Kind.RATE, 0,
            "bytes per second on the wire, with K, M, G units; 0: unlimited"),
    Setting("rate_schedule", Kind.LIST, (), "other caps by local time of day: the first "
            "window that covers the minute wins, rate_limit outside them", keys=RATE_WINDOW),
    Setting("compression", Kind.CHOICE, Compression.ZSTD, "compression on the wire"),
    Setting("rpo", Kind.SECTION, keys=RPO, help="recovery-point alert bounds of this link "
            "(each volume's lag against them); none by default"),
)


@dataclass(frozen=True)
class PeerConfig:
    name: str
    role: Role
    address: str
    port: int = default_of(PEER, "port")
    heartbeat_addresses: tuple[str, ...] = default_of(PEER, "heartbeat_addresses")
    mode: PeerMode = default_of(PEER, "mode")
    sync_timeout: float = default_of(PEER, "sync_timeout")
    rate_limit: int = default_of(PEER, "rate_limit")  # bytes per second on the wire; 0 = unlimited
    compression: Compression = default_of(PEER, "compression")
    rate_schedule: tuple[RateWindow, ...] = default_of(PEER, "rate_schedule")
    rpo: RpoConfig = RpoConfig()
    # The group to name in the route preamble: the peer's end is its node's shared
    # port (peerlink/front.py); None: a port of the group's own.
    route: str | None = None


class Every(enum.Enum):
    """How often a snapshot schedule runs (MINUTES: every ``minutes`` minutes)."""

    MINUTES = "minutes"
    HOURLY = "hourly"
    DAILY = "daily"
    WEEKLY = "weekly"


MAX_SNAPSHOTS_PER_VOLUME = 512  # blockstore.snapshot.MAX_SNAPSHOTS

SCHEDULE = Keys(
    Setting("name", Kind.TEXT, required=True,
            help="1-32 of letters, digits, '_', '-'; starts with a letter or digit; unique"),
    Setting("every", Kind.TEXT, required=True,
            help="Nm (N minutes, 1..10080) | hourly | daily | weekly, in UTC"),
    Setting("keep", Kind.INTEGER, required=True, minimum=1, maximum=MAX_SNAPSHOTS_PER_VOLUME,
            help="snapshots kept; all schedules of a volume keep at most 512 together"),
    Setting("volumes", Kind.LIST, (), "volumes snapshotted together at one instant; "
            "key absent: every volume"),
)

SNAPSHOTS = Keys(
    Setting("schedules", Kind.LIST, (), "timed snapshots, run by the daemon", keys=SCHEDULE),
)


@dataclass(frozen=True)
class SnapshotSchedule:
    """One timed snapshot schedule: snapshots named ``<name>-<UTC slot time>``."""

    name: str
    every: Every
    minutes: int  # the period in minutes (60 hourly, 1440 daily, 10080 weekly)
    keep: int
    volumes: tuple[str, ...] = default_of(SCHEDULE, "volumes")  # empty: every volume, one group


@dataclass(frozen=True)
class SnapshotsConfig:
    schedules: tuple[SnapshotSchedule, ...] = default_of(SNAPSHOTS, "schedules")


FAILOVER = Keys(
    Setting("auto", Kind.BOOLEAN, True, "automatic failover (needs peerlink.secret_file); "
            "false: roles never move by themselves"),
    Setting("heartbeat_port", Kind.INTEGER, 7790, "UDP port of the heartbeats, the same on "
            "every site", minimum=1, maximum=65535),
    Setting("interval", Kind.SECONDS, 0.5, "between two heartbeats"),
    Setting("timeout", Kind.SECONDS, 2.0, "silence after which a site counts as gone; at "
            "least 3 x interval"),
    Setting("fence_margin", Kind.SECONDS, 1.0, "time for a cut-off primary to fence itself "
            "before the secondary may promote"),
)


@dataclass(frozen=True)
class FailoverConfig:
    """Heartbeats and automatic failover (gateway/failover.py).  With the defaults a
    dead primary is replaced in about 4 s: ``timeout`` of silence, ``fence_margin`` for
    the old primary to have fenced itself, then the promotion."""

    auto: bool = default_of(FAILOVER, "auto")
    heartbeat_port: int = default_of(FAILOVER, "heartbeat_port")
    interval: float = default_of(FAILOVER, "interval")
    timeout: float = default_of(FAILOVER, "timeout")
    fence_margin: float = default_of(FAILOVER, "fence_margin")


class CoordinatorKind(enum.Enum):
    HEARTBEAT = "heartbeat"
    ETCD = "etcd"


COORDINATOR = Keys(
    Setting("kind", Kind.CHOICE, CoordinatorKind.HEARTBEAT, "who decides which node is "
            "primary: heartbeat (the sites' own majority, failover:) | etcd (a lease and a "
            "key per group in an etcd v3 cluster)"),
    Setting("endpoints", Kind.LIST, (), "etcd's client URLs, http(s)://IP:PORT, every "
            "member of the cluster (tried in turn); required with kind etcd"),
    Setting("lease_ttl", Kind.INTEGER, 5, "seconds of the node's etcd lease: a dead primary "
            "is replaced about this long after its last keepalive", minimum=2, maximum=60),
    Setting("poll_interval", Kind.SECONDS, 0.5, "between two reads of the group's keys by "
            "a replica (the primary reads 4 x less often)"),
    Setting("prefix", Kind.STRING, "/nbdgw", "where nbdgw's keys live in etcd; the same on "
            "every node of the fleet"),
    Setting("group", Kind.STRING, "default", "this volume group's name in etcd "
            "(<prefix>/groups/<group>/); the same on every node of the group"),
    Setting("ca_file", Kind.PATH, None, "the CA of etcd's certificates (https endpoints); "
            "none: the system's CAs"),
    Setting("cert_file", Kind.PATH, None, "a client certificate for etcd (with key_file)"),
    Setting("key_file", Kind.PATH, None, "its private key (mode 0600)"),
)


@dataclass(frozen=True)
class CoordinatorConfig:
    """Who decides roles (gateway/coordinator.py): the heartbeat majority of the sites
    (gateway/nodecore.py), or etcd (gateway/etcdcore.py, DESIGN.md §6)."""

    kind: CoordinatorKind = default_of(COORDINATOR, "kind")
    endpoints: tuple[str, ...] = default_of(COORDINATOR, "endpoints")
    lease_ttl: int = default_of(COORDINATOR, "lease_ttl")
    poll_interval: float = default_of(COORDINATOR, "poll_interval")
    prefix: str = default_of(COORDINATOR, "prefix")
    group: str = default_of(COORDINATOR, "group")
    ca_file: Path | None = default_of(COORDINATOR, "ca_file")
    cert_file: Path | None = default_of(COORDINATOR, "cert_file")
    key_file: Path | None = default_of(COORDINATOR, "key_file")


METRICS = Keys(
    Setting("listen", Kind.HOST_PORT, None, "the Prometheus endpoint of the daemon "
            "(HOST an IP address); none: no endpoint"),
)


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint of `nbdgw daemon` (gateway/metrics.py); off without listen."""

    listen: tuple[str, int] | None = default_of(METRICS, "listen")


HEALTH = Keys(
    Setting("warn_free_percent", Kind.PERCENT, 15.0,
            "free space of data_dir's file system below which it is a warning"),
    Setting("critical_free_percent", Kind.PERCENT, 5.0,
            "... and critical; at most warn_free_percent"),
    Setting("interval", Kind.SECONDS, 60.0, "between the daemon's checks"),
    Setting("max_disk_temperature", Kind.INTEGER, 60, "Celsius at which a disk warns",
            minimum=30, maximum=100),
)


@dataclass(frozen=True)
class HealthConfig:
    """Store health (gateway/health.py): below which share of free space the file system
    of data_dir is a warning and critical, how often the daemon checks (SMART and mdadm
    answers are reused for as long), and the disk temperature that warns."""

    warn_free_percent: float = default_of(HEALTH, "warn_free_percent")
    critical_free_percent: float = default_of(HEALTH, "critical_free_percent")
    interval: float = default_of(HEALTH, "interval")
    max_disk_temperature: int = default_of(HEALTH, "max_disk_temperature")


CONTROL = Keys(
    Setting("group", Kind.STRING, None, "a group whose members may use the daemon's control "
            "socket besides root (it must exist); none: root only"),
)


@dataclass(frozen=True)
class ControlConfig:
    """Who may use the daemon's control socket besides root: members of ``group``."""

    group: str | None = default_of(CONTROL, "group")


NODE = Keys(
    Setting("name", Kind.STRING, os.uname().nodename, "shown in logs and status; differs "
            "from every peers[].name", shown_default="the host name"),
    Setting("data_dir", Kind.PATH, DEFAULT_DATA_DIR, "volumes live in <data_dir>/volumes/"),
    Setting("role", Kind.CHOICE, Role.PRIMARY, "the default role of this node's volumes: "
            "primary, secondary, dr; witness: a voter that holds no data"),
)

# -- volume groups (a config with `sites` and `groups`) --------------------------------------

SITE = Keys(
    Setting("name", Kind.STRING, required=True, help="the site's node.name (1-63 of letters, "
            "digits, '.', '_', '-')"),
    Setting("address", Kind.ADDRESS, required=True, help="its IP address: the peerlink, "
            "heartbeats and metrics of every group it is in"),
    Setting("heartbeat_addresses", Kind.LIST, (),
            "IP addresses of second paths for heartbeats only"),
)

GROUP_PORTS = Keys(
    Setting("peerlink", Kind.INTEGER, None, "TCP port of the group's replication on every "
            "site of it; none: the node's shared port, peerlink.listen's (the same on every "
            "site), where a front routes each connection to its group", minimum=1,
            maximum=65535),
    Setting("heartbeat", Kind.INTEGER, required=True, minimum=1, maximum=65535,
            help="UDP port of the group's heartbeats on every site of it"),
    Setting("nbd", Kind.INTEGER, required=True, minimum=1, maximum=65535,
            help="TCP port where the group's primary serves NBD (on every address)"),
    Setting("metrics", Kind.INTEGER, None, "TCP port of the group's Prometheus endpoint on "
            "each site's address; none: no endpoint", minimum=1, maximum=65535),
    Setting("iscsi", Kind.INTEGER, None, "with iscsi.enabled: TCP port of the group's iSCSI "
            "portal on its primary, also the number of its tgtd's control socket; none: "
            "the group is served over NBD only", minimum=1, maximum=32767),
)

# The options of the link to one site: the same keys as a peers[] item's.
LINK_KEYS = ("mode", "sync_timeout", "rate_limit", "rate_schedule", "compression", "rpo")

REPLICA = Keys(
    Setting("site", Kind.STRING, required=True, help="a data site of the group (primary, "
            "secondary or dr): these options apply to whichever site ships to it"),
    *(PEER[k] for k in LINK_KEYS),
)

# What a group may set of the failover section; the rest is the node's (heartbeat_port
# is the group's ports.heartbeat).
GROUP_FAILOVER = Keys(*(replace(FAILOVER[k], shown_default=f"the node's failover.{k}")
                        for k in ("auto", "interval", "timeout", "fence_margin")))

GROUP_SERVICE_DNS = Keys(*(st for st in SERVICE_DNS if st.name != "address"))

GROUP_SERVICE = Keys(
    SERVICE["address"],
    Setting("interface", Kind.STRING, None, "the interface the address is added to (the "
            "same name on every data site of the group)"),
    Setting("dns", Kind.SECTION, keys=GROUP_SERVICE_DNS, help="a DNS name that follows the "
            "group's primary (each site publishes its sites[].address)"),
)

GROUP = Keys(
    Setting("name", Kind.STRING, required=True, help="1-32 of a-z, 0-9, '-', starting with a "
            "letter or digit; unique; the group's data is in <data_dir>/groups/<name>"),
    Setting("primary", Kind.STRING, required=True, help="the site installed as primary"),
    Setting("secondary", Kind.STRING, None, "the site that takes over (failover target)"),
    Setting("dr", Kind.STRING, None, "a third data site that votes (or witness, not both)"),
    Setting("witness", Kind.STRING, None, "a site that votes for the group and holds none "
            "of its data; it may hold other groups' data"),
    Setting("topology", Kind.CHOICE, Topology.FANOUT, "fanout: the primary ships to every "
            "data site; cascade: primary -> secondary -> dr"),
    Setting("replicas", Kind.LIST, (), "options of the link to each data site (default: "
            "async, unlimited, zstd)", keys=REPLICA),
    Setting("ports", Kind.SECTION, keys=GROUP_PORTS, required=True, help="the group's own "
            "ports: distinct from every other group's on a site they share"),
    Setting("service", Kind.SECTION, keys=GROUP_SERVICE, help="the address or DNS name that "
            "follows the group's primary"),
    Setting("volumes", Kind.LIST, (), "the group's volumes; empty: every volume in its "
            "data_dir; names unique on every site", keys=VOLUME),
    Setting("snapshots", Kind.SECTION, keys=SNAPSHOTS, help="the group's timed snapshots"),
    Setting("failover", Kind.SECTION, keys=GROUP_FAILOVER, help="the group's own failover "
            "timings (e.g. a longer timeout for a branch behind a slow link), or auto: false "
            "for a group moved by hand only; what it does not set is the node's failover"),
)

TOP = Keys(
    Setting("version", Kind.INTEGER, required=True, minimum=CONFIG_VERSION,
            maximum=CONFIG_VERSION, help="the config format version"),
    Setting("node", Kind.SECTION, keys=NODE, help="this node"),
    Setting("service", Kind.SECTION, keys=SERVICE, help="the address that follows the "
            "primary"),
    Setting("peerlink", Kind.SECTION, keys=PEERLINK, help="replication between sites"),
    Setting("peers", Kind.LIST, (), "the other sites, the same list on every node",
            keys=PEER),
    Setting("failover", Kind.SECTION, keys=FAILOVER, help="heartbeats and automatic failover"),
    Setting("coordinator", Kind.SECTION, keys=COORDINATOR, help="who decides roles: the "
            "heartbeat majority or etcd"),
    Setting("nbd", Kind.SECTION, keys=NBD, help="the NBD server (nbdkit)"),
    Setting("journal", Kind.SECTION, keys=JOURNAL, help="each volume's write journal"),
    Setting("activity_log", Kind.SECTION, keys=ACTIVITY_LOG, help="DRBD's al-extents"),
    Setting("volumes", Kind.LIST, (), "volumes this node serves; empty: every volume in "
            "data_dir", keys=VOLUME),
    Setting("snapshots", Kind.SECTION, keys=SNAPSHOTS, help="timed snapshots"),
    Setting("cdp", Kind.SECTION, keys=CDP, help="continuous data protection: the history "
            "window of every volume this site holds, replicas too (each site its own)"),
    Setting("iscsi", Kind.SECTION, keys=ISCSI, help="the iSCSI bridge (tgtd)"),
    Setting("metrics", Kind.SECTION, keys=METRICS, help="Prometheus metrics"),
    Setting("control", Kind.SECTION, keys=CONTROL, help="the daemon's control socket"),
    Setting("health", Kind.SECTION, keys=HEALTH, help="store health checks"),
    Setting("sites", Kind.LIST, (), "with groups: every site of the fleet, the same list "
            "on every node", keys=SITE),
    Setting("groups", Kind.LIST, (), "volume groups, each with its own roles, ports and "
            "failover (instead of node.role, peers, service, volumes)", keys=GROUP),
)
TOP_KEYS = TOP.known


@dataclass(frozen=True)
class SiteConfig:
    name: str
    address: str
    heartbeat_addresses: tuple[str, ...] = default_of(SITE, "heartbeat_addresses")


@dataclass(frozen=True)
class GroupPorts:
    peerlink: int | None  # None: the node's shared port (peerlink.listen)
    heartbeat: int
    nbd: int
    metrics: int | None = None
    iscsi: int | None = None

    def named(self) -> list[tuple[str, int]]:
        return [(k, v) for k, v in (("peerlink", self.peerlink), ("heartbeat", self.heartbeat),
                                    ("nbd", self.nbd), ("metrics", self.metrics),
                                    ("iscsi", self.iscsi))
                if v is not None]


@dataclass(frozen=True)
class ReplicaConfig:
    """The options of the link to ``site`` (PeerConfig's, by LINK_KEYS)."""

    site: str
    options: tuple[tuple[str, Any], ...] = ()

    def get(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass(frozen=True)
class GroupConfig:
    """A volume group: the unit of role, epoch, write order and failover.  Each site of
    it runs the group as an ordinary node config (group_config) in its own processes."""

    name: str
    primary: str
    ports: GroupPorts
    secondary: str | None = None
    dr: str | None = None
    witness: str | None = None
    topology: Topology = default_of(GROUP, "topology")
    replicas: tuple[ReplicaConfig, ...] = ()
    service: ServiceConfig = ServiceConfig()
    volumes: tuple[VolumeConfig, ...] = ()
    snapshots: SnapshotsConfig = SnapshotsConfig()
    failover: FailoverConfig | None = None  # the node's failover with the group's keys

    def members(self) -> list[tuple[str, Role]]:
        """(site, role) of every site of the group, the primary first."""
        return [(site, role) for site, role in (
            (self.primary, Role.PRIMARY), (self.secondary, Role.SECONDARY),
            (self.dr, Role.DR), (self.witness, Role.WITNESS)) if site is not None]

    def role_of(self, site: str) -> Role | None:
        return next((r for s, r in self.members() if s == site), None)


@dataclass(frozen=True)
class NodeConfig:
    name: str = default_of(NODE, "name")
    data_dir: Path = default_of(NODE, "data_dir")
    nbd: NbdConfig = NbdConfig()
    journal: JournalConfig = JournalConfig()
    al_extents: int = default_of(ACTIVITY_LOG, "extents")
    volumes: tuple[VolumeConfig, ...] = default_of(TOP, "volumes")
    source: Path | None = None  # the file it was read from
    role: Role = default_of(NODE, "role")
    service: ServiceConfig = ServiceConfig()
    peerlink: PeerlinkConfig = PeerlinkConfig()
    peers: tuple[PeerConfig, ...] = default_of(TOP, "peers")
    failover: FailoverConfig = FailoverConfig()
    coordinator: CoordinatorConfig = CoordinatorConfig()
    snapshots: SnapshotsConfig = SnapshotsConfig()
    cdp: CdpConfig = CdpConfig()
    iscsi: IscsiConfig = IscsiConfig()
    metrics: MetricsConfig = MetricsConfig()
    control: ControlConfig = ControlConfig()
    health: HealthConfig = HealthConfig()
    # A config with groups: every site and group (this node runs group_config() of each
    # group it is in); empty in a config of today's format and in a group's own config.
    sites: tuple[SiteConfig, ...] = ()
    groups: tuple[GroupConfig, ...] = ()
    group: str | None = None  # a group's own config: the group's name

    def volume(self, name: str) -> VolumeConfig | None:
        return next((v for v in self.volumes if v.name == name), None)

    def cdp_of(self, name: str) -> CdpConfig:
        """The history window of volume ``name`` here: its own, else the node's."""
        v = self.volume(name)
        return v.cdp if v is not None and v.cdp is not None else self.cdp

    def peer(self, name: str) -> PeerConfig | None:
        return next((p for p in self.peers if p.name == name), None)

    def send_to(self) -> tuple[PeerConfig, ...]:
        """The peers this node ships its volumes' journals to, by role and topology."""
        cascade = self.peerlink.topology is Topology.CASCADE
        if self.role is Role.PRIMARY:
            if not cascade:
                return tuple(p for p in self.peers
                             if p.role not in (Role.PRIMARY, Role.WITNESS))
            seconds = tuple(p for p in self.peers if p.role is Role.SECONDARY)
            return seconds or tuple(p for p in self.peers if p.role is Role.DR)
        if self.role is Role.SECONDARY and cascade:
            return tuple(p for p in self.peers if p.role is Role.DR)
        return ()

    def receives(self) -> bool:
        """Whether this node holds replicas (runs a peerlink receiver)."""
        return self.role not in (Role.PRIMARY, Role.WITNESS)

    def with_overrides(self, **kw: Any) -> NodeConfig:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


MAX_SECONDS = 86400  # no duration in the config means more than a day; .inf never does

class _Section:
    """Reads one mapping against its declared keys (`Keys`): a key not declared is
    refused by name; `value` reads and checks a key by its declared kind, range and
    default; the section's code does the rest (lists, sub-sections, checks across keys).
    Reading a key the table does not declare is a KeyError: code and table cannot drift."""

    def __init__(self, raw: Any, path: str, keys: Keys) -> None:
        where = path or "the config file"
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a mapping for {where}")
        known = keys.known
        for key in raw:
            if key not in known:
                raise ConfigError(
                    f"unknown key {key!r} in {where} (known: {', '.join(sorted(known))})"
                )
        self.raw = raw
        self.path = path
        self.keys = keys

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return self.keys[name].name in self.raw

    def get(self, name: str) -> Any:
        return self.raw.get(self.keys[name].name)

    def require(self, *names: str) -> None:
        """Refuse the first of ``names`` (each declared required) that is absent."""
        for name in names:
            assert self.keys[name].required, name
            if name not in self.raw:
                raise ConfigError(f"missing key '{name}' in {self.path}")

    def value(self, name: str) -> Any:
        """``name`` read and checked by its declaration (its default when absent)."""
        st = self.keys[name]
        read = _READ_BY_KIND.get(st.kind)
        if read is None:
            raise TypeError(f"{self.key(name)} ({st.kind.value}) is read by its section's code")
        return read(self, st)

    def _integer(self, st: Setting) -> int:
        assert isinstance(st.minimum, int) and not isinstance(st.maximum, float), st.name
        return self.integer(st.name, st.default, st.minimum, st.maximum)

    def _size(self, st: Setting) -> int:
        v = self.size(st.name, st.default)
        if st.minimum is not None and v < st.minimum:
            raise ConfigError(f"expected at least {size_text(st.minimum)} for {self.key(st.name)}")
        if st.maximum is not None and v > st.maximum:
            raise ConfigError(f"expected at most {size_text(st.maximum)} for {self.key(st.name)}")
        return v

    def _choice(self, st: Setting) -> Any:
        assert st.choices is not None
        return self.enum(st.name, st.choices, st.default)

    def _host_port(self, st: Setting) -> tuple[str, int] | None:
        default: tuple[str, int] | None = st.default
        if st.name not in self.raw:
            return default
        v = self.raw[st.name]
        if v is None and st.default is None:  # an endpoint that is off by default
            return None
        return parse_host_port(v, self.key(st.name))

    def values(self, *skip: str) -> dict[str, Any]:
        """`value` of every declared key of a kind read by declaration alone, except
        ``skip``: the keyword arguments of a section's dataclass."""
        return {st.name: self.value(st.name) for st in self.keys
                if st.kind in _READ_BY_KIND and st.name not in skip}

    def integer(self, name: str, default: int, minimum: int, maximum: int | None = None) -> int:
        v = self.raw.get(name, default)
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= minimum
        if ok and maximum is not None and v > maximum:
            ok = False
        if not ok:
            rng = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise ConfigError(f"expected integer {rng} for {self.key(name)}")
        return int(v)

    def size(self, name: str, default: int) -> int:
        v = self.raw.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise ConfigError(f"expected a size such as 10G for {self.key(name)}")
        try:
            return parse_size(v)
        except InvalidArgument as e:
            raise ConfigError(f"{e} for {self.key(name)}") from None

    def string(self, name: str, default: str | None) -> str | None:
        v = self.raw.get(name, default)
        if v is not None and (not isinstance(v, str) or not v):
            raise ConfigError(f"expected a non-empty string for {self.key(name)}")
        return v

    def boolean(self, name: str, default: bool) -> bool:
        v = self.raw.get(name, default)
        if not isinstance(v, bool):
            raise ConfigError(f"expected true or false for {self.key(name)}")
        return v

    def path_(self, name: str, default: Path | None) -> Path | None:
        v = self.raw.get(name)
        if v is None:
            return default
        if not isinstance(v, str) or not v.startswith("/"):
            raise ConfigError(f"expected an absolute path for {self.key(name)}")
        return Path(v)

    def percent(self, name: str, default: float) -> float:
        v = self.raw.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 100:
            raise ConfigError(f"expected a percentage >= 0 and < 100 for {self.key(name)}")
        return float(v)

    def enum(self, name: str, cls: type[enum.Enum], default: enum.Enum | None) -> Any:
        v = self.raw.get(name, None if default is None else default.value)
        if v is False:  # YAML 1.1 reads a bare `off` as false
            v = "off"
        if v is True:
            v = "on"
        try:
            return cls(v)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ConfigError(f"expected one of {choices} for {self.key(name)}") from None

    def listing(self, name: str) -> list[Any]:
        v = self.raw.get(self.keys[name].name, [])
        if not isinstance(v, list):
            raise ConfigError(f"expected a list for {self.key(name)}")
        return v


# How `_Section.value` reads each kind it can read by the declaration alone.
_READ_BY_KIND: dict[Kind, Callable[[_Section, Setting], Any]] = {
    Kind.INTEGER: _Section._integer,
    Kind.SIZE: _Section._size,
    Kind.SECONDS: lambda s, st: _number(s, st.name, st.default),
    Kind.PERCENT: lambda s, st: s.percent(st.name, st.default),
    Kind.BOOLEAN: lambda s, st: s.boolean(st.name, st.default),
    Kind.STRING: lambda s, st: s.string(st.name, st.default),
    Kind.PATH: lambda s, st: s.path_(st.name, st.default),
    Kind.CHOICE: _Section._choice,
    Kind.HOST_PORT: _Section._host_port,
}


def _tls(raw: Any) -> TlsConfig:
    return check_tls(TlsConfig(**_Section(raw, "nbd.tls", NBD_TLS).values()))


def check_tls(tls: TlsConfig) -> TlsConfig:
    if tls.mode is not TlsMode.OFF:
        if (tls.psk_file is None) == (tls.certificates_dir is None):
            raise ConfigError(
                "nbd.tls.mode is on or require: set exactly one of nbd.tls.psk_file "
                "and nbd.tls.certificates_dir"
            )
        if tls.verify_peer and tls.certificates_dir is None:
            raise ConfigError("nbd.tls.verify_peer needs nbd.tls.certificates_dir")
    return tls


def parse_cidr(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"expected an address or CIDR string in {where}")
    try:
        return str(ipaddress.ip_network(v, strict=False))
    except ValueError:
        raise ConfigError(f"expected an address or CIDR in {where}, got {v!r}") from None


def _nbd(raw: Any) -> NbdConfig:
    s = _Section(raw, "nbd", NBD)
    listen = tuple(parse_listen(x, f"nbd.listen[{i}]") for i, x in enumerate(s.listing("listen")))
    if not s.has("listen"):
        listen = default_of(NBD, "listen")
    if not listen:
        raise ConfigError("expected at least one address in nbd.listen")
    allow = tuple(parse_cidr(x, f"nbd.allow[{i}]") for i, x in enumerate(s.listing("allow")))
    default = s.value("default_export")
    if default is not None:
        try:
            validate_name(default)
        except InvalidArgument as e:
            raise ConfigError(f"nbd.default_export: {e}") from None
    return NbdConfig(listen=listen, tls=_tls(s.get("tls")), allow=allow,
                     default_export=default)


def _volumes(items: list[Any], where: str = "volumes") -> tuple[VolumeConfig, ...]:
    out: list[VolumeConfig] = []
    for i, raw in enumerate(items):
        s = _Section(raw, f"{where}[{i}]", VOLUME)
        name = s.value("name")
        if name is None:
            raise ConfigError(f"missing key 'name' in {where}[{i}]")
        try:
            validate_name(name)
        except InvalidArgument as e:
            raise ConfigError(f"{e} in {where}[{i}].name") from None
        s.require("size")
        if any(v.name == name for v in out):
            raise ConfigError(f"volume {name} is listed twice in {where}")
        cdp = _cdp(s.get("cdp"), f"{where}[{i}].cdp") if s.has("cdp") else None
        out.append(VolumeConfig(name, s.value("size"), s.value("read_only"), cdp))
    return tuple(out)


def _cdp(raw: Any, where: str) -> CdpConfig:
    s = _Section(raw, where, CDP)
    try:
        window = parse_duration(s.get("window") if s.has("window") else 0)
    except InvalidArgument:
        raise ConfigError(f"expected a duration (30m, 24h, 7d; 0: none) for "
                          f"{s.key('window')}") from None
    return CdpConfig(window, s.value("max_bytes"))


def parse_host_port(v: Any, where: str) -> tuple[str, int]:
    """``HOST:PORT`` with HOST an IP address (``[v6]:port`` for IPv6)."""
    if not isinstance(v, str):
        raise ConfigError(f"expected 'HOST:PORT' for {where}")
    host, sep, port = v.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        ok = bool(sep) and port.isdigit() and 1 <= int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"expected 'HOST:PORT' with an IP address and a port 1..65535 "
                          f"for {where}, got {v!r}")
    return host, int(port)


def _service(raw: Any, where: str = "service", keys: Keys = SERVICE) -> ServiceConfig:
    """service (and a group's, whose DNS name is published under each site's address)."""
    s = _Section(raw, where, keys)
    address = s.value("address")
    if address is not None:
        try:
            iface = ipaddress.ip_interface(address)
        except ValueError:
            raise ConfigError(f"expected an address with a prefix length such as "
                              f"192.0.2.10/24 for {where}.address, got {address!r}") from None
        if "/" not in address:
            raise ConfigError(f"expected an address with a prefix length such as "
                              f"192.0.2.10/24 for {where}.address, got {address!r}")
        address = str(iface)
    dns = (_service_dns(s.get("dns"), f"{where}.dns", keys["dns"].keys)
           if s.has("dns") else None)
    return ServiceConfig(address=address, interface=s.value("interface"), dns=dns)


def _service_dns(raw: Any, where: str, keys: Keys | None) -> ServiceDnsConfig:
    assert keys is not None
    s = _Section(raw, where, keys)
    s.require("name", "zone", "servers", "key_file",
              *(("address",) if "address" in keys else ()))
    name, zone = s.value("name").rstrip("."), s.value("zone").rstrip(".")
    s.value("key_file")
    s.value("ttl")
    if name.lower() == zone.lower() or not name.lower().endswith("." + zone.lower()):
        raise ConfigError(f"{where}.name {name!r} is not inside {where}.zone {zone!r}")
    servers = []
    for i, text in enumerate(s.listing("servers")):
        try:
            servers.append(str(parse_server(str(text))))
        except ValueError:
            raise ConfigError(f"expected IP or IP:PORT for {where}.servers[{i}], "
                              f"got {text!r}") from None
    if not servers:
        raise ConfigError(f"expected at least one server in {where}.servers")
    address = ""  # a group's: each site's own address (group_config)
    if "address" in keys:
        address = _address(s.get("address"), f"{where}.address")
    return ServiceDnsConfig(name=name, zone=zone, servers=tuple(servers),
                            key_file=s.value("key_file"),
                            address=address, ttl=s.value("ttl"))


def _peerlink(raw: Any) -> PeerlinkConfig:
    s = _Section(raw, "peerlink", PEERLINK)
    host, port = s.value("listen")
    tls = None
    if s.has("tls"):
        t = _Section(s.get("tls"), "peerlink.tls", PEERLINK_TLS)
        files = [t.value(k) for k in ("cert_file", "key_file", "ca_file")]
        missing = [k for k, f in zip(("cert_file", "key_file", "ca_file"), files, strict=True)
                   if f is None]
        if missing:
            raise ConfigError(f"missing key '{missing[0]}' in peerlink.tls (mutual TLS "
                              f"needs cert_file, key_file and ca_file)")
        cert, key, ca = (f for f in files if f is not None)
        tls = PeerlinkTlsConfig(cert, key, ca)
    cfg = PeerlinkConfig(listen_host=host, listen_port=port, tls=tls, **s.values("listen"))
    if cfg.next_secret_file is not None and cfg.secret_file is None:
        raise ConfigError("peerlink.next_secret_file needs peerlink.secret_file: a node "
                          "proves itself with the current secret and accepts the next one "
                          "besides it (rotating the secret: SECURITY.md)")
    return cfg


def _rpo(raw: Any, where: str) -> RpoConfig:
    s = _Section(raw, where, RPO)
    return RpoConfig(seconds=s.value("seconds") if s.has("seconds") else None,
                     bytes=s.value("bytes") if s.has("bytes") else None)


def _number(s: _Section, name: str, default: float) -> float:
    v = s.raw.get(name, default)
    if (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            or not 0 < v <= MAX_SECONDS):
        raise ConfigError(f"expected a number of seconds > 0 and at most {MAX_SECONDS} "
                          f"for {s.key(name)}")
    return float(v)


def _address(v: Any, where: str) -> str:
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ConfigError(f"expected an IP address for {where}, got {v!r}") from None


def _addresses(s: _Section, name: str) -> tuple[str, ...]:
    """A list of IP addresses (heartbeat_addresses)."""
    return tuple(_address(a, f"{s.key(name)}[{j}]") for j, a in enumerate(s.listing(name)))


def _link_options(s: _Section) -> dict[str, Any]:
    """The options of the link to one site (LINK_KEYS of a peers[] item or of a group's
    replicas[] item): PeerConfig's keyword arguments."""
    where = s.path
    rate = s.get("rate_limit") if s.has("rate_limit") else default_of(PEER, "rate_limit")
    if isinstance(rate, bool) or not isinstance(rate, int | str):
        raise ConfigError(f"expected a rate such as 100M (bytes/s) or 0 for "
                          f"{where}.rate_limit")
    try:
        rate = parse_rate(str(rate))
    except ValueError:
        raise ConfigError(f"expected a rate such as 100M (bytes/s) or 0 for "
                          f"{where}.rate_limit, got {rate!r}") from None
    schedule = []
    for j, item in enumerate(s.listing("rate_schedule")):
        w = _Section(item, f"{where}.rate_schedule[{j}]", RATE_WINDOW)
        w.require("from", "to", "rate")
        got = {k: w.get(k) for k in ("from", "to", "rate")}
        if any(isinstance(v, bool) or not isinstance(v, int | str) for v in got.values()):
            raise ConfigError(f"expected from: HH:MM, to: HH:MM and a rate such as 20M "
                              f"in {w.path}")
        # YAML 1.1 reads an unquoted 18:00 as the sexagesimal 1080: minutes, as meant.
        start, end = (f"{v // 60:02d}:{v % 60:02d}" if isinstance(v, int) else v
                      for v in (got["from"], got["to"]))
        days = w.get("days") if w.has("days") else default_of(RATE_WINDOW, "days")
        try:
            schedule.append(rate_window(str(days), start, end, str(got["rate"])))
        except ValueError as e:
            raise ConfigError(f"{e} in {w.path}") from None
    return {"mode": s.value("mode"), "sync_timeout": s.value("sync_timeout"),
            "rate_limit": rate, "rate_schedule": tuple(schedule),
            "rpo": _rpo(s.get("rpo"), f"{where}.rpo") if s.has("rpo") else RpoConfig(),
            "compression": s.value("compression")}


def _site_name(s: _Section, key: str = "name") -> str:
    name = s.value(key)
    assert name is not None
    try:
        validate_name(name)
    except InvalidArgument as e:
        raise ConfigError(f"{e} in {s.key(key)}") from None
    return str(name)


def _peers(items: list[Any], node_name: str) -> tuple[PeerConfig, ...]:
    out: list[PeerConfig] = []
    for i, raw in enumerate(items):
        where = f"peers[{i}]"
        s = _Section(raw, where, PEER)
        s.require("name", "role", "address")
        name = _site_name(s)
        if name == node_name:
            raise ConfigError(f"peer {name} in {where} is this node (node.name)")
        if any(p.name == name for p in out):
            raise ConfigError(f"peer {name} is listed twice in peers")
        address = _address(s.get("address"), f"{where}.address")
        options = _link_options(s)
        out.append(PeerConfig(heartbeat_addresses=_addresses(s, "heartbeat_addresses"),
                              name=name, role=s.value("role"), address=address,
                              port=s.value("port"), **options))
    return tuple(out)


def check_roles(role: Role, name: str, peers: tuple[PeerConfig, ...]) -> None:
    """At most one primary among the sites; exactly one once peers are listed.  A witness
    (a voter without data) takes the third site's place: primary + secondary + witness,
    as primary + secondary + dr; a DR site and a witness together are refused for now
    (the DR site votes already, and a fourth voter would make the majority three)."""
    def named(r: Role) -> list[str]:
        return ([f"{name} (node.role)"] if role is r else []) + [
            f"{p.name} (peers[{i}].role)" for i, p in enumerate(peers) if p.role is r]

    primaries = named(Role.PRIMARY)
    if len(primaries) > 1:
        raise ConfigError(f"two primaries: {' and '.join(primaries[:2])}; a volume has "
                          f"one primary site")
    if peers and not primaries:
        raise ConfigError("no primary: neither node.role nor any peers[].role is primary")
    witnesses, drs = named(Role.WITNESS), named(Role.DR)
    if len(witnesses) > 1:
        raise ConfigError(f"two witnesses: {' and '.join(witnesses[:2])}; one witness "
                          "votes for a pair")
    if witnesses and drs:
        raise ConfigError(f"a witness ({witnesses[0]}) and a DR site ({drs[0]}) together: "
                          "the third voter is one or the other, not both")
    if witnesses and not named(Role.SECONDARY):
        raise ConfigError(f"a witness ({witnesses[0]}) without a secondary: it votes for a "
                          "pair of data sites (primary and secondary)")


MAIN_ROLES: Final = (Role.PRIMARY, Role.SECONDARY)
SYNC_PAIR_ONLY = ("mode: sync is allowed only between the two main-site nodes (primary "
                  "and secondary)")


def check_sync(role: Role, name: str, peers: tuple[PeerConfig, ...]) -> None:
    """Sync is a property of the main-site pair: whichever of the two is primary ships
    synchronously to the other (a secondary's ``mode: sync`` on the primary means "when
    I am primary, I ship sync to it").  A DR site is never sync, either way."""
    for i, p in enumerate(peers):
        if p.mode is not PeerMode.SYNC:
            continue
        if role in (Role.DR, Role.WITNESS):
            raise ConfigError(f"{SYNC_PAIR_ONLY}: this node ({name}) is a {_site(role)}, "
                              f"so peers[{i}] ({p.name}) cannot be sync")
        if p.role in (Role.DR, Role.WITNESS):
            raise ConfigError(f"{SYNC_PAIR_ONLY}: peers[{i}] ({p.name}) is a "
                              f"{_site(p.role)}")


def _site(role: Role) -> str:
    return "DR site" if role is Role.DR else "witness (it holds no data)"


def check_witness(cfg: NodeConfig) -> None:
    """A witness holds no data: volumes named in its config would never be served; and
    it does nothing but vote, so automatic failover must be on."""
    if cfg.role is not Role.WITNESS:
        return
    if cfg.volumes:
        raise ConfigError(f"volumes: node {cfg.name} is a witness: it holds no volume "
                          "(remove the list)")
    if not cfg.failover.auto:
        raise ConfigError(f"failover.auto: node {cfg.name} is a witness: it only votes, "
                          "so failover.auto must be true")


def _failover(raw: Any) -> FailoverConfig:
    f = FailoverConfig(**_Section(raw, "failover", FAILOVER).values())
    if f.timeout < 3 * f.interval:
        raise ConfigError("failover.timeout must be at least 3 x failover.interval (a "
                          "single lost heartbeat must not look like a dead node)")
    return f


GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
ETCD_URL = re.compile(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})/?")


def _coordinator(raw: Any, role: Role | None) -> CoordinatorConfig:
    """``role``: node.role (None with groups, where each group gives the site's role)."""
    s = _Section(raw, "coordinator", COORDINATOR)
    c = CoordinatorConfig(**s.values())
    eps = []
    for i, text in enumerate(s.listing("endpoints")):
        m = ETCD_URL.fullmatch(str(text))
        if m is None or not 0 < int(m.group(3)) < 65536:
            raise ConfigError(f"expected http(s)://HOST:PORT for coordinator.endpoints[{i}], "
                              f"got {text!r}")
        eps.append(str(text).rstrip("/"))
    c = replace(c, endpoints=tuple(eps))
    if not GROUP_NAME.fullmatch(c.group):
        raise ConfigError(f"expected a name of letters, digits, '_', '.', '-' for "
                          f"coordinator.group, got {c.group!r}")
    if not c.prefix.startswith("/") or any(ch.isspace() for ch in c.prefix) \
            or c.prefix.rstrip("/") == "":
        raise ConfigError(f"expected an absolute key prefix such as /nbdgw for "
                          f"coordinator.prefix, got {c.prefix!r}")
    if (c.cert_file is None) != (c.key_file is None):
        raise ConfigError("coordinator.cert_file and coordinator.key_file go together")
    if c.kind is CoordinatorKind.ETCD:
        if not c.endpoints:
            raise ConfigError("coordinator.kind etcd needs coordinator.endpoints (etcd's "
                              "client URLs, e.g. http://192.0.2.21:2379)")
        if role is Role.WITNESS:
            raise ConfigError("node.role witness with coordinator.kind etcd: etcd decides "
                              "who is primary, a witness site has nothing to do")
    elif c.endpoints:
        raise ConfigError("coordinator.endpoints is set but coordinator.kind is heartbeat: "
                          "set kind: etcd, or remove the endpoints")
    return c


def _chap(raw: Any, where: str) -> ChapConfig | None:
    if raw is None:
        return None
    s = _Section(raw, where, CHAP)
    user = s.value("user")
    if user is None:
        raise ConfigError(f"missing key 'user' in {where}")
    if any(c.isspace() for c in user):
        raise ConfigError(f"expected a user name without spaces for {where}.user")
    secret_file = s.value("secret_file")
    if secret_file is None:
        raise ConfigError(f"missing key 'secret_file' in {where}")
    return ChapConfig(user, secret_file)


def _iscsi(raw: Any) -> IscsiConfig:
    s = _Section(raw, "iscsi", ISCSI)
    host, port = s.value("portal")
    iqn = s.get("iqn")
    if iqn is not None:
        try:
            validate_iqn(iqn)
        except InvalidName as e:
            raise ConfigError(f"{e} for iscsi.iqn") from None
    initiators = []
    for i, name in enumerate(s.listing("initiators")):
        try:
            initiators.append(validate_initiator(name))
        except InvalidName as e:
            raise ConfigError(f"{e} in iscsi.initiators[{i}]") from None
    allow = tuple(parse_cidr(x, f"iscsi.allow[{i}]") for i, x in enumerate(s.listing("allow")))
    cfg = IscsiConfig(
        enabled=s.value("enabled"),
        portal_host=host,
        portal_port=port,
        readers_portal=s.value("readers_portal"),
        iqn=iqn,
        chap=_chap(s.get("chap"), "iscsi.chap"),
        mutual_chap=_chap(s.get("mutual_chap"), "iscsi.mutual_chap"),
        initiators=tuple(initiators),
        allow=allow,
        control_port=s.value("control_port"),
        run_dir=s.value("run_dir"),
        route=s.value("route"),
        fuse=s.value("fuse"),
    )
    if cfg.enabled and cfg.iqn is None:
        raise ConfigError("missing key 'iqn' in iscsi (required when iscsi.enabled is true)")
    if cfg.mutual_chap is not None and cfg.chap is None:
        raise ConfigError("iscsi.mutual_chap needs iscsi.chap (the initiator "
                          "authenticates first)")
    if cfg.chap and cfg.mutual_chap and cfg.chap.user == cfg.mutual_chap.user:
        raise ConfigError("iscsi.chap.user and iscsi.mutual_chap.user must differ")
    if cfg.initiators and cfg.allow:
        raise ConfigError(
            "set iscsi.initiators or iscsi.allow, not both: tgtd admits an initiator "
            "that matches either list, so together they would widen access, not narrow it")
    return cfg


def check_iscsi_volumes(iscsi: IscsiConfig, volumes: tuple[VolumeConfig, ...]) -> None:
    """Every declared volume must make a valid target IQN when the bridge is on."""
    if not iscsi.enabled or iscsi.iqn is None:
        return
    for i, v in enumerate(volumes):
        try:
            target_iqn(iscsi.iqn, v.name)
        except InvalidName as e:
            raise ConfigError(f"{e} (volumes[{i}].name, exported by iscsi)") from None


_SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_EVERY_MINUTES = re.compile(r"^([0-9]+)m$")
_EVERY = {"hourly": (Every.HOURLY, 60), "daily": (Every.DAILY, 1440),
          "weekly": (Every.WEEKLY, 10080)}


def _every(v: Any, where: str) -> tuple[Every, int]:
    msg = f"expected 'Nm' (N from 1 to 10080), hourly, daily or weekly for {where}"
    if not isinstance(v, str):
        raise ConfigError(msg)
    if v in _EVERY:
        return _EVERY[v]
    m = _EVERY_MINUTES.fullmatch(v)
    if not m or not 1 <= int(m.group(1)) <= 10080:
        raise ConfigError(msg)
    return Every.MINUTES, int(m.group(1))


def _snapshots(raw: Any, where_: str = "snapshots") -> SnapshotsConfig:
    s = _Section(raw, where_, SNAPSHOTS)
    out: list[SnapshotSchedule] = []
    for i, item in enumerate(s.listing("schedules")):
        where = f"{where_}.schedules[{i}]"
        sec = _Section(item, where, SCHEDULE)
        sec.require("name", "every", "keep")
        name = sec.get("name")
        if not isinstance(name, str) or not _SCHEDULE_NAME.fullmatch(name):
            raise ConfigError(f"expected 1-32 letters, digits, '_' or '-', starting with a "
                              f"letter or digit, for {where}.name")
        if any(x.name == name for x in out):
            raise ConfigError(f"schedule {name} is listed twice in {where_}.schedules")
        every, minutes = _every(sec.get("every"), f"{where}.every")
        keep = sec.value("keep")
        vols: list[str] = []
        for j, v in enumerate(sec.listing("volumes")):
            try:
                validate_name(v)
            except InvalidArgument as e:
                raise ConfigError(f"{e} in {where}.volumes[{j}]") from None
            if v in vols:
                raise ConfigError(f"volume {v} is listed twice in {where}.volumes")
            vols.append(v)
        if sec.has("volumes") and not vols:
            raise ConfigError(f"expected at least one volume in {where}.volumes "
                              "(leave the key out for every volume)")
        out.append(SnapshotSchedule(name, every, minutes, keep, tuple(vols)))
    # Every schedule's snapshots must fit in a volume's 512 at once.
    named = {v for x in out for v in x.volumes}
    for vol in [*sorted(named), ""]:
        total = sum(x.keep for x in out if not x.volumes or vol in x.volumes)
        if total > MAX_SNAPSHOTS_PER_VOLUME:
            what = f"volume {vol}" if vol else "every volume"
            raise ConfigError(f"{where_}.schedules keep {total} snapshots of {what} "
                              f"together (at most {MAX_SNAPSHOTS_PER_VOLUME})")
    return SnapshotsConfig(tuple(out))


def _metrics(raw: Any) -> MetricsConfig:
    return MetricsConfig(**_Section(raw, "metrics", METRICS).values())


def _control(raw: Any) -> ControlConfig:
    group = _Section(raw, "control", CONTROL).value("group")
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise ConfigError(f"no group named {group!r} on this host for "
                              "control.group") from None
    return ControlConfig(group=group)


def _health(raw: Any) -> HealthConfig:
    h = HealthConfig(**_Section(raw, "health", HEALTH).values())
    if h.critical_free_percent > h.warn_free_percent:
        raise ConfigError("health.critical_free_percent must be at most "
                          "health.warn_free_percent")
    return h


def parse_config(raw: Any, source: Path | None = None) -> NodeConfig:
    """Validate a loaded YAML document into a NodeConfig; raise ConfigError."""
    top = _Section(raw, "", TOP)
    version = top.get("version")
    if type(version) is not int or version != CONFIG_VERSION:
        raise ConfigError(f"expected version: {CONFIG_VERSION} at the top of the config")
    node = _Section(top.get("node"), "node", NODE)
    al = _Section(top.get("activity_log"), "activity_log", ACTIVITY_LOG)
    journal = JournalConfig(**_Section(top.get("journal"), "journal", JOURNAL).values())
    if journal.max_bytes < journal.segment_bytes:
        raise ConfigError("journal.max_bytes must be at least journal.segment_bytes")
    name = node.value("name") or default_of(NODE, "name")  # `name:` with no value: the default
    if top.has("sites") or top.has("groups"):
        return _groups_config(top, node, name, journal, al.value("extents"), source)
    role = node.value("role")
    peers = _peers(top.listing("peers"), name)
    check_roles(role, name, peers)
    check_sync(role, name, peers)
    cfg = NodeConfig(
        role=role,
        service=_service(top.get("service")),
        peerlink=_peerlink(top.get("peerlink")),
        peers=peers,
        failover=_failover(top.get("failover")),
        coordinator=_coordinator(top.get("coordinator"), role),
        name=name,
        data_dir=node.value("data_dir"),
        nbd=_nbd(top.get("nbd")),
        journal=journal,
        al_extents=al.value("extents"),
        volumes=_volumes(top.listing("volumes")),
        source=source,
        snapshots=_snapshots(top.get("snapshots")),
        cdp=_cdp(top.get("cdp"), "cdp"),
        iscsi=_iscsi(top.get("iscsi")),
        metrics=_metrics(top.get("metrics")),
        control=_control(top.get("control")),
        health=_health(top.get("health")),
    )
    check_iscsi_volumes(cfg.iscsi, cfg.volumes)
    check_witness(cfg)
    check_peerlink_auth(cfg)
    check_failover_secret(cfg)
    return cfg


# Keys of today's format that a config with groups takes per group (or not yet at all).
NOT_WITH_GROUPS: Final = (
    ("node", "role", "each site's role is per group (groups[].primary, secondary, dr, "
                     "witness)"),
    ("", "peers", "a group's sites are named in groups[] and described in sites"),
    ("", "service", "each group has its own: groups[].service"),
    ("", "volumes", "each group lists its own: groups[].volumes"),
    ("", "snapshots", "each group has its own: groups[].snapshots"),
    ("", "metrics", "each group has its own endpoint: groups[].ports.metrics"),
    ("iscsi", "portal", "each group served over iSCSI has its own portal port: "
                        "groups[].ports.iscsi"),
    ("iscsi", "control_port", "each group's tgtd uses its portal port's number: "
                              "groups[].ports.iscsi"),
    ("iscsi", "readers_portal", "not per group yet (each group's tgtd listens on a port "
                                "of its own: groups[].ports.iscsi)"),
    ("peerlink", "topology", "each group has its own: groups[].topology"),
    ("failover", "heartbeat_port", "each group beats on its own port: "
                                   "groups[].ports.heartbeat"),
    ("nbd", "listen", "each group's primary serves on its own port: groups[].ports.nbd"),
    ("nbd", "default_export", "not per group yet: clients name their export"),
)
_GROUP_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def _groups_config(top: _Section, node: _Section, name: str, journal: JournalConfig,
                   al_extents: int, source: Path | None) -> NodeConfig:
    """A config with ``sites`` and ``groups``: what is node-wide is read as in today's
    format; roles, peers, ports, service and volumes are per group (group_config)."""
    if not (top.has("sites") and top.has("groups")):
        raise ConfigError("sites and groups go together: a config with groups lists every "
                          "site in sites")
    for section, key, hint in NOT_WITH_GROUPS:
        raw = top.get(section) if section else top.raw
        if isinstance(raw, dict) and key in raw:
            where = f"{section}.{key}" if section else key
            raise ConfigError(f"{where} is not used in a config with groups: {hint}")
    sites = _sites(top.listing("sites"))
    failover = _failover(top.get("failover"))
    if name not in {x.name for x in sites}:
        raise ConfigError(f"node.name {name} is not one of sites[].name ("
                          + ", ".join(x.name for x in sites) + ")")
    cfg = NodeConfig(
        name=name, data_dir=node.value("data_dir"), journal=journal, al_extents=al_extents,
        peerlink=_peerlink(top.get("peerlink")), failover=failover,
        nbd=_nbd(top.get("nbd")), cdp=_cdp(top.get("cdp"), "cdp"),
        control=_control(top.get("control")), health=_health(top.get("health")),
        iscsi=_iscsi(top.get("iscsi")),
        source=source, sites=sites, groups=_groups(top.listing("groups"), sites, failover),
        coordinator=_coordinator(top.get("coordinator"), None))
    check_groups(cfg)
    return cfg


def _sites(items: list[Any]) -> tuple[SiteConfig, ...]:
    out: list[SiteConfig] = []
    for i, raw in enumerate(items):
        s = _Section(raw, f"sites[{i}]", SITE)
        s.require("name", "address")
        name = _site_name(s)
        if any(x.name == name for x in out):
            raise ConfigError(f"site {name} is listed twice in sites")
        out.append(SiteConfig(name, _address(s.get("address"), f"sites[{i}].address"),
                              _addresses(s, "heartbeat_addresses")))
    if not out:
        raise ConfigError("expected at least one site in sites")
    return tuple(out)


def _group_failover(raw: Any, where: str, node: FailoverConfig) -> FailoverConfig | None:
    f = _Section(raw, f"{where}.failover", GROUP_FAILOVER)
    if not f.raw:
        return None
    out = replace(node, **{k: f.value(k) for k in f.raw})
    if out.timeout < 3 * out.interval:
        raise ConfigError(f"{where}.failover.timeout ({out.timeout} s) must be at least 3 x "
                          f"the group's failover.interval ({out.interval} s): a single lost "
                          "heartbeat must not look like a dead node")
    return out


def _groups(items: list[Any], sites: tuple[SiteConfig, ...], failover: FailoverConfig
            ) -> tuple[GroupConfig, ...]:
    known = [x.name for x in sites]
    out: list[GroupConfig] = []
    for i, raw in enumerate(items):
        where = f"groups[{i}]"
        s = _Section(raw, where, GROUP)
        s.require("name", "primary", "ports")
        name = s.value("name")
        if not isinstance(name, str) or not _GROUP_NAME.fullmatch(name):
            raise ConfigError(f"expected 1-32 of a-z, 0-9 and '-', starting with a letter "
                              f"or digit, for {where}.name")
        if any(g.name == name for g in out):
            raise ConfigError(f"group {name} is listed twice in groups")
        members: dict[str, str] = {}
        for key in ("primary", "secondary", "dr", "witness"):
            site = s.value(key)
            if site is None:
                continue
            if site not in known:
                raise ConfigError(f"{where}.{key}: no site named {site!r} in sites "
                                  f"(sites: {', '.join(known)})")
            if site in members:
                raise ConfigError(f"{where}: site {site} is both {members[site]} and {key}; "
                                  "a site has one role in a group")
            members[site] = key
        replicas: list[ReplicaConfig] = []
        for j, item in enumerate(s.listing("replicas")):
            r = _Section(item, f"{where}.replicas[{j}]", REPLICA)
            r.require("site")
            site = r.value("site")
            if members.get(site) not in ("primary", "secondary", "dr"):
                raise ConfigError(f"{r.path}.site: {site!r} is not a data site of group "
                                  f"{name} (its primary, secondary or dr)")
            if any(x.site == site for x in replicas):
                raise ConfigError(f"site {site} is listed twice in {where}.replicas")
            if r.value("mode") is PeerMode.SYNC and members[site] == "dr":
                raise ConfigError(f"{SYNC_PAIR_ONLY}: {r.path} ({site}) is the DR site "
                                  f"of group {name}")
            replicas.append(ReplicaConfig(site, tuple(_link_options(r).items())))
        p = _Section(s.get("ports"), f"{where}.ports", GROUP_PORTS)
        p.require("heartbeat", "nbd")
        own = [p.value(k) if p.get(k) is not None else None
               for k in ("peerlink", "metrics", "iscsi")]
        ports = GroupPorts(own[0], p.value("heartbeat"), p.value("nbd"), *own[1:])
        out.append(GroupConfig(
            name=name, primary=s.value("primary"), secondary=s.value("secondary"),
            dr=s.value("dr"), witness=s.value("witness"), topology=s.value("topology"),
            replicas=tuple(replicas), ports=ports,
            service=_service(s.get("service"), f"{where}.service", GROUP_SERVICE),
            volumes=_volumes(s.listing("volumes"), f"{where}.volumes"),
            snapshots=_snapshots(s.get("snapshots"), f"{where}.snapshots"),
            failover=_group_failover(s.get("failover"), where, failover)))
    if not out:
        raise ConfigError("expected at least one group in groups")
    return tuple(out)


def check_groups(cfg: NodeConfig) -> None:
    """Across groups: every site is in a group; a group's roles make sense (as today's
    check_roles, check_sync, check_witness for each of its sites); the groups that share
    a site use distinct ports there and distinct volume names."""
    for i, site in enumerate(cfg.sites):
        if not groups_of(cfg, site.name):
            raise ConfigError(f"sites[{i}] ({site.name}) is in no group")
    for i, g in enumerate(cfg.groups):
        check_group(cfg, i, g)
    for site in cfg.sites:
        check_shared_site(cfg, site.name)
    if cfg.iscsi.enabled:
        served = [g for g in cfg.groups if g.ports.iscsi is not None]
        if not served:
            raise ConfigError("iscsi.enabled: no group has ports.iscsi (each group served "
                              "over iSCSI has a portal port of its own)")
        for g in served:
            check_iscsi_volumes(cfg.iscsi, g.volumes)


def check_group(cfg: NodeConfig, i: int, g: GroupConfig) -> None:
    where = f"groups[{i}] ({g.name})"
    if g.witness is not None and g.dr is not None:
        raise ConfigError(f"{where}: a witness ({g.witness}) and a DR site ({g.dr}) "
                          "together: the third voter is one or the other, not both")
    if g.witness is not None and g.secondary is None:
        raise ConfigError(f"{where}: a witness ({g.witness}) without a secondary: it "
                          "votes for a pair of data sites (primary and secondary)")
    auto = (g.failover or cfg.failover).auto
    if g.witness is not None and not auto:
        raise ConfigError(f"{where}: a witness ({g.witness}) votes only for automatic "
                          f"failover: remove it, or keep groups[{i}].failover.auto true")
    if auto and len(g.members()) > 1 and (
            g.secondary is None or (g.dr is None and g.witness is None)):
        raise ConfigError(f"{where}: failover.auto needs three voters in every group "
                          "with more than one site: a primary, a secondary and a dr or "
                          "witness site (or failover.auto: false)")
    used: dict[int, str] = {}
    for key, port in g.ports.named():
        if port in used:
            raise ConfigError(f"groups[{i}].ports.{key} and .{used[port]} are both "
                              f"{port}: a group's ports differ")
        used[port] = key
    if g.ports.peerlink is None and cfg.peerlink.secret_file is None:
        raise ConfigError(f"{where}: on the node's shared peerlink port (no ports.peerlink "
                          "of its own) a group needs peerlink.secret_file: the proofs bind "
                          "each session to its group, so a connection routed to another "
                          "group is refused")
    for member, _role in g.members():  # today's checks, on each site's own config
        try:
            derived = group_config(cfg, g.name, member)
            check_sync(derived.role, member, derived.peers)
            check_witness(derived)
            check_peerlink_auth(derived)
            check_failover_secret(derived)
        except ConfigError as e:
            raise ConfigError(f"{where}, site {member}: {e}") from None


def check_shared_site(cfg: NodeConfig, site: str) -> None:
    """The groups ``site`` is in use ports of their own there, and volume names of
    their own (clients name exports by volume)."""
    ports: dict[int, str] = {}
    volumes: dict[str, str] = {}
    if any(g.ports.peerlink is None for g in cfg.groups):
        ports[cfg.peerlink.listen_port] = ("peerlink.listen's port, the shared port of the "
                                           "groups without ports.peerlink")
    for g in groups_of(cfg, site):
        i = cfg.groups.index(g)
        for key, port in g.ports.named():
            if port in ports:
                raise ConfigError(f"groups[{i}].ports.{key} {port} is also {ports[port]} on "
                                  f"site {site}: groups that share a site need ports of "
                                  "their own")
            ports[port] = f"groups[{i}].ports.{key}"
        for v in g.volumes:
            if v.name in volumes:
                raise ConfigError(f"volume {v.name} is in groups {volumes[v.name]} and "
                                  f"{g.name}, which share site {site}: volume names are "
                                  "unique on a site (clients name exports by volume)")
            volumes[v.name] = g.name


def groups_of(cfg: NodeConfig, site: str | None = None) -> tuple[GroupConfig, ...]:
    """The groups ``site`` (default: this node) is in, in config order."""
    site = cfg.name if site is None else site
    return tuple(g for g in cfg.groups if g.role_of(site) is not None)


def find_group(cfg: NodeConfig, group: str) -> GroupConfig:
    g = next((x for x in cfg.groups if x.name == group), None)
    if g is None:
        known = ", ".join(x.name for x in cfg.groups)
        raise ConfigError(f"no group {group!r} in the config" + (
            f" (groups: {known})" if known else " (it has no groups)"))
    return g


def group_config(cfg: NodeConfig, group: str, site: str | None = None) -> NodeConfig:
    """Group ``group`` as site ``site`` (default: this node) runs it: an ordinary node
    config whose role is the site's role in the group, whose peers are the group's other
    sites (on the group's ports) and whose data_dir is ``<data_dir>/groups/<group>``.
    Everything below the config (node state, lease, nbdkit, peerlink, the node core,
    status) works on it unchanged, in processes of the group's own."""
    g = find_group(cfg, group)
    site = cfg.name if site is None else site
    role = g.role_of(site)
    if role is None:
        raise ConfigError(f"site {site} is not in group {g.name} (its sites: "
                          + ", ".join(s for s, _ in g.members()) + ")")
    by_name = {x.name: x for x in cfg.sites}
    # The options of the link to a site, as whoever ships to it uses them; sync only
    # between the main-site pair (check_sync), never on a DR site's or witness's side.
    links = {r.site: r.get() if role in MAIN_ROLES and g.role_of(r.site) in MAIN_ROLES
             else {**r.get(), "mode": PeerMode.ASYNC} for r in g.replicas}
    shared = g.ports.peerlink is None  # on every site's shared port, routed by name
    peers = tuple(PeerConfig(name=name, role=r, address=by_name[name].address,
                             port=peers_port(cfg, g),
                             heartbeat_addresses=by_name[name].heartbeat_addresses,
                             route=g.name if shared else None, **links.get(name, {}))
                  for name, r in g.members() if name != site)
    witness = role is Role.WITNESS
    service = ServiceConfig()
    if not witness:
        dns = g.service.dns
        service = replace(g.service, dns=None if dns is None else replace(
            dns, address=by_name[site].address))
    metrics = MetricsConfig(None if g.ports.metrics is None
                            else (by_name[site].address, g.ports.metrics))
    return replace(
        cfg, name=site, role=role, data_dir=cfg.data_dir / "groups" / g.name, peers=peers,
        service=service, volumes=() if witness else g.volumes, snapshots=g.snapshots,
        nbd=replace(cfg.nbd, listen=(Listen("tcp", host="0.0.0.0", port=g.ports.nbd),)),
        peerlink=replace(cfg.peerlink, listen_host=cfg.peerlink.listen_host if shared
                         else "0.0.0.0", listen_port=peers_port(cfg, g),
                         topology=g.topology, front=shared),
        failover=replace(g.failover or cfg.failover, heartbeat_port=g.ports.heartbeat),
        metrics=metrics, iscsi=_group_iscsi(cfg.iscsi, g, witness), sites=(), groups=(),
        group=g.name,
        # Under etcd each group is decided on its own key: the group's name.
        coordinator=replace(cfg.coordinator, group=g.name))


def _group_iscsi(node: IscsiConfig, g: GroupConfig, witness: bool) -> IscsiConfig:
    """The node's bridge settings (IQN, CHAP, initiators) on the group's own portal port,
    tgtd control socket and run dir, so that each group's primary runs a tgtd of its own;
    none for a group without ports.iscsi or on its witness."""
    if not node.enabled or g.ports.iscsi is None or witness:
        return IscsiConfig()
    return replace(node, portal_port=g.ports.iscsi, control_port=g.ports.iscsi,
                   run_dir=node.run_dir / g.name)


def peers_port(cfg: NodeConfig, g: GroupConfig) -> int:
    """The port group ``g``'s replication arrives at: its own, or the node's shared one."""
    return cfg.peerlink.listen_port if g.ports.peerlink is None else g.ports.peerlink


def front_routes(cfg: NodeConfig) -> dict[str, Path]:
    """What the groups parent's front routes (peerlink/front.py): each group this node
    holds data of that has no peerlink port of its own, to its handoff socket."""
    return {g.name: handoff_path(cfg.data_dir / "groups" / g.name)
            for g in groups_of(cfg) if g.ports.peerlink is None
            and g.role_of(cfg.name) is not Role.WITNESS}


def check_peerlink_auth(cfg: NodeConfig) -> None:
    """Replication without a secret or TLS accepts anyone who reaches the port: only
    when the config says so (``peerlink.insecure: true``), never by omission."""
    pl = cfg.peerlink
    if cfg.peers and pl.secret_file is None and pl.tls is None and not pl.insecure:
        raise ConfigError(
            "peerlink has neither secret_file nor tls: any host that reaches this node's "
            "replication port could send it data or ask for its volumes; set "
            "peerlink.secret_file (or peerlink.tls), or peerlink.insecure: true to run "
            "replication unauthenticated")


def check_failover_secret(cfg: NodeConfig) -> None:
    """Automatic failover acts on heartbeats: they must be authenticated, and the
    shared secret is their key (TLS protects the replication links only)."""
    if cfg.failover.auto and cfg.peers and cfg.peerlink.secret_file is None \
            and cfg.coordinator.kind is CoordinatorKind.HEARTBEAT:
        raise ConfigError(
            "failover.auto needs peerlink.secret_file: heartbeats are authenticated with "
            "the shared secret (TLS protects only the replication links); set "
            "peerlink.secret_file, or failover.auto: false")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping naming a key twice (PyYAML keeps the last
    one silently: a second ``timeout:`` would replace the first without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` overridden by explicit keys is intended
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen.setdefault(key, line)
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it below
            if first is not None:
                raise ConfigError(f"duplicate key {key!r} at line {line} (first at line "
                                  f"{first}): YAML would silently keep only the last one")
        return super().construct_mapping(node, deep=deep)


def load_config(path: Path, files: bool = False) -> NodeConfig:
    """Read and validate ``path``; with ``files``, also the files it names
    (check_files), as `config check`, `serve`, `replicate` and the daemon do."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        cfg = parse_config(raw, path)
        if files:
            check_files(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def check_config_files(cfg: NodeConfig) -> None:
    """check_files, with the config file's path in front of the message."""
    try:
        check_files(cfg)
    except ConfigError as e:
        raise ConfigError(f"{cfg.source}: {e}" if cfg.source else str(e)) from None


def check_files(cfg: NodeConfig) -> None:
    """The files the config names exist; those holding secrets are regular files that
    only their owner (root or the user running nbdgw) can read, and hold a secret of
    an acceptable length.  Certificates and CA files may be world-readable."""
    pl = cfg.peerlink
    for key, path in (("secret_file", pl.secret_file),
                      ("next_secret_file", pl.next_secret_file)):
        if path is None:
            continue
        data = _secret_file(path, f"peerlink.{key}")
        from peerlink.auth import MIN_SECRET

        if len(data.strip()) < MIN_SECRET:
            raise ConfigError(f"peerlink.{key} {path}: the secret must be at "
                              f"least {MIN_SECRET} bytes, got {len(data.strip())}")
    if pl.tls is not None:
        _public_file(pl.tls.cert_file, "peerlink.tls.cert_file")
        _secret_file(pl.tls.key_file, "peerlink.tls.key_file")
        _public_file(pl.tls.ca_file, "peerlink.tls.ca_file")
    tls = cfg.nbd.tls
    if tls.psk_file is not None:
        _secret_file(tls.psk_file, "nbd.tls.psk_file")
    if tls.certificates_dir is not None:
        d = tls.certificates_dir
        if not d.is_dir():
            raise ConfigError(f"nbd.tls.certificates_dir {d} "
                              + ("is not a directory" if d.exists() else "does not exist"))
        where = f"nbd.tls.certificates_dir {d}:"
        _public_file(d / "server-cert.pem", where)
        _secret_file(d / "server-key.pem", where)
    _coordinator_files(cfg.coordinator)
    _check_dns_keys(cfg)
    for chap, where in ((cfg.iscsi.chap, "iscsi.chap"),
                        (cfg.iscsi.mutual_chap, "iscsi.mutual_chap")):
        if chap is not None:
            _secret_file(chap.secret_file, f"{where}.secret_file")
            from iscsi_bridge.bridge import read_secret
            from iscsi_bridge.errors import BridgeError

            try:
                read_secret(chap, where)
            except BridgeError as e:
                raise ConfigError(str(e)) from None


def _check_dns_keys(cfg: NodeConfig) -> None:
    """The TSIG key files of service.dns and of each group's."""
    names = [("service.dns", cfg.service.dns)] + [
        (f"groups[{i}].service.dns", g.service.dns) for i, g in enumerate(cfg.groups)]
    for where, dns in names:
        if dns is None:
            continue
        _secret_file(dns.key_file, f"{where}.key_file")
        try:
            load_key(dns.key_file)
        except DnsError as e:
            raise ConfigError(str(e)) from None


def _coordinator_files(co: CoordinatorConfig) -> None:
    """etcd's CA and client certificate may be read by anyone; its key by its owner only."""
    for key, path in (("ca_file", co.ca_file), ("cert_file", co.cert_file)):
        if path is not None:
            _public_file(path, f"coordinator.{key}")
    if co.key_file is not None:
        _secret_file(co.key_file, "coordinator.key_file")


def _public_file(path: Path, where: str) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{where} {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read {where} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{where} {path} is not a regular file")
    return st


def _secret_file(path: Path, where: str) -> bytes:
    """A file holding a key or secret: owned by root or us, mode 0600 or stricter."""
    st = _public_file(path, where)
    if st.st_mode & 0o077:
        raise ConfigError(f"{where} {path} is accessible by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{where} {path} is owned by uid {st.st_uid}: it must belong to "
                          f"root or to the user running nbdgw (uid {os.geteuid()})")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {where} {path}: {e.strerror}") from None


def default_config() -> NodeConfig:
    return NodeConfig(nbd=NbdConfig(), volumes=(), source=None)


