"""Shared storage core of nbdgw: record codec, journal, activity log, store, volume.

Imported by the nbdkit plugin (in nbdkit's embedded interpreter), by peerlink and by the
gateway CLI.  Nothing here uses asyncio, sockets or threads; every function is either
pure (the codecs) or does plain file I/O on descriptors it owns.
"""
