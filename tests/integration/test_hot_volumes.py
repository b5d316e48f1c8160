"""Volumes come and go on a running node: served within seconds, withdrawn when deleted,
with no restart and no error for clients of other volumes (NBD and iSCSI)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Served, run_nbdgw

MiB = 1 << 20


def writer(uri: str, stop: threading.Event, errors: list[str], done: list[int]) -> None:
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    i = 0
    try:
        while not stop.is_set():
            h.pwrite(bytes([i % 256]) * 4096, (i % 1000) * 4096)
            i += 1
            if i % 16 == 0:
                h.flush()
    except nbd.Error as e:
        errors.append(str(e))
    finally:
        done.append(i)
        h.shutdown()


def exports(sock: Path) -> list[str]:
    import nbd

    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(str(sock))
    names: list[str] = []
    h.opt_list(lambda name, desc: names.append(name) or 0)
    h.opt_abort()
    return names


def test_a_volume_created_while_serving_is_served_and_withdrawn(data_dir: Path) -> None:
    import nbd

    run_nbdgw("volume", "create", "v1", "--size", "32M", "--data-dir", str(data_dir))
    served = Served(data_dir, [])
    stop, errors, done = threading.Event(), [], []
    t = threading.Thread(target=writer, args=(served.uri("v1"), stop, errors, done))
    t.start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        run_nbdgw("volume", "create", "v2", "--size", "16M", "--data-dir", str(data_dir))
        h = nbd.NBD()
        while True:  # served within 2 s, no restart
            try:
                h.connect_uri(served.uri("v2"))
                break
            except nbd.Error:
                assert time.monotonic() - t0 < 2.0, "v2 not served within 2 s"
                time.sleep(0.05)
        took = time.monotonic() - t0
        h.pwrite(b"\x07" * 4096, 0)
        h.flush()
        assert h.pread(4096, 0) == b"\x07" * 4096
        assert "v2" in exports(served.sock)
        # Deleting a volume a client uses is refused with the reason; once it left, the
        # volume is withdrawn from the running server and deleted.
        p = run_nbdgw("volume", "delete", "v2", "--yes", "--data-dir", str(data_dir),
                      check=False)
        assert p.returncode != 0
        assert "volume v2 is in use by 1 client (NBD or iSCSI): disconnect them first" \
            in p.stderr
        h.shutdown()
        del h
        time.sleep(0.2)
        run_nbdgw("volume", "delete", "v2", "--yes", "--data-dir", str(data_dir))
        assert "v2" not in exports(served.sock)
        h2 = nbd.NBD()
        with pytest.raises(nbd.Error, match="no export named 'v2'"):
            h2.connect_uri(served.uri("v2"))
    finally:
        stop.set()
        t.join(30)
    assert errors == [] and done and done[0] > 100, (errors, done)
    assert took < 2.0
    served.stop()


def test_a_client_naming_no_export_is_refused_unless_a_default_is_named(
        data_dir: Path, tmp_path: Path) -> None:
    import nbd

    run_nbdgw("volume", "create", "v1", "--size", "16M", "--data-dir", str(data_dir))
    served = Served(data_dir, [])
    h = nbd.NBD()
    with pytest.raises(nbd.Error, match="no export named ''"):
        h.connect_unix(str(served.sock))  # the empty export name: refused, not v1
    time.sleep(0.2)
    assert "name the volume to connect to (nbd://HOST/VOLUME); exports: v1" \
        in served.stderr()
    served.stop()
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text(f"version: 1\nnode: {{data_dir: {data_dir}}}\n"
                   "nbd: {default_export: v1}\n")
    served = Served(data_dir, [], config=cfg)
    h = nbd.NBD()
    h.connect_unix(str(served.sock))
    assert h.get_size() == 16 * MiB
    h.shutdown()
    served.stop()
