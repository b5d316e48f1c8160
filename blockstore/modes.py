"""Modes of what nbdgw creates under a data directory (DESIGN.md §10).

Volume data (the store, journal segments, snapshot data) is readable by its owner only:
files 0600 in directories 0700, set explicitly, whatever the umask of the process that
creates them (the CLI runs with an admin's 022).  The one way to open anything up is
``control.group``: ``open_to_group`` makes the directories owner:group 02750 (setgid, so
that what is created in them later belongs to the group) and the metadata files 0640,
which lets the group's members run ``nbdgw status``.  Volume data stays 0600 even then.
Files and directories created later follow their directory: group-readable metadata
only in a directory opened to a group, volume data never.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from .errors import BlockstoreError

DIR = 0o700
FILE = 0o600
GROUP_DIR = 0o2750
GROUP_FILE = 0o640
_JOURNAL_DIR = "journal"
_DATA_NAMES = frozenset({"store", "data"})  # a volume's store; a snapshot store's data


class NotOwned(BlockstoreError):
    """A directory nbdgw would keep private belongs to another user."""


def opened_to_group(directory: Path) -> bool:
    """Whether ``open_to_group`` opened ``directory`` (setgid, a group other than root's)."""
    st = os.stat(directory)
    return bool(st.st_mode & stat.S_ISGID) and st.st_gid != 0


def dir_mode(parent: Path) -> int:
    return GROUP_DIR if opened_to_group(parent) else DIR


def file_mode(parent: Path, data: bool = False) -> int:
    return GROUP_FILE if not data and opened_to_group(parent) else FILE


def make_dir(path: Path, *, parents: bool = False, exist_ok: bool = False) -> None:
    """mkdir ``path`` with the mode of its parent's kind (0700, or 02750 in a directory
    opened to a group).  With ``parents``, missing ancestors are made as mkdir -p would:
    they are outside the data directory, which is ``path`` itself.  An existing ``path``
    (``exist_ok``) is tightened: no access for others, none for the group unless it was
    opened to one."""
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, DIR)
    except FileExistsError:
        if not exist_ok or not path.is_dir():
            raise
        tighten_dir(path)
        return
    os.chmod(path, dir_mode(path.parent))


def make_own_dir(path: Path, what: str) -> None:
    """make_dir(path, parents=True, exist_ok=True) for a directory that must be this
    process's user's own: one that another user owns is refused (NotOwned), not taken
    over, since its owner can replace what is in it whatever its mode."""
    with contextlib.suppress(FileNotFoundError):
        owner = os.lstat(path).st_uid
        if owner != os.geteuid():
            raise NotOwned(f"{what} {path} belongs to uid {owner}, not to uid "
                           f"{os.geteuid()} that runs nbdgw: remove it, or give it to "
                           f"uid {os.geteuid()} (chown) if its content is trusted")
    make_dir(path, parents=True, exist_ok=True)


def tighten_dir(path: Path) -> None:
    """Take others' access to ``path`` away, and the group's unless it was opened to one
    (a directory made before nbdgw set modes, 0755 under an umask of 022)."""
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    want = mode & ~0o007 if opened_to_group(path) else mode & ~0o077
    if want != mode:
        os.chmod(path, want)


def tighten_tree(top: Path) -> None:
    """tighten_dir every directory under ``top`` (and ``top``), and make every journal
    file 0600: a volume created before nbdgw set modes had segments 0644, and journal
    files are recycled, mode and all."""
    for root, _dirs, files in os.walk(top):
        tighten_dir(Path(root))
        if _in_journal(Path(root)):
            for name in files:
                _chmod_file(Path(root) / name, FILE)


def create_file(path: Path, flags: int, *, data: bool = False, tighten: bool = True
                ) -> int:
    """os.open(path, flags | O_CREAT): the descriptor.  A file it creates gets the mode
    of its directory's kind (see the module doc) whatever the umask; an existing one
    loses any access beyond that mode (one an older nbdgw made 0644), unless not
    ``tighten`` (the audit log, which control.group members may append to)."""
    want = file_mode(path.parent, data)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE)
        created = True
    except FileExistsError:
        if flags & os.O_EXCL:
            raise
        fd = os.open(path, flags | os.O_CREAT, FILE)
        created = False
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if created and mode != want:
            os.fchmod(fd, want)
        elif not created and tighten and mode & ~want:
            os.fchmod(fd, mode & want)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_file(path: Path, content: bytes, *, data: bool = False) -> None:
    """Create or replace the whole of ``path`` (mode as create_file), not atomically."""
    fd = create_file(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, data=data)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _in_journal(directory: Path) -> bool:
    """``directory`` is a volume's journal, or a quarantine in one (volume repair)."""
    return any(d.name == _JOURNAL_DIR and (d.parent / "volume.json").is_file()
               for d in (directory, directory.parent))


def _is_data(path: Path) -> bool:
    return path.name in _DATA_NAMES or _in_journal(path.parent)


def _chmod_file(path: Path, mode: int) -> None:
    with contextlib.suppress(FileNotFoundError):  # a journal file released meanwhile
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)


def open_to_group(data_dir: Path, gid: int, private: tuple[str, ...] = ()) -> None:
    """Let group ``gid`` (control.group) read the metadata under ``data_dir``: every
    directory owner:gid 02750, every metadata file gid 0640; volume data 0600, the files
    named in ``private`` (directly in ``data_dir``) as they are, and sockets as they are
    (each has its own mode).  Idempotent; changes only what differs."""
    for root, _dirs, files in os.walk(data_dir):
        rpath = Path(root)
        st = os.stat(rpath)
        if st.st_gid != gid:
            os.chown(rpath, -1, gid)
        if stat.S_IMODE(st.st_mode) != GROUP_DIR:
            os.chmod(rpath, GROUP_DIR)
        for name in files:
            path = rpath / name
            if rpath == data_dir and name in private:
                continue
            if _is_data(path):
                _chmod_file(path, FILE)
                continue
            with contextlib.suppress(FileNotFoundError):
                fst = os.lstat(path)
                if not stat.S_ISREG(fst.st_mode):
                    continue
                if fst.st_gid != gid:
                    os.chown(path, -1, gid)
                want = GROUP_FILE
                if stat.S_IMODE(fst.st_mode) != want:
                    os.chmod(path, want)
