"""The NBD data path driven by real clients: libnbd, qemu-img and fio against `nbdgw serve`.

Each test serves real volumes through nbdkit and the python plugin, drives them with a
real client, and checks the outcome against an independent model (a bytearray, a local
file, fio's own verify headers), including across `kill -9` of nbdkit.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import subprocess
import time
from pathlib import Path

import nbd
import pytest

from tests.conftest import Served, need, run_nbdgw

MiB = 1 << 20
VOL_SIZE = 64 * MiB


def seeded(seed: int) -> random.Random:
    """A reproducible generator for test data (not for secrets)."""
    return random.Random(seed)  # noqa: S311 - test data must be reproducible from the seed


def checksum(data_dir: Path, name: str) -> str:
    """`nbdgw volume checksum NAME` (the volume must not be served)."""
    out = run_nbdgw("volume", "checksum", name, "--data-dir", str(data_dir)).stdout
    digest, vol = out.split()
    assert vol == name
    return digest


def create(data_dir: Path, name: str, size: str) -> None:
    run_nbdgw("volume", "create", name, "--size", size, "--data-dir", str(data_dir))


def read_all(h: nbd.NBD, size: int, chunk: int = 4 * MiB) -> bytes:
    """The whole export, read in chunks below the server's maximum request size."""
    return b"".join(bytes(h.pread(min(chunk, size - o), o)) for o in range(0, size, chunk))


def nbd_errno(exc: pytest.ExceptionInfo[nbd.Error]) -> str:
    return exc.value.errno


def recovery(s: Served) -> dict:
    """The `volume_recovered` event that serve logs when it opens an uncleanly closed volume."""
    events = [json.loads(x) for x in s.stderr().splitlines() if x.startswith("{")]
    found = [e for e in events if e.get("event") == "volume_recovered"]
    assert len(found) == 1, f"expected one volume_recovered event in:\n{s.stderr()}"
    return found[0]


def s_log(s: Served) -> str:
    """Everything serve wrote to stderr (readable after stop, which closes the log)."""
    return Path(s.log.name).read_text()


def random_ops(rng: random.Random, count: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) pairs: aligned and unaligned, tiny to 1 MiB, some touching the end."""
    lengths = [1, 7, 511, 512, 513, 4095, 4096, 4097, 65536, 65536 + 3, 300_000, MiB]
    ops = []
    for i in range(count):
        length = rng.choice(lengths)
        if i % 10 == 0:
            offset = size - length  # ends exactly at the last byte
        elif i % 3 == 0:
            offset = rng.randrange(0, (size - length) // 4096) * 4096  # 4 KiB aligned
        else:
            offset = rng.randrange(0, size - length + 1)  # anywhere, unaligned
        ops.append((offset, length))
    return ops


def test_random_writes_match_model_and_checksum(data_dir: Path, volume: str, serve) -> None:
    """Random writes of varied size and alignment read back exactly; the stopped volume's
    checksum is the SHA-256 of the model."""
    rng = seeded(0x5EED)
    model = bytearray(VOL_SIZE)
    s: Served = serve()
    h = s.connect(volume)
    assert h.get_size() == VOL_SIZE
    for i, (offset, length) in enumerate(random_ops(rng, 300, VOL_SIZE)):
        data = rng.randbytes(length)
        h.pwrite(data, offset)
        model[offset:offset + length] = data
        if i % 25 == 0:  # spot-check a random range while writing
            o = rng.randrange(0, VOL_SIZE - 70_000)
            assert h.pread(70_000, o) == model[o:o + 70_000]
    h.flush()
    assert read_all(h, VOL_SIZE) == model
    h.shutdown()
    del h
    assert s.stop() == 0
    assert checksum(data_dir, volume) == hashlib.sha256(model).hexdigest()


def test_two_volumes_listed_and_isolated(data_dir: Path, serve) -> None:
    """Both volumes are listed by NBD_OPT_LIST, with their own sizes, and writes to one
    never show in the other."""
    create(data_dir, "v1", "64M")
    create(data_dir, "v2", "32M")
    s: Served = serve()

    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(s.uri())
    names: list[str] = []
    assert h.opt_list(lambda name, _desc: names.append(name)) == 2
    h.opt_abort()
    assert sorted(names) == ["v1", "v2"]

    h1, h2 = s.connect("v1"), s.connect("v2")
    assert (h1.get_size(), h2.get_size()) == (64 * MiB, 32 * MiB)
    pattern = b"\xa5" * MiB
    h1.pwrite(pattern, 0)
    h1.pwrite(pattern, 31 * MiB)
    h1.flush()
    assert h2.pread(MiB, 0) == bytes(MiB)
    assert h2.pread(MiB, 31 * MiB) == bytes(MiB)
    h2.pwrite(b"\x5a" * 4096, 0)
    h2.flush()
    assert h1.pread(MiB, 0) == pattern
    h1.shutdown()
    h2.shutdown()
    del h1, h2
    assert s.stop() == 0
    assert checksum(data_dir, "v2") == hashlib.sha256(
        b"\x5a" * 4096 + bytes(32 * MiB - 4096)).hexdigest()
    assert checksum(data_dir, "v1") == hashlib.sha256(
        pattern + bytes(30 * MiB) + pattern + bytes(32 * MiB)).hexdigest()


def test_multi_conn_one_flush_survives_kill9(data_dir: Path, volume: str, serve) -> None:
    """multi-conn is advertised, so a FLUSH on one connection covers the writes of all
    four; after kill -9 of nbdkit and a restart every write is there."""
    s: Served = serve()
    handles = [s.connect(volume) for _ in range(4)]
    assert all(h.can_multi_conn() for h in handles)
    model = bytearray(VOL_SIZE)
    rng = seeded(4)
    region = VOL_SIZE // 4
    for i, h in enumerate(handles):
        for j in range(8):  # disjoint regions: connection i owns [i*16M, (i+1)*16M)
            offset = i * region + j * (region // 8) + rng.randrange(0, 4096)
            data = rng.randbytes(rng.choice([512, 4096, 100_000, 1 << 20]))
            h.pwrite(data, offset)
            model[offset:offset + len(data)] = data
    handles[2].flush()
    s.kill9_nbdkit()
    assert s.proc.returncode != 0  # serve reports nbdkit's unexpected death
    del handles

    s2: Served = serve()
    assert recovery(s2)["replayed"] == 4 * 8  # redo of every write from the journal
    h = s2.connect(volume)
    assert read_all(h, VOL_SIZE) == model
    h.shutdown()
    del h
    assert s2.stop() == 0
    assert checksum(data_dir, volume) == hashlib.sha256(model).hexdigest()


def test_fua_writes_survive_kill9(data_dir: Path, volume: str, serve) -> None:
    """Writes, trims and zeroes sent with FUA (and no FLUSH) are there after kill -9."""
    s: Served = serve()
    h = s.connect(volume)
    assert h.can_fua()
    model = bytearray(VOL_SIZE)
    rng = seeded(7)
    for offset, length in random_ops(rng, 40, VOL_SIZE):
        data = rng.randbytes(length)
        h.pwrite(data, offset, nbd.CMD_FLAG_FUA)
        model[offset:offset + length] = data
    h.trim(4 * MiB, 8 * MiB, nbd.CMD_FLAG_FUA)
    model[8 * MiB:12 * MiB] = bytes(4 * MiB)
    h.zero(10_000, 20 * MiB + 3, nbd.CMD_FLAG_FUA)
    model[20 * MiB + 3:20 * MiB + 10_003] = bytes(10_000)
    s.kill9_nbdkit()
    del h

    s2: Served = serve()
    assert recovery(s2)["replayed"] == 40 + 2
    h = s2.connect(volume)
    assert read_all(h, VOL_SIZE) == model
    h.shutdown()
    del h
    assert s2.stop() == 0
    assert checksum(data_dir, volume) == hashlib.sha256(model).hexdigest()


def extents(h: nbd.NBD, count: int, offset: int) -> list[tuple[int, int, int]]:
    """base:allocation as (offset, length, flags) covering [offset, offset+count)."""
    out: list[tuple[int, int, int]] = []
    pos = offset
    while pos < offset + count:
        got: list[int] = []

        def cb(ctx: str, _start: int, entries: list[int], _err: object,
               got: list[int] = got) -> int:
            if ctx == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(entries)
            return 0

        h.block_status(offset + count - pos, pos, cb)
        assert got, "no base:allocation extents returned"
        for length, flags in zip(got[::2], got[1::2], strict=True):
            out.append((pos, length, flags))
            pos += length
    return out


def flags_at(ext: list[tuple[int, int, int]], lo: int, hi: int) -> set[int]:
    """The set of flags of every extent overlapping [lo, hi)."""
    return {f for o, n, f in ext if o < hi and o + n > lo}


def test_trim_and_zero_read_zeros_and_block_status(data_dir: Path, volume: str, serve) -> None:
    """TRIM and WRITE_ZEROES (plain, NO_HOLE, FAST_ZERO, unaligned) read back as zeros;
    base:allocation shows a hole where 4 MiB were trimmed and data where written."""
    s: Served = serve()
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(s.uri(volume))
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h.can_trim()
    assert h.can_zero()
    assert h.can_fast_zero()

    # A fresh volume is one hole.
    assert flags_at(extents(h, VOL_SIZE, 0), 0, VOL_SIZE) == {nbd.STATE_HOLE | nbd.STATE_ZERO}

    data = seeded(9).randbytes(32 * MiB)
    for o in range(0, len(data), 4 * MiB):
        h.pwrite(data[o:o + 4 * MiB], o)
    model = bytearray(data) + bytearray(VOL_SIZE - len(data))

    ops = [  # (what, offset, length, flags)
        ("trim", 4 * MiB, 4 * MiB, 0),
        ("zero", 12 * MiB, 2 * MiB, 0),  # may trim
        ("zero", 16 * MiB, 2 * MiB, nbd.CMD_FLAG_NO_HOLE),
        ("zero", 20 * MiB, 2 * MiB, nbd.CMD_FLAG_FAST_ZERO),
        ("zero", 24 * MiB + 1, 12345, 0),  # unaligned, inside one block
        ("zero", 25 * MiB - 100, 200_000, nbd.CMD_FLAG_NO_HOLE),  # unaligned, spanning
        ("trim", 28 * MiB, 4096, 0),
    ]
    for what, offset, length, flags in ops:
        if what == "trim":
            h.trim(length, offset, flags)
        else:
            h.zero(length, offset, flags)
        model[offset:offset + length] = bytes(length)
        assert h.pread(length, offset) == bytes(length), (what, offset, length, flags)
    h.flush()
    assert read_all(h, VOL_SIZE) == model

    ext = extents(h, VOL_SIZE, 0)
    assert sum(n for _, n, _ in ext) == VOL_SIZE
    assert flags_at(ext, 4 * MiB, 8 * MiB) == {nbd.STATE_HOLE | nbd.STATE_ZERO}
    assert flags_at(ext, 0, 4 * MiB) == {0}
    assert flags_at(ext, 8 * MiB, 12 * MiB) == {0}
    assert flags_at(ext, 32 * MiB, VOL_SIZE) == {nbd.STATE_HOLE | nbd.STATE_ZERO}
    h.shutdown()
    del h
    assert s.stop() == 0
    assert checksum(data_dir, volume) == hashlib.sha256(model).hexdigest()


def test_requests_past_the_end_fail_and_server_stays_up(data_dir: Path, volume: str,
                                                          serve) -> None:
    """Out-of-range requests get EINVAL (reads, trims) or ENOSPC (writes, zeroes) from
    nbdkit, change nothing, and the connection and server keep working."""
    s: Served = serve()
    h = s.connect(volume)
    h.set_strict_mode(0)  # let the requests reach the server
    payload = b"\x11" * 8192
    h.pwrite(payload, VOL_SIZE - 8192)
    h.flush()

    cases: list[tuple[str, tuple[object, ...], str]] = [  # method, arguments, errno
        ("pread", (4096, VOL_SIZE - 2048), "EINVAL"),  # straddles the end
        ("pread", (512, VOL_SIZE + 4096), "EINVAL"),  # wholly beyond
        ("pwrite", (b"\x22" * 4096, VOL_SIZE - 2048), "ENOSPC"),
        ("pwrite", (b"\x22" * 512, VOL_SIZE + 4096), "ENOSPC"),
        ("zero", (8192, VOL_SIZE - 4096), "ENOSPC"),
        ("trim", (4096, VOL_SIZE), "EINVAL"),
    ]
    for method, args, want in cases:
        with pytest.raises(nbd.Error) as exc:
            getattr(h, method)(*args)
        assert nbd_errno(exc) == want, (method, args[1:], str(exc.value))
        assert errno.errorcode[exc.value.errnum] == want
    # The same connection still works, and nothing was written by the failed requests.
    assert h.pread(8192, VOL_SIZE - 8192) == payload
    assert s.proc.poll() is None
    h2 = s.connect(volume)
    assert h2.pread(8192, VOL_SIZE - 8192) == payload
    h.shutdown()
    h2.shutdown()
    del h, h2
    assert s.stop() == 0
    want = hashlib.sha256(bytes(VOL_SIZE - 8192) + payload).hexdigest()
    assert checksum(data_dir, volume) == want


def test_serve_read_only_flag(data_dir: Path, volume: str, serve) -> None:
    """`serve --read-only`: the export is read-only, and a write sent anyway gets EPERM."""
    s: Served = serve()
    h = s.connect(volume)
    h.pwrite(b"\x33" * 4096, 0)
    h.shutdown()
    del h
    assert s.stop() == 0

    s = serve("--read-only")
    h = s.connect(volume)
    assert h.is_read_only()
    assert not h.can_trim()
    assert not h.can_zero()
    with pytest.raises(nbd.Error) as exc:  # refused by libnbd itself
        h.pwrite(b"\x44" * 512, 0)
    assert nbd_errno(exc) == "EPERM"
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as exc:  # refused by nbdkit (EROFS is EPERM on the wire)
        h.pwrite(b"\x44" * 512, 0)
    assert nbd_errno(exc) == "EPERM"
    assert h.pread(4096, 0) == b"\x33" * 4096
    h.shutdown()
    del h
    assert s.stop() == 0
    assert checksum(data_dir, volume) == hashlib.sha256(
        b"\x33" * 4096 + bytes(VOL_SIZE - 4096)).hexdigest()


def test_config_read_only_volume(data_dir: Path, tmp_path: Path, serve) -> None:
    """A volume declared `read_only: true` is served read-only; its neighbour is writable."""
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text(
        "version: 1\n"
        f"node:\n  data_dir: {data_dir}\n"
        "volumes:\n"
        "  - {name: v1, size: 64M, read_only: true}\n"
        "  - {name: v2, size: 64M}\n"
    )
    for name in ("v1", "v2"):
        run_nbdgw("-c", str(cfg), "volume", "create", name)
    s: Served = serve(config=cfg)
    ro, rw = s.connect("v1"), s.connect("v2")
    assert ro.is_read_only()
    assert not rw.is_read_only()
    ro.set_strict_mode(0)
    with pytest.raises(nbd.Error) as exc:
        ro.pwrite(b"\x55" * 4096, 0)
    assert nbd_errno(exc) == "EPERM"
    rw.pwrite(b"\x66" * 4096, 0)
    rw.flush()
    assert ro.pread(4096, 0) == bytes(4096)
    assert rw.pread(4096, 0) == b"\x66" * 4096
    ro.shutdown()
    rw.shutdown()
    del ro, rw
    assert s.stop() == 0
    assert checksum(data_dir, "v1") == hashlib.sha256(bytes(VOL_SIZE)).hexdigest()
    assert checksum(data_dir, "v2") == hashlib.sha256(
        b"\x66" * 4096 + bytes(VOL_SIZE - 4096)).hexdigest()


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert p.returncode == 0, f"{argv} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


def test_qemu_img_convert_in_and_out(data_dir: Path, volume: str, tmp_path: Path,
                                     serve) -> None:
    """qemu-img copies a 16 MiB file into the export and back out bit for bit."""
    need("qemu-img")
    src = tmp_path / "src.raw"
    src.write_bytes(seeded(16).randbytes(16 * MiB))
    s: Served = serve()
    uri = s.uri(volume)

    info = json.loads(run(["qemu-img", "info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == VOL_SIZE

    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)])
    assert out.stat().st_size == VOL_SIZE
    run(["cmp", "-n", str(16 * MiB), str(src), str(out)])
    with out.open("rb") as f:
        f.seek(16 * MiB)
        assert f.read() == bytes(VOL_SIZE - 16 * MiB)
    assert s.stop() == 0
    assert checksum(data_dir, volume) == hashlib.sha256(
        src.read_bytes() + bytes(VOL_SIZE - 16 * MiB)).hexdigest()


def fio(uri: str, *args: str) -> dict:
    """Run one fio job through its nbd engine; return the job's JSON result."""
    argv = ["fio", "--name=nbdgw", "--ioengine=nbd", f"--uri={uri}", "--size=32M",
            "--bs=4k", "--iodepth=16", "--runtime=30", "--verify=crc32c",
            "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--randseed=1234",
            "--output-format=json", *args]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    assert p.returncode == 0, f"fio failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr}"
    assert "verify" not in p.stderr.lower(), p.stderr
    out = json.loads(p.stdout[p.stdout.index("{"):])
    (job,) = out["jobs"]
    assert job["error"] == 0
    return job


def test_fio_nbd_engine_verify(data_dir: Path, volume: str, serve) -> None:
    need("fio")
    """fio writes 32 MiB of random 4 KiB blocks at queue depth 16 and verifies every one
    (crc32c headers); then a mixed random read/write job verifies too."""
    s: Served = serve()
    job = fio(s.uri(volume), "--rw=randwrite")
    assert job["write"]["io_kbytes"] == 32 * 1024
    assert job["read"]["io_kbytes"] == 32 * 1024  # the verify pass read every block back

    job = fio(s.uri(volume), "--rw=randrw", "--rwmixread=50", "--offset=32M")
    assert job["write"]["io_kbytes"] > 0
    assert job["read"]["io_kbytes"] > 0
    assert s.stop() == 0
    # fio's data really is in the volume: not all zeros any more.
    assert checksum(data_dir, volume) != hashlib.sha256(bytes(VOL_SIZE)).hexdigest()


def test_stop_with_idle_client_closes_volume_cleanly(data_dir: Path, volume: str,
                                                     serve) -> None:
    """SIGTERM to serve while a client stays connected (a VM, nbdfuse) must still close
    the volume cleanly and promptly: no SIGKILL of nbdkit, no recovery on the next open."""
    s: Served = serve()
    h = s.connect(volume)
    h.pwrite(b"\x77" * 4096, 0)
    h.flush()
    t0 = time.monotonic()
    rc = s.stop()
    elapsed = time.monotonic() - t0
    with pytest.raises(nbd.Error):  # the client was disconnected, not left hanging
        h.pread(4096, 0)
    del h
    assert "nbdkit_kill" not in s_log(s), "serve had to SIGKILL nbdkit"
    assert rc == 0
    assert elapsed < 10, f"stop took {elapsed:.1f} s with a client connected"

    s2: Served = serve()
    assert "volume_recovered" not in s2.stderr(), "the volume was not closed cleanly"
    h = s2.connect(volume)
    assert h.pread(4096, 0) == b"\x77" * 4096
    h.shutdown()
    del h
    assert s2.stop() == 0
