"""The bridge: desired iSCSI targets in, tgtd made to match, idempotently.

Theory of operation.  `Bridge.reconcile(exports)` compares what tgtd should serve (one
target per NBD export, named from the config's IQN) with what it serves now, as
``tgtadm --op show`` reports it, and applies the difference:

1. tgtd not answering on our control port (never started, killed, crashed) -> start it;
   its targets and accounts are gone with it and are rebuilt below.
2. Targets tgtd has that are not wanted (volume deleted, role no longer primary,
   snapshot withdrawn) are deleted first, sessions and all, then their FUSE mounts.
3. Per wanted export: the FUSE mount is (re)started if it is not healthy; the
   target, its LUN 1 (rdwr, O_DIRECT, on the FUSE file), the LUN's identity and
   read-only flag, the initiator ACL and the CHAP bindings are created or corrected.
   A LUN whose open file is not the current mount's (its FUSE server restarted under
   it) is re-created.

Calling it again with the same input changes nothing.  Read-only is generic: an
`Export` with ``read_only=True`` gets a read-only FUSE mount and tgtd ``readonly=1``;
snapshots (``VOLUME@SNAP``) are always read-only.  `stop()` deletes every target and stops tgtd
with ``tgtadm --op delete --mode system``, then unmounts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from . import loop
from .errors import BridgeError, InvalidName
from .fuse import FuseMount
from .names import DISK_LUN, scsi_id, scsi_sn, split_export, target_iqn, target_tid
from .settings import ChapConfig, IscsiConfig
from .tgt import TargetState, Tgtd, private_run_dir

log = structlog.get_logger(component="iscsi")

VENDOR_ID = "NBDGW"
BSOFLAGS = "direct"
CHAP_MIN, CHAP_MAX = 12, 255


@dataclass(frozen=True)
class Export:
    """One NBD export to show as an iSCSI target: a volume, or ``VOLUME@SNAP``."""

    name: str
    read_only: bool = False

    @property
    def is_snapshot(self) -> bool:
        return split_export(self.name)[1] is not None


@dataclass(frozen=True)
class Target:
    """What one export should look like in tgtd."""

    export: Export
    iqn: str
    tid: int
    read_only: bool
    scsi_id: str
    scsi_sn: str


@dataclass
class Report:
    """What one reconcile did; empty lists mean tgtd already matched."""

    tgtd_started: bool = False
    created: list[str] = field(default_factory=list)  # target IQNs
    repaired: list[str] = field(default_factory=list)  # "<iqn>: <what>"
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # export -> error

    @property
    def changed(self) -> bool:
        return bool(self.tgtd_started or self.created or self.repaired or self.removed)


def read_secret(chap: ChapConfig, where: str) -> str:
    """The CHAP secret in ``chap.secret_file`` (one line), checked for length."""
    try:
        text = chap.secret_file.read_text()
    except OSError as e:
        raise BridgeError(f"cannot read {where}.secret_file {chap.secret_file}: "
                          f"{e.strerror}") from None
    secret = text.strip("\n")
    if not CHAP_MIN <= len(secret) <= CHAP_MAX or any(c.isspace() for c in secret):
        raise BridgeError(
            f"the CHAP secret in {chap.secret_file} ({where}.secret_file) must be "
            f"{CHAP_MIN} to {CHAP_MAX} characters without spaces (Windows initiators "
            "accept at most 16)")
    return secret


class Bridge:
    """tgtd + a FUSE file per export (served inside nbdkit, by nbdgw-fuse or nbdfuse),
    reconciled to a list of exports.

    ``nbd_uri(export)`` returns the NBD URI the FUSE server connects to for one export
    name, e.g. ``nbd+unix:///v1?socket=/run/nbdgw/nbd.sock`` (iscsi.fuse nbdgw and
    nbdfuse); with iscsi.fuse nbdkit the mounts are served by the nbdkit serving the
    volumes in ``data_dir``, through each volume's control socket.
    """

    def __init__(self, cfg: IscsiConfig, nbd_uri: Callable[[str], str],
                 route: str | None = None, data_dir: Path | None = None) -> None:
        self.cfg = cfg
        # Needed to name targets (plan, withdraw); status and stop only need tgtd's
        # control port and run_dir, so they work without it.
        self.base_iqn = cfg.iqn
        self.nbd_uri = nbd_uri
        self.data_dir = data_dir
        self.tgtd = Tgtd(cfg.control_port, cfg.portal, cfg.run_dir)
        self.adm = self.tgtd.adm
        self.mount_root = cfg.run_dir / "mnt"
        self.mounts: dict[str, FuseMount] = {}
        self._secrets_set: dict[str, str] = {}  # user -> secret, for this tgtd's pid
        self._tgtd_pid: int | None = None
        # "file": tgtd on the FUSE file itself (O_DIRECT; what the conformance suite
        # passes with).  "loop": tgtd on a direct-I/O loop device over it: writes overlap
        # (see loop.py), but tgtd's VERIFY, WRITE AND VERIFY, ORWRITE and odd-length
        # transfers use buffers that O_DIRECT on a block device refuses (EINVAL).
        self.route = route or cfg.route.value
        if self.route not in ("loop", "file"):
            raise BridgeError(f"unknown route {self.route!r} (loop or file)")
        if self.route == "loop" and not loop.available():
            raise BridgeError("iscsi.route is loop but this host cannot make loop devices "
                              f"({loop.LOOP_CONTROL} missing or not writable)")

    # -- desired state -------------------------------------------------------------

    def _base_iqn(self) -> str:
        if self.base_iqn is None:
            raise BridgeError("iscsi.iqn is not set")
        return self.base_iqn

    def plan(self, exports: Iterable[Export]) -> tuple[dict[int, Target], dict[str, str]]:
        """Targets by tid for ``exports``; exports that cannot be targets, with why."""
        targets: dict[int, Target] = {}
        failed: dict[str, str] = {}
        base = self._base_iqn()
        for e in exports:
            try:
                iqn = target_iqn(base, e.name)
            except InvalidName as err:
                failed[e.name] = str(err)
                continue
            tid = target_tid(iqn)
            same = next((t for t in targets.values() if t.iqn == iqn), None)
            if same is not None:
                failed[e.name] = (f"target name {iqn} is also {same.export.name}'s "
                                  "(IQNs ignore case)")
                continue
            if tid in targets:
                other = targets[tid].export.name
                failed[e.name] = (f"target id {tid} of {iqn} collides with {other}'s; "
                                  "rename one of them")
                continue
            ro = e.read_only or e.is_snapshot
            targets[tid] = Target(e, iqn, tid, ro, scsi_id(iqn, DISK_LUN),
                                  scsi_sn(iqn, DISK_LUN))
        return targets, failed

    def _acl(self) -> set[str]:
        acl = set(self.cfg.initiators) | set(self.cfg.allow)
        return acl or {"ALL"}

    def _secrets(self) -> dict[str, tuple[str, bool]]:
        """user -> (secret, outgoing) for the configured CHAP identities."""
        out: dict[str, tuple[str, bool]] = {}
        if self.cfg.chap is not None:
            out[self.cfg.chap.user] = (read_secret(self.cfg.chap, "iscsi.chap"), False)
        if self.cfg.mutual_chap is not None:
            secret = read_secret(self.cfg.mutual_chap, "iscsi.mutual_chap")
            if self.cfg.chap is not None and secret == out[self.cfg.chap.user][0]:
                raise BridgeError("iscsi.chap and iscsi.mutual_chap must use different "
                                  "secrets (initiators refuse a target that echoes theirs)")
            out[self.cfg.mutual_chap.user] = (secret, True)
        return out

    # -- reconcile -----------------------------------------------------------------

    def reconcile(self, exports: Iterable[Export]) -> Report:
        """Make tgtd serve exactly ``exports``; safe to call any number of times."""
        report = Report()
        targets, report.failed = self.plan(exports)
        for name, err in report.failed.items():
            log.error("iscsi_export_refused", export=name, error=err)
        secrets = self._secrets()
        private_run_dir(self.cfg.run_dir)

        if not self.adm.alive():
            self.tgtd.start()
            report.tgtd_started = True
        pid = self.tgtd.pid()
        if pid != self._tgtd_pid:  # a new tgtd knows none of our accounts
            self._secrets_set.clear()
            self._tgtd_pid = pid

        actual = self.adm.targets()
        for tid, t in actual.items():
            want = targets.get(tid)
            if want is None or want.iqn != t.name:
                self.adm.remove_target(t)
                report.removed.append(t.name)
                log.info("iscsi_target_removed", target=t.name, tid=tid)
        for name in set(self.mounts) - {t.export.name for t in targets.values()}:
            self._drop_mount(self.mounts.pop(name))
        for name in self._stray_mounts(targets):
            self._drop_mount(FuseMount(name, self.mount_root / name, "", True,
                                       self.cfg.fuse.value))

        portals = self.adm.portals()
        if self.cfg.portal not in portals:
            self.adm.new_portal(self.cfg.portal)
            report.repaired.append(f"portal {self.cfg.portal}")
        for p in portals - {self.cfg.portal}:
            self.adm.delete_portal(p)

        self._reconcile_accounts(secrets)
        actual = self.adm.targets()
        for tid, want in sorted(targets.items(), key=lambda kv: kv[1].iqn):
            try:
                self._reconcile_target(want, actual.get(tid), secrets, report)
            except BridgeError as err:
                report.failed[want.export.name] = str(err)
                log.error("iscsi_target_failed", target=want.iqn, error=str(err))
        if report.changed:
            log.info("iscsi_reconciled", created=report.created, repaired=report.repaired,
                     removed=report.removed, tgtd_started=report.tgtd_started)
        return report

    def _stray_mounts(self, targets: dict[int, Target]) -> list[str]:
        """Mount dirs left by an earlier bridge process for exports no longer wanted."""
        if not self.mount_root.is_dir():
            return []
        wanted = {t.export.name for t in targets.values()} | set(self.mounts)
        return [p.name for p in self.mount_root.iterdir() if p.is_dir() and p.name not in wanted]

    def _reconcile_accounts(self, secrets: dict[str, tuple[str, bool]]) -> None:
        existing = self.adm.accounts()
        for user in existing - set(secrets):
            self.adm.delete_account(user)
            self._secrets_set.pop(user, None)
        for user, (secret, _) in secrets.items():
            if user in existing and self._secrets_set.get(user) == secret:
                continue
            if user in existing:
                self.adm.delete_account(user)  # unknown or changed secret: set it again
            self.adm.new_account(user, secret)
            self._secrets_set[user] = secret

    def _drop_mount(self, m: FuseMount, timeout: float = 15) -> None:
        """Detach the mount's loop devices (tgtd no longer uses them), then unmount."""
        if self.route == "loop":
            loop.detach_all(m.file)
        m.stop(timeout)

    def _backing(self, want: Target, mount: FuseMount) -> str:
        """The path tgtd's LUN opens: the FUSE file, or a current loop device over it."""
        if self.route == "file":
            return str(mount.file)
        for lo in loop.loops_of(mount.file):
            if loop.current(lo, mount.file) and lo.read_only == want.read_only:
                return lo.device
        return loop.attach(mount.file, want.read_only)

    def _mount(self, want: Target) -> tuple[FuseMount, bool]:
        """The healthy mount for ``want`` and whether it was (re)started just now."""
        name = want.export.name
        m = self.mounts.get(name)
        if m is not None and m.read_only == want.read_only and m.healthy():
            return m, False
        if m is not None:
            self._drop_mount(m)
        m = FuseMount(name, self.mount_root / name, self._source(name), want.read_only,
                      self.cfg.fuse.value)
        self.mounts[name] = m
        if m.healthy():  # adopted from an earlier bridge process
            return m, False
        m.start()
        return m, True

    def _known_source(self, export: str) -> str:
        """The volume directory whose nbdkit serves a mount found on disk (iscsi.fuse
        nbdkit, data_dir known: stop then waits until nbdkit let go of it), else ""."""
        if self.cfg.fuse.value != "nbdkit" or self.data_dir is None:
            return ""
        return self._source(export)

    def _source(self, export: str) -> str:
        """What the FUSE server of ``export`` reads: an NBD URI, or (nbdkit) the
        directory of the volume whose nbdkit serves it."""
        from blockstore.volume import volumes_dir

        if self.cfg.fuse.value != "nbdkit":
            return self.nbd_uri(export)
        if self.data_dir is None:
            raise BridgeError("iscsi.fuse is nbdkit but the bridge was not given the data "
                              "directory of the nbdkit serving the volumes")
        volume = export.partition("@")[0]
        if "@" not in export:
            from blockstore.clone import find_clone

            clone = find_clone(self.data_dir, export)
            if clone is not None:  # served by the nbdkit that serves its base volume
                volume = clone.volume
        return str(volumes_dir(self.data_dir) / volume)

    def _remove_lun(self, want: Target, have: TargetState, report: Report) -> None:
        """Remove the target's LUN, to be made again on a fresh mount or path."""
        self.adm.remove_lun(want.tid, DISK_LUN)
        del have.luns[DISK_LUN]
        report.repaired.append(f"{want.iqn}: LUN {DISK_LUN} re-created on a fresh mount")

    def _reconcile_target(self, want: Target, have: TargetState | None,
                          secrets: dict[str, tuple[str, bool]], report: Report) -> None:
        old = self.mounts.get(want.export.name)
        if (have is not None and DISK_LUN in have.luns and old is not None
                and old.read_only != want.read_only):
            # The mount is made again for the new flag, and unmounting ends its FUSE
            # connection: the LUN goes first, so tgtd never serves from a dead mount.
            self._remove_lun(want, have, report)
        mount, restarted = self._mount(want)
        path = self._backing(want, mount)
        if have is None:
            self.adm.new_target(want.tid, want.iqn)
            have = TargetState(want.tid, want.iqn)
            report.created.append(want.iqn)
            log.info("iscsi_target_created", target=want.iqn, tid=want.tid,
                     read_only=want.read_only)
        lun = have.luns.get(DISK_LUN)
        if lun is not None and (restarted or lun.path != path or
                                BSOFLAGS not in lun.bsoflags or
                                not self._lun_file_current(lun.path, mount)):
            self._remove_lun(want, have, report)
            lun = None
        params = {"vendor_id": VENDOR_ID,
                  "product_id": "SNAPSHOT" if want.export.is_snapshot else "VOLUME",
                  "scsi_id": want.scsi_id, "scsi_sn": want.scsi_sn,
                  "readonly": "1" if want.read_only else "0",
                  # Not thin: tgtd's thin-provisioning path (GET LBA STATUS via
                  # lseek SEEK_DATA, UNMAP via fallocate) misbehaves on the nbdfuse
                  # file -- after a GET LBA STATUS past the end, 16-byte reads near
                  # the end come back short (libiscsi's conformance suite shows it).
                  "thin_provisioning": "0"}
        if lun is None:
            try:
                self.adm.new_lun(want.tid, DISK_LUN, path, BSOFLAGS)
            finally:
                if self.route == "loop":
                    # tgtd holds it open now: detaching marks it autoclear, so the kernel
                    # frees it when tgtd lets go (LUN deleted, tgtd killed) -- no leak,
                    # even when the mount under it has died and its path means nothing.
                    loop.detach(path)
            self.adm.update_lun(want.tid, DISK_LUN, **params)
        elif (lun.scsi_id, lun.scsi_sn, lun.readonly) != (want.scsi_id, want.scsi_sn,
                                                          want.read_only):
            self.adm.update_lun(want.tid, DISK_LUN, **params)
            report.repaired.append(f"{want.iqn}: LUN {DISK_LUN} identity or read-only flag")

        self._reconcile_access(want, have, secrets, report)

    def _reconcile_access(self, want: Target, have: TargetState,
                          secrets: dict[str, tuple[str, bool]], report: Report) -> None:
        """The target's initiator ACL and CHAP account bindings."""
        acl = self._acl()
        for a in sorted(acl - have.acl):  # widen first, then narrow: no moment of no access
            self.adm.bind(want.tid, a)
        for a in sorted(have.acl - acl):
            self.adm.unbind(want.tid, a)
        if have.acl and have.acl != acl:
            report.repaired.append(f"{want.iqn}: initiator ACL")

        incoming = {u for u, (_, out) in secrets.items() if not out}
        outgoing = {u for u, (_, out) in secrets.items() if out}
        for u in incoming - have.accounts:
            self.adm.bind_account(want.tid, u)
        for u in outgoing - have.outgoing:
            self.adm.bind_account(want.tid, u, outgoing=True)
        for u in have.accounts - incoming:
            self.adm.unbind_account(want.tid, u)
        for u in have.outgoing - outgoing:
            self.adm.unbind_account(want.tid, u, outgoing=True)

    def _lun_file_current(self, path: str, mount: FuseMount) -> bool:
        """Does tgtd hold ``path`` open on the current mount (not a dead earlier one)?

        A loop device is checked against the mount in `_backing` already (a loop held
        open by tgtd cannot be detached and reused, so its name stays unique)."""
        pid = self.tgtd.pid()
        if pid is None:
            return True  # cannot tell (tgtd not ours); the path check above must do
        try:
            dev = os.stat(mount.file if self.route == "file" else path).st_dev
        except OSError:
            return False
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink(fd_dir / fd) == path and os.stat(fd_dir / fd).st_dev == dev:
                    return True
            except OSError:
                continue
        return False

    # -- withdraw and stop ---------------------------------------------------------

    def withdraw(self, export: str) -> bool:
        """Take one export's target down now (before its volume or snapshot is deleted)."""
        try:
            iqn = target_iqn(self._base_iqn(), export)
        except InvalidName:
            return False
        removed = False
        if self.adm.alive():
            for tid, t in self.adm.targets().items():
                if t.name == iqn:
                    self.adm.remove_target(t)
                    removed = True
                    log.info("iscsi_target_removed", target=iqn, tid=tid)
        m = self.mounts.pop(export, None) or FuseMount(export, self.mount_root / export, "",
                                                       True, self.cfg.fuse.value)
        self._drop_mount(m)
        return removed

    def stop(self, timeout: float = 15) -> None:
        """Delete every target, stop tgtd (delete system), then unmount every export,
        waiting at most ``timeout`` s per mount for its server to let go of it (the caller
        may be about to kill that server anyway: then a short wait will do)."""
        self.tgtd.stop()
        self._secrets_set.clear()
        self._tgtd_pid = None
        for m in self.mounts.values():
            self._drop_mount(m, timeout)
        self.mounts.clear()
        for name in self._stray_mounts({}):
            self._drop_mount(FuseMount(name, self.mount_root / name, self._known_source(name),
                                       True, self.cfg.fuse.value), timeout)
        log.info("iscsi_stopped")

    # -- status --------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """tgtd's view: per target the LUN, its identity, ACL and sessions (JSON-able)."""
        if not self.adm.alive():
            return {"tgtd": "down", "control_port": self.cfg.control_port, "targets": []}
        targets = []
        for tid, t in sorted(self.adm.targets().items(), key=lambda kv: kv[1].name):
            lun = t.luns.get(DISK_LUN)
            targets.append({
                "iqn": t.name, "tid": tid,
                "backing_store": lun.path if lun else None,
                "read_only": lun.readonly if lun else None,
                "scsi_id": lun.scsi_id if lun else None,
                "scsi_sn": lun.scsi_sn if lun else None,
                "acl": sorted(t.acl), "chap": sorted(t.accounts),
                "mutual_chap": sorted(t.outgoing),
                "sessions": [{"initiator": n.initiator, "addresses": n.addresses}
                             for n in t.nexuses],
            })
        return {"tgtd": "up", "pid": self.tgtd.pid(), "control_port": self.cfg.control_port,
                "portal": self.cfg.portal, "targets": targets}
