"""The front-end VBD machine (specs/frontend_vbd.toml) and its observer: what a blkfront does.

Two pure pieces, no I/O (the h11 split):

- `observe_backend(read)` / `backend_event(state, max_ring_page_order)`: what a blkfront
  reads of its back-end when its watch on the back-end's `state` fires (the raw value,
  absent, garbage) turned into ONE event for the machine.  It decides nothing: an
  absent node is `BackendVanished`, garbage is `BackendStateInvalid`, a repeated state is
  fed again (a watch may fire spuriously, and a re-announced Connected is a resize);
  what each means in each state is the spec's.
- `FrontendVbd`: the machine.  Effects out, answers in, same contract as the back-end:
  `OfferRing` is answered with `RingOffered` (or `RingOfferFailed`), `ReadBackendInfo`
  with `BackendInfoRead` (or `BackendInfoInvalid`), before the next event.

Used by the simulated guests (`blktap3.sim.frontend.Blkfront` executes the effects the
way a personality does) and by tests that wire a front-end and a back-end together
(`blktap3.sim.memory`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from blktap3.abi import BlkifProtocol

from .effects import (
    OfferRing,
    Perms,
    ReadBackendInfo,
    ReleaseRing,
    ReportFault,
    WriteKeys,
)
from .events import (
    BackendInfoRead,
    BackendStateChanged,
    BackendStateInvalid,
    BackendVanished,
    DeviceFound,
    DiskInfo,
    Event,
    RingOffered,
)
from .machine import SpecMachine
from .xenbus_state import XenbusState, parse_xenbus_state

# --- the observer ---------------------------------------------------------------------------

BackendReader = Callable[[str], str | None]  # key under the back-end directory -> value
_UNSIGNED = re.compile(r"[0-9]{1,10}")  # ASCII digits only, as a strict xenbus read


def _unsigned(raw: str | None, default: int) -> int:
    """A number the back-end offers, as Linux's `xenbus_read_unsigned` reads it."""
    return int(raw) if raw is not None and _UNSIGNED.fullmatch(raw) else default


def backend_event(state: str | None, max_ring_page_order: str | None = None,
                  max_queues: str | None = None,
                  max_indirect_segments: str | None = None) -> Event:
    """The event for one look at the back-end: its raw `state` node (None: absent) and,
    for InitWait, its raw `max-ring-page-order` (absent or not a number: 0, as Linux's
    `xenbus_read_unsigned` defaults; any number: the machine caps it by its own),
    `multi-queue-max-queues` (absent or not a number: 1, as negotiate_mq reads it) and
    `feature-max-indirect-segments` (absent or not a number: 0, none)."""
    if state is None:
        return BackendVanished()
    parsed = parse_xenbus_state(state)
    if parsed is None:
        return BackendStateInvalid(state)
    return BackendStateChanged(parsed, _unsigned(max_ring_page_order, 0),
                               _unsigned(max_queues, 1), _unsigned(max_indirect_segments, 0))


def observe_backend(read: BackendReader) -> Event:
    """`backend_event` from a reader of the back-end's keys (`read("state")` and, only on
    InitWait, the offers the rings are sized by: `max-ring-page-order`,
    `multi-queue-max-queues`, `feature-max-indirect-segments`, which blkback and tapback
    write before InitWait): what a blkfront reads when its watch fires. (Linux reads the
    indirect offer on Connected and sizes its indirect pages then; ours are part of the
    ring the guest shares at InitWait.)

    `read` is whatever the owner has: `lambda k: xs.read_optional(f"{backend}/{k}")`, or
    a `MemoryStore`'s read; this function does no I/O of its own.
    """
    state = read("state")
    if state is not None and parse_xenbus_state(state) is XenbusState.INIT_WAIT:
        return backend_event(state, read("max-ring-page-order"),
                             read("multi-queue-max-queues"),
                             read("feature-max-indirect-segments"))
    return backend_event(state)


# --- the machine ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontendOptions:
    """What this blkfront asks for and says of itself (a personality's transport part)."""

    max_ring_page_order: int = 0  # its own maximum; the back-end's max-ring-page-order caps it
    # Its own most queues (Linux: xen_blkif_max_queues, at most the online CPUs); the
    # back-end's multi-queue-max-queues caps it (negotiate_mq).
    max_queues: int = 1
    # Its own most segments per INDIRECT request (Linux: xen_blkif_max_segments, 32; 0:
    # never indirect); the back-end's feature-max-indirect-segments caps it.
    max_indirect_segments: int = 0
    # The `protocol` key as written (None: left out, native); a string, so that tests
    # can write what a hostile guest would.
    protocol: str | None = BlkifProtocol.X86_64.xenstore
    persistent: bool | None = False  # `feature-persistent`; None leaves the key out


@dataclass(frozen=True)
class FrontendTransportConfig:
    """The transport keys a front-end writes: its granted ring pages and event channel."""

    ring_refs: tuple[int, ...] = (8,)  # one page, or 2**order pages
    event_channel: int = 8
    protocol: str | None = BlkifProtocol.X86_64.xenstore  # None: key left out (native)
    persistent: bool | None = False  # None: key left out
    # Multi-queue: queues 1..N-1's (ring refs, event channel); queue 0's are above.
    more_queues: tuple[tuple[tuple[int, ...], int], ...] = ()

    def keys(self) -> tuple[tuple[str, str], ...]:
        """As Linux's talk_to_blkback: `ring-page-order` once, then one queue's ring refs
        and event channel at the top, or with several `multi-queue-num-queues` and each
        queue's under `queue-N/`."""
        queues = ((self.ring_refs, self.event_channel), *self.more_queues)
        keys: list[tuple[str, str]] = []
        if len(self.ring_refs) > 1:
            keys.append(("ring-page-order", str((len(self.ring_refs) - 1).bit_length())))
        if len(queues) > 1:
            keys.append(("multi-queue-num-queues", str(len(queues))))
        for n, (refs, port) in enumerate(queues):
            where = f"queue-{n}/" if len(queues) > 1 else ""
            if len(refs) == 1:
                keys.append((f"{where}ring-ref", str(refs[0])))
            else:
                keys += [(f"{where}ring-ref{i}", str(r)) for i, r in enumerate(refs)]
            keys.append((f"{where}event-channel", str(port)))
        if self.protocol is not None:
            keys.append(("protocol", self.protocol))
        if self.persistent is not None:
            keys.append(("feature-persistent", "1" if self.persistent else "0"))
        return tuple(keys)


class FrontendState(enum.StrEnum):
    """The states of specs/frontend_vbd.toml, as code names them."""

    INITIALISING = "initialising"
    OFFERING_RING = "offering_ring"
    INITIALISED = "initialised"
    READING_INFO = "reading_info"
    CONNECTED = "connected"
    CLOSING = "closing"
    CLOSED = "closed"


class FrontendVbd(SpecMachine):
    """A blkfront's handshake for one VBD.

    `ring` is the ring offered and not yet released (what `OfferRing` was answered
    with); `disk` what the back-end last announced.
    """

    SPEC: ClassVar[str] = "frontend_vbd"
    STATES: ClassVar[type[enum.StrEnum]] = FrontendState
    INITIAL_PUBLISHED: ClassVar[XenbusState | None] = XenbusState.INITIALISING

    def __init__(
        self, domid: int, backend_domid: int = 0, options: FrontendOptions | None = None
    ) -> None:
        self.domid = domid
        self.options = options or FrontendOptions()
        self.perms = Perms(owner=domid, readers=(backend_domid,))
        self.ring: RingOffered | None = None
        self.disk: DiskInfo | None = None
        super().__init__()

    # --- conditions -----------------------------------------------------------------------

    def holds_ring(self, **_: Any) -> bool:
        return self.ring is not None

    # --- callbacks ------------------------------------------------------------------------

    def record_found(self, event: DeviceFound, **_: Any) -> None:
        # What the node holds is what was last published: entering initialising again
        # publishes 1 only if that is not it.
        self.published = event.state

    def offer_ring(self, event: BackendStateChanged, **_: Any) -> None:
        self.emit(OfferRing(min(self.options.max_ring_page_order, event.max_ring_page_order),
                            max(1, min(self.options.max_queues, event.max_queues)),
                            min(self.options.max_indirect_segments,
                                event.max_indirect_segments)))

    def record_ring(self, event: RingOffered, **_: Any) -> None:
        self.ring = event

    def write_transport(self, event: RingOffered, **_: Any) -> None:
        transport = FrontendTransportConfig(
            ring_refs=event.ring_refs, event_channel=event.event_channel,
            protocol=self.options.protocol, persistent=self.options.persistent,
            more_queues=event.more_queues)
        self.emit(WriteKeys(transport.keys(), self.perms))

    def release_ring(self, **_: Any) -> None:
        self.ring = None
        self.emit(ReleaseRing())

    def read_backend_info(self, **_: Any) -> None:
        self.emit(ReadBackendInfo())

    def record_disk(self, event: BackendInfoRead, **_: Any) -> None:
        self.disk = event.disk

    def report_backend_fault(self, event: Event, **_: Any) -> None:
        what = self.spec.triggers[event.trigger].doc
        if isinstance(event, BackendStateInvalid):
            what = f"{what}: {event.raw!r}"
        self.emit(ReportFault(f"{what}: out of protocol in {self.state}"))
