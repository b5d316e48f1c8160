"""iSCSI bridge: the node's NBD exports to iSCSI initiators through tgtd and a FUSE file.

``Bridge(config.iscsi, nbd_uri, data_dir=...).reconcile(exports)`` makes tgtd serve exactly
``exports`` (idempotent; repairs a restarted tgtd or a target deleted by hand);
``.stop()`` takes everything down.  See bridge.py for the theory of operation and
names.py for how target names and SCSI identities are derived.
"""

from .bridge import Bridge, Export, Report
from .errors import BridgeError, FuseError, InvalidName, TgtdError

__all__ = ["Bridge", "BridgeError", "Export", "FuseError", "InvalidName", "Report",
           "TgtdError"]
