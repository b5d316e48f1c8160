"""peerlink: journal shipping from a primary to its replicas.

This package's modules are the pure core (no sockets, files or asyncio): frame codec,
messages, batch building with coalescing, and handshake authentication.  The wire protocol
and the receiver's atomic-apply design are described in PROTOCOL.md next to this file.
"""
