"""The blockstore exception hierarchy: one base class, one subclass per failure kind."""

from __future__ import annotations


class BlockstoreError(Exception):
    """Base class of every error raised by blockstore."""


class InvalidArgument(BlockstoreError):
    """Local misuse: a bad name, size or range given by the caller."""


class VolumeNotFound(BlockstoreError):
    """No volume of that name exists in the data directory."""


class VolumeExists(BlockstoreError):
    """`create` was asked for a name that is already taken."""


class VolumeInUse(BlockstoreError):
    """Another process holds the volume's lock (it is being served)."""


class FormatError(BlockstoreError):
    """An on-disk file has the wrong magic, an unknown version, or a bad checksum."""


class JournalCorrupt(FormatError):
    """A journal record in the middle of the journal fails its checks.

    Nothing after it may be replayed; the operator decides (``nbdgw volume repair``).
    """

    def __init__(self, segment: str, offset: int, reason: str) -> None:
        self.segment = segment
        self.offset = offset
        self.reason = reason
        super().__init__(
            f"journal corrupt in segment {segment} at offset {offset}: {reason}; "
            "refusing to serve this volume (inspect it, then run "
            "'nbdgw volume repair' to cut the journal there)"
        )


class JournalGap(BlockstoreError):
    """The records a reader asked for were released from the journal already.

    A peer that falls this far behind is resynced from a dirty-extent map instead.
    """

    def __init__(self, wanted: int, first_retained: int) -> None:
        self.wanted = wanted
        self.first_retained = first_retained
        super().__init__(
            f"journal records from seq {wanted} were released "
            f"(oldest retained is seq {first_retained})"
        )


class NoSpace(BlockstoreError, OSError):
    """The file system is (nearly) full: says which file, how many bytes it needed and
    how many were free.  An OSError with errno ENOSPC, so that every caller that handles
    a full disk (the NBD plugin answers ENOSPC) handles this one too."""

    def __init__(self, message: str, path: str, needed: int, free: int) -> None:
        super().__init__(28, message)  # errno.ENOSPC
        self.path = path
        self.needed = needed
        self.free = free

    def __str__(self) -> str:
        return str(self.strerror)

