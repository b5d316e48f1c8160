"""The service address (DESIGN.md §6 and 10): within one subnet, a virtual IP that the
primary holds, moved with gratuitous ARP.  ``ServiceAddress`` is the promotion step's
address hook; a DNS-update implementation (RFC 2136) for routed sites plugs in beside it
with the same ``take()``/``release()``.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path
from typing import Final

import structlog

from nbdgw_common.errors import CommandError
from nbdgw_common.proc import run

log = structlog.get_logger(component="vip")

ETH_P_ARP: Final = 0x0806
GARP_COUNT: Final = 3


def gratuitous_arp(interface: str, address: str, count: int = GARP_COUNT) -> None:
    """Broadcast ARP announcements of ``address`` at this interface's MAC, so that every
    host and switch on the segment updates its cache now instead of after a timeout."""
    mac = bytes.fromhex(Path(f"/sys/class/net/{interface}/address").read_text()
                        .strip().replace(":", ""))
    ip = ipaddress.IPv4Address(address).packed
    frame = (b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
             + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((interface, 0))
        for _ in range(count):
            s.send(frame)


class ServiceAddress:
    """``ip addr add/del`` of the service address on its interface, plus gratuitous ARP."""

    def __init__(self, address: str, interface: str) -> None:
        self.iface = ipaddress.ip_interface(address)
        self.interface = interface

    def held(self) -> bool:
        out = run(["ip", "-o", "addr", "show", "dev", self.interface])
        return f" {self.iface.with_prefixlen} " in out

    def take(self) -> None:
        if not self.held():
            run(["ip", "addr", "add", self.iface.with_prefixlen, "dev", self.interface])
        if self.iface.version == 4:
            gratuitous_arp(self.interface, str(self.iface.ip))
        log.info("service_address_taken", address=self.iface.with_prefixlen,
                 interface=self.interface)

    def release(self) -> None:
        try:
            if self.held():
                run(["ip", "addr", "del", self.iface.with_prefixlen, "dev", self.interface])
                log.info("service_address_released", address=self.iface.with_prefixlen,
                         interface=self.interface)
        except CommandError as e:
            log.error("service_address_release_failed", error=str(e))
