"""Bad input on the real data path and CLI: a full disk, malformed configs, unsafe names.

A full disk must surface as ENOSPC to the NBD client with the server still serving and the
journal still valid; every operator mistake must be refused with one exact message
("nbdgw: error: ...", exit status 1) and leave nothing behind on disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
from pathlib import Path

import nbd
import pytest

from blockstore.record import (
    REC_HEADER_SIZE,
    SEG_HEADER_SIZE,
    Op,
    check_payload,
    decode_header,
)
from tests.conftest import run_nbdgw
from tests.integration.conftest import connected, tmpfs

MiB = 1 << 20
EXTENT_SHIFT = 22
NAME_RULE = "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"


# -- helpers -----------------------------------------------------------------------






def chunk(i: int) -> bytes:
    """The 1 MiB written at offset i MiB: a pattern naming its index."""
    return struct.pack("<QQ", 0xD15C_F011, i) * (MiB // 16)


def journal_writes(vdir: Path) -> list[tuple[int, bytes]]:
    """(offset, data) of every WRITE record in the journal, in order, each checked."""
    out: list[tuple[int, bytes]] = []
    for seg in sorted((vdir / "journal").glob("seg-*.jnl")):
        buf = seg.read_bytes()
        pos = SEG_HEADER_SIZE
        while pos < len(buf):
            hdr = decode_header(buf[pos:pos + REC_HEADER_SIZE])
            payload = buf[pos + REC_HEADER_SIZE:pos + REC_HEADER_SIZE + hdr.payload_len]
            check_payload(hdr, payload)
            if hdr.op is Op.WRITE:
                out.append((hdr.offset, payload))
            pos += REC_HEADER_SIZE + hdr.payload_len
    return out


def refused(p: subprocess.CompletedProcess[str], message: str) -> None:
    """The CLI refused with exactly one error line and exit status 1."""
    assert (p.returncode, p.stdout, p.stderr) == (1, "", f"nbdgw: error: {message}\n")


# -- a full disk -----------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.timeout(90)
@pytest.mark.parametrize("fs_size", [
    "24m",  # the journal append is what fails
    "23m",  # the store write fails part way (a short write changed part of the range)
])
def test_full_disk_is_enospc_and_the_journal_stays_valid(data_dir, serve, fs_size):
    """A 64 MiB volume on a ~24 MiB file system: 1 MiB writes until the client gets ENOSPC.
    The server keeps serving, acknowledged writes read back, the journal holds exactly
    them, and once space is added the volume reopens with the expected contents.

    The two sizes make the disk fill at different points of the write that fails: with
    24m the store takes it and the journal append fails; with 23m the store write itself
    fails part way (what exactly happens is checked, not assumed)."""
    vdir = data_dir / "volumes" / "v1"
    with tmpfs(data_dir / "volumes", fs_size):
        run_nbdgw("volume", "create", "v1", "--size", "64M", "--data-dir", str(data_dir))
        s = serve()
        acked: list[int] = []
        try:
            with connected(s) as h:
                err = None
                for i in range(64):
                    try:
                        h.pwrite(chunk(i), i * MiB)
                    except nbd.Error as e:
                        err = e
                        break
                    acked.append(i)
                assert err is not None, f"64 MiB fitted on a {fs_size} tmpfs"
                assert (err.errnum, err.errno) == (errno.ENOSPC, "ENOSPC"), str(err)
                failed = len(acked)
                assert 4 <= failed < 24, f"ENOSPC after {failed} MiB on a {fs_size} tmpfs"
                assert s.proc.poll() is None, "nbdgw serve died on ENOSPC"
                h.flush()
                for i in acked:
                    assert h.pread(MiB, i * MiB) == chunk(i), f"acknowledged write {i} lost"
                # A failed write leaves its range undefined (old or new, 4 KiB at a time).
                region = h.pread(MiB, failed * MiB)
                new, zero = chunk(failed), bytes(4096)
                bad = [o for o in range(0, MiB, 4096)
                       if region[o:o + 4096] not in (zero, new[o:o + 4096])]
                assert not bad, f"failed write: blocks {bad} are neither old nor new"
                assert h.pread(MiB, 40 * MiB) == bytes(MiB)
        finally:
            assert s.stop() == 0

        # The journal holds exactly the acknowledged writes, every record checksum-valid
        # (a failed append was cut, not left as a torn record).
        assert journal_writes(vdir) == [(i * MiB, chunk(i)) for i in acked]

        # The operator adds space; the volume reopens (recovering if the stop could not
        # write its clean state) without any corruption error.
        subprocess.run(["mount", "-o", "remount,size=48m", str(data_dir / "volumes")],
                       check=True, capture_output=True, timeout=30)
        model = bytearray(64 * MiB)
        for i in acked:
            model[i * MiB:(i + 1) * MiB] = chunk(i)
        model[failed * MiB:(failed + 1) * MiB] = region
        p = run_nbdgw("volume", "checksum", "v1", "--data-dir", str(data_dir))
        assert p.stdout == f"{hashlib.sha256(model).hexdigest()}  v1\n"
        assert json.loads((vdir / "state.json").read_text())["clean"] is True
        assert journal_writes(vdir) == [(i * MiB, chunk(i)) for i in acked]
        if region != bytes(MiB):
            # The store took (part of) a write that the journal never recorded: the
            # peers must be sent that extent again, or primary and replicas differ for good.
            resync = (json.loads((vdir / "resync.json").read_text())
                      if (vdir / "resync.json").exists() else None)
            assert resync is not None and (failed * MiB) >> EXTENT_SHIFT in resync["extents"], (
                f"the failed write at {failed} MiB changed "
                f"{sum(region[o:o + 4096] != zero for o in range(0, MiB, 4096))} blocks of the "
                f"store but its extent is not in resync.json: {resync}")


# -- config errors through the CLI ----------------------------------------------------------


CONFIG_CASES = {
    "malformed-yaml": ("version: 1\nnode:\n  name: a\n   data_dir: /x\n",
                       "not valid YAML at line 4, column 12"),
    "unknown-top-key": ("version: 1\nfoo: 1\n",
                        "unknown key 'foo' in the config file (known: activity_log, cdp, control, "
                        "coordinator, failover, groups, health, iscsi, journal, metrics, nbd, "
                        "node, peerlink, peers, service, sites, snapshots, version, volumes)"),
    "unknown-nbd-key": ("version: 1\nnbd:\n  colour: blue\n",
                        "unknown key 'colour' in nbd (known: allow, default_export, listen, tls)"),
    "listen-scheme": ("version: 1\nnbd:\n  listen: ['udp:127.0.0.1:10809']\n",
                      "expected 'tcp:HOST:PORT' or 'unix:PATH' for nbd.listen[0], got "
                      "'udp:127.0.0.1:10809'"),
    "listen-host": ("version: 1\nnbd:\n  listen: ['tcp:localhost:10809']\n",
                    "expected an IP address as HOST in 'tcp:localhost:10809' for nbd.listen[0]"),
    "listen-port": ("version: 1\nnbd:\n  listen: ['tcp:127.0.0.1:70000']\n",
                    "expected 'tcp:HOST:PORT' with PORT 0-65535 for nbd.listen[0], got "
                    "'tcp:127.0.0.1:70000'"),
    "listen-relative-unix": ("version: 1\nnbd:\n  listen: ['unix:nbd.sock']\n",
                             "expected an absolute socket path after 'unix:' for nbd.listen[0]"),
    "bad-size": ("version: 1\njournal:\n  max_bytes: 12X\n",
                 "invalid size '12X': expected a number with an optional unit K, M, G, T or P "
                 "for journal.max_bytes"),
    "unaligned-volume-size": ("version: 1\nvolumes:\n  - {name: v1, size: 1000}\n",
                              "invalid size 1000: must be a multiple of 4096 bytes for "
                              "volumes[0].size"),
    "unsafe-volume-name": ("version: 1\nvolumes:\n  - {name: ../x, size: 1M}\n",
                           f"invalid volume name '../x': {NAME_RULE} in volumes[0].name"),
    # Issue 20, point 7: what config check used to pass.
    "duplicate-key": ("version: 1\nfailover:\n  timeout: 10\nfailover:\n  timeout: 2\n",
                      "duplicate key 'failover' at line 4 (first at line 2): YAML would "
                      "silently keep only the last one"),
    "infinite-timeout": ("version: 1\nfailover: {timeout: .inf}\n",
                         "expected a number of seconds > 0 and at most 86400 for "
                         "failover.timeout"),
    "peers-without-secret": ("version: 1\nfailover: {auto: false}\npeers:\n"
                             "  - {name: dc, role: secondary, address: 192.0.2.12}\n",
                             "peerlink has neither secret_file nor tls: any host that "
                             "reaches this node's replication port could send it data or "
                             "ask for its volumes; set peerlink.secret_file (or "
                             "peerlink.tls), or peerlink.insecure: true to run replication "
                             "unauthenticated"),
    "missing-secret-file": ("version: 1\npeers:\n"
                            "  - {name: dc, role: secondary, address: 192.0.2.12}\n"
                            "peerlink: {secret_file: /nonexistent/nbdgw/peer.secret}\n",
                            "peerlink.secret_file /nonexistent/nbdgw/peer.secret does not "
                            "exist"),
    "missing-psk-file": ("version: 1\nnbd:\n  tls: {mode: require, psk_file: "
                         "/nonexistent/nbdgw/tls.psk}\n",
                         "nbd.tls.psk_file /nonexistent/nbdgw/tls.psk does not exist"),
    "missing-chap-file": ("version: 1\niscsi:\n  chap: {user: sql, secret_file: "
                          "/nonexistent/nbdgw/chap.secret}\n",
                          "iscsi.chap.secret_file /nonexistent/nbdgw/chap.secret does not "
                          "exist"),
    "missing-version": ("node:\n  name: a\n", "expected version: 1 at the top of the config"),
    "string-version": ("version: '1'\n", "expected version: 1 at the top of the config"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_check_refuses_with_the_exact_message(tmp_path, case):
    text, message = CONFIG_CASES[case]
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text(text)
    refused(run_nbdgw("-c", str(cfg), "config", "check", check=False), f"{cfg}: {message}")


def test_config_check_accepts_a_good_config(tmp_path):
    """The control: the same CLI path accepts a valid file (so the refusals are meaningful)."""
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text("version: 1\nnode: {name: alpha, data_dir: /srv/nbdgw}\n"
                   "nbd:\n  listen: ['tcp:127.0.0.1:0', 'unix:/run/x.sock']\n"
                   "journal: {segment_bytes: 1M, max_bytes: 8M}\n"
                   "volumes:\n  - {name: v1, size: 1G}\n")
    p = run_nbdgw("-c", str(cfg), "config", "check")
    assert p.stdout == ("config ok: node alpha, data_dir /srv/nbdgw, 1 volume(s), listen "
                        "tcp:127.0.0.1:0, unix:/run/x.sock\n")


def test_config_check_refuses_a_short_chap_secret(tmp_path):
    """A 3-character CHAP secret (issue 20, point 7), and one others can read."""
    secret = tmp_path / "chap.secret"
    secret.write_text("abc\n")
    secret.chmod(0o600)
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text(f"version: 1\niscsi:\n  chap: {{user: sql, secret_file: {secret}}}\n")
    refused(run_nbdgw("-c", str(cfg), "config", "check", check=False),
            f"{cfg}: the CHAP secret in {secret} (iscsi.chap.secret_file) must be 12 to 255 "
            "characters without spaces (Windows initiators accept at most 16)")
    secret.write_text("twelve-chars\n")
    secret.chmod(0o644)
    refused(run_nbdgw("-c", str(cfg), "config", "check", check=False),
            f"{cfg}: iscsi.chap.secret_file {secret} is accessible by group or others (mode "
            f"0644): chmod 600 {secret}")
    secret.chmod(0o600)
    assert run_nbdgw("-c", str(cfg), "config", "check").stdout.startswith("config ok: ")


def test_serve_runs_the_same_file_checks(tmp_path, data_dir, volume):
    """serve (and the daemon) refuse what config check refuses, before serving."""
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text("version: 1\nnbd:\n  tls: {mode: require, psk_file: "
                   "/nonexistent/nbdgw/tls.psk}\n")
    refused(run_nbdgw("-c", str(cfg), "serve", "--data-dir", str(data_dir), "--listen",
                      f"unix:{data_dir / 'nbd.sock'}", check=False, timeout=30),
            f"{cfg}: nbd.tls.psk_file /nonexistent/nbdgw/tls.psk does not exist")


# -- volume names and sizes --------------------------------------------------------------------


def test_volume_create_refuses_a_size_the_file_system_cannot_hold(tmp_path):
    """--size 1P where files stop short of it (ext4: 16T - 4K) is refused before anything
    is made; it used to fail half way with 'File too large' and leave .creating-* behind."""
    from blockstore.volume import largest_file_size

    limit = largest_file_size(tmp_path, 1 << 50)
    if limit is None:
        pytest.skip("this file system holds a 1 PiB file")
    data_dir = tmp_path / "data"
    p = run_nbdgw("volume", "create", "big", "--size", "1P", "--data-dir", str(data_dir),
                  check=False)
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr.startswith(
        f"nbdgw: error: invalid size 1125899906842624 bytes (1P): files on the file system "
        f"of {tmp_path} can be at most {limit} bytes ("), p.stderr
    assert p.stderr.endswith("); nothing was created\n"), p.stderr
    assert list(tmp_path.iterdir()) == []



BAD_NAMES = ["../x", "a/b", "a b", "-x", ".x", "a" * 64, "..", "x\n", ""]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_volume_create_refuses_unsafe_names(data_dir, name):
    # "--" so that a name starting with "-" reaches the command rather than the parser.
    p = run_nbdgw("volume", "create", "--size", "1M", "--data-dir", str(data_dir), "--", name,
                  check=False)
    refused(p, f"invalid volume name {name!r}: {NAME_RULE}")
    assert list(data_dir.iterdir()) == []


def test_longest_name_is_accepted(data_dir):
    """63 characters is the limit, not 62: the boundary of the rule above."""
    name = "a" * 63
    p = run_nbdgw("volume", "create", name, "--size", "1M", "--data-dir", str(data_dir))
    assert p.stdout.startswith(f"created volume {name}: 1048576 bytes in ")
    assert (data_dir / "volumes" / name / "volume.json").exists()


@pytest.mark.parametrize(("size", "reason"), [
    ("0", "must be greater than zero"),
    ("1000", "must be a multiple of 4096 bytes"),
    ("12X", "expected a number with an optional unit K, M, G, T or P"),
    ("-4096", "expected a number with an optional unit K, M, G, T or P"),
    ("2P", "larger than 1 PiB"),
])
def test_volume_create_refuses_bad_sizes(data_dir, size, reason):
    p = run_nbdgw("volume", "create", "v1", "--size", size, "--data-dir", str(data_dir),
                  check=False)
    refused(p, f"invalid size {size!r}: {reason}")
    assert list(data_dir.iterdir()) == []


def test_volume_create_twice(data_dir, volume):
    before = (data_dir / "volumes" / "v1" / "volume.json").read_text()
    p = run_nbdgw("volume", "create", "v1", "--size", "8M", "--data-dir", str(data_dir),
                  check=False)
    refused(p, f"volume v1 already exists in {data_dir}")
    assert (data_dir / "volumes" / "v1" / "volume.json").read_text() == before
    assert sorted(x.name for x in (data_dir / "volumes").iterdir()) == ["v1"]


@pytest.mark.timeout(60)
def test_volume_delete_refused_while_a_client_uses_it(data_dir, volume, serve):
    """A served volume a client uses is not deleted (the reason names how many); once
    nobody uses it, delete withdraws it from the running server and deletes it."""
    s = serve()
    with connected(s) as h:
        h.pwrite(b"x" * 4096, 0)
        p = run_nbdgw("volume", "delete", "v1", "--yes", "--data-dir", str(data_dir),
                      check=False)
        refused(p, "volume v1 is in use by 1 client (NBD or iSCSI): disconnect them first")
        assert h.pread(4096, 0) == b"x" * 4096  # the client did not notice
    p = run_nbdgw("volume", "delete", "v1", "--yes", "--data-dir", str(data_dir))
    assert p.stdout == "deleted volume v1\n"
    assert list((data_dir / "volumes").iterdir()) == []
    assert s.stop() == 0


def test_volume_delete_unknown(data_dir):
    p = run_nbdgw("volume", "delete", "v9", "--yes", "--data-dir", str(data_dir), check=False)
    refused(p, f"no volume named v9 in {data_dir}")


def test_serve_with_no_volume(data_dir):
    p = run_nbdgw("serve", "--data-dir", str(data_dir), "--listen",
                  f"unix:{data_dir / 'nbd.sock'}", check=False, timeout=30)
    refused(p, f"no volume to serve in {data_dir} (create one with "
               "'nbdgw volume create NAME --size SIZE')")
    assert not (data_dir / "nbd.sock").exists()
    assert os.listdir(data_dir) == []
