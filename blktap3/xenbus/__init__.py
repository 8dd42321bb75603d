"""XenStore access: pyxs wrapper, xenbus states, vbd3 path and key schemas.

- `XenStore` (client.py): a str API over pyxs with a timeout on every call and typed
  errors (errors.py); `transact()` re-runs a transaction body on EAGAIN.
- `WatchStream` (watch.py): typed watch events; survives a xenstored restart.
- `RingConnection` (ring.py): the guest side, over a xenstore ring page + event channel.
- `XenbusState` (states.py), `VbdPaths` and the front-end key parsers (schema.py),
  `Permission` (perms.py).
"""

from blktap3.abi import XenbusState

from .client import Transaction, XenStore, default_socket_path
from .errors import (
    XenbusValueError,
    XenStoreAgain,
    XenStoreConnectionError,
    XenStoreError,
    XenStoreExists,
    XenStoreInvalid,
    XenStoreNotFound,
    XenStorePermissionError,
    XenStoreQuota,
    XenStoreTimeout,
    XenStoreTransactionConflict,
)
from .perms import Access, Permission, owned_by
from .ring import BoundPort, EventChannel, RingConnection
from .schema import (
    BackendKey,
    FrontendKey,
    FrontendTransport,
    RingQueue,
    VbdPaths,
    backend_root,
    parse_backend_path,
    parse_frontend_transport,
    reader_for,
)
from .states import parse_state
from .watch import Reconnected, WatchEvent, WatchStream

__all__ = [
    "Access",
    "BackendKey",
    "BoundPort",
    "EventChannel",
    "FrontendKey",
    "FrontendTransport",
    "Permission",
    "Reconnected",
    "RingConnection",
    "RingQueue",
    "Transaction",
    "VbdPaths",
    "WatchEvent",
    "WatchStream",
    "XenStore",
    "XenStoreAgain",
    "XenStoreConnectionError",
    "XenStoreError",
    "XenStoreExists",
    "XenStoreInvalid",
    "XenStoreNotFound",
    "XenStorePermissionError",
    "XenStoreQuota",
    "XenStoreTimeout",
    "XenStoreTransactionConflict",
    "XenbusState",
    "XenbusValueError",
    "backend_root",
    "default_socket_path",
    "owned_by",
    "parse_backend_path",
    "parse_frontend_transport",
    "parse_state",
    "reader_for",
]
