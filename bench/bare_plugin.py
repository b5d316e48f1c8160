# The "bare" nbdkit Python plugin: the floor for any Python data path.
#
#   nbdkit python bench/bare_plugin.py file=PATH [thread_model=serialize_all_requests]
#
# Each request is one os.pwrite / os.preadv on a plain file and nothing else, so the
# gap between this and nbdkit's C `file` plugin is the cost of nbdkit's Python
# binding (GIL, buffer objects, callback dispatch), and the gap between nbdgw and this
# is the cost of nbdgw's own work (journal record, CRCs, activity log, checks).
# `thread_model` lets bench/datapath measure SERIALIZE_ALL_REQUESTS against PARALLEL.
import errno
import os

import nbdkit

API_VERSION = 2

_MODELS = {
    "serialize_connections": nbdkit.THREAD_MODEL_SERIALIZE_CONNECTIONS,
    "serialize_all_requests": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    "serialize_requests": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS,
    "parallel": nbdkit.THREAD_MODEL_PARALLEL,
}

_path: str | None = None
_model: int = nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS
_fd = -1
_size = 0


def config(key: str, value: str) -> None:
    global _path, _model
    if key == "file":
        _path = value
    elif key == "thread_model":
        if value not in _MODELS:
            raise ValueError(f"thread_model must be one of {', '.join(_MODELS)}, got {value!r}")
        _model = _MODELS[value]
    else:
        raise ValueError(f"unknown parameter {key!r} (known: file, thread_model)")


def config_complete() -> None:
    global _fd, _size
    if _path is None:
        raise ValueError("missing required parameter file")
    _fd = os.open(_path, os.O_RDWR)
    _size = os.fstat(_fd).st_size


def thread_model() -> int:
    return _model


def open(readonly: bool) -> int:  # the callback's literal name
    return _fd


def get_size(h: int) -> int:
    return _size


def can_multi_conn(h: int) -> bool:
    return True


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    if os.preadv(h, [buf], offset) != len(buf):
        nbdkit.set_error(errno.EIO)
        raise OSError(errno.EIO, "short read")


def pwrite(h: int, buf: bytes, offset: int, flags: int) -> None:
    if os.pwrite(h, buf, offset) != len(buf):
        nbdkit.set_error(errno.EIO)
        raise OSError(errno.EIO, "short write")


def flush(h: int, flags: int) -> None:
    os.fdatasync(h)
