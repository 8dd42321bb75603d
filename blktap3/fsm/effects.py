"""Effects: what a machine asks its owner to do (frozen dataclasses, no behaviour).

A machine never touches XenStore, a socket or a file.  Its callbacks append effects; the
owner executes them in order and reports results back as events.  Paths in XenStore
effects are relative to the machine's own device directory.
"""

from __future__ import annotations

from dataclasses import dataclass

from .events import BlkifRing, DiskInfo, RingTransport, TapdiskRef
from .xenbus_state import XenbusState


@dataclass(frozen=True)
class Effect:
    """Base class of all effects."""


@dataclass(frozen=True)
class Perms:
    """XenStore permissions: `n<owner>` then `r<reader>` for each reader."""

    owner: int
    readers: tuple[int, ...] = ()

    def as_strings(self) -> tuple[str, ...]:
        return (f"n{self.owner}", *(f"r{d}" for d in self.readers))


@dataclass(frozen=True)
class WriteKeys(Effect):
    """Write these keys, all in ONE XenStore transaction (retried on EAGAIN)."""

    keys: tuple[tuple[str, str], ...]
    perms: Perms

    def as_dict(self) -> dict[str, str]:
        return dict(self.keys)


@dataclass(frozen=True)
class PublishState(Effect):
    """Write our own `state` node."""

    state: XenbusState


@dataclass(frozen=True)
class SetError(Effect):
    """Record a human-readable error for the toolstack (the `error` node)."""

    text: str


@dataclass(frozen=True)
class Unregister(Effect):
    """Stop watching this device and forget its machine."""


@dataclass(frozen=True)
class WatchTapdisk(Effect):
    """Report this tapdisk's exit (`TapdiskDied`) and its opens of the VBD's image
    (`ImageChanged`) from now on."""

    tapdisk: TapdiskRef


@dataclass(frozen=True)
class ReadFrontendTransport(Effect):
    """Read and strictly parse the front-end's transport keys; answer with
    `TransportRead` or `TransportInvalid` (an order above the maximum, a queue count of 0
    or above the maximum, a missing queue directory are invalid)."""

    max_ring_page_order: int
    max_queues: int = 1


@dataclass(frozen=True)
class ReadBackendInfo(Effect):
    """(front-end) Read `sectors`, `info`, `sector-size` (and the features the front-end
    uses); answer with `BackendInfoRead`, or `BackendInfoInvalid` when one is bad."""


@dataclass(frozen=True)
class OfferRing(Effect):
    """(front-end) Grant a shared ring of 2**order pages to the back-end and bind an
    unbound event channel for it, for each of `queues` queues (multi-queue: a ring per
    queue); answer with `RingOffered` (every queue's) or `RingOfferFailed`."""

    order: int
    queues: int = 1
    # Segments per INDIRECT request (0: none, requests of 11 segments at most): each ring
    # slot needs indirect pages for that many.
    indirect_segments: int = 0


@dataclass(frozen=True)
class ReleaseRing(Effect):
    """(front-end) Ungrant the ring and close its event channel: the back-end let go."""


@dataclass(frozen=True)
class ReportFault(Effect):
    """Log that the other end broke the protocol here; the machine stays where it is."""

    text: str


@dataclass(frozen=True)
class ControlMessage:
    """Base class of the tapdisk control requests a machine asks for."""


@dataclass(frozen=True)
class XenblkifConnect(ControlMessage):
    """XENBLKIF_CONNECT: map the front-end's ring and bind its event channel."""

    pid: int
    minor: int
    domid: int
    devid: int
    transport: RingTransport
    # The indirect segments the back-end offered (feature-max-indirect-segments; 0: none),
    # which the tapdisk enforces.
    max_indirect_segments: int = 0
    # Whether discard may be served (False: withheld by the toolstack; the tapdisk then
    # answers DISCARD with EOPNOTSUPP whatever its image can do).
    discard: bool = True
    # blktap's polling, passed on as its tapback does: spin this many us for work before
    # sleeping, only while this % of CPU time is idle.
    poll_duration: int = 0
    poll_idle_threshold: int = 0
    # Persistent grants as negotiated at this connect (both ends said 1), fixed until the
    # next one: the lesson of Linux's 2022 blkback fixes.
    persistent: bool = False


@dataclass(frozen=True)
class XenblkifDisconnect(ControlMessage):
    """XENBLKIF_DISCONNECT: unmap the ring, unbind the event channel."""

    pid: int
    minor: int
    domid: int
    devid: int


@dataclass(frozen=True)
class DiskInfoQuery(ControlMessage):
    """DISK_INFO: the image's geometry (`DiskInfoRead` or `DiskInfoFailed`)."""

    pid: int
    minor: int


@dataclass(frozen=True)
class SendControl(Effect):
    """Send one control message to a tapdisk; its reply comes back as an event."""

    message: ControlMessage


# --- effects of the tapdisk side ----------------------------------------------------------


@dataclass(frozen=True)
class OpenImage(Effect):
    """Open the image with its driver and hold it aside; answer `ImageOpened` or
    `ImageOpenFailed`.  The machine then accepts it (`AcceptImage`) or not (`DiscardImage`).
    `logpath`: track changed blocks there (ADD_LOG); `secondary`: mirror writes there
    (SECONDARY); "" for neither."""

    path: str
    flags: int
    logpath: str = ""
    secondary: str = ""


@dataclass(frozen=True)
class AcceptImage(Effect):
    """The image just opened becomes the VBD's (it replaces none: the old one is closed)."""


@dataclass(frozen=True)
class DiscardImage(Effect):
    """Close the image just opened: the machine refused it (a changed geometry)."""


@dataclass(frozen=True)
class CloseImage(Effect):
    """Close the VBD's image (in-flight I/O has drained)."""


@dataclass(frozen=True)
class StartRing(Effect):
    """Map the ring and start its service thread; answer `RingStarted` or `RingStartFailed`."""

    ring: BlkifRing


@dataclass(frozen=True)
class StopRing(Effect):
    """Stop the ring service thread, unmap, unbind (in-flight requests complete first)."""


@dataclass(frozen=True)
class QuiesceRing(Effect):
    """Stop taking new requests; answer `Drained` once in-flight I/O completed, or
    `DrainFailed`."""


@dataclass(frozen=True)
class UnquiesceRing(Effect):
    """Take requests again (on the VBD's image, maybe a new one)."""


@dataclass(frozen=True)
class ReleaseMinor(Effect):
    """The VBD is gone: forget it and release the minor's marker lock (it may be freed)."""


@dataclass(frozen=True)
class Reply(Effect):
    """Answer the request that caused this step: `error` 0 = success, else a positive errno
    with `message`; `disk` = the geometry the reply carries (OPEN, DISK_INFO)."""

    error: int = 0
    disk: DiskInfo | None = None
    message: str = ""


@dataclass(frozen=True)
class CleanupRuntime(Effect):
    """Remove a dead tapdisk's control socket and shared-memory files."""

    pid: int


@dataclass(frozen=True)
class ExitProcess(Effect):
    """Leave the tapdisk's main loop."""
