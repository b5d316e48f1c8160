"""An authoritative DNS server for the lab and the tests: BIND 9 (``named``, Debian's
bind9) serving one dynamic zone, with a TSIG key that may update every name in it
(``update-policy { grant KEY zonesub ANY; }``) and, optionally, keys limited to one name.
Nothing here is used by a production node: there the zone and its policy are the DNS
administrator's (README, "Service names by DNS").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nbdgw_common.errors import GatewayError
from nbdgw_common.proc import run
from nbdgw_common.supervise import ChildProcess, NotReady

NAMED = "/usr/sbin/named"
UPDATE_KEY = "nbdgw-update"


class DnsLabError(GatewayError):
    pass


def tsig_key(name: str) -> str:
    """A new key in tsig-keygen's format (hmac-sha256)."""
    return run(["tsig-keygen", "-a", "hmac-sha256", name])


def write_key(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


@dataclass
class Zone:
    """The files of one server: ``directory/named.conf``, the zone file, the keys."""

    directory: Path
    zone: str
    address: str  # where named listens (inside its namespace)
    port: int = 53

    @property
    def conf(self) -> Path:
        return self.directory / "named.conf"

    @property
    def key_file(self) -> Path:
        """The key that may update any name of the zone (what nodes get)."""
        return self.directory / f"{UPDATE_KEY}.key"

    def name_key_file(self, name: str) -> Path:
        return self.directory / f"only-{name}.key"

    def write(self, limited: tuple[str, ...] = ()) -> None:
        """named.conf, the zone (SOA, NS and the name server's own A record) and keys:
        the update key, and one key per name of ``limited`` allowed that name only."""
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
        write_key(self.key_file, tsig_key(UPDATE_KEY))
        grants = [f"grant {UPDATE_KEY} zonesub ANY;"]
        keys = [f'include "{self.key_file}";']
        for name in limited:
            key = f"only-{name}"
            write_key(self.name_key_file(name), tsig_key(key))
            keys.append(f'include "{self.name_key_file(name)}";')
            grants.append(f"grant {key} name {name}.{self.zone}. A AAAA;")
        (d / "zone.db").write_text(
            f"$ORIGIN {self.zone}.\n$TTL 30\n"
            f"@ IN SOA ns.{self.zone}. hostmaster.{self.zone}. 1 60 30 600 5\n"
            f"@ IN NS ns.{self.zone}.\n"
            f"ns IN A {self.address}\n")
        body = "\n".join(grants)
        self.conf.write_text(
            "\n".join(keys) + f"""
options {{
    directory "{d}";
    pid-file "{d}/named.pid";
    listen-on port {self.port} {{ {self.address}; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    allow-query {{ any; }};
    notify no;
}};
controls {{ }};
zone "{self.zone}" {{
    type primary;
    file "{d}/zone.db";
    update-policy {{
        {body}
    }};
}};
""")

    def argv(self) -> list[str]:
        """named in the foreground, logging to stderr, as the caller's user."""
        return [NAMED, "-g", "-c", str(self.conf)]


def start(zone: Zone, netns: str | None, log: Path, timeout: float = 20.0) -> ChildProcess:
    """Start named (in ``netns`` if given) and wait until it has loaded the zone."""
    missing = DnsLabError("named is not installed: apt install bind9 (make setup does)")
    if not Path(NAMED).exists():
        raise missing
    argv = zone.argv()
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    child = ChildProcess(argv, name="named", log_file=log, new_session=True,
                         not_found=missing)
    offset = log.stat().st_size if log.exists() else 0  # a restart appends to the log
    child.start()

    def loaded() -> bool:
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return "running" in text and "all zones loaded" in text

    try:
        child.wait_ready(loaded, timeout)
    except NotReady as e:
        child.stop(10)
        raise DnsLabError(f"named did not start ({zone.conf}): {e}") from None
    return child


def stop(child: ChildProcess) -> None:
    child.stop(10)
