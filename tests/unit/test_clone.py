"""Writable clones (blockstore/clone.py) against a model: random writes, zeros and reads,
aligned and not, over a base that is never written; the clone reads exactly the model,
keeps only what it wrote, survives a reopen, and refuses what it must."""

from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path

import pytest

from blockstore.clone import (
    Clone,
    CloneError,
    create_clone,
    delete_clone,
    find_clone,
    list_clones,
)

SIZE = (1 << 20) + 3 * 512  # not a whole number of blocks


class BytesBase:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        self.reads += 1
        buf[:] = self.data[offset:offset + len(buf)]


def make(tmp_path: Path, seed: int = 1) -> tuple[Clone, BytesBase, bytearray]:
    base = BytesBase(random.Random(seed).randbytes(SIZE))  # noqa: S311 - test data
    info = create_clone(tmp_path, "c1", "v1", "s1", SIZE)
    return Clone(info, base), base, bytearray(base.data)


def test_random_operations_read_as_the_model(tmp_path: Path) -> None:
    clone, base, model = make(tmp_path)
    rng = random.Random(7)  # noqa: S311 - a replayable schedule
    for _ in range(400):
        off = rng.randrange(SIZE)
        n = rng.choice([1, 17, 512, 4096, 5000, 65536, 200_000])
        n = min(n, SIZE - off)
        kind = rng.random()
        if kind < 0.5:
            data = rng.randbytes(n)
            clone.write(data, off, fua=rng.random() < 0.1)
            model[off:off + n] = data
        elif kind < 0.6:
            clone.zero(off, n)
            model[off:off + n] = bytes(n)
        else:
            buf = bytearray(n)
            clone.read_into(buf, off)
            assert buf == model[off:off + n], (off, n)
    clone.flush()
    whole = bytearray(SIZE)
    clone.read_into(whole, 0)
    assert whole == model
    assert base.data == bytes(base.data)  # the base is never written
    clone.close()
    again = Clone(find_clone(tmp_path, "c1"), base)  # type: ignore[arg-type]
    whole2 = bytearray(SIZE)
    again.read_into(whole2, 0)
    assert whole2 == model
    again.close()


def test_a_clone_stores_only_its_own_writes(tmp_path: Path) -> None:
    clone, base, _ = make(tmp_path)
    clone.write(b"x" * 100, 10_000)  # one block's worth
    clone.flush()
    info = clone.info.to_json()
    assert 0 < info["allocated_bytes"] <= 64 << 10
    runs = clone.runs(0, SIZE)
    assert [w for _, _, w in runs] == [False, True, False]
    buf = bytearray(4096)
    clone.read_into(buf, 8192)  # the block: the write inside the base's bytes
    assert buf[10_000 - 8192:10_100 - 8192] == b"x" * 100
    assert buf[:10_000 - 8192] == base.data[8192:10_000]
    clone.close()


def test_partial_writes_into_one_block_from_threads_never_undo_each_other(
        tmp_path: Path) -> None:
    clone, _, _ = make(tmp_path)
    blocks = 64

    def writer(k: int) -> None:
        for b in range(blocks):
            off = b * 4096 + k * 512
            clone.write(bytes([k + 1]) * 512, off)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    buf = bytearray(blocks * 4096)
    clone.read_into(buf, 0)
    for b in range(blocks):
        for k in range(8):
            assert buf[b * 4096 + k * 512:b * 4096 + (k + 1) * 512] == bytes([k + 1]) * 512
    clone.close()


def test_refusals(tmp_path: Path) -> None:
    clone, base, _ = make(tmp_path)
    with pytest.raises(OSError, match="outside clone c1") as ei:
        clone.write(b"x", SIZE)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(CloneError, match="a clone named c1 exists"):
        create_clone(tmp_path, "c1", "v1", "s1", SIZE)
    ro = Clone(clone.info, base, readonly=True)
    with pytest.raises(OSError, match="open read-only") as ei:
        ro.write(b"x", 0)
    assert ei.value.errno == errno.EROFS
    with pytest.raises(CloneError, match="its base is 4096 bytes"):
        Clone(clone.info, BytesBase(bytes(4096)))
    ro.close()
    clone.close()
    assert [c.name for c in list_clones(tmp_path)] == ["c1"]
    delete_clone(tmp_path, "c1")
    assert list_clones(tmp_path) == [] and not (tmp_path / "clones" / "c1").exists()
    with pytest.raises(CloneError, match="no clone named c1"):
        delete_clone(tmp_path, "c1")
    assert os.listdir(tmp_path / "clones") == []
