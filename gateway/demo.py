"""`make demo`: a narrated run of nbdgw on real components, about a minute.

As root with network namespaces (gateway/labdemo.py): a three-site lab on this machine
(primary, secondary, DR, each running `nbdgw daemon` in its own namespace), data written
from a client namespace, shown replicated, a snapshot, a power cut of the primary, the
failover, the data intact through the service address, and teardown.

Where namespaces cannot be made (not root, no `ip netns`), it says why and runs the
single-node loopback demo below instead: creates a volume in a temporary data
directory and a replica of it in another, serves the volume with `nbdgw serve` (real
nbdkit), replicates it with `nbdgw peerlink` over loopback, writes and reads it back
with libnbd and qemu-img, crashes nbdkit with kill -9 mid-stream and shows recovery,
then stops cleanly, shows the replica identical by checksum, and prints how to connect.
Run ``python -m gateway.demo --keep`` to leave it serving until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def nbdgw(*args: str) -> str:
    p = subprocess.run([str(BIN / "nbdgw"), "--log-format", "json", *args],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        sys.exit(f"demo failed: nbdgw {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout.strip()


def start_serve(data_dir: Path, sock: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    argv = [str(BIN / "nbdgw"), "--log-format", "json", "serve", "--data-dir", str(data_dir),
            "--listen", f"unix:{sock}", "--listen", f"tcp:127.0.0.1:{port}"]
    log = open(data_dir / "serve.log", "a")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    tcp = ""
    while True:
        line = proc.stdout.readline()
        if not line:
            sys.exit(f"demo failed: nbdgw serve exited; see {data_dir / 'serve.log'}")
        if line.startswith("nbdgw: listening on tcp:"):
            tcp = line.split("listening on ", 1)[1].strip()
        if line.startswith("nbdgw: export"):
            return proc, tcp


def start_link(tmp: Path, data_dir: Path, replica_dir: Path) -> list[subprocess.Popen[str]]:
    """A replica receiver and the primary's sender on 127.0.0.1 (a free port)."""
    secret = Path(tmp) / "peer.secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)  # as `nbdgw config check` wants a secret file
    nbdgw_bin = str(BIN / "nbdgw")
    recv = subprocess.Popen(
        [nbdgw_bin, "peerlink", "receive", "--data-dir", str(replica_dir), "--volume", "demo",
         "--listen", "127.0.0.1:0", "--node", "replica", "--secret-file", str(secret)],
        stdout=subprocess.PIPE, stderr=open(replica_dir / "receive.log", "a"),  # noqa: SIM115
        text=True)
    assert recv.stdout is not None
    line = recv.stdout.readline()
    if "listening on" not in line:
        sys.exit(f"demo failed: the replica did not start; see {replica_dir / 'receive.log'}")
    addr = line.rsplit(" ", 1)[1].strip()
    send = subprocess.Popen(
        [nbdgw_bin, "peerlink", "send", "--data-dir", str(data_dir), "--volume", "demo",
         "--peer", f"replica={addr}", "--node", "primary", "--secret-file", str(secret),
         "--max-backoff", "1"],
        stdout=subprocess.DEVNULL, stderr=open(data_dir / "send.log", "a"),  # noqa: SIM115
        text=True)
    print(f"   replica listening on {addr}; the primary's sender ships its journal there")
    return [send, recv]


def wait_caught_up(data_dir: Path, timeout: float = 60) -> int:
    """The replica's acknowledged seq, once it equals the primary's last journal seq."""
    from blockstore.journal import journal_bounds

    vdir = data_dir / "volumes" / "demo"
    deadline = time.monotonic() + timeout
    acked = -1
    while time.monotonic() < deadline:
        last = journal_bounds(vdir / "journal")[1]
        peer = vdir / "peers" / "replica.json"
        if peer.exists():
            acked = int(json.loads(peer.read_text())["acked_seq"])
            if acked == last:
                return acked
        time.sleep(0.1)
    sys.exit(f"demo failed: the replica stayed at seq {acked}; see {data_dir / 'send.log'}")


def nbdkit_pid(serve_pid: int) -> int:
    for _ in range(100):
        kids = Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split()
        if kids:
            return int(kids[0])
        time.sleep(0.05)
    sys.exit("demo failed: no nbdkit process")


def loopback_demo(args: argparse.Namespace) -> None:  # noqa: PLR0915 - narrated steps
    import nbd

    with tempfile.TemporaryDirectory(prefix="nbdgw-demo-") as tmp:
        data_dir = Path(tmp) / "data"
        sock = Path(tmp) / "nbd.sock"
        replica_dir = Path(tmp) / "replica"
        say(f"Creating a 1 GiB volume 'demo' in {data_dir} (a sparse file + an empty journal)")
        print(nbdgw("volume", "create", "demo", "--size", "1G", "--data-dir", str(data_dir)))
        say(f"Creating its replica in {replica_dir} (Inconsistent until the first sync)")
        print(nbdgw("volume", "create", "demo", "--size", "1G", "--replica",
                    "--data-dir", str(replica_dir)))

        say("Serving it with nbdkit and the nbdgw plugin (every write is journaled, CRC32C)")
        proc, tcp = start_serve(data_dir, sock, args.port)
        uri = f"nbd+unix:///demo?socket={sock}"
        print(f"   serving on {tcp} and unix:{sock}")

        say("Replicating it with peerlink (batches applied atomically on the replica)")
        link = start_link(Path(tmp), data_dir, replica_dir)

        say("Writing 64 MiB with qemu-img, and 4 KiB blocks with libnbd, then reading back")
        src = Path(tmp) / "payload.bin"
        payload = os.urandom(64 << 20)
        src.write_bytes(payload)
        subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri],
                       check=True)
        h = nbd.NBD()
        h.connect_uri(uri)
        blocks = {i * (97 << 20) % (900 << 20): os.urandom(4096) for i in range(1, 9)}
        for off, data in blocks.items():
            h.pwrite(data, off)
        h.flush()
        ok = h.pread(len(payload), 0) == payload and all(
            h.pread(4096, off) == data for off, data in blocks.items())
        print(f"   read back {'identical' if ok else 'DIFFERENT'}: 64 MiB + {len(blocks)} blocks")
        if not ok:
            sys.exit("demo failed: read-back mismatch")

        say("Crash: kill -9 of nbdkit right after more acknowledged writes (no flush)")
        late = os.urandom(1 << 20)
        h.pwrite(late, 512 << 20)
        del h
        os.kill(nbdkit_pid(proc.pid), signal.SIGKILL)
        proc.wait(30)
        proc, tcp = start_serve(data_dir, sock, args.port)
        recovered = [ln for ln in (data_dir / "serve.log").read_text().splitlines()
                     if "volume_recovered" in ln]
        print(f"   restarted; recovery log: {recovered[-1] if recovered else 'none'}")
        h = nbd.NBD()
        h.connect_uri(uri)
        intact = h.pread(len(late), 512 << 20) == late and h.pread(4096, 0) == payload[:4096]
        del h
        print(f"   every acknowledged write is there after the crash: {intact}")
        if not intact:
            sys.exit("demo failed: data lost across kill -9")

        expect = hashlib.sha256()
        expect_img = bytearray(1 << 30)
        expect_img[: len(payload)] = payload
        for off, data in blocks.items():
            expect_img[off:off + 4096] = data
        expect_img[512 << 20:(512 << 20) + len(late)] = late
        expect.update(expect_img)
        if args.keep:
            say("Serving until Ctrl-C. Connect with:")
            print(f"   nbdinfo nbd://{tcp.split(':', 1)[1]}/demo")
            print(f"   qemu-img info nbd://{tcp.split(':', 1)[1]}/demo")
            with contextlib.suppress(KeyboardInterrupt):
                proc.wait()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        say("Waiting for the replica to acknowledge the primary's last journal record")
        t0 = time.monotonic()
        seq = wait_caught_up(data_dir)
        print(f"   replica caught up at seq {seq} ({time.monotonic() - t0:.1f} s after the "
              "writes, including the restart)")
        for p in link:
            p.send_signal(signal.SIGTERM)
        for p in link:
            p.wait(30)
        say("Stopped cleanly; volume checksums (what operators compare across replicas)")
        line = nbdgw("volume", "checksum", "demo", "--data-dir", str(data_dir))
        rline = nbdgw("volume", "checksum", "demo", "--data-dir", str(replica_dir))
        print(f"   primary: {line}\n   replica: {rline}")
        same = line.split()[0] == expect.hexdigest()
        print(f"   primary equals the checksum of what the demo wrote: {same}")
        replicated = rline.split()[0] == line.split()[0]
        print(f"   replica identical to the primary: {replicated}")
        if not same:
            sys.exit("demo failed: checksum mismatch")
        if not replicated:
            sys.exit("demo failed: the replica differs from the primary")
        say("To serve your own volume:")
        print("   .venv/bin/nbdgw volume create v1 --size 10G --data-dir /srv/nbdgw")
        print("   .venv/bin/nbdgw serve --data-dir /srv/nbdgw --listen tcp:0.0.0.0:10809")
        print("   qemu-img info nbd://SERVER:10809/v1   # or nbdinfo, nbdfuse, fio --ioengine=nbd")
        print("   three sites in network namespaces: nbdgw lab up --dir /tmp/lab   (as root)")
        print("\ndemo complete: data intact, replica identical")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", action="store_true",
                    help="loopback demo: keep serving until Ctrl-C")
    ap.add_argument("--port", type=int, default=0, help="loopback demo: TCP port on "
                    "127.0.0.1 (0: any)")
    ap.add_argument("--loopback", action="store_true",
                    help="the single-node loopback demo even where namespaces work")
    ap.add_argument("--branches", action="store_true",
                    help="the fan-in story instead: three branches into one data centre, "
                    "volume groups, failover by DNS (needs root and namespaces)")
    args = ap.parse_args()
    from .labdemo import branches_demo, lab_demo, namespaces_unavailable

    if args.branches:
        if (why := namespaces_unavailable()) is not None:
            sys.exit(f"the fan-in story needs network namespaces: {why}")
        branches_demo()
        return
    why = "--loopback was given" if args.loopback or args.keep else namespaces_unavailable()
    if why is None:
        lab_demo()
        return
    say(f"No three-site lab here: {why}. Running the single-node demo on loopback instead")
    loopback_demo(args)


if __name__ == "__main__":
    main()
