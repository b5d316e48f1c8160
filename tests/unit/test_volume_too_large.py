"""Issue 20, point 7: `volume create --size 1P` on a file system that cannot hold a file
that large used to fail half way ("File too large" from ftruncate, a hidden
.creating-* directory left behind).  The size is now tried on an unnamed file
(O_TMPFILE) of the same file system before anything is made, and refused with the
largest size that fits.

Free space is not the limit: stores are sparse (thin provisioning), so only the file
system's maximum file size is checked (ext4 with 4 KiB blocks: 16 TiB - 4 KiB).
PC_FILESIZEBITS does not tell it: ext4 answers 64.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import blockstore.volume as volume_mod
from blockstore.errors import InvalidArgument
from blockstore.volume import Volume, create_volume, largest_file_size

LIMIT = (16 << 40) - 4096  # ext4, 4 KiB blocks


@pytest.fixture
def limited(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system whose files stop at LIMIT bytes, whatever the test machine has."""
    real = os.ftruncate

    def ftruncate(fd: int, length: int) -> None:
        if length > LIMIT:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        real(fd, length)

    monkeypatch.setattr(volume_mod.os, "ftruncate", ftruncate)


def test_largest_file_size(tmp_path: Path, limited: None) -> None:
    assert largest_file_size(tmp_path, 1 << 50) == LIMIT
    assert largest_file_size(tmp_path, LIMIT) is None  # fits
    assert os.listdir(tmp_path) == []  # the probe is an unnamed file


def test_create_refuses_before_making_anything(tmp_path: Path, limited: None) -> None:
    data_dir = tmp_path / "data"
    with pytest.raises(InvalidArgument) as ei:
        create_volume(data_dir, "big", 1 << 50)
    assert str(ei.value) == (
        f"invalid size 1125899906842624 bytes (1P): files on the file system of {tmp_path} "
        "can be at most 17592186040320 bytes (16T - 4K); nothing was created")
    assert not data_dir.exists()
    assert os.listdir(tmp_path) == []
    # Within the limit the same call works.
    assert create_volume(data_dir, "big", LIMIT).size == LIMIT


def test_existing_data_dir_is_left_as_it_was(tmp_path: Path, limited: None) -> None:
    create_volume(tmp_path, "v1", 1 << 20)
    before = sorted(p.name for p in (tmp_path / "volumes").iterdir())
    with pytest.raises(InvalidArgument):
        create_volume(tmp_path, "big", 1 << 50)
    assert sorted(p.name for p in (tmp_path / "volumes").iterdir()) == before == ["v1"]


def test_grow_refuses_too(tmp_path: Path, limited: None) -> None:
    create_volume(tmp_path, "v1", 1 << 20)
    vol = Volume.open(tmp_path, "v1")
    try:
        with pytest.raises(InvalidArgument) as ei:
            vol.grow(1 << 50)
        assert str(ei.value) == (
            f"invalid size 1125899906842624 bytes (1P): files on the file system of "
            f"{tmp_path / 'volumes' / 'v1'} can be at most 17592186040320 bytes "
            "(16T - 4K); nothing was changed")
        assert vol.size == 1 << 20
    finally:
        vol.close()


def test_on_this_machine(tmp_path: Path) -> None:
    """The real file system under the tests, when it has a limit below 1 PiB."""
    limit = largest_file_size(tmp_path, 1 << 50)
    if limit is None:
        pytest.skip("this file system holds a 1 PiB file (tmpfs, xfs, btrfs)")
    with pytest.raises(InvalidArgument, match=f"can be at most {limit} bytes"):
        create_volume(tmp_path / "data", "big", 1 << 50)
    assert not (tmp_path / "data").exists()
