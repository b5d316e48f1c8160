"""Small versioned metadata files, written atomically (temp, fsync, rename, fsync dir)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import FormatError
from .modes import create_file
from .space import is_enospc, no_space
from .store import pwrite_all


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename or create inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


IN_PLACE_MAX = 512  # one disk sector: written in place only when a sector holds it all


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Replace ``path`` with ``obj`` as JSON so that a crash leaves the old or the new file.

    On a full file system (ENOSPC) a small file that exists is rewritten in place
    instead: its block is allocated already, and a write of at most one 512-byte sector
    at offset 0 is atomic on the devices we run on (PostgreSQL keeps pg_control under
    512 bytes on the same assumption).  The text is padded with spaces to the old length
    so the file's size does not change.  Anything else raises NoSpace naming the file, the
    bytes it needed and the bytes free.  The temp file never outlives a failure."""
    tmp = path.with_name(path.name + ".tmp")
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    try:
        fd = create_file(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            pwrite_all(fd, data, 0, f"write of {tmp}")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not is_enospc(e):
            raise
        if not _rewrite_in_place(path, data):
            raise no_space(path, len(data)) from None
        return
    fsync_dir(path.parent)


def _rewrite_in_place(path: Path, data: bytes) -> bool:
    """Overwrite a small existing file in place (see write_json); False if it cannot be."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        old = os.fstat(fd).st_size
        if max(old, len(data)) > IN_PLACE_MAX:
            return False
        buf = data[:-1] + b" " * (old - len(data)) + b"\n" if old > len(data) else data
        os.pwrite(fd, buf, 0)
        os.fsync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def read_json(path: Path, kind: str, version: int) -> dict[str, Any]:
    """Read a metadata file written by write_json; check its format version."""
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        raise FormatError(f"{path}: not an nbdgw {kind} file")
    if obj.get("version") != version:
        raise FormatError(
            f"{path}: {kind} format version {obj.get('version')!r} is not supported "
            f"(this nbdgw reads version {version})"
        )
    return obj
