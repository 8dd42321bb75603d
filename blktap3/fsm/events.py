"""Events: what the outside world tells a machine (frozen dataclasses, no behaviour).

The daemon that owns a machine turns what it observed (a XenStore watch, a control reply,
a process exit) into one of these and calls `machine.handle(event)`.  Each event names the
spec trigger it fires through its `trigger` property; the spec says who is to blame when
that trigger is not allowed in the current state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from blktap3.abi import SECTOR_SIZE, BlkifProtocol

from .xenbus_state import XenbusState


@dataclass(frozen=True)
class Event:
    """Base class: `trigger` is the spec trigger name this event fires."""

    TRIGGER: ClassVar[str] = ""

    @property
    def trigger(self) -> str:
        return self.TRIGGER


# --- values carried by events -------------------------------------------------------------


@dataclass(frozen=True)
class DiskInfo:
    """The image geometry tapdisk reports (OPEN / DISK_INFO reply)."""

    sectors: int  # always in 512-byte units, as `sectors` in XenStore
    sector_size: int = SECTOR_SIZE
    info: int = 0  # VDISK_CDROM 1, VDISK_REMOVABLE 2, VDISK_READONLY 4
    physical_sector_size: int = SECTOR_SIZE
    discard: bool = False  # the image can punch holes (the data path serves DISCARD)
    # The image really erases (a secure erase of the medium): none of our drivers does, a
    # punched hole or zeroes written through a file system may leave the old data behind.
    discard_secure: bool = False


@dataclass(frozen=True)
class TapdiskRef:
    """Which tapdisk serves the VBD: its pid and the minor of the VBD inside it."""

    pid: int
    minor: int


@dataclass(frozen=True)
class QueueRing:
    """One more queue of a multi-queue front-end: its `queue-N/` ring and channel."""

    ring_refs: tuple[int, ...]
    event_channel: int


@dataclass(frozen=True)
class RingTransport:
    """The front-end's transport keys, already parsed and checked by the caller.

    `ring_refs` and `event_channel` are its ring's, or queue 0's when it uses several
    (`multi-queue-num-queues`): queues 1..N-1 are `more_queues`.
    """

    ring_refs: tuple[int, ...]  # ring-ref, or ring-ref0..N-1 (N = 2**ring-page-order)
    event_channel: int
    protocol: BlkifProtocol = BlkifProtocol.NATIVE  # native: the key was missing
    persistent: bool = False
    more_queues: tuple[QueueRing, ...] = ()

    @property
    def nr_queues(self) -> int:
        return 1 + len(self.more_queues)


# --- xenbus: the other end's state node ----------------------------------------------------


@dataclass(frozen=True)
class FrontendStateChanged(Event):
    """The front-end's `state` node holds a valid xenbus state (maybe unchanged)."""

    state: XenbusState

    @property
    def trigger(self) -> str:
        return f"frontend_{self.state.trigger_suffix}"


@dataclass(frozen=True)
class FrontendStateInvalid(Event):
    """The front-end's `state` node holds something that is not 0..8."""

    TRIGGER: ClassVar[str] = "frontend_invalid"
    raw: str


@dataclass(frozen=True)
class FrontendStateUnreadable(Event):
    """The front-end's `state` node exists but refuses us (the guest changed its
    permissions: it owns the node, and a driver domain is not privileged)."""

    TRIGGER: ClassVar[str] = "frontend_unreadable"


@dataclass(frozen=True)
class FrontendVanished(Event):
    """The front-end's `state` node does not exist (not yet, or not any more)."""

    TRIGGER: ClassVar[str] = "frontend_vanished"


@dataclass(frozen=True)
class BackendStateChanged(Event):
    """For front-end machines: the back-end's `state` node holds a valid xenbus state.

    `max_ring_page_order` is the back-end's `max-ring-page-order` read with it (0 when
    absent or not a number, as Linux's `xenbus_read_unsigned` defaults), `max_queues`
    its `multi-queue-max-queues` (1 when absent or not a number, as Linux's
    negotiate_mq reads it), `max_indirect_segments` its `feature-max-indirect-segments`
    (0: none offered); the front-end machine uses them on InitWait to size the rings it
    offers.
    """

    state: XenbusState
    max_ring_page_order: int = 0
    max_queues: int = 1
    max_indirect_segments: int = 0

    @property
    def trigger(self) -> str:
        return f"backend_{self.state.trigger_suffix}"


@dataclass(frozen=True)
class BackendStateInvalid(Event):
    """For front-end machines: the back-end's `state` node holds something not 0..8."""

    TRIGGER: ClassVar[str] = "backend_invalid"
    raw: str


@dataclass(frozen=True)
class BackendVanished(Event):
    """For front-end machines: the back-end's `state` node does not exist."""

    TRIGGER: ClassVar[str] = "backend_vanished"


# --- back-end VBD: our own directory and the hotplug step ----------------------------------


@dataclass(frozen=True)
class BackendFound(Event):
    """What our directory held when tapback found the VBD: fed first, exactly once.

    `state` is the back-end `state` node (None: absent or not a xenbus state); `keys`
    are the other nodes (the toolstack's, and those a previous tapback may have
    written), with their values.  Connected makes the machine adopt the VBD (replay the
    ring connect, answered EALREADY, and publish nothing the front-end already sees);
    the other states only spare redundant writes.
    """

    TRIGGER: ClassVar[str] = "backend_found"
    state: XenbusState | None
    keys: tuple[tuple[str, str], ...] = ()
    # What the toolstack says of the disk (`mode`, `device-type`, `removable`): the
    # `info` bits the back-end adds to the tapdisk's.
    readonly: bool = False
    cdrom: bool = False
    removable: bool = False
    # The toolstack's `discard-enable` (libxl writes it): "0" withholds discard from the
    # guest whatever the image can do (blkback's xen_blkbk_discard).
    discard_enabled: bool = True
    # blktap's polling keys, the toolstack's: `polling-duration` (microseconds the ring
    # spins for work before sleeping) and `polling-idle-threshold` (% of CPU time that
    # must be idle for it to spin); 0 (absent, or not a number in range): no polling.
    polling_duration: int = 0
    polling_idle_threshold: int = 0


@dataclass(frozen=True)
class HotplugConnected(Event):
    """`hotplug-status=connected` and `physical-device-path` names this tapdisk's VBD.

    Reported each time the hotplug nodes change (the spec decides what a repeat means);
    the disk geometry is asked of the tapdisk next (`DiskInfoQuery`).
    """

    TRIGGER: ClassVar[str] = "hotplug_connected"
    tapdisk: TapdiskRef


@dataclass(frozen=True)
class HotplugFailed(Event):
    """`hotplug-status` says error, or `physical-device-path` names no usable tapdisk."""

    TRIGGER: ClassVar[str] = "hotplug_failed"
    reason: str


@dataclass(frozen=True)
class DiskInfoRead(Event):
    """Answer to `DiskInfoQuery`: the geometry the tapdisk reports for the image (its
    own `info` bits; the machine adds those the toolstack's mode and type ask for)."""

    TRIGGER: ClassVar[str] = "disk_info_read"
    disk: DiskInfo


@dataclass(frozen=True)
class DiskInfoFailed(Event):
    """Answer to `DiskInfoQuery`: the tapdisk did not answer, or refused (positive errno)."""

    TRIGGER: ClassVar[str] = "disk_info_failed"
    errno: int
    message: str = ""


@dataclass(frozen=True)
class ImageChanged(Event):
    """The image of this VBD's tapdisk was opened again (a resize may have happened)."""

    TRIGGER: ClassVar[str] = "image_changed"


@dataclass(frozen=True)
class OnlineChanged(Event):
    """The toolstack's `online` node: False means "unregister once the guest let go"."""

    online: bool

    @property
    def trigger(self) -> str:
        return "online" if self.online else "offline"


@dataclass(frozen=True)
class BackendRemoved(Event):
    """Our back-end directory disappeared (the toolstack removed it)."""

    TRIGGER: ClassVar[str] = "backend_removed"


@dataclass(frozen=True)
class TransportRead(Event):
    """Answer to `ReadFrontendTransport`: the keys parsed fine."""

    TRIGGER: ClassVar[str] = "transport_read"
    transport: RingTransport


@dataclass(frozen=True)
class TransportInvalid(Event):
    """Answer to `ReadFrontendTransport`: a key is missing or malformed."""

    TRIGGER: ClassVar[str] = "transport_invalid"
    reason: str


@dataclass(frozen=True)
class RingConnected(Event):
    """XENBLKIF_CONNECT succeeded (EALREADY comes as `RingConnectFailed`)."""

    TRIGGER: ClassVar[str] = "ring_connected"


@dataclass(frozen=True)
class RingConnectFailed(Event):
    """XENBLKIF_CONNECT answered an error (positive errno)."""

    TRIGGER: ClassVar[str] = "ring_connect_failed"
    errno: int
    message: str = ""


@dataclass(frozen=True)
class RingDisconnected(Event):
    """XENBLKIF_DISCONNECT succeeded."""

    TRIGGER: ClassVar[str] = "ring_disconnected"


@dataclass(frozen=True)
class RingDisconnectFailed(Event):
    """XENBLKIF_DISCONNECT answered an error, or the tapdisk was gone (logged, not fatal)."""

    TRIGGER: ClassVar[str] = "ring_disconnect_failed"
    errno: int
    message: str = ""


@dataclass(frozen=True)
class TapdiskDied(Event):
    """A tapdisk exited (the machine knows whether it is the one serving this VBD)."""

    TRIGGER: ClassVar[str] = "tapdisk_died"
    pid: int


# --- front-end (simulated blkfront) --------------------------------------------------------


@dataclass(frozen=True)
class DeviceFound(Event):
    """What our own `state` node held when the blkfront started (None: absent or not a
    xenbus state): fed first, so that a device an earlier blkfront left is started over."""

    TRIGGER: ClassVar[str] = "device_found"
    state: XenbusState | None


@dataclass(frozen=True)
class RingOffered(Event):
    """Answer to `OfferRing`: the ring pages are granted and the event channel bound."""

    TRIGGER: ClassVar[str] = "ring_offered"
    ring_refs: tuple[int, ...]  # queue 0's: one per page, 2**order of them
    event_channel: int
    # Multi-queue: queues 1..N-1, each its own (ring refs, event channel), same order.
    more_queues: tuple[tuple[tuple[int, ...], int], ...] = ()


@dataclass(frozen=True)
class RingOfferFailed(Event):
    """Answer to `OfferRing`: no ring could be made (grants or event channels exhausted)."""

    TRIGGER: ClassVar[str] = "ring_offer_failed"
    reason: str


@dataclass(frozen=True)
class BackendInfoRead(Event):
    """Answer to `ReadBackendInfo`: the front-end read sectors/info/sector-size."""

    TRIGGER: ClassVar[str] = "backend_info_read"
    disk: DiskInfo


@dataclass(frozen=True)
class BackendInfoInvalid(Event):
    """Answer to `ReadBackendInfo`: a mandatory key is missing or malformed."""

    TRIGGER: ClassVar[str] = "backend_info_invalid"
    reason: str


@dataclass(frozen=True)
class DeviceClose(Event):
    """The guest lets the device go (unplug, shutdown)."""

    TRIGGER: ClassVar[str] = "device_close"


@dataclass(frozen=True)
class DeviceReconnect(Event):
    """The guest starts over after Closed (resume, migration): back to Initialising."""

    TRIGGER: ClassVar[str] = "device_reconnect"


# --- tapdisk process -------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlSocketReady(Event):
    """The spawned tapdisk answers on its control socket."""

    TRIGGER: ClassVar[str] = "socket_ready"
    pid: int


@dataclass(frozen=True)
class SpawnFailed(Event):
    """The tapdisk exited (or timed out) before its control socket answered."""

    TRIGGER: ClassVar[str] = "spawn_failed"
    reason: str


@dataclass(frozen=True)
class VbdAdded(Event):
    """ATTACH created a VBD in this tapdisk."""

    TRIGGER: ClassVar[str] = "vbd_added"
    minor: int


@dataclass(frozen=True)
class VbdRemoved(Event):
    """DETACH removed a VBD from this tapdisk."""

    TRIGGER: ClassVar[str] = "vbd_removed"
    minor: int


@dataclass(frozen=True)
class ExitRequested(Event):
    """EXIT message (or SIGTERM): stop once nothing is attached."""

    TRIGGER: ClassVar[str] = "exit_requested"


@dataclass(frozen=True)
class ProcessExited(Event):
    """The process is gone (waitpid or a dead control socket)."""

    TRIGGER: ClassVar[str] = "process_exited"
    status: int


# --- VBD inside a tapdisk (control messages and their completions) ------------------------
# Requests come from `blktap3.tapdisk.observer` (a decoded control message in, an event
# out); completions answer the machine's effects.


@dataclass(frozen=True)
class BlkifRing:
    """The ring XENBLKIF_CONNECT names, as on the wire (the data path checks the values)."""

    domid: int
    devid: int
    grefs: tuple[int, ...] = ()
    order: int = 0
    port: int = 0
    protocol: int = 0  # Xen's `enum blkif_protocol` number (0: unset, native)
    poll_us: int = 0  # blktap's poll_duration; 0: the data path's default
    poll_idle_threshold: int = 0  # blktap's: spin only while this % of CPU is idle
    max_indirect_segments: int = 0  # ours: the back-end's offer, enforced (0: none)
    discard: bool = True  # ours: False when the back-end withheld discard (EOPNOTSUPP)
    persistent: bool = False  # ours: persistent grants negotiated (map once, keep)
    queue: int = 0  # ours (multi-queue): which of the front-end's queues this ring is
    nr_queues: int = 1  # ours: how many queues the front-end uses (blktap's: one)

    @property
    def ids(self) -> tuple[int, int]:
        """(domid, devid): which front-end's ring this is."""
        return (self.domid, self.devid)


@dataclass(frozen=True)
class EffectFailed(Event):
    """Base of the answers that say an effect failed: a positive errno and why."""

    errno: int
    reason: str = ""


@dataclass(frozen=True)
class Attach(Event):
    """ATTACH."""

    TRIGGER: ClassVar[str] = "attach"


@dataclass(frozen=True)
class Open(Event):
    """OPEN of `type:/path` (parsed by the driver that opens it) with blktap's open flags,
    the changed-block log path that followed it (ADD_LOG) and the secondary (SECONDARY)."""

    TRIGGER: ClassVar[str] = "open"
    path: str
    flags: int = 0
    logpath: str = ""
    secondary: str = ""


@dataclass(frozen=True)
class ImageOpened(Event):
    """Answer to `OpenImage`: the image is open with this geometry."""

    TRIGGER: ClassVar[str] = "image_opened"
    disk: DiskInfo


@dataclass(frozen=True)
class ImageOpenFailed(EffectFailed):
    """Answer to `OpenImage`: the driver could not open the image."""

    TRIGGER: ClassVar[str] = "image_open_failed"


@dataclass(frozen=True)
class ConnectRing(Event):
    """XENBLKIF_CONNECT for this VBD."""

    TRIGGER: ClassVar[str] = "connect_ring"
    ring: BlkifRing

    @property
    def ids(self) -> tuple[int, int]:
        return self.ring.ids


@dataclass(frozen=True)
class RingStarted(Event):
    """Answer to `StartRing`: the ring is mapped and served."""

    TRIGGER: ClassVar[str] = "ring_started"


@dataclass(frozen=True)
class RingStartFailed(EffectFailed):
    """Answer to `StartRing`: mapping or serving the ring failed."""

    TRIGGER: ClassVar[str] = "ring_start_failed"


@dataclass(frozen=True)
class DisconnectRing(Event):
    """XENBLKIF_DISCONNECT of the ring (domid, devid) from this VBD."""

    TRIGGER: ClassVar[str] = "disconnect_ring"
    domid: int
    devid: int

    @property
    def ids(self) -> tuple[int, int]:
        return (self.domid, self.devid)


@dataclass(frozen=True)
class Pause(Event):
    """PAUSE."""

    TRIGGER: ClassVar[str] = "pause"


@dataclass(frozen=True)
class Drained(Event):
    """Answer to `QuiesceRing`: no request is in flight any more."""

    TRIGGER: ClassVar[str] = "drained"


@dataclass(frozen=True)
class DrainFailed(EffectFailed):
    """Answer to `QuiesceRing`: in-flight requests did not complete (e.g. ETIMEDOUT)."""

    TRIGGER: ClassVar[str] = "drain_failed"


@dataclass(frozen=True)
class Resume(Event):
    """RESUME, optionally with a new image path (image swap); `resize`: the image may have
    grown (our `ResumeFlags.RESIZE`), a larger size is then accepted. `logpath` (ADD_LOG,
    `unpause -c`) switches the changed-block log, `secondary` (`unpause -2`) the mirror's
    target; None keeps the VBD's."""

    TRIGGER: ClassVar[str] = "resume"
    path: str | None = None
    resize: bool = False
    logpath: str | None = None
    secondary: str | None = None


@dataclass(frozen=True)
class Close(Event):
    """CLOSE, or FORCE_SHUTDOWN when `force`."""

    TRIGGER: ClassVar[str] = "close"
    force: bool = False


@dataclass(frozen=True)
class Detach(Event):
    """DETACH."""

    TRIGGER: ClassVar[str] = "detach"


@dataclass(frozen=True)
class GetDiskInfo(Event):
    """DISK_INFO: the geometry of the VBD's image."""

    TRIGGER: ClassVar[str] = "disk_info"
