"""What nbdgw and its tests need from the host, in one table: ``nbdgw doctor``.

Each requirement names what is checked (a command on PATH, or a file that a package
installs, such as qemu's iSCSI block driver), the Debian package that brings it, and who
needs it: the product on every node, or only the tests and benchmarks. ``scripts/setup.sh``
installs the packages this table says are missing (``python3 -m gateway.doctor
--missing-packages``), so the list of packages is written once, here.

Standard library only: ``setup.sh`` runs this with Debian's interpreter before the
virtual environment exists.
"""

from __future__ import annotations

import argparse
import glob
import shutil
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Requirement:
    name: str  # what the user sees: a command, or a short name for a driver
    package: str  # the Debian package that brings it
    purpose: str
    scope: str  # "product" (every node) or "tests" (tests and benchmarks only)
    path_glob: str = ""  # checked instead of PATH when set

    def present(self) -> bool:
        if self.path_glob:
            return bool(glob.glob(self.path_glob))
        return shutil.which(self.name) is not None


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("nbdkit", "nbdkit", "serves every volume", "product"),
    Requirement("nbdkit python plugin", "nbdkit-plugin-python", "the journaled plugin",
                "product", "/usr/lib/*/nbdkit/plugins/nbdkit-python-plugin.so"),
    Requirement("python3-libnbd", "python3-libnbd", "NBD client of the tools and tests",
                "product", "/usr/lib/python3/dist-packages/nbd.py"),
    Requirement("nbdinfo", "libnbd-bin", "NBD client tools (nbdinfo, nbdcopy, nbdfuse)",
                "product"),
    Requirement("nbdfuse", "libnbd-bin", "an export as a file (fallback FUSE server)",
                "product"),
    Requirement("nbdcopy", "libnbd-bin", "copies of snapshot exports (the backup recipe)",
                "product"),
    Requirement("tgtd", "tgt", "the iSCSI target", "product"),
    Requirement("fusermount3", "fuse3", "FUSE mounts of the iSCSI bridge", "product"),
    Requirement("ip", "iproute2", "service address, lab namespaces", "product"),
    Requirement("iptables", "iptables", "lab partitions", "product"),
    Requirement("nft", "nftables", "lab partitions", "product"),
    Requirement("losetup", "util-linux", "loop devices", "product"),
    Requirement("fsfreeze", "util-linux", "consistent snapshots of a mounted file system",
                "product"),
    Requirement("openssl", "openssl", "TLS keys and certificates", "product"),
    Requirement("python3 venv", "python3-venv", "builds .venv from /usr/bin/python3",
                "product", "/usr/lib/python3*/ensurepip/__init__.py"),
    Requirement("qemu-img", "qemu-utils", "NBD/iSCSI client in tests", "tests"),
    Requirement("qemu-nbd", "qemu-utils", "reconnecting NBD client, bench peer", "tests"),
    Requirement("qemu iscsi driver", "qemu-block-extra", "qemu-img iscsi:// URLs",
                "tests", "/usr/lib/*/qemu/block-iscsi.so"),
    Requirement("qemu-storage-daemon", "qemu-system-common", "bench peer", "tests"),
    Requirement("nbd-server", "nbd-server", "bench peer", "tests"),
    Requirement("iscsi-inq", "libiscsi-bin", "iSCSI client tools and conformance suite",
                "tests"),
    Requirement("fio", "fio", "load and benchmarks", "tests"),
    Requirement("named", "bind9", "the DNS server of the lab and the service-name tests",
                "tests", "/usr/sbin/named"),
    Requirement("tsig-keygen", "bind9", "TSIG keys for dynamic DNS updates", "tests",
                "/usr/sbin/tsig-keygen"),
    Requirement("etcd", "etcd-server", "the etcd clusters of the lab and of the etcd tests "
                "(coordinator.kind etcd: the fleet's own etcd runs on hosts of its choosing)",
                "tests", "/usr/bin/etcd"),
    Requirement("etcdctl", "etcd-client", "etcd's command line (lab, tests, operators)",
                "tests"),
    Requirement("mkfs.ext4", "e2fsprogs", "file systems on volumes", "tests"),
    Requirement("e2fsck", "e2fsprogs", "file system checks after faults", "tests"),
    Requirement("postgresql", "postgresql-15", "PostgreSQL, pgbench and amcheck on a "
                "clone (the DR drill test)", "tests",
                "/usr/share/postgresql/15/extension/amcheck.control"),
)


class MissingTool(RuntimeError):
    """A tool or driver is not installed; the message names the package."""


def find(name: str) -> Requirement:
    for req in REQUIREMENTS:
        if req.name == name:
            return req
    raise KeyError(f"gateway.doctor knows no requirement named {name!r}")


def require(name: str) -> None:
    """Raise MissingTool naming the package when ``name`` is not installed."""
    req = find(name)
    if not req.present():
        raise MissingTool(f"{req.name} is missing ({req.purpose}): apt-get install "
                          f"{req.package}, or run `make setup`")


def missing(scopes: tuple[str, ...] = ("product", "tests")) -> list[Requirement]:
    return [r for r in REQUIREMENTS if r.scope in scopes and not r.present()]


def report(scopes: tuple[str, ...]) -> tuple[list[str], int]:
    lines, bad = [], 0
    width = max(len(r.name) for r in REQUIREMENTS)
    for req in REQUIREMENTS:
        if req.scope not in scopes:
            continue
        ok = req.present()
        bad += not ok
        mark = "ok     " if ok else "MISSING"
        lines.append(f"{mark} {req.name:<{width}}  {req.package:<20} {req.purpose}")
    return lines, bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nbdgw doctor",
                                 description="check the tools nbdgw and its tests need")
    ap.add_argument("--product-only", action="store_true",
                    help="only what a node needs, not the tests and benchmarks")
    ap.add_argument("--missing-packages", action="store_true",
                    help="print the Debian packages to install, one per line")
    args = ap.parse_args(argv)
    scopes = ("product",) if args.product_only else ("product", "tests")
    if args.missing_packages:
        for pkg in sorted({r.package for r in missing(scopes)}):
            print(pkg)
        return 0
    lines, bad = report(scopes)
    print("\n".join(lines))
    if bad:
        pkgs = " ".join(sorted({r.package for r in missing(scopes)}))
        print(f"\n{bad} missing: apt-get install {pkgs}   (or: make setup)")
        return 1
    print("\neverything is installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
