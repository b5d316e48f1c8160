"""peerlink: journal shipping from a primary to its replicas.

Pure (no sockets, files or asyncio): the frame codec (frames), messages, batch building
with coalescing (batch), handshake authentication (auth), the sync-mode standing
(syncstate) and the protocol's rules for one connection (session: handshake order,
phases, resume and refusal rules, the window, verify tokens).  The shells perform what
those decide: link (asyncio transport), sender and receiver (journal and volume I/O,
reconnects), admin and __main__.  The wire protocol
and the receiver's atomic-apply design are described in PROTOCOL.md next to this file.
"""
