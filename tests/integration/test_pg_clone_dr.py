"""PostgreSQL on a replicated volume, and a DR drill on a clone of a CDP point while
replication goes on.  A real `nbdgw serve` primary with a CDP window, real peerlink
sender and receiver (the DR replica keeps its own window), ext4 on the volume through
nbdfuse and a loop device, PostgreSQL 15 (its own fsyncs: crash-safe) under pgbench.
On the DR side, while pgbench keeps writing and the receiver keeps applying: `nbdgw
clone create v1 drill --at <now>` (the last FLUSH the replica holds), served by `nbdgw
serve` on the replica's data dir, mounted read-write by a client (ext4 replays its
journal), PostgreSQL started on it (crash recovery replays its WAL), `amcheck`
(bt_index_check of every pgbench index) and the pgbench balance check (the sums of
abalance, bbalance, tbalance and history delta are equal) pass; replication moved on
meanwhile; at the end the replica's checksum equals the primary's."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import yaml

from blockstore.cdp import CdpPolicy, format_instant, lasting_pins, write_policy
from tests.conftest import Served, free_port, need, run_nbdgw
from tests.integration.conftest import FS_MARKS, loop_device, mounted, nbdfuse, run
from tests.integration.peerenv import Env

pytestmark = FS_MARKS

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SIZE = "512M"
PGBENCH_SCALE = 2  # 200 000 accounts, about 30 MiB
PGBENCH_MAX_S = 150  # stopped (SIGINT) once the drill is done, well before this


def as_postgres(*argv: str, timeout: float = 120, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
    return run(["runuser", "-u", "postgres", "--", *argv], timeout=timeout, check=check)


def psql(sock: Path, port: int, sql: str) -> str:
    return as_postgres(str(PG_BIN / "psql"), "-h", str(sock), "-p", str(port), "-d",
                       "postgres", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c",
                       sql).stdout.strip()


@contextmanager
def postgres(pgdata: Path, sock: Path, port: int, log: Path) -> Iterator[None]:
    p = as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(pgdata), "-l", str(log), "-w", "-t",
                    "90", "-o", f"-p {port} -k {sock} -c listen_addresses=''", "start",
                    timeout=120, check=False)
    assert p.returncode == 0, f"PostgreSQL did not start on {pgdata}:\n{log.read_text()}"
    try:
        yield
    finally:
        t0 = time.monotonic()
        p = as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w",
                        "-t", "90", "stop", timeout=120, check=False)
        print(f"pg_ctl stop {pgdata}: {p.returncode} in {time.monotonic() - t0:.1f} s")
        assert p.returncode == 0, f"PostgreSQL did not stop:\n{p.stderr}\n{log.read_text()}"


@pytest.fixture
def pg_env(tmp_path: Path, data_dir: Path, serve: Callable[..., Served]) -> Iterator[Env]:
    for tool in ("postgresql", "mkfs.ext4"):
        need(tool)
    replica = tmp_path / "replica"
    replica.mkdir()
    for d, extra in ((data_dir, ()), (replica, ("--replica",))):
        run_nbdgw("volume", "create", "v1", "--size", SIZE, *extra, "--data-dir", str(d))
    config = tmp_path / "nbdgw.yaml"
    config.write_text(yaml.safe_dump({"version": 1, "node": {"data_dir": str(data_dir)},
                                      "cdp": {"window": "1h"}}))
    write_policy(replica / "volumes/v1", CdpPolicy(3600, 4 << 30))
    (tmp_path / "replica.yaml").write_text(yaml.safe_dump(
        {"version": 1, "node": {"data_dir": str(replica)},
         "cdp": {"window": "1h", "max_bytes": "4G"}}))
    e = Env(tmp_path, data_dir, replica, serve(config=config))
    try:
        yield e
    finally:
        e.kill_all()


@pytest.fixture
def pg_dir() -> Iterator[Path]:
    """Mount points and sockets PostgreSQL (user postgres) can reach: pytest's tmp_path
    is 0700 root."""
    base = Path(tempfile.mkdtemp(prefix="nbdgw-pg-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def fsync_file(path: Path) -> None:
    """Write back what the page cache holds of an nbdfuse image, before the unmount
    (which the helper gives a short time): a busy 2-core machine takes longer."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def balance_check(sock: Path, port: int) -> tuple[int, list[int]]:
    """(history rows, [sum abalance, sum bbalance, sum tbalance, sum delta])."""
    row = psql(sock, port, "SELECT (SELECT count(*) FROM pgbench_history), "
               "(SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts), "
               "(SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches), "
               "(SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers), "
               "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)")
    n, *sums = (int(x) for x in row.split("|"))
    return n, sums


@pytest.mark.timeout(600)
def test_postgres_starts_on_a_clone_of_a_cdp_point_on_the_dr_site(  # noqa: PLR0915
        pg_env: Env, pg_dir: Path, serve: Callable[..., Served], tmp_path: Path) -> None:
    e = pg_env
    rx = e.receiver()
    e.sender(rx.port)
    port, cport = free_port(), free_port()
    sock = pg_dir / "sock"
    sock.mkdir()
    shutil.chown(sock, "postgres", "postgres")
    rdd = ["--data-dir", str(e.replica)]
    with ExitStack() as primary:
        image = primary.enter_context(nbdfuse(tmp_path / "fuse", e.served.uri("v1")))
        primary.callback(fsync_file, image)
        dev = primary.enter_context(loop_device(image))
        primary.callback(run, ["blockdev", "--flushbufs", dev], 180)
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
        mnt = primary.enter_context(mounted(dev, pg_dir / "pmnt"))
        primary.callback(run, ["sync", "-f", str(mnt)], 180)
        pgdata = mnt / "pg"
        pgdata.mkdir(mode=0o700)
        shutil.chown(pgdata, "postgres", "postgres")
        as_postgres(str(PG_BIN / "initdb"), "-D", str(pgdata), "-A", "trust", "-U",
                    "postgres", "--wal-segsize=1", timeout=180)
        with (pgdata / "postgresql.conf").open("a") as f:
            f.write("shared_buffers = 16MB\nmax_wal_size = 64MB\nmin_wal_size = 8MB\n")
            # Made durable, as PostgreSQL makes its own files: an image of a crash (a
            # CDP point is one) may hold the file's new size with its tail still zeros.
            f.flush()
            os.fsync(f.fileno())
        primary.enter_context(postgres(pgdata, sock, port, sock / "primary.log"))
        as_postgres(str(PG_BIN / "pgbench"), "-h", str(sock), "-p", str(port), "-i", "-q",
                    "-s", str(PGBENCH_SCALE), "postgres", timeout=300)
        bench_log = (tmp_path / "pgbench.log").open("w")
        primary.callback(bench_log.close)
        bench = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / "pgbench"), "-h", str(sock),
             "-p", str(port), "-c", "2", "-T", str(PGBENCH_MAX_S), "-P", "5", "postgres"],
            stdout=bench_log, stderr=subprocess.STDOUT, start_new_session=True)

        def stop_bench() -> None:
            """SIGINT to pgbench itself (runuser does not pass it on): it stops between
            transactions, as an operator's ^C would."""
            if bench.poll() is None:
                os.killpg(bench.pid, signal.SIGINT)
                try:
                    bench.wait(30)
                except subprocess.TimeoutExpired:
                    bench.kill()
                    bench.wait(10)

        primary.callback(stop_bench)
        time.sleep(15)  # pgbench commits for a while (each commit a FLUSH: a point)
        assert bench.poll() is None, (tmp_path / "pgbench.log").read_text()

        # The DR drill: a clone of the replica's newest consistency point.
        at = format_instant(time.time_ns())
        out = run_nbdgw("clone", "create", "v1", "drill", "--at", at, *rdd).stdout
        assert "created clone drill of v1@" in out
        assert set(lasting_pins(e.replica / "volumes/v1")) == {"clone-drill"}
        acked_before = e.acked()
        rs = serve(data_dir_=e.replica, config=tmp_path / "replica.yaml")
        assert rs.lines[-1].startswith("nbdgw: export drill: ")
        with ExitStack() as drill:
            cimage = drill.enter_context(nbdfuse(tmp_path / "cfuse", rs.uri("drill")))
            drill.callback(fsync_file, cimage)
            cdev = drill.enter_context(loop_device(cimage))
            drill.callback(run, ["blockdev", "--flushbufs", cdev], 180)
            cmnt = drill.enter_context(mounted(cdev, pg_dir / "cmnt"))  # ext4 replays
            drill.callback(run, ["sync", "-f", str(cmnt)], 180)
            cdata = cmnt / "pg"
            # The primary's postmaster runs on this same machine: its lock file in the
            # image names a live process (on a DR host it would not).
            (cdata / "postmaster.pid").unlink()
            drill.enter_context(postgres(cdata, sock, cport, sock / "clone.log"))
            recovery = (sock / "clone.log").read_text()
            assert "database system was not properly shut down" in recovery, recovery
            psql(sock, cport, "CREATE EXTENSION IF NOT EXISTS amcheck")
            checked = psql(sock, cport,
                           "SELECT count(bt_index_check(c.oid, true)) FROM pg_index i "
                           "JOIN pg_class c ON c.oid = i.indexrelid "
                           "WHERE i.indrelid::regclass::text LIKE 'pgbench_%'")
            assert int(checked) == 3  # the primary keys of accounts, branches, tellers
            rows, sums = balance_check(sock, cport)
            assert rows > 0, "no pgbench transaction reached the clone's point"
            assert len(set(sums)) == 1, f"balances differ on the clone: {sums}"
            print(f"clone: {rows} pgbench transactions, balances {sums}")
        # Replication went on during the drill, and pgbench with it.
        assert bench.poll() is None, (tmp_path / "pgbench.log").read_text()
        assert e.acked() > acked_before
        stop_bench()
        progress = [x for x in (tmp_path / "pgbench.log").read_text().splitlines()
                    if x.startswith("progress:")]
        assert progress and all(x.endswith(" 0 failed") for x in progress), progress
        rows, sums = balance_check(sock, port)
        assert len(set(sums)) == 1, f"balances differ on the primary: {sums}"
        print(f"primary: {rows} pgbench transactions")
    # PostgreSQL stopped, the file system unmounted: the primary is idle.
    run_nbdgw("clone", "delete", "drill", *rdd)
    rs.stop()
    e.wait_caught_up(timeout=120)
    for p in e.procs:
        assert p.stop() == 0
    primary_sum, replica_sum = e.checksums()
    assert primary_sum == replica_sum
