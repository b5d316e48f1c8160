"""The `nbdgw` command line."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import structlog

from blockstore.errors import BlockstoreError, VolumeInUse
from blockstore.modes import make_dir
from blockstore.volume import (
    Volume,
    checksum_path,
    create_volume,
    delete_volume,
    find_volume,
    list_volumes,
    parse_size,
    volume_status,
)
from nbdgw_common import logs
from nbdgw_common.errors import GatewayError
from nbdgw_common.settings import describe
from nbdgw_common.signals import dump_stacks_on, relay_signals

from . import audit
from .config import (
    DEFAULT_CONFIG_PATH,
    TOP,
    NodeConfig,
    Role,
    TlsConfig,
    TlsMode,
    check_config_files,
    check_tls,
    default_config,
    group_config,
    groups_of,
    load_config,
    parse_cidr,
    parse_listen,
)
from .control import open_data_dir
from .serve import NbdServer, precheck_volumes, uri, warn_if_open

log = structlog.get_logger(component="cli")


class Ctx:
    def __init__(self, config_path: Path | None, group: str | None = None) -> None:
        self.config_path = config_path
        self.group = group  # --group / NBDGW_GROUP
        self.log_format = "auto"
        self._cfg: NodeConfig | None = None

    def node_config(self, files: bool = False) -> NodeConfig:
        """The config file as it is: with groups, every group of every site (what
        `daemon`, `witness`, `status` and `config check` read without --group)."""
        if self._cfg is None:
            if self.config_path is not None:
                self._cfg = load_config(self.config_path)
            elif DEFAULT_CONFIG_PATH.exists():
                self._cfg = load_config(DEFAULT_CONFIG_PATH)
            else:
                self._cfg = default_config()
        if files:
            check_config_files(self._cfg)
        return self._cfg

    def config(self, files: bool = False) -> NodeConfig:
        """The node config; with ``files``, the files it names are checked too (secret
        files, keys, certificates: what `config check`, serve, replicate and the daemon
        need; status and list commands do not read them).  On a config with groups, the
        config of the group --group names (config.group_config): every command then acts
        on that group, in its own data_dir."""
        cfg = self.node_config(files)
        if not cfg.groups:
            if self.group is not None:
                raise GatewayError(f"--group {self.group}: the config "
                                   f"{cfg.source or '(defaults)'} has no groups")
            return cfg
        if self.group is None:
            raise GatewayError(f"node {cfg.name}'s config has groups: name one with --group "
                               f"GROUP (or NBDGW_GROUP=GROUP); this node is in "
                               f"{group_roles(cfg)}")
        return group_config(cfg, self.group)

    def data_dir(self, override: Path | None, must_exist: bool = True) -> Path:
        """--data-dir (made absolute already), else node.data_dir; one that does not exist
        is an error, except for the commands that create it."""
        dd = override if override is not None else self.config().data_dir
        if must_exist:
            existing_data_dir(dd)
        group = self.config().control.group
        if override is None and group is not None and os.geteuid() == 0:
            # control.group members read status from the start, not once a daemon ran.
            make_dir(dd, parents=True, exist_ok=True)
            open_data_dir(dd, group)
        return dd


def group_roles(cfg: NodeConfig) -> str:
    """``b1 (secondary), b2 (primary)``: this node's groups and its role in each."""
    return ", ".join(f"{g.name} ({g.role_of(cfg.name).value})"  # type: ignore[union-attr]
                     for g in groups_of(cfg)) or "no group"


def existing_data_dir(dd: Path) -> Path:
    if not dd.is_dir():
        raise GatewayError(f"data directory {dd} does not exist (check --data-dir or "
                           "node.data_dir; 'nbdgw volume create' makes it)")
    return dd


def _confirm(yes: bool, question: str) -> None:
    """Ask before a destructive action unless --yes was given; stop if not confirmed."""
    if not yes and not click.confirm(question):
        _fail("not confirmed")


def _fail(msg: str, code: int = 1) -> None:
    click.echo(f"nbdgw: error: {msg}", err=True)
    sys.exit(code)


class Group(click.Group):
    """Turns nbdgw's own errors into one clear line and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (GatewayError, BlockstoreError) as e:
            _fail(str(e))
        except OSError as e:
            _fail(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        return None


def _absolute(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    # Relative to the current directory, made absolute once: nbdkit runs in /, and paths
    # in messages, logs and control sockets must mean the same everywhere.
    return None if value is None else Path(os.path.abspath(value))


data_dir_opt = click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                            callback=_absolute,
                            help="Data directory (default: node.data_dir from the config); "
                                 "a relative path is taken from the current directory.")


@click.group(cls=Group)
@click.version_option(package_name="nbdgw", prog_name="nbdgw", message="%(prog)s %(version)s")
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path), default=None,
              help=f"Node config file (default: {DEFAULT_CONFIG_PATH} if it exists).")
@click.option("--group", "group", envvar="NBDGW_GROUP", default=None, metavar="GROUP",
              help="On a config with groups: act on this volume group (env NBDGW_GROUP).")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), default="auto")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, group: str | None,
        log_format: str) -> None:
    """nbdgw: journaled, replicated block volumes over NBD and iSCSI."""
    logs.configure(log_format)
    ctx.obj = Ctx(config_path, group or None)
    ctx.obj.log_format = log_format


@cli.group(cls=Group)
def volume() -> None:
    """Create, list, delete, checksum and repair volumes."""


@volume.command("create")
@click.argument("name")
@click.option("--size", default=None, help="Size, e.g. 10G, 512M (default: from the config).")
@click.option("--replica", is_flag=True,
              help="Create a replica (Inconsistent until its initial sync; not servable).")
@data_dir_opt
@click.pass_obj
@audit.audited("volume create")
def volume_create(obj: Ctx, name: str, size: str | None, replica: bool,
                  data_dir: Path | None) -> None:
    """Create an empty (sparse) volume."""
    if data_dir is None and obj.config().role is Role.WITNESS:
        _fail(f"node {obj.config().name} is a witness: it holds no data (no volume in its "
              "data_dir)")
    if size is None:
        declared = obj.config().volume(name)
        if declared is None:
            _fail(f"--size is required (volume {name} is not declared in the config)")
            return
        nbytes = declared.size
    else:
        nbytes = parse_size(size)
    if data_dir is None and obj.group is not None:
        _unique_on_site(obj.node_config(), obj.group, name)
    info = create_volume(obj.data_dir(data_dir, must_exist=False), name, nbytes,
                         replica=replica)
    click.echo(f"created {'replica ' if replica else ''}volume {info.name}: "
               f"{info.size} bytes in {info.path}")


def _unique_on_site(node: NodeConfig, group: str, name: str) -> None:
    """Clients name exports by volume: a volume name is used by one group of a site."""
    for g in groups_of(node):
        if g.name == group:
            continue
        dd = group_config(node, g.name).data_dir
        held = {v.name for v in list_volumes(dd)} if (dd / "volumes").is_dir() else set()
        if name in held or any(v.name == name for v in g.volumes):
            _fail(f"volume {name} belongs to group {g.name} on this site ({node.name}): "
                  "volume names are unique on a site (clients name exports by volume)")


@volume.command("list")
@data_dir_opt
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def volume_list(obj: Ctx, data_dir: Path | None, as_json: bool) -> None:
    """List volumes: size, allocation, journal, and whether each is in use."""
    rows = [volume_status(info) for info in list_volumes(obj.data_dir(data_dir))]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no volumes")
        return
    click.echo(f"{'NAME':<24} {'SIZE':>10} {'ALLOCATED':>10} {'JOURNAL':>10} "
               f"{'LAST SEQ':>10}  STATE")
    for r in rows:
        state = "in use" if r["in_use"] else ("idle" if r["clean"] else "idle, unclean")
        if r["role"] == "replica":
            state = f"replica ({'inconsistent' if r['inconsistent'] else 'consistent'}, " \
                    f"upstream seq {r['upstream_seq']}), {state}"
        if r["resync_full"] or r["resync_extents"]:
            state += (", full resync pending" if r["resync_full"]
                      else f", {r['resync_extents']} extents to resync")
        click.echo(f"{r['name']:<24} {_human(r['size']):>10} {_human(r['allocated_bytes']):>10} "
                   f"{_human(r['journal_bytes']):>10} {r['last_seq']:>10}  {state}")


def _human(n: int) -> str:
    """Binary units, as the size options take them (1.5G, 512M)."""
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


@volume.command("delete")
@click.argument("name")
@data_dir_opt
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
@audit.audited("volume delete")
def volume_delete(obj: Ctx, name: str, data_dir: Path | None, yes: bool) -> None:
    """Delete a volume and its journal.  A volume a running `nbdgw serve` or daemon
    serves is withdrawn from it first (refused while a client still uses it)."""
    from nbdgw_common.control_socket import ControlError, request

    dd = obj.data_dir(data_dir)
    info = find_volume(dd, name)
    _confirm(yes, f"delete volume {name} and all its data?")
    try:
        delete_volume(dd, name)
    except VolumeInUse:
        try:
            request(info.path, {"op": "withdraw"}, timeout=60)  # refusals raise, as is
        except ControlError as e:
            _fail(str(e))
        except OSError as e:
            _fail(f"volume {name} is in use and its server cannot be asked to let it go "
                  f"({e}): stop what uses it first")
        delete_volume(dd, name)
    click.echo(f"deleted volume {name}")


@volume.command("grow")
@click.argument("name")
@click.argument("size")
@data_dir_opt
@click.pass_obj
@audit.audited("volume grow")
def volume_grow(obj: Ctx, name: str, size: str, data_dir: Path | None) -> None:
    """Grow a volume to SIZE (on its primary; replicas follow through the journal).
    Works while it is served: NBD clients see the new size when they reconnect."""
    from blockstore.volume import is_replica
    from nbdgw_common.control_socket import ControlError, request

    dd = obj.data_dir(data_dir)
    info = find_volume(dd, name)
    new = parse_size(size)
    if is_replica(info):
        _fail(f"volume {name} is a replica: grow it on its primary (replicas follow "
              "through the journal)")
    try:
        vol = Volume.open(dd, name)
    except VolumeInUse:
        try:
            request(info.path, {"op": "grow", "volume": name, "size": new}, timeout=60)
        except ControlError as e:
            _fail(str(e))
        except OSError as e:
            _fail(f"volume {name} is in use and its server cannot be asked to grow it ({e})")
    else:
        try:
            vol.grow(new)
        finally:
            vol.close()
    click.echo(f"volume {name}: {_human(new)} ({new} bytes)")


@volume.command("checksum")
@click.argument("name")
@data_dir_opt
@click.pass_obj
def volume_checksum(obj: Ctx, name: str, data_dir: Path | None) -> None:
    """Print the SHA-256 of the volume's contents."""
    dd = obj.data_dir(data_dir)
    info = find_volume(dd, name)
    try:
        # Read-only when it was closed cleanly (nothing to recover, nothing written: a
        # full disk does not matter); after an unclean stop, opened to recover first.
        vol = Volume(info, readonly=True)
        if vol.recovery.unclean:
            vol.close()
            vol = Volume(info)
    except VolumeInUse:
        click.echo(f"nbdgw: warning: volume {name} is being served; the checksum is of "
                   "its contents at this moment", err=True)
        click.echo(f"{checksum_path(info.path / 'store', info.size)}  {name}")
        return
    try:
        digest = vol.checksum()
    finally:
        vol.close()
    click.echo(f"{digest}  {name}")


@volume.command("repair")
@click.argument("name")
@data_dir_opt
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
@audit.audited("volume repair")
def volume_repair(obj: Ctx, name: str, data_dir: Path | None, yes: bool) -> None:
    """Cut a corrupt journal at the bad record (an explicit operator decision)."""
    from blockstore.repair import repair_journal

    dd = obj.data_dir(data_dir)
    info = find_volume(dd, name)
    _confirm(yes, (
        f"cut the journal of {name} at its first bad record? Records after it are moved "
        "aside and the volume is marked for a full resync to its peers"))
    report = repair_journal(info)
    click.echo(report)


def _echo_clone_exports(data_dir: Path, uri_of: Callable[[str], str]) -> None:
    """An export line per clone of this node (writable; more appear as they come)."""
    from blockstore.clone import list_clones

    for c in list_clones(data_dir):
        click.echo(f"nbdgw: export {c.name}: {uri_of(c.name)} (clone of "
                   f"{c.volume}@{c.snapshot})")


def _replica_points(data_dir: Path, name: str) -> list[str]:
    """The CDP points of replica ``name`` exported (`nbdgw cdp export` there)."""
    from blockstore.cdp import read_exports

    try:
        return [e.partition("@")[2] for e in read_exports(find_volume(data_dir, name).path)]
    except (BlockstoreError, OSError):
        return []


@cli.command()
@data_dir_opt
@click.option("--listen", "listen", multiple=True,
              help="unix:PATH or tcp:HOST:PORT (repeatable; replaces nbd.listen).")
@click.option("--volume", "volumes", multiple=True, help="Serve only these volumes.")
@click.option("--read-only", is_flag=True, help="Serve every volume read-only.")
@click.option("--allow", multiple=True, help="Client address or CIDR allowed (repeatable).")
@click.option("--tls", "tls_mode", type=click.Choice(["off", "on", "require"]), default=None)
@click.option("--tls-psk", type=click.Path(path_type=Path), default=None,
              help="PSK file (nbdkit --tls-psk format: 'user:hexkey' lines).")
@click.option("--tls-certificates", type=click.Path(path_type=Path), default=None,
              help="Directory with ca-cert.pem, server-cert.pem, server-key.pem.")
@click.pass_obj
def serve(obj: Ctx, data_dir: Path | None, listen: tuple[str, ...], volumes: tuple[str, ...],
          read_only: bool, allow: tuple[str, ...], tls_mode: str | None,
          tls_psk: Path | None, tls_certificates: Path | None) -> None:
    """Serve the volumes over NBD in the foreground until SIGTERM or SIGINT."""
    cfg = obj.config()
    nbd_cfg = cfg.nbd
    if listen:
        nbd_cfg = replace(nbd_cfg, listen=tuple(parse_listen(x, "--listen") for x in listen))
    if allow:
        nbd_cfg = replace(nbd_cfg, allow=tuple(parse_cidr(a, "--allow") for a in allow))
    if tls_mode or tls_psk or tls_certificates:
        t = nbd_cfg.tls
        mode = TlsMode(tls_mode) if tls_mode else (
            t.mode if t.mode is not TlsMode.OFF else TlsMode.REQUIRE)
        psk = tls_psk or (None if tls_certificates else t.psk_file)
        certs = tls_certificates or (None if tls_psk else t.certificates_dir)
        nbd_cfg = replace(nbd_cfg, tls=check_tls(TlsConfig(mode, psk, certs, t.verify_peer)))
    cfg = cfg.with_overrides(data_dir=data_dir, nbd=nbd_cfg)
    if cfg.role is Role.WITNESS:
        _fail(f"node {cfg.name} is a witness: it holds no data and serves nothing "
              "(run 'nbdgw witness')")
    check_config_files(cfg)  # the same checks as `config check`, with the flags applied
    existing_data_dir(cfg.data_dir)
    # Replicas (their receiver holds them): only their snapshots, read-only, REPLICA@SNAP.
    named = list(volumes) or [v.name for v in cfg.volumes]
    replicas = _replicas(cfg.data_dir, named)
    others = [n for n in named if n not in replicas]
    pre = precheck_volumes(cfg, others if named else None, all_readonly=read_only)
    for name, err in pre.failed.items():
        click.echo(f"nbdgw: error: volume {name} not served: {err}", err=True)
    if not pre.served and not replicas:
        _fail("no volume to serve" + ("" if pre.failed else
                                      f" in {cfg.data_dir} (create one with "
                                      "'nbdgw volume create NAME --size SIZE')"))
    # Without a volume named (here or in the config), volumes created while it runs are
    # served too, and deleted ones withdrawn.
    warn_if_open(cfg)
    server = NbdServer(cfg, pre.served + replicas, all_readonly=read_only,
                       discover=not volumes and not cfg.volumes)
    stop = threading.Event()
    relay_signals((signal.SIGTERM, signal.SIGINT), lambda _signum: stop.set())
    server.start()
    server.wait_ready()
    tls_on = cfg.nbd.tls.mode is not TlsMode.OFF
    for a in server.addresses:
        click.echo(f"nbdgw: listening on {a}")
    for name in pre.served:
        click.echo(f"nbdgw: export {name}: {uri(server.addresses[0], name, tls_on)}")
    _echo_replica_exports(cfg.data_dir, replicas, lambda e: uri(server.addresses[0], e, tls_on))
    _echo_clone_exports(cfg.data_dir, lambda e: uri(server.addresses[0], e, tls_on))
    sys.stdout.flush()
    while not stop.is_set() and server.poll() is None:
        stop.wait(0.2)
    if stop.is_set():
        click.echo("nbdgw: stopping (volumes are closed cleanly)")
    rc = server.stop()
    if not stop.is_set():
        _fail(f"nbdkit exited unexpectedly with status {rc}")


def _replicas(data_dir: Path, named: list[str]) -> list[str]:
    """The replicas among ``named`` (every replica in data_dir when none is named)."""
    from blockstore.volume import is_replica

    return [v.name for v in list_volumes(data_dir)
            if is_replica(v) and (not named or v.name in named)]


def _echo_replica_exports(data_dir: Path, replicas: list[str],
                          uri_of: Callable[[str], str]) -> None:
    """An export line per snapshot of each replica served (more appear as they come)."""
    from blockstore.snapshot import read_index

    for name in replicas:
        try:
            _shift, index = read_index(find_volume(data_dir, name).path / "snapshots/index")
            snaps = [index.snaps[i].name for i in index.order]
        except (BlockstoreError, OSError):
            snaps = []
        points = _replica_points(data_dir, name)
        for snap in [*snaps, *points]:
            click.echo(f"nbdgw: export {name}@{snap}: {uri_of(f'{name}@{snap}')} (read-only)")
        if not snaps and not points:
            click.echo(f"nbdgw: replica {name}: its snapshots are exported read-only as "
                       f"{name}@SNAPSHOT (none yet)")


@cli.command()
@data_dir_opt
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable (schema: gateway/status.py).")
@click.option("--watch", "watch_s", type=click.FloatRange(0.2, 3600), default=None,
              help="Again every N seconds: redrawn with progress bars on a terminal; "
                   "otherwise one block (text) or one JSON line (--json) each time.")
@click.pass_obj
def status(obj: Ctx, data_dir: Path | None, as_json: bool, watch_s: float | None) -> None:
    """Node, role, quorum; volumes (clients, snapshots); how far each peer trails."""
    from .status import node_report

    node = obj.node_config()
    if node.groups and obj.group is None:
        _status_of_groups(node, as_json, watch_s)
        return
    cfg = obj.config()
    dd = obj.data_dir(data_dir)
    if not as_json and sys.stdout.isatty():
        from rich.console import Console

        from . import statusview

        console = Console()
        if watch_s is None:
            console.print(statusview.render(node_report(cfg.name, dd, cfg)))
        else:
            statusview.watch(console, lambda: node_report(cfg.name, dd, cfg), watch_s)
        return
    if watch_s is None:
        _print_status(node_report(cfg.name, dd, cfg), as_json, indent=2)
        return
    # A pipe or a file: a report every watch_s seconds until the reader goes away
    # (`nbdgw status --watch 1 | head -3`) or Ctrl-C; JSON as one document per line.
    try:
        while True:
            _print_status(node_report(cfg.name, dd, cfg), as_json, indent=None)
            time.sleep(watch_s)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # The reader is gone: no traceback, and nothing left to flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _status_of_groups(node: NodeConfig, as_json: bool, watch_s: float | None) -> None:
    """`nbdgw status` on a config with groups, without --group: every group of this node,
    a section each.  `--json`: a list of ``{"group": G, "status": REPORT}`` (REPORT as
    `nbdgw --group G status --json` prints it, gateway/status.py's schema) or, for a
    group whose data directory does not exist yet, ``{"group": G, "error": TEXT}``."""
    from .status import node_report, render_text

    def reports() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for g in groups_of(node):
            cfg = group_config(node, g.name)
            if not cfg.data_dir.is_dir():  # never started, no volume created yet
                out.append({"group": g.name, "error": f"data directory {cfg.data_dir} "
                                                      "does not exist"})
                continue
            out.append({"group": g.name, "status": node_report(cfg.name, cfg.data_dir, cfg)})
        return out

    while True:
        rs = reports()
        if as_json:
            sys.stdout.write(json.dumps(rs, indent=None if watch_s else 2) + "\n")
        else:
            for r in rs:
                sys.stdout.write(f"group {r['group']}:\n")
                lines = [r["error"]] if "error" in r else render_text(r["status"])
                sys.stdout.write("".join(f"  {line}\n" for line in lines))
            if watch_s:
                sys.stdout.write("\n")
        sys.stdout.flush()
        if watch_s is None:
            return
        try:
            time.sleep(watch_s)
        except KeyboardInterrupt:
            return


def _print_status(report: dict[str, Any], as_json: bool, indent: int | None) -> None:
    from .status import render_text

    if as_json:
        sys.stdout.write(json.dumps(report, indent=indent) + "\n")
    else:
        sys.stdout.write("\n".join(render_text(report)) + "\n" + ("" if indent else "\n"))
    sys.stdout.flush()


@cli.command()
@data_dir_opt
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable (schema: gateway/health.py).")
@click.pass_obj
def health(obj: Ctx, data_dir: Path | None, as_json: bool) -> None:
    """Store health: the file system of data_dir and what the volumes hold of it (with
    groups and no --group: every group's, named GROUP/VOLUME), the MD array under it
    (mdstat, mdadm) and its disks (smartctl).  Exit status 0 when all is
    well, 1 with a warning, 2 with a critical problem (as monitoring plugins do)."""
    from . import health as health_mod

    # Without --group on a config with groups: the node (its file system once, every
    # group's volumes), as a monitoring check on the host wants it.
    node = obj.node_config()
    cfg = obj.config() if obj.group or not node.groups else node
    report = health_mod.check(cfg.with_overrides(data_dir=data_dir)).to_json()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for line in health_mod.render_text(report):
            click.echo(line)
    sys.exit({"ok": 0, "warning": 1, "critical": 2}[report["level"]])


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                              "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def peerlink(args: tuple[str, ...]) -> None:
    """Run one end of a replication link: `nbdgw peerlink receive|send --help`."""
    from peerlink.__main__ import main as peerlink_main

    sys.exit(peerlink_main(list(args) or ["--help"]))


@cli.group(cls=Group)
def fleet() -> None:
    """Every volume group of the fleet, from etcd (coordinator.kind etcd)."""


@fleet.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable.")
@click.pass_obj
def fleet_status(obj: Ctx, as_json: bool) -> None:
    """Each group's primary, its lease, epochs, outdated marks and members."""
    from .etcdclient import EtcdUnavailable
    from .fleet import fleet_status as report_of
    from .fleet import render

    try:
        report = report_of(obj.config())
    except EtcdUnavailable as e:
        raise GatewayError(f"fleet status: {e}") from None
    click.echo(json.dumps(report, indent=2) if as_json else render(report))


@fleet.command("events")
@click.option("--follow", is_flag=True, help="Go on with the changes as they happen.")
@click.option("--since", type=click.IntRange(min=1), default=None,
              help="From this etcd revision (default: the oldest etcd keeps; with "
                   "--follow, from now).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
@click.pass_obj
def fleet_events(obj: Ctx, follow: bool, since: int | None, as_json: bool) -> None:
    """What changed in the fleet: primaries taken, lost, handed over; outdated marks;
    member states (from etcd's history: see README "Growing past one trio")."""
    from .etcdclient import EtcdUnavailable
    from .fleet import Compacted, render_event
    from .fleet import fleet_events as events_of

    try:
        for e in events_of(obj.config(), since, follow):
            click.echo(json.dumps({"compacted": e.revision} if isinstance(e, Compacted)
                                  else e.as_dict()) if as_json else render_event(e))
            sys.stdout.flush()  # each event as it comes (--follow into a pipe)
    except EtcdUnavailable as e:
        raise GatewayError(f"fleet events: {e}") from None


@fleet.command("place")
@click.argument("group")
@click.option("--primary", required=True, help="The node that should be the primary.")
@click.option("--replicas", default="", help="The other nodes, comma-separated.")
@click.option("--timeout", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds the primary may take to drain.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable.")
@click.pass_obj
def fleet_place(obj: Ctx, group: str, primary: str, replicas: str, timeout: float,
                as_json: bool) -> None:
    """Record where GROUP should run and move its primary there (a switchover asked
    through etcd).  Adding or removing a node is a config change on that node: this
    says which, and exits 2 while one is needed (or while the group has no primary to
    move)."""
    from .etcdclient import EtcdUnavailable
    from .fleet import place, render_place

    try:
        report = place(obj.config(), group, primary,
                       [r for r in replicas.split(",") if r], timeout)
    except EtcdUnavailable as e:
        raise GatewayError(f"fleet place: {e}") from None
    click.echo(json.dumps(report, indent=2) if as_json else "\n".join(render_place(report)))
    needed = report["add_to_config"] or report["remove_from_config"]
    sys.exit(0 if report["placed"] and not needed else 2)


@cli.group(cls=Group)
def lab() -> None:
    """A three-site lab in network namespaces: primary main, secondary dc, DR dr (or
    witness wit with --witness)."""


lab_dir_opt = click.option("--dir", "lab_dir", type=click.Path(path_type=Path), required=True,
                           help="The lab's directory (site data, configs, logs, lab.json).")


@lab.command("up")
@lab_dir_opt
@click.option("--subnet", default="192.0.2.0/24", show_default=True,
              help="IPv4 subnet of the lab's bridge (a documentation range by default).")
@click.option("--size", default="256M", show_default=True, help="Size of volume v1.")
@click.option("--topology", type=click.Choice(["fanout", "cascade"]), default="fanout",
              show_default=True, help="fanout: main ships to dc and dr; cascade: main -> dc "
              "-> dr.")
@click.option("--mode", type=click.Choice(["async", "sync"]), default="async",
              show_default=True, help="Replication mode of the secondary dc.")
@click.option("--iscsi", is_flag=True, help="Every site runs the iSCSI bridge too (portal: "
              "the service address, port 3260; one target IQN).")
@click.option("--dns", is_flag=True, help="Clients in another subnet behind a router find "
              "the primary by the name db.nbdgw.lab, which a BIND server in the lab holds "
              "(RFC 2136 updates with TSIG) instead of a service address.")
@click.option("--witness", is_flag=True, help="A witness site wit (no data: heartbeats and "
              "votes only, `nbdgw witness`) instead of the DR site dr: a pair and a witness.")
@click.option("--branches", type=click.IntRange(1, 9), default=None, metavar="N",
              help="The fan-in shape of volume groups instead: N branch sites in subnets of "
              "their own, each primary of its group bN (volume vN, name bN.nbdgw.lab), the "
              "data centre dc holding every group's replica, dr fed by dc (or with "
              "--witness a witness wit), a router and the name server.")
@click.option("--coordinator", type=click.Choice(["heartbeat", "etcd"]), default="heartbeat",
              show_default=True, help="etcd: a three-member etcd cluster in namespaces of "
              "its own (etcd1..3) decides who is primary (coordinator.kind etcd).")
def lab_up(lab_dir: Path, subnet: str, size: str, topology: str, mode: str,
           iscsi: bool, dns: bool, witness: bool, branches: int | None,
           coordinator: str) -> None:
    """Build the namespaces and bridge, start every site, print the lab as JSON."""
    from . import lab as lab_mod

    click.echo(json.dumps(lab_mod.up(lab_dir, subnet, size, topology, mode, iscsi, dns,
                                     witness, branches or 0, coordinator), indent=2))


@lab.command("kill")
@click.argument("node")
@lab_dir_opt
def lab_kill(node: str, lab_dir: Path) -> None:
    """SIGKILL every process of NODE at once (a power cut); `dns`: the lab's name
    server (--dns), its zone files kept."""
    from . import lab as lab_mod

    click.echo(json.dumps(lab_mod.kill(lab_dir, node)))


@lab.command("start")
@click.argument("node")
@lab_dir_opt
def lab_start(node: str, lab_dir: Path) -> None:
    """Start NODE's processes again with the same arguments; wait until it is back
    (`dns`: the name server, on the records it held)."""
    from . import lab as lab_mod

    click.echo(json.dumps(lab_mod.start(lab_dir, node)))


@lab.command("down")
@lab_dir_opt
def lab_down(lab_dir: Path) -> None:
    """Stop everything, delete the namespaces and bridge; DIR's data is kept."""
    from . import lab as lab_mod

    result = lab_mod.down(lab_dir)
    click.echo(json.dumps(result))
    click.echo(f"nbdgw: lab {result['id']} is down; its data is left in "
               f"{result['data_left_in']} for inspection", err=True)


@cli.group(cls=Group)
def snapshot() -> None:
    """Take, list, delete and roll back to snapshots (served volumes too)."""


@snapshot.command("create")
@click.argument("volumes", nargs=-1, required=True)
@click.option("--name", default=None,
              help="Snapshot name (default: snap-<UTC time>). Several volumes: one "
                   "consistency group, taken at one instant.")
@data_dir_opt
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@audit.audited("snapshot create")
def snapshot_create(obj: Ctx, volumes: tuple[str, ...], name: str | None,
                    data_dir: Path | None, as_json: bool) -> None:
    """Take a snapshot of VOLUMES (O(1): nothing is copied until data changes)."""
    from . import snapshots

    rows = snapshots.create(obj.data_dir(data_dir), list(volumes), name)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"created snapshot {r['name']} of volume {r['volume']} (id {r['id']}, "
                   f"journal seq {r['seq']})" + (f", group {r['group']}" if r["group"] else ""))


@snapshot.command("list")
@click.argument("volume")
@data_dir_opt
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def snapshot_list(obj: Ctx, volume: str, data_dir: Path | None, as_json: bool) -> None:
    """List VOLUME's snapshots: time, name, bytes of changed data each holds."""
    import time as _time

    from . import snapshots

    rows = snapshots.listing(obj.data_dir(data_dir), volume)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no snapshots of volume {volume}")
        return
    click.echo(f"{'TIME (UTC)':<20} {'NAME':<32} {'HELD':>10} {'SEQ':>10}  GROUP")
    for r in rows:
        when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.gmtime(r["time"]))
        click.echo(f"{when:<20} {r['name']:<32} {_human(r['held_bytes']):>10} "
                   f"{r['seq']:>10}  {r['group'] or '-'}")


@cli.group(cls=Group)
def cdp() -> None:
    """Continuous data protection: the history window, any instant as a read-only export."""


@cdp.command("list")
@click.argument("volume")
@data_dir_opt
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def cdp_list(obj: Ctx, volume: str, data_dir: Path | None, as_json: bool) -> None:
    """VOLUME's history here: the window, its oldest point, the bytes held, and the
    consistency points (completed FLUSHes) with their times."""
    from . import cdp as cdp_ops

    w = cdp_ops.window(obj.data_dir(data_dir), volume)
    if as_json:
        click.echo(json.dumps(w, indent=2))
        return
    oldest = w["oldest_point"]
    click.echo(f"volume {volume}: window {w['window_seconds']:g} s, "
               f"{_human(w['bytes_held'])} held of {_human(w['max_bytes'])} "
               f"({len(w['bases'])} bases), oldest point "
               + (f"seq {oldest['seq']} at {oldest['time']}" if oldest else "none"))
    flushes = [p for p in w["points"] if p["flush"]]
    click.echo(f"{'TIME (UTC)':<26} {'SEQ':>12}  consistency points ({len(flushes)})")
    for p in flushes:
        click.echo(f"{p['time']:<26} {p['seq']:>12}")
    for e in w["exports"]:
        click.echo(f"exported: {e}")


@cdp.command("export")
@click.argument("volume")
@click.option("--at", "at", default=None,
              help="An instant (ISO 8601, UTC: 2026-12-02T10:15:03Z): the last FLUSH at "
                   "or before it.")
@click.option("--seq", type=int, default=None, help="A point's journal seq.")
@click.option("--before-last-flush", is_flag=True,
              help="The consistency point before the newest one.")
@data_dir_opt
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@audit.audited("cdp export")
def cdp_export(obj: Ctx, volume: str, at: str | None, seq: int | None,
               before_last_flush: bool, data_dir: Path | None, as_json: bool) -> None:
    """Export VOLUME as of a point, read-only: prints the NBD export name."""
    from . import cdp as cdp_ops

    r = cdp_ops.export(obj.data_dir(data_dir), volume, at, seq, before_last_flush)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(r["export"])
    click.echo(f"nbdgw: {r['export']} is volume {volume} at journal seq {r['seq']} "
               f"({'FLUSH' if r['flush'] else 'point'} at {r['time']}), read-only",
               err=True)


@cdp.command("restore")
@click.argument("volumes", nargs=-1, required=True)
@click.option("--at", "at", default=None,
              help="An instant (ISO 8601, UTC): the last FLUSH at or before it.")
@click.option("--seq", type=int, default=None, help="A point's journal seq.")
@click.option("--before-last-flush", is_flag=True,
              help="The consistency point before the newest one.")
@click.option("--snapshot", default=None,
              help="Name of the snapshot keeping the state before (default "
                   "pre-restore-<UTC time>).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@data_dir_opt
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@audit.audited("cdp restore")
def cdp_restore(obj: Ctx, volumes: tuple[str, ...], at: str | None, seq: int | None,
                before_last_flush: bool, snapshot: str | None, yes: bool,
                data_dir: Path | None, as_json: bool) -> None:
    """Roll VOLUMES back to a point of their history (through the journal: replicas
    follow; the state before is kept as a snapshot; all or nothing across a crash).
    Several volumes: one consistency group, each to its last FLUSH at or before --at."""
    from . import cdp as cdp_ops

    dd = obj.data_dir(data_dir)
    if len(volumes) > 1:
        if at is None or seq is not None or before_last_flush:
            raise click.UsageError("a consistency group is restored to one instant: "
                                   "--at only")
        _confirm(yes, f"roll volumes {', '.join(volumes)} back to {at}? Clients see the "
                      "data change under them (unmount first)")
        rows = cdp_ops.restore_group(dd, list(volumes), at, snapshot)
    else:
        point = cdp_ops.export_point(dd, volumes[0], at, seq, before_last_flush)
        _confirm(yes, f"roll volume {volumes[0]} back to seq {point['seq']} "
                      f"({point['time']})? Clients see the data change under them "
                      "(unmount first)")
        rows = [cdp_ops.restore(dd, volumes[0], None, point["seq"], False, snapshot)]
    if as_json:
        click.echo(json.dumps(rows if len(volumes) > 1 else rows[0], indent=2))
        return
    for r in rows:
        click.echo(f"restored volume {r['volume']} to seq {r['seq']} ({r['time']}), "
                   f"{_human(r['bytes_written'])} written; the state before is snapshot "
                   f"{r['snapshot']}")


@cdp.command("unexport")
@click.argument("volume")
@click.argument("name")
@data_dir_opt
@click.pass_obj
@audit.audited("cdp unexport")
def cdp_unexport(obj: Ctx, volume: str, name: str, data_dir: Path | None) -> None:
    """Stop offering point export NAME (VOLUME@POINT) to new clients."""
    from . import cdp as cdp_ops

    if not cdp_ops.unexport(obj.data_dir(data_dir), volume, name):
        _fail(f"{name} is not exported")
    click.echo(f"unexported {name}")


@snapshot.command("delete")
@click.argument("volume")
@click.argument("name")
@data_dir_opt
@click.pass_obj
@audit.audited("snapshot delete")
def snapshot_delete(obj: Ctx, volume: str, name: str, data_dir: Path | None) -> None:
    """Delete snapshot NAME of VOLUME (every other snapshot stays exactly as it was)."""
    from . import snapshots

    snapshots.delete(obj.data_dir(data_dir), volume, name)
    click.echo(f"deleted snapshot {name} of volume {volume}")


@cli.group(cls=Group)
def clone() -> None:
    """Writable clones of snapshots, on any site: for mounting, reports, DR drills."""


@clone.command("create")
@click.argument("source", metavar="VOLUME@SNAPSHOT|VOLUME@POINT|VOLUME")
@click.argument("name")
@click.option("--at", "at", default=None,
              help="Of VOLUME as of an instant (ISO 8601, UTC): the last FLUSH at or "
                   "before it.")
@click.option("--seq", type=int, default=None, help="Of VOLUME at a point's journal seq.")
@click.option("--before-last-flush", is_flag=True,
              help="Of VOLUME at the consistency point before the newest one.")
@data_dir_opt
@click.pass_obj
@audit.audited("clone create")
def clone_create(obj: Ctx, source: str, name: str, at: str | None, seq: int | None,
                 before_last_flush: bool, data_dir: Path | None) -> None:
    """A writable clone NAME of a snapshot or of a CDP point (VOLUME@2026-12-02T10:15:03Z,
    VOLUME@seq-N as `nbdgw cdp export` prints them, or VOLUME with --at, --seq or
    --before-last-flush): it stores only its own writes, is never replicated, and is
    served as NBD export NAME (and an iSCSI LUN) by this node's nbdgw serve. The
    snapshot, or the point's history, stays while the clone exists."""
    from . import clones

    info = clones.create(obj.data_dir(data_dir), source, name, at, seq, before_last_flush)
    base = info.snapshot if info.point_seq is None else (
        f"{info.snapshot} (journal seq {info.point_seq})")
    click.echo(f"created clone {info.name} of {info.volume}@{base} "
               f"(export {info.name}, {_human(info.size)})")


@clone.command("list")
@data_dir_opt
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def clone_list(obj: Ctx, data_dir: Path | None, as_json: bool) -> None:
    """The clones of this node: base, size, and the space their writes take."""
    from blockstore.clone import list_clones

    rows = [c.to_json() for c in list_clones(obj.data_dir(data_dir))]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no clones")
        return
    click.echo(f"{'NAME':<24} {'BASE':<40} {'SIZE':>10} {'WRITTEN':>10}")
    for r in rows:
        click.echo(f"{r['name']:<24} {r['volume'] + '@' + r['snapshot']:<40} "
                   f"{_human(r['size']):>10} {_human(r['allocated_bytes']):>10}")


@clone.command("delete")
@click.argument("name")
@data_dir_opt
@click.pass_obj
@audit.audited("clone delete")
def clone_delete(obj: Ctx, name: str, data_dir: Path | None) -> None:
    """Delete clone NAME and everything written to it (refused while it is served)."""
    from blockstore.clone import delete_clone

    delete_clone(obj.data_dir(data_dir), name)
    click.echo(f"deleted clone {name}")


@snapshot.command("rollback")
@click.argument("volume")
@click.argument("name")
@data_dir_opt
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
@audit.audited("snapshot rollback")
def snapshot_rollback(obj: Ctx, volume: str, name: str, data_dir: Path | None,
                      yes: bool) -> None:
    """Make VOLUME's contents those of snapshot NAME (through the journal: replicas
    follow; other snapshots are kept)."""
    from . import snapshots

    dd = obj.data_dir(data_dir)
    if name not in {r["name"] for r in snapshots.listing(dd, volume)}:
        _fail(f"volume {volume} has no snapshot named {name!r}")
    _confirm(yes, f"roll volume {volume} back to snapshot {name}? Changes made since are "
                  "overwritten (snapshots taken since are kept)")
    from .statusview import progress

    with progress(f"rollback {volume} to {name}", None, sys.stderr.isatty()):
        n = snapshots.rollback(dd, volume, name)
    click.echo(f"rolled volume {volume} back to snapshot {name} ({_human(n)} written)")


@cli.group(cls=Group)
def config() -> None:
    """Check the node config; list its keys."""


@config.command("check")
@click.argument("path", type=click.Path(path_type=Path), required=False)
@click.pass_obj
def config_check(obj: Ctx, path: Path | None) -> None:
    """Validate a config file and print what it means."""
    cfg = load_config(path, files=True) if path else obj.node_config(files=True)
    if cfg.groups:
        click.echo(f"config ok: node {cfg.name}, data_dir {cfg.data_dir}, "
                   f"{len(cfg.groups)} group(s) of {len(cfg.sites)} site(s); this node is "
                   f"in {group_roles(cfg)}")
        for g in groups_of(cfg):
            d = group_config(cfg, g.name)
            sends = ", ".join(f"{p.name} ({p.mode.value})" for p in d.send_to()) or "nobody"
            shared = [("peerlink", f"{d.peerlink.listen_port} (shared)")] if d.peerlink.front \
                else []
            click.echo(f"group {g.name}: role {d.role.value}, data_dir {d.data_dir}, ports "
                       + ", ".join(f"{k} {v}" for k, v in [*shared, *g.ports.named()])
                       + f"; sends to {sends}; "
                       + f"{len(d.volumes)} volume(s) in the config")
        return
    click.echo(f"config ok: node {cfg.name}, data_dir {cfg.data_dir}, "
               f"{len(cfg.volumes)} volume(s), listen "
               + ", ".join(str(x) for x in cfg.nbd.listen))
    if cfg.peers:
        sends = ", ".join(f"{p.name} ({p.mode.value})" for p in cfg.send_to()) or "nobody"
        click.echo(f"role {cfg.role.value}, {cfg.peerlink.topology.value}: sends to {sends}"
                   + (f"; receives on {cfg.peerlink.listen_host}:{cfg.peerlink.listen_port}"
                      if cfg.receives() else ""))


@config.command("keys")
def config_keys() -> None:
    """Every config key: its type and range, default and meaning (from the declarations
    in the code; examples/nbdgw.yaml explains them at length)."""
    for line in describe(TOP):
        click.echo(line)


@cli.command()
@click.pass_obj
def replicate(obj: Ctx) -> None:
    """Run this node's replication links (peerlink) from the config, in the foreground.

    Senders for the peers the node's role and topology name, receivers for its replica
    volumes, and the sync gate for synchronous peers.  `nbdgw daemon` runs this for you.
    """
    import asyncio

    import uvloop

    from . import nodestate
    from .replication import Replication

    if os.environ.get("NBDGW_DIE_WITH_PARENT"):
        die_with_parent()
    cfg = nodestate.effective_config(obj.config(files=True))
    _log_group(cfg)
    rep = Replication(cfg)
    if not rep.plan.senders and not rep.plan.receivers:
        _fail(f"nothing to replicate on node {cfg.name} (role {cfg.role.value}, "
              f"{len(cfg.peers)} peer(s) in the config)")

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await rep.run(stop)

    sys.exit(uvloop.run(main()))


@cli.command()
@click.argument("volume_name", metavar="VOLUME")
@click.option("--peer", required=True, help="The peer to compare with (a peers[].name).")
@click.option("--no-resync", is_flag=True, help="Only report; do not resync what differs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--timeout", type=float, default=3600.0, show_default=True,
              help="Seconds to wait for the comparison and the resync.")
@data_dir_opt
@click.pass_obj
def verify(obj: Ctx, volume_name: str, peer: str, no_resync: bool, as_json: bool,
           timeout: float, data_dir: Path | None) -> None:
    """Compare VOLUME with its replica on PEER extent by extent, while writes go on.

    Runs in this node's replication process (`nbdgw daemon` or `nbdgw replicate` must be
    running).  Differing extents are listed and resynced (unless --no-resync); exit
    status 0 when the replica matches or was repaired, 3 when it differs and was not.
    """
    from .statusview import progress
    from .verify import run_verify

    with progress(f"verify {volume_name} against {peer}", None,
                  sys.stderr.isatty() and not as_json) as update:
        report = run_verify(obj.data_dir(data_dir), volume_name, peer, not no_resync,
                            timeout, update)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for line in report_lines(report):
            click.echo(line)
    if report["differing"] and not report.get("resynced"):
        sys.exit(3)


def report_lines(r: dict[str, Any]) -> list[str]:
    size = r["extent_bytes"]
    out = [f"verify {r['volume']} against {r['peer']}: {r['extents']} extents of "
           f"{_human(size)} compared in {r['seconds']} s, {len(r['differing'])} differ"]
    for e in r["differing"][:20]:
        out.append(f"  differs: bytes {e * size}..{(e + 1) * size - 1}")
    if len(r["differing"]) > 20:
        out.append(f"  ... and {len(r['differing']) - 20} more")
    if r["unverified"]:
        out.append(f"  {len(r['unverified'])} extent(s) were written during every one of "
                   f"{r['rounds']} comparisons and could not be verified; run verify again")
    if r.get("resynced"):
        out.append(f"  resynced {len(r['differing'])} extent(s); the replica now matches")
    elif r["differing"]:
        out.append("  not resynced (--no-resync)")
    return out


@cli.command()
@click.option("--site", required=True, help="The site to promote: this node's name.")
@click.option("--force", is_flag=True,
              help="Promote even though main-site nodes are still heard (they are told of "
                   "the newer epoch and stop serving). Never promotes an Inconsistent "
                   "replica.")
@click.pass_obj
def promote(obj: Ctx, site: str, force: bool) -> None:
    """Promote this site (the DR site, the day the main site is lost) to primary.

    Asks the running daemon, which refuses with the exact reason while a main-site node
    is heard (unless --force) or a replica is Inconsistent (always).  Recorded in the
    audit log.
    """
    cfg = obj.config()
    if site != cfg.name:
        _fail(f"--site {site}: this is node {cfg.name}; run promote on the site to promote")
    reply = _ask_daemon(cfg, "promote", {"site": site, "force": force},
                        {"op": "promote", "force": force}, 150.0, label=f"promote {site}")
    click.echo(f"promoted {site}: primary at epoch {reply['epoch']}"
               + (" (forced: main site was heard)" if reply.get("main_site_heard") else ""))


def _ask_daemon(cfg: NodeConfig, action: str, args: dict[str, Any], req: dict[str, Any],
                timeout: float, label: str | None = None) -> dict[str, Any]:
    """One admin request to the local daemon, which records it in the audit log with its
    answer (and the user the kernel says asked); one that reaches no daemon is recorded
    as an error here (gateway/audit.py: by a root CLI only)."""
    from . import audit
    from .control import ask, control_path

    try:
        reply = ask(control_path(cfg.data_dir), {**req, "client": audit.declared_context()},
                    timeout, who="the daemon",
                    unreachable_hint="is `nbdgw daemon` running on this node?",
                    closed_hint="without an answer")
    except GatewayError as e:
        audit.record(cfg.data_dir, action, args, "error", str(e))
        raise
    if "error" in reply:
        _fail(f"{label or action}: {reply['error']}")
    if "audit_error" in reply:
        raise GatewayError(f"{label or action} done ({json.dumps(reply, sort_keys=True)}), "
                           "but the daemon could not write the audit log "
                           f"{cfg.data_dir / audit.FILE}: {reply['audit_error']}")
    return reply


@cli.command()
@click.option("--to", "target", required=True, help="The node that takes over (a peer).")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=30.0, show_default=True,
              help="Seconds the target may take to catch up while client I/O is held.")
@click.pass_obj
def switchover(obj: Ctx, target: str, timeout: float) -> None:
    """Planned switchover: hand the primary role to NODE with no acknowledged write lost.

    Run on the current primary.  Client I/O is held (a pause, not an error) while the
    target acknowledges every journal record durably; then this node stops serving and
    rejoins as a replica, and the target promotes and takes the service address.  If the
    target does not catch up within --timeout, nothing changes and I/O resumes.  If this
    node loses its primary role meanwhile (cut off from its peers, it fences itself), the
    switchover fails at once, saying so: I/O does not resume here.
    """
    cfg = obj.config()
    reply = _ask_daemon(cfg, "switchover", {"to": target, "timeout": timeout},
                        {"op": "switchover", "to": target, "timeout": timeout}, timeout + 90)
    click.echo(f"switched over from {reply['from']} to {reply['to']}: drained in "
               f"{reply['drain_s']:.3f} s, {reply['from']} is {reply['state']} now; "
               + ("the target serves" if reply["target_serving"] else
                  "the target has not reported serving yet (see 'nbdgw status')"))


@cli.command()
@click.option("--discard", required=True,
              help="The node whose writes since the split brain are discarded: this node, "
                   "or the other primary.")
@click.pass_obj
def resolve(obj: Ctx, discard: str) -> None:
    """Settle a split brain, on the node in split brain (`nbdgw status` says so).

    --discard THIS-NODE: its writes since the split are kept as snapshot
    diverged-<generation>, and it rejoins the other primary as a replica.
    --discard OTHER: this node serves again on a newer generation; OTHER keeps its
    writes as its own diverged snapshot and rejoins this node as a replica.
    """
    cfg = obj.config()
    reply = _ask_daemon(cfg, "resolve", {"discard": discard},
                        {"op": "resolve", "discard": discard}, 120.0)
    click.echo(f"resolved: {reply['discarded']}'s writes discarded (kept as its diverged "
               f"snapshot); {reply['discarded']} follows {reply['following']}")


@cli.command("audit")
@data_dir_opt
@click.option("--json", "as_json", is_flag=True)
@click.option("--verify", is_flag=True,
              help="Check the hash chain and the recorded end (exit status 1 and the first "
                   "bad line when it fails).")
@click.pass_obj
def audit_cmd(obj: Ctx, data_dir: Path | None, as_json: bool, verify: bool) -> None:
    """The audit log of admin actions on this node (root's: see `nbdgw audit --help`)."""
    from dataclasses import asdict

    from . import audit

    dd = obj.data_dir(data_dir)
    path = dd / audit.FILE
    try:
        v = audit.verify_file(dd)
        entries = audit.read(dd)
    except PermissionError:
        raise GatewayError(f"permission denied on {path}: only root reads the audit "
                           "log") from None
    if verify:
        if as_json:
            click.echo(json.dumps({"path": str(path), **asdict(v)}))
        if not v.ok:
            raise GatewayError(f"audit log {path} fails verification at line {v.bad_line}: "
                               f"{v.problem}")
        if not as_json:
            click.echo(f"audit log {path}: {v.entries} "
                       f"{'entry' if v.entries == 1 else 'entries'}, chain intact"
                       + (f"; {v.warning}" if v.warning else ""))
        return
    for e in entries:
        click.echo(json.dumps(e) if as_json else
                   f"{e.get('time')} {e.get('action')} {json.dumps(e.get('args'))} "
                   f"{e.get('outcome')}{': ' + e['detail'] if e.get('detail') else ''} by "
                   f"{e.get('user')} from {e.get('from')}")
    if not v.ok:
        click.echo(f"nbdgw: warning: audit log {path} fails verification at line "
                   f"{v.bad_line}: {v.problem} (nbdgw audit --verify)", err=True)


@cli.command()
@click.pass_obj
def daemon(obj: Ctx) -> None:
    """Run everything this node's role needs (nbdkit, peerlink), supervised, until
    SIGTERM.  This is what the systemd unit runs."""
    fmt = "json" if obj.log_format == "auto" else obj.log_format
    _run_daemon(obj, fmt, witness=False)


def _run_daemon(obj: Ctx, fmt: str, witness: bool) -> None:
    """The node daemon of a config of today's format or of one group (--group); on a
    config with groups and no --group, the parent that runs one per group of the node."""
    from .daemon import Daemon, GroupsDaemon

    node = obj.node_config(files=True)
    if node.groups and obj.group is None:
        sys.exit(GroupsDaemon(node, obj.config_path, fmt).run())
    cfg = obj.config()
    if witness and cfg.role is not Role.WITNESS:
        _fail(f"node {cfg.name} is {cfg.role.value}, not a witness"
              + (f" of group {cfg.group}" if cfg.group else " (node.role: witness)")
              + "; run 'nbdgw daemon'")
    if os.environ.get("NBDGW_DIE_WITH_PARENT"):  # a group's daemon, under GroupsDaemon
        die_with_parent()
    _log_group(cfg)
    sys.exit(Daemon(cfg, obj.config_path, fmt).run())


def _log_group(cfg: NodeConfig) -> None:
    """A group's processes (its daemon, its peerlink) say which group in every line."""
    if cfg.group is not None:
        structlog.contextvars.bind_contextvars(group=cfg.group)


@cli.command()
@click.pass_obj
def witness(obj: Ctx) -> None:
    """Run this node as the witness of a pair (node.role: witness), until SIGTERM.

    The daemon of a node that holds no data: heartbeats, votes, outdated marks and the
    control socket; no volume, nbdkit, peerlink or iSCSI.  The same as `nbdgw daemon`,
    but refuses a config whose node.role is not witness.  On a config with groups: with
    --group, the witness of that group; without, the same parent as `nbdgw daemon`
    (one process per group of this node)."""
    fmt = "json" if obj.log_format == "auto" else obj.log_format
    _run_daemon(obj, fmt, witness=True)


def die_with_parent() -> None:
    """SIGTERM this process when its parent (the daemon) dies, even by SIGKILL."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:
        sys.exit("nbdgw: the daemon that started this process is gone")


@cli.group(cls=Group)
def iscsi() -> None:
    """The iSCSI bridge: the volumes to iSCSI initiators through tgtd (iscsi: section)."""


def _nbd_uri_for(cfg: NodeConfig, nbd_socket: Path | None) -> Any:
    """How a FUSE server over NBD (iscsi.fuse nbdgw, nbdfuse) reaches the NBD server:
    --nbd-socket, else nbd.listen's first address."""
    if nbd_socket is not None:
        sock = str(nbd_socket)
        return lambda export: f"nbd+unix:///{export}?socket={sock}"
    unix = [a for a in cfg.nbd.listen if a.kind == "unix"]
    if unix:
        return lambda export: f"nbd+unix:///{export}?socket={unix[0].path}"
    if cfg.nbd.tls.mode is not TlsMode.OFF:
        _fail("the iSCSI bridge connects to NBD without TLS: add a unix: address to "
              "nbd.listen or give --nbd-socket")
    a = cfg.nbd.listen[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(a.host, a.host)
    host = f"[{host}]" if ":" in host else host
    return lambda export: f"nbd://{host}:{a.port}/{export}"


def _clone_exports(data_dir: Path, names: tuple[str, ...]) -> list[Any]:
    """`iscsi serve --clone`: the clones as writable exports (each must exist)."""
    from blockstore.clone import find_clone
    from iscsi_bridge import Export

    for name in names:
        if find_clone(data_dir, name) is None:
            _fail(f"--clone {name}: no clone named {name} in {data_dir}")
    return [Export(n) for n in names]


@iscsi.command("serve")
@data_dir_opt
@click.option("--nbd-socket", type=click.Path(path_type=Path), default=None,
              help="Unix socket of the running `nbdgw serve` (default: from nbd.listen).")
@click.option("--volume", "volumes", multiple=True, help="Export only these volumes.")
@click.option("--snapshot", "snapshots", multiple=True, metavar="VOLUME@SNAP",
              help="Also export this snapshot or CDP point export (`nbdgw cdp export`), "
                   "read-only (a replica's too: on a secondary or DR node, served by "
                   "`nbdgw serve` there).")
@click.option("--clone", "clone_names", multiple=True, metavar="NAME",
              help="Also export this clone, writable.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=5.0, show_default=True,
              help="Seconds between reconciles (repairs a restarted tgtd or a lost target).")
@click.pass_obj
def iscsi_serve(obj: Ctx, data_dir: Path | None, nbd_socket: Path | None,
                volumes: tuple[str, ...], snapshots: tuple[str, ...],
                clone_names: tuple[str, ...], interval: float) -> None:
    """Serve the volumes over iSCSI in the foreground until SIGTERM or SIGINT."""
    from iscsi_bridge import Bridge, Export

    from .exports import exports_from_config

    cfg = obj.config().with_overrides(data_dir=data_dir)
    if not cfg.iscsi.enabled:
        _fail("iscsi is not enabled in the config (set iscsi.enabled: true and iscsi.iqn)")
    exports = exports_from_config(cfg)
    if volumes:
        exports = [e for e in exports if e.name in volumes]
    for name in snapshots:
        if not Export(name).is_snapshot:
            _fail(f"--snapshot {name}: expected VOLUME@SNAP")
        exports.append(Export(name, read_only=True))
    exports += _clone_exports(cfg.data_dir, clone_names)
    if not exports:
        _fail(f"no volume to export over iSCSI in {cfg.data_dir}")
    bridge = Bridge(cfg.iscsi, _nbd_uri_for(cfg, nbd_socket), data_dir=cfg.data_dir)
    stop = threading.Event()
    relay_signals((signal.SIGTERM, signal.SIGINT), lambda _signum: stop.set())
    try:
        report = bridge.reconcile(exports)
        for name, err in report.failed.items():
            click.echo(f"nbdgw: error: volume {name} not exported over iSCSI: {err}", err=True)
        click.echo(f"nbdgw: iscsi portal {cfg.iscsi.portal}")
        for t in bridge.plan(exports)[0].values():
            if t.export.name not in report.failed:
                click.echo(f"nbdgw: iscsi target {t.export.name}: "
                           f"iscsi://{cfg.iscsi.portal}/{t.iqn}/1")
        sys.stdout.flush()
        while not stop.wait(interval):
            try:
                bridge.reconcile(exports)
            except GatewayError as e:  # keep serving what works; say what does not
                log.error("iscsi_reconcile_failed", error=str(e))
    finally:
        click.echo("nbdgw: stopping the iSCSI bridge (tgtadm --op delete --mode system)")
        bridge.stop()


@iscsi.command("status")
@data_dir_opt
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def iscsi_status(obj: Ctx, data_dir: Path | None, as_json: bool) -> None:
    """tgtd's targets: LUN backing file, identity, ACL, CHAP and sessions.

    Needs only tgtd's control port (iscsi.control_port, default 3260): it works without
    a config and without iscsi.iqn; --data-dir is accepted like everywhere else."""
    from iscsi_bridge import Bridge

    cfg = obj.config().with_overrides(data_dir=data_dir)
    report = Bridge(cfg.iscsi, lambda e: "", data_dir=cfg.data_dir).status()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if report["tgtd"] == "down":
        click.echo(f"tgtd: not running (control port {cfg.iscsi.control_port})")
        return
    click.echo(f"tgtd: pid {report['pid']}, portal {report['portal']}, "
               f"control port {report['control_port']}")
    targets: list[dict[str, Any]] = report["targets"]  # type: ignore[assignment]
    for t in targets:
        mode = "read-only" if t["read_only"] else "read-write"
        click.echo(f"{t['iqn']}  LUN 1 {mode}, serial {t['scsi_sn']}, "
                   f"{len(t['sessions'])} session(s), acl {','.join(t['acl'])}")


@iscsi.command("down")
@data_dir_opt
@click.pass_obj
def iscsi_down(obj: Ctx, data_dir: Path | None) -> None:
    """Stop the bridge's tgtd (delete system) and unmount its FUSE files.

    Needs tgtd's control port and run directory (iscsi.control_port, iscsi.run_dir;
    their defaults without a config) and, for mounts served by nbdkit (iscsi.fuse
    nbdkit), the data directory of the nbdkit serving them (--data-dir or node.data_dir):
    it then waits until nbdkit has let go of each export, so that a volume or snapshot
    can be deleted right after.  iscsi.iqn is not needed."""
    from iscsi_bridge import Bridge

    cfg = obj.config().with_overrides(data_dir=data_dir)
    Bridge(cfg.iscsi, lambda e: "", data_dir=cfg.data_dir).stop()
    click.echo("nbdgw: iscsi bridge stopped")


@cli.group()
def peer() -> None:
    """Pause, resume, disconnect or connect the replication link to one peer."""


def _peer_action(obj: Ctx, name: str, action: str) -> None:
    from peerlink import admin

    from .control import ask
    from .replication import gate_path

    cfg = obj.config()
    if cfg.peer(name) is None:
        _fail(f"{name!r} is not a peer of {cfg.name} (peers: "
              f"{', '.join(p.name for p in cfg.peers) or 'none'})")
    try:
        r = ask(gate_path(cfg.data_dir), {"op": "peer", "peer": name, "action": action}, 30,
                who="peerlink", unreachable_hint="", closed_hint="")
    except GatewayError:
        state = admin.apply(cfg.data_dir, name, action)  # applies when peerlink starts
        click.echo(f"peer {name}: {state} (recorded; replication is not running here)")
        return
    if not r.get("ok"):
        _fail(str(r.get("error")))
    links = ", ".join(r["links"]) or "no link from this node"
    click.echo(f"peer {name}: {r['state']} ({links})")


for _action, _help in (("pause", "Stop shipping to PEER (the link stays up; the journal "
                                 "buffers)."),
                       ("resume", "Ship to PEER again."),
                       ("disconnect", "Close the links to PEER; no reconnect until "
                                      "'connect'."),
                       ("connect", "Connect to PEER again.")):
    def _make(action: str, text: str) -> Any:
        @peer.command(action, help=text)
        @click.argument("name")
        @click.pass_obj
        @audit.audited(f"peer {action}")
        def cmd(obj: Ctx, name: str) -> None:
            _peer_action(obj, name, action)
        return cmd
    _make(_action, _help)


@cli.command("resync")
@click.argument("volume_name")
@click.option("--peer", "peer_name", required=True, help="the peer to resend to")
@click.option("--full", is_flag=True, required=True,
              help="resend every extent (the only kind an operator asks for)")
@data_dir_opt
@click.pass_obj
@audit.audited("resync")
def resync_cmd(obj: Ctx, volume_name: str, peer_name: str, full: bool,
               data_dir: Path | None) -> None:
    """Resend the whole volume to one peer (its next session resyncs every extent)."""
    from blockstore.peers import DIRTY_FULL, known_peers, write_dirty

    cfg = obj.config()
    if cfg.peer(peer_name) is None and not known_peers(
            find_volume(obj.data_dir(data_dir), volume_name)):
        _fail(f"{peer_name!r} is not a peer of {cfg.name}")
    info = find_volume(obj.data_dir(data_dir), volume_name)
    acked = known_peers(info).get(peer_name, 0)
    path = write_dirty(info, peer_name, reason=DIRTY_FULL, from_seq=acked + 1,
                       through_seq=acked + 1, shift=info.extent_shift, extents=[])
    click.echo(f"volume {volume_name}: full resync to {peer_name} requested ({path.name}); "
               "the link restarts and resends every extent")


@cli.command("events")
@data_dir_opt
@click.option("--now", "now_only", is_flag=True,
              help="print the current state and exit (do not follow)")
@click.option("--timeout", type=float, default=None,
              help="stop following after this many seconds (default: never)")
@click.pass_obj
def events_cmd(obj: Ctx, data_dir: Path | None, now_only: bool, timeout: float | None) -> None:
    """A stream of JSON lines, one per change (role, epoch, peer states, resync progress,
    split brain, snapshots, health), starting with the current state."""
    from . import events as ev

    d = obj.data_dir(data_dir)
    if not (d / "volumes").is_dir():
        _fail(f"{d} holds no nbdgw volumes (wrong --data-dir?)")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `nbdgw events | head` ends quietly
    following = ev.follow(d / "run", stop_after=timeout)  # opened first: nothing missed
    for e in ev.exists(ev.node_summary(d)):
        click.echo(json.dumps(e))
    if now_only:
        return
    sys.stdout.flush()
    for e in following:
        click.echo(json.dumps(e))
        sys.stdout.flush()


@cli.command()
@click.option("--product-only", is_flag=True,
              help="only what a node needs (not the tests and benchmarks)")
def doctor(product_only: bool) -> None:
    """Check that every external tool and driver is installed (names the package)."""
    from . import doctor as doc

    sys.exit(doc.main(["--product-only"] if product_only else []))


def main() -> None:
    dump_stacks_on()  # kill -USR2: every thread's stack in the log (a stuck process)
    cli(prog_name="nbdgw")


if __name__ == "__main__":
    main()
