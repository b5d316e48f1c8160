"""Small versioned metadata files, written atomically (temp, fsync, rename, fsync dir)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import FormatError


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename or create inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Replace ``path`` with ``obj`` as JSON so that a crash leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
