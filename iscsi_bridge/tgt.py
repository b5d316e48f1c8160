"""tgtd and tgtadm: start and stop the daemon, read its state, change it.

`parse_show` is pure (text of ``tgtadm --mode target --op show`` in, TargetState out);
`Tgtadm` runs tgtadm through nbdgw_common.proc.run, always with our own control port, so a
system tgtd (control port 0) or another node's bridge on the same host is never touched.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from blockstore.modes import NotOwned, make_own_dir
from nbdgw_common.errors import CommandError
from nbdgw_common.proc import run
from nbdgw_common.supervise import KILL_WAIT, ChildProcess, NotReady

from .errors import BridgeError, TgtdError

log = structlog.get_logger(component="iscsi")

TGTD_SOCKET_DIR = Path("/var/run/tgtd")


@dataclass
class LunState:
    lun: int
    type: str = ""
    scsi_id: str = ""
    scsi_sn: str = ""
    readonly: bool = False
    online: bool = True
    bstype: str = ""
    path: str = ""
    bsoflags: str = ""


@dataclass
class NexusState:
    nexus: int
    initiator: str = ""
    addresses: list[str] = field(default_factory=list)


@dataclass
class TargetState:
    tid: int
    name: str
    luns: dict[int, LunState] = field(default_factory=dict)
    accounts: set[str] = field(default_factory=set)
    outgoing: set[str] = field(default_factory=set)
    acl: set[str] = field(default_factory=set)  # addresses, CIDRs, "ALL" and names
    nexuses: list[NexusState] = field(default_factory=list)


def parse_show(text: str) -> dict[int, TargetState]:
    """Parse ``tgtadm --mode target --op show`` into targets by tid."""
    p = _ShowParser()
    for raw in text.splitlines():
        p.line(raw)
    return p.targets


class _ShowParser:
    """Line by line: "Target N: name", 4-space section headers, 8+-space entries."""

    def __init__(self) -> None:
        self.targets: dict[int, TargetState] = {}
        self.tgt: TargetState | None = None
        self.lun: LunState | None = None
        self.nexus: NexusState | None = None
        self.section = ""

    def line(self, raw: str) -> None:
        line = raw.strip()
        if not line:
            return
        if raw.startswith("Target ") and ":" in raw:
            head, _, name = raw.partition(":")
            self.tgt = TargetState(int(head.split()[1]), name.strip())
            self.targets[self.tgt.tid] = self.tgt
            self.section, self.lun, self.nexus = "", None, None
        elif self.tgt is None:
            return
        elif raw.startswith("    ") and not raw.startswith("        "):
            self.section = line.rstrip(":")
        elif self.section == "LUN information":
            self._lun(line)
        elif self.section == "I_T nexus information":
            self._nexus(line)
        elif self.section == "Account information":
            if line.endswith(" (outgoing)"):
                self.tgt.outgoing.add(line.removesuffix(" (outgoing)"))
            else:
                self.tgt.accounts.add(line)
        elif self.section == "ACL information":
            self.tgt.acl.add(line)

    def _lun(self, line: str) -> None:
        assert self.tgt is not None
        key, sep, value = line.partition(":")
        if key == "LUN" and sep:
            self.lun = LunState(int(value))
            self.tgt.luns[self.lun.lun] = self.lun
        elif self.lun is not None:
            _lun_field(self.lun, key, value.strip())

    def _nexus(self, line: str) -> None:
        assert self.tgt is not None
        key, sep, value = line.partition(":")
        value = value.strip()
        if key == "I_T nexus" and sep:
            self.nexus = NexusState(int(value))
            self.tgt.nexuses.append(self.nexus)
        elif self.nexus is not None and key == "Initiator":
            self.nexus.initiator = value.split(" alias:")[0].strip()
        elif self.nexus is not None and key == "IP Address":
            self.nexus.addresses.append(value)


def _lun_field(lun: LunState, key: str, value: str) -> None:
    if key == "Type":
        lun.type = value
    elif key == "SCSI ID":
        lun.scsi_id = value
    elif key == "SCSI SN":
        lun.scsi_sn = value
    elif key == "Readonly":
        lun.readonly = value == "Yes"
    elif key == "Online":
        lun.online = value == "Yes"
    elif key == "Backing store type":
        lun.bstype = value
    elif key == "Backing store path":
        lun.path = value
    elif key == "Backing store flags":
        lun.bsoflags = value


class Tgtadm:
    """tgtadm bound to one control port; every call raises CommandError on failure."""

    def __init__(self, control_port: int, timeout: float = 30) -> None:
        self.control_port = control_port
        self.timeout = timeout

    def _run(self, *args: str) -> str:
        return run(["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args],
                   timeout=self.timeout)

    def alive(self) -> bool:
        """True if a tgtd answers on our control port."""
        try:
            self._run("--mode", "system", "--op", "show")
        except CommandError:
            return False
        return True

    def targets(self) -> dict[int, TargetState]:
        return parse_show(self._run("--mode", "target", "--op", "show"))

    def accounts(self) -> set[str]:
        out = self._run("--mode", "account", "--op", "show")
        return {x.strip() for x in out.splitlines()[1:] if x.strip()}

    def portals(self) -> set[str]:
        out = self._run("--mode", "portal", "--op", "show")
        # "Portal: 127.0.0.1:3260,1" -> "127.0.0.1:3260"
        return {line.split(":", 1)[1].strip().rsplit(",", 1)[0]
                for line in out.splitlines() if line.startswith("Portal:")}

    def new_portal(self, portal: str) -> None:
        self._run("--mode", "portal", "--op", "new", "--param", f"portal={portal}")

    def delete_portal(self, portal: str) -> None:
        self._run("--mode", "portal", "--op", "delete", "--param", f"portal={portal}")

    def new_target(self, tid: int, name: str) -> None:
        self._run("--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", name)

    def delete_target(self, tid: int) -> None:
        self._run("--mode", "target", "--op", "delete", "--force", "--tid", str(tid))

    def connections(self, tid: int) -> list[tuple[int, int]]:
        """(session id, connection id) of every connection to target ``tid``."""
        out = self._run("--mode", "conn", "--op", "show", "--tid", str(tid))
        conns: list[tuple[int, int]] = []
        sid = None
        for line in out.splitlines():
            key, _, value = line.strip().partition(":")
            if key == "Session":
                sid = int(value)
            elif key == "Connection" and sid is not None:
                conns.append((sid, int(value)))
        return conns

    def delete_connection(self, tid: int, sid: int, cid: int) -> None:
        self._run("--mode", "conn", "--op", "delete", "--tid", str(tid), "--sid", str(sid),
                  "--cid", str(cid))

    def remove_target(self, target: TargetState, timeout: float = 10) -> None:
        """Delete a target even while initiators use it.

        ``delete --force`` alone fails ("this logical unit is still active") while
        commands are in flight, so: unbind the ACL (no new logins), close every
        connection, and retry until tgtd lets the target go.
        """
        for acl in target.acl:
            with contextlib.suppress(CommandError):
                self.unbind(target.tid, acl)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.delete_target(target.tid)
                return
            except CommandError as e:
                if "still active" not in e.stderr or time.monotonic() > deadline:
                    raise
            for sid, cid in self.connections(target.tid):
                with contextlib.suppress(CommandError):
                    self.delete_connection(target.tid, sid, cid)
            time.sleep(0.1)

    def remove_lun(self, tid: int, lun: int, timeout: float = 10) -> None:
        """Delete a LUN, closing the target's connections if it is busy."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.delete_lun(tid, lun)
                return
            except CommandError as e:
                if "still active" not in e.stderr or time.monotonic() > deadline:
                    raise
            for sid, cid in self.connections(tid):
                with contextlib.suppress(CommandError):
                    self.delete_connection(tid, sid, cid)
            time.sleep(0.1)

    def new_lun(self, tid: int, lun: int, path: str, bsoflags: str = "") -> None:
        args = ["--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun", str(lun),
                "--backing-store", path, "--bstype", "rdwr"]
        if bsoflags:
            args += ["--bsoflags", bsoflags]
        self._run(*args)

    def update_lun(self, tid: int, lun: int, **params: str) -> None:
        joined = ",".join(f"{k}={v}" for k, v in params.items())
        self._run("--mode", "logicalunit", "--op", "update", "--tid", str(tid),
                  "--lun", str(lun), "--params", joined)

    def delete_lun(self, tid: int, lun: int) -> None:
        self._run("--mode", "logicalunit", "--op", "delete", "--tid", str(tid),
                  "--lun", str(lun))

    def bind(self, tid: int, acl: str) -> None:
        self._run("--mode", "target", "--op", "bind", "--tid", str(tid), *_acl_args(acl))

    def unbind(self, tid: int, acl: str) -> None:
        self._run("--mode", "target", "--op", "unbind", "--tid", str(tid), *_acl_args(acl))

    def new_account(self, user: str, password: str) -> None:
        """Create a CHAP account.  tgtadm takes the secret only on its command line
        (readable by any local user in /proc/PID/cmdline while it runs, and in the
        CommandError of a failure), so this one request is sent over tgtd's control
        socket directly, as tgtadm would send it: the secret never leaves this process
        but to tgtd."""
        send_account_new(self.control_port, user, password, self.timeout)

    def delete_account(self, user: str) -> None:
        self._run("--mode", "account", "--op", "delete", "--user", user)

    def bind_account(self, tid: int, user: str, outgoing: bool = False) -> None:
        self._run("--mode", "account", "--op", "bind", "--tid", str(tid), "--user", user,
                  *(["--outgoing"] if outgoing else []))

    def unbind_account(self, tid: int, user: str, outgoing: bool = False) -> None:
        self._run("--mode", "account", "--op", "unbind", "--tid", str(tid), "--user", user,
                  *(["--outgoing"] if outgoing else []))

    def delete_system(self) -> None:
        self._run("--mode", "system", "--op", "delete")


# tgtd's management protocol (tgt usr/tgtadm.h and usr/mgmt.c, unchanged from 1.0.85,
# Debian 12, to 1.0.97): a struct tgtadm_req, then "key=value,..." text ending in NUL;
# the answer is a struct tgtadm_rsp (err, len including itself) and len - 8 bytes of text.
# tgtd answers only a peer with its own uid and gid (SO_PEERCRED): root.
_REQ = struct.Struct("=ii64sIiQQIIIIII")  # mode op lld len tid sid lun cid host_no
_RSP = struct.Struct("=II")               # device_type ac_dir pack force / err len
_MODE_ACCOUNT, _OP_NEW = 7, 0
_TGTADM_ERRORS = (  # enum tgtadm_errno
    "success", "unknown error", "out of memory", "can't find the driver",
    "can't find the target", "can't find the logical unit", "can't find the session",
    "can't find the connection", "can't find the binding", "this target already exists",
    "this logical unit number already exists", "this binding already exists",
    "this access control rule already exists", "this access control rule does not exist",
    "this account already exists", "can't find the account", "too many accounts",
    "invalid request", "this target already has an outgoing account",
    "this target is still active", "this logical unit is still active",
    "this driver is busy", "this operation isn't supported", "unknown parameter",
    "this device has Prevent Removal set")
assert _REQ.size == 120 and _RSP.size == 8  # sizeof(struct tgtadm_req), (tgtadm_rsp)


def account_new_request(user: str, password: str) -> bytes:
    """The bytes tgtadm sends for ``--mode account --op new --user U --password P``."""
    if not user or any(c in user for c in ",=\0") or "\0" in password:
        raise TgtdError(f"CHAP user {user!r} cannot be sent to tgtd (no ',', '=' or NUL)")
    body = f"user={user},password={password}".encode() + b"\0"
    lld = b"iscsi".ljust(64, b"\0")
    head = _REQ.pack(_MODE_ACCOUNT, _OP_NEW, lld, _REQ.size + len(body), -1, 0,
                     0xFFFFFFFFFFFFFFFF, 0, 0, 0, 0, 0, 0)
    return head + body


def send_account_new(control_port: int, user: str, password: str, timeout: float) -> None:
    """Send account_new_request to the tgtd on ``control_port``; raise TgtdError naming
    the user and tgtd's answer (never the secret)."""
    path = str(TGTD_SOCKET_DIR / f"socket.{control_port}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(account_new_request(user, password))
            head = b""
            while len(head) < _RSP.size:
                chunk = s.recv(_RSP.size - len(head))
                if not chunk:
                    raise TgtdError(f"tgtd on {path} closed the connection before answering "
                                    f"the new CHAP account {user}")
                head += chunk
    except OSError as e:
        raise TgtdError(f"cannot create CHAP account {user} in tgtd ({path}): "
                        f"{e.strerror or e}") from None
    err, _ = _RSP.unpack(head)
    if err:
        what = _TGTADM_ERRORS[err] if err < len(_TGTADM_ERRORS) else f"error {err}"
        raise TgtdError(f"tgtd refused the new CHAP account {user}: {what}")


def _acl_args(acl: str) -> list[str]:
    """An initiator name (iqn./eui./naa.) or an address/CIDR/ALL, as tgtadm wants it."""
    if acl.startswith(("iqn.", "eui.", "naa.")):
        return ["--initiator-name", acl]
    return ["--initiator-address", acl]


def private_run_dir(run_dir: Path) -> None:
    """Make iscsi.run_dir root's alone (0700; an existing one tightened): it holds the
    FUSE mounts tgtd serves the volumes from, and tgtd's pid file.  One that belongs to
    another user is refused (BridgeError): that user could swap what is in it."""
    try:
        make_own_dir(run_dir, "iscsi.run_dir")
    except NotOwned as e:
        raise BridgeError(str(e)) from None


class Tgtd:
    """One tgtd process with its own control port and portal, run in the foreground.

    A tgtd left running by an earlier bridge process (same control port) is adopted:
    its pid is read from the pid file, and it is stopped the same way.
    """

    def __init__(self, control_port: int, portal: str, run_dir: Path) -> None:
        self.adm = Tgtadm(control_port)
        self.portal = portal
        self.run_dir = run_dir
        self.pid_file = run_dir / "tgtd.pid"
        self.child = ChildProcess(
            ["tgtd", "-f", "-C", str(control_port), "--iscsi", f"portal={portal}"],
            log_file=run_dir / "tgtd.log", new_session=True, pid_file=self.pid_file,
            not_found=TgtdError("tgtd: command not found (apt-get install tgt)"))

    def pid(self) -> int | None:
        return self.child.pid

    def start(self, timeout: float = 15) -> None:
        """Start tgtd and wait until it answers on its control port."""
        private_run_dir(self.run_dir)
        log.info("tgtd_starting", argv=self.child.argv)
        self.child.start()
        self.pid_file.write_text(f"{self.child.pid}\n")
        try:
            self.child.wait_ready(self.adm.alive, timeout)
        except NotReady as e:
            if e.status is not None:
                raise TgtdError(f"tgtd exited with status {e.status} at start: {e.tail}"
                                ) from None
            raise TgtdError(f"tgtd did not answer on control port {self.adm.control_port} "
                            f"within {timeout} s") from None
        log.info("tgtd_started", pid=self.child.pid, portal=self.portal)

    def stop(self, timeout: float = 15) -> None:
        """`tgtadm --op delete --mode system` (the way tgtd stops), then wait for it."""
        pid = self.pid()
        if self.adm.alive():
            for target in self.adm.targets().values():
                self.adm.remove_target(target)
            try:
                self.adm.delete_system()
            except CommandError as e:
                log.warning("tgtd_delete_system_failed", error=str(e))
        self.child.stop(timeout, sig=None, on_kill=lambda: log.error(
            "tgtd_kill", pid=pid, reason=f"still running {timeout} s after delete system"))
        if self.child.alive:
            raise TgtdError(f"tgtd (pid {pid}) survived SIGKILL for {KILL_WAIT:g} s")
        self.pid_file.unlink(missing_ok=True)
        if pid is not None:  # tgtd leaves its control socket and lock file behind
            for suffix in ("", ".lock"):
                (TGTD_SOCKET_DIR / f"socket.{self.adm.control_port}{suffix}").unlink(
                    missing_ok=True)
        log.info("tgtd_stopped", pid=pid)
