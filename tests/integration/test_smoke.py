"""The shortest end-to-end path: create, serve, write and read back over NBD, stop."""

from __future__ import annotations

import os

from tests.conftest import run_nbdgw


def test_write_read_back_and_clean_stop(data_dir, volume, serve):
    s = serve()
    h = s.connect("v1")
    data = os.urandom(1 << 20)
    h.pwrite(data, 3 << 20)
    h.flush()
    assert h.pread(len(data), 3 << 20) == data
    assert h.get_size() == 64 << 20
    del h
    assert s.stop() == 0
    digest = run_nbdgw("volume", "checksum", "v1", "--data-dir", str(data_dir)).stdout.split()[0]
    expect = __import__("hashlib").sha256(bytes(3 << 20) + data + bytes(60 << 20)).hexdigest()
    assert digest == expect
