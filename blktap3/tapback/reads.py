"""What tapback reads of one VBD from XenStore, into the observer's and machine's terms.

Holds the readers the daemon's worker and executor use, and that the in-memory pair of
the tests (`blktap3.sim.memory.VbdPair`) uses too, so both read the same nodes the same
way: the back-end directory when a VBD is found (`read_directory`), the snapshot of what
tapback watches (`read_snapshot`, `read_frontend_state`), the front-end's transport keys
as the answer to `ReadFrontendTransport` (`transport_answer`, through
`blktap3.xenbus.parse_frontend_transport`), and `physical-device-path` (`parse_device`).
They only read: what a change means is `blktap3.fsm.BackendObserver`'s and the spec's.
"""

from __future__ import annotations

from typing import Protocol

from blktap3.fsm import (
    UNREADABLE,
    BackendDirectory,
    BackendSnapshot,
    Event,
    FrontendValue,
    QueueRing,
    RingTransport,
    TapdiskRef,
    TransportInvalid,
    TransportRead,
)
from blktap3.xenbus import (
    BackendKey,
    VbdPaths,
    XenbusValueError,
    XenStorePermissionError,
    parse_frontend_transport,
)
from blktap3.xenbus.schema import Reader

from .tapdisks import parse_device_path

HOTPLUG_ERROR = "hotplug-error"  # Xen's hotplug scripts' "why", beside hotplug-status
# The back-end nodes `read_snapshot` reads: a change of any of them prompts a re-read.
WATCHED_KEYS: tuple[str, ...] = (BackendKey.HOTPLUG_STATUS, HOTPLUG_ERROR,
                                 BackendKey.PHYSICAL_DEVICE_PATH, BackendKey.ONLINE)


class NodeReader(Protocol):
    """What the readers need of a store: `XenStore`, a `Transaction`, a `MemoryStore`."""

    def read_optional(self, path: str) -> str | None: ...

    def exists(self, path: str) -> bool: ...

    def ls(self, path: str) -> list[str]: ...


def parse_device(value: str) -> TapdiskRef:
    """The tapdisk and minor `physical-device-path` names; ValueError says what is wrong."""
    location = parse_device_path(value)
    return TapdiskRef(location.pid, location.minor)


def read_directory(xs: NodeReader, paths: VbdPaths) -> BackendDirectory:
    """Every node of the back-end directory (the toolstack's, a previous tapback's)."""
    keys = []
    for name in xs.ls(paths.backend):
        value = xs.read_optional(paths.backend_key(name))
        if value is not None:
            keys.append((name, value))
    return BackendDirectory(tuple(keys))


def read_frontend_state(xs: NodeReader, frontend: str) -> FrontendValue:
    """The front-end's `state` node; `UNREADABLE` when the guest locked us out of it."""
    try:
        return xs.read_optional(f"{frontend}/state")
    except XenStorePermissionError:
        return UNREADABLE


def read_snapshot(xs: NodeReader, paths: VbdPaths, frontend: str) -> BackendSnapshot:
    """What tapback watches of one VBD (see `blktap3.fsm.BackendSnapshot`)."""
    b = paths.backend_key
    hotplug = xs.read_optional(b(BackendKey.HOTPLUG_STATUS))
    online = xs.read_optional(b(BackendKey.ONLINE))
    if hotplug is None and online is None and not xs.exists(paths.backend):
        return BackendSnapshot(backend_exists=False)
    error = device = None
    if hotplug is not None:  # without a status they say nothing: spare the reads
        error = xs.read_optional(b(HOTPLUG_ERROR))
        device = xs.read_optional(b(BackendKey.PHYSICAL_DEVICE_PATH))
    return BackendSnapshot(
        backend_exists=True,
        frontend_state=read_frontend_state(xs, frontend),
        hotplug_status=hotplug,
        hotplug_error=error,
        physical_device_path=device,
        online=online,
    )


def transport_answer(read: Reader, max_ring_page_order: int, max_queues: int = 1) -> Event:
    """The answer to `ReadFrontendTransport`: the keys `read` returns, strictly parsed.

    `read(key)` reads a key of the front-end directory (in one transaction, for the
    daemon); a key the guest locked us out of is as bad as a malformed one: its fault,
    and final for this VBD (retrying would wait forever). `multi-queue-num-queues` of 0
    or above `max_queues`, and a queue whose `queue-N/` keys are missing, are invalid
    (blkback's read_per_ring_refs and connect_ring: an error node, the device closed).
    """
    try:
        transport = parse_frontend_transport(read, max_ring_page_order=max_ring_page_order,
                                             max_queues=max_queues)
    except XenbusValueError as exc:
        return TransportInvalid(str(exc))
    except XenStorePermissionError as exc:
        return TransportInvalid(f"cannot read {exc.path or 'a key'}: permission denied")
    queue0, *more = transport.queues
    return TransportRead(RingTransport(
        queue0.ring_refs, queue0.event_channel, transport.protocol,
        transport.feature_persistent,
        more_queues=tuple(QueueRing(q.ring_refs, q.event_channel) for q in more)))
