"""What every other package of nbdgw may use, beneath all of them: the root error class
and the one way to run external commands (proc; supervise, for long-running children),
structlog set-up, the FUSE protocol (served by nbdgw-fuse and inside nbdkit) and the
client of a volume's control socket.

Layers (pyproject.toml, ``[tool.importlinter]``; DESIGN.md): ``nbdgw_common`` <-
``blockstore`` <- ``peerlink`` | ``nbd_plugin`` | ``iscsi_bridge`` <- ``gateway``.
Nothing here imports any of them.
"""
