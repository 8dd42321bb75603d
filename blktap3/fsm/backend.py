"""The back-end VBD machine (specs/backend_vbd.toml): tapback's half of the handshake.

One `BackendVbd` per `backend/vbd3/<domid>/<devid>`.  The daemon feeds it what it saw
(front-end `state`, `hotplug-status`, `online`: the changes `BackendObserver` finds in
its snapshots; control replies, tapdisk deaths, image opens) and executes the effects it
returns.  The first event is always `BackendFound`, what the directory held: the
toolstack's mode and device type (the `info` bits), and what a previous tapback left (a
restarted tapback): a Connected VBD is then adopted (the connect replayed, EALREADY,
nothing the front-end sees rewritten), and keys already holding the value we would
write are not written again.

Which toolstack's order is served (`Toolstack`, tapback's `--toolstack`) is a fact of the
machine the spec's conditions read: xapi (blktap's order, the default) runs hotplug first
and InitWait follows it; libxl waits for InitWait before it runs its block-tap script, so
InitWait is published as soon as the directory appears.  Both are served by one table.

The machine asks the tapdisk for the disk's geometry itself (`DiskInfoQuery`) once
hotplug named it, and again when its image was reopened (`ImageChanged`): whether the
size changed, and what that means in each state, is the spec's.

Contract: an effect that asks a question (`ReadFrontendTransport`, `SendControl`) is
answered with its result event before the next event of this VBD is fed.  Once
`is_final`, the owner forgets the machine (and drops any later reply for it).
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from blktap3.abi import MAX_RING_PAGE_ORDER, SECTOR_SIZE, VdiskInfo

from .effects import (
    DiskInfoQuery,
    Effect,
    Perms,
    ReadFrontendTransport,
    SendControl,
    SetError,
    Unregister,
    WatchTapdisk,
    WriteKeys,
    XenblkifConnect,
    XenblkifDisconnect,
)
from .events import (
    BackendFound,
    DiskInfo,
    DiskInfoFailed,
    DiskInfoRead,
    Event,
    FrontendStateChanged,
    FrontendStateInvalid,
    FrontendStateUnreadable,
    FrontendVanished,
    HotplugConnected,
    HotplugFailed,
    RingConnectFailed,
    RingTransport,
    TapdiskDied,
    TapdiskRef,
    TransportInvalid,
    TransportRead,
)
from .machine import SpecMachine
from .xenbus_state import XenbusState

KTHREAD_PID = "kthread-pid"


class Toolstack(enum.StrEnum):
    """Whose order of hotplug and InitWait tapback serves (see the module docstring)."""

    XAPI = "xapi"  # hotplug-status=connected first, then InitWait (blktap's tapback)
    LIBXL = "libxl"  # InitWait first: libxl runs block-tap add only once it saw it


@dataclass(frozen=True)
class BackendFeatures:
    """What this back-end offers the front-end (keys written at probe and at connect).

    `discard` says the back-end may offer discard: it is announced only for a disk whose
    image can punch holes (`DiskInfo.discard`) and that the guest may write, and not when
    the toolstack wrote `discard-enable` = 0 (`BackendFound.discard_enabled`).
    `discard_secure` likewise: `discard-secure` is written, as blkback does, only when
    the image really erases (`DiskInfo.discard_secure`), and left out otherwise.
    """

    max_ring_page_order: int = MAX_RING_PAGE_ORDER
    max_queues: int = 1  # multi-queue-max-queues (blkback's: the online CPUs)
    barrier: bool = True
    flush_cache: bool = True
    discard: bool = True
    discard_granularity: int = SECTOR_SIZE
    discard_alignment: int = 0
    discard_secure: bool = False
    persistent: bool = False
    max_indirect_segments: int = 0  # 0: feature not offered
    polling_duration: int = 0  # us the ring spins for work (0: never), from the toolstack
    polling_idle_threshold: int = 0  # ...only while this % of CPU is idle (0: always)

    def probe_keys(self) -> tuple[tuple[str, str], ...]:
        keys = [
            ("max-ring-page-order", str(self.max_ring_page_order)),
            # The same offer in pages, the legacy key FreeBSD's blkfront reads (blkback
            # stopped writing it; FreeBSD still falls back to it).
            ("max-ring-pages", str(1 << self.max_ring_page_order)),
            # Written always, as blkback does: the guest may use 1..this many queues.
            ("multi-queue-max-queues", str(self.max_queues)),
        ]
        if self.max_indirect_segments:
            keys.append(("feature-max-indirect-segments", str(self.max_indirect_segments)))
        return tuple(keys)

    def for_toolstack(self, found: BackendFound) -> BackendFeatures:
        """The offer once the toolstack's word on this VBD is known (`discard-enable`)."""
        return replace(self, discard=self.discard and found.discard_enabled,
                       polling_duration=found.polling_duration,
                       polling_idle_threshold=found.polling_idle_threshold)

    def persistent_with(self, transport: RingTransport) -> bool:
        """Persistent grants are used only when both ends said 1: ours from configuration
        (`feature-persistent` as advertised), the front-end's in its transport keys.
        Decided at connect and fixed until the next one (Linux's 2022 blkback fixes split
        advertised from negotiated for this)."""
        return self.persistent and transport.persistent

    def discard_for(self, disk: DiskInfo) -> bool:
        writable = not disk.info & (VdiskInfo.READONLY | VdiskInfo.CDROM)
        return self.discard and disk.discard and writable

    def connect_keys(self, disk: DiskInfo) -> tuple[tuple[str, str], ...]:
        discard = self.discard_for(disk)
        keys = [
            ("feature-barrier", _bit(self.barrier)),
            ("feature-flush-cache", _bit(self.flush_cache)),
            ("feature-discard", _bit(discard)),
        ]
        if discard:
            keys += [
                ("discard-granularity", str(self.discard_granularity)),
                ("discard-alignment", str(self.discard_alignment)),
            ]
            if self.discard_secure and disk.discard_secure:
                keys.append(("discard-secure", "1"))
        keys += [
            ("feature-persistent", _bit(self.persistent)),
            ("sectors", str(disk.sectors)),
            ("info", str(disk.info)),
            ("sector-size", str(disk.sector_size)),
            ("physical-sector-size", str(disk.physical_sector_size)),
        ]
        return tuple(keys)


def _bit(flag: bool) -> str:
    return "1" if flag else "0"


class BackendState(enum.StrEnum):
    """The states of specs/backend_vbd.toml, as code names them."""

    WAITING_HOTPLUG = "waiting_hotplug"
    PROBED = "probed"
    ADOPTING = "adopting"
    ADOPTING_DISK = "adopting_disk"
    ADOPTING_TRANSPORT = "adopting_transport"
    ADOPTING_RING = "adopting_ring"
    QUERYING_DISK = "querying_disk"
    WAITING_FRONTEND = "waiting_frontend"
    INIT_WAIT = "init_wait"
    READING_TRANSPORT = "reading_transport"
    CONNECTING_RING = "connecting_ring"
    CONNECTED = "connected"
    CLOSING = "closing"
    DISCONNECTING_RING = "disconnecting_ring"
    CLOSED = "closed"
    FAILED = "failed"
    REMOVED = "removed"
    UNREGISTERED = "unregistered"


class BackendVbd(SpecMachine):
    """The xenbus handshake of one VBD, back-end side.  See the module docstring."""

    SPEC: ClassVar[str] = "backend_vbd"
    STATES: ClassVar[type[enum.StrEnum]] = BackendState
    INITIAL_PUBLISHED: ClassVar[XenbusState | None] = XenbusState.INITIALISING

    def __init__(
        self,
        domid: int,
        devid: int,
        backend_domid: int = 0,
        features: BackendFeatures | None = None,
        toolstack: Toolstack = Toolstack.XAPI,
    ) -> None:
        self.domid = domid
        self.devid = devid
        self.backend_domid = backend_domid
        self.features = features or BackendFeatures()
        self.toolstack = toolstack
        self.perms = Perms(owner=backend_domid, readers=(domid,))
        self.frontend_state: XenbusState | None = None  # None: node absent or invalid
        self.frontend_has_appeared = False
        self.tapdisk: TapdiskRef | None = None
        self.disk: DiskInfo | None = None  # the tapdisk's, with `info_bits` added
        self.info_bits = VdiskInfo(0)  # from the toolstack's mode and type (BackendFound)
        self.transport: RingTransport | None = None
        self.ring_requested = False  # XENBLKIF_CONNECT sent and not undone since
        self.wants_online = True
        self.probe_written = False  # the probe keys go out once (libxl: before hotplug)
        self.restarting = False  # Connected -> Initialising: InitWait once the ring is down
        # Nodes a previous tapback left (BackendFound): a key is written only when we
        # would change it; each is forgotten once we wrote (or skipped) it.
        self.found_keys: dict[str, str] = {}
        self.found = False
        super().__init__()

    def handle(self, event: Event) -> tuple[Effect, ...]:
        # Remember what the front-end last said: a plain data update that the
        # conditions read (the state change itself is the spec's).
        if isinstance(event, FrontendStateChanged):
            self.frontend_state = event.state
            self.frontend_has_appeared = True
        elif isinstance(event, FrontendStateInvalid | FrontendStateUnreadable):
            self.frontend_state = None
            self.frontend_has_appeared = True
        elif isinstance(event, FrontendVanished):
            self.frontend_state = None
        elif isinstance(event, BackendFound) and event.state == XenbusState.CONNECTED:
            # A tapback before us published Connected: a front-end connected to it, so a
            # state node absent now is a vanished guest, not one yet to come.
            self.frontend_has_appeared = True
        return super().handle(event)

    # --- conditions -----------------------------------------------------------------------

    def frontend_ready(self, **_: Any) -> bool:
        return self.frontend_state in (XenbusState.INITIALISED, XenbusState.CONNECTED)

    def frontend_is_initialising(self, **_: Any) -> bool:
        return self.frontend_state == XenbusState.INITIALISING

    def frontend_seen(self, **_: Any) -> bool:
        return self.frontend_has_appeared

    def frontend_is_closed(self, **_: Any) -> bool:
        return self.frontend_state == XenbusState.CLOSED

    def frontend_absent(self, **_: Any) -> bool:
        """The front-end's state node is gone (after it was seen: a vanished guest)."""
        return self.frontend_has_appeared and self.frontend_state is None

    def serves_libxl(self, **_: Any) -> bool:
        return self.toolstack is Toolstack.LIBXL

    def found_not_closed(self, event: BackendFound, **_: Any) -> bool:
        """Nothing or 1/2 published: InitWait at once is a xenbus step (6 -> 2 is not)."""
        return event.state in (None, XenbusState.INITIALISING, XenbusState.INIT_WAIT)

    def restarting_frontend(self, **_: Any) -> bool:
        return self.restarting

    def untouched(self, **_: Any) -> bool:
        """Nothing happened yet: what was found is still what the store holds."""
        return not self.found and self.tapdisk is None and self.published == self.INITIAL_PUBLISHED

    def found_connected(self, event: BackendFound, **_: Any) -> bool:
        return event.state == XenbusState.CONNECTED

    def closed_published(self, **_: Any) -> bool:
        return self.published == XenbusState.CLOSED

    def tapdisk_known(self, **_: Any) -> bool:
        return self.tapdisk is not None and self.disk is not None

    def tapdisk_unknown(self, **_: Any) -> bool:
        return self.tapdisk is None

    def disk_unknown(self, **_: Any) -> bool:
        return self.disk is None

    def our_tapdisk(self, event: TapdiskDied, **_: Any) -> bool:
        return self.tapdisk is not None and event.pid == self.tapdisk.pid

    def already_connected(self, event: RingConnectFailed, **_: Any) -> bool:
        return event.errno == errno.EALREADY

    def geometry_changed(self, event: DiskInfoRead, **_: Any) -> bool:
        old, new = self.disk, self._with_bits(event.disk)
        return old is not None and (old.sector_size, old.info) != (new.sector_size, new.info)

    def sectors_changed(self, event: DiskInfoRead, **_: Any) -> bool:
        return self.disk is not None and self.disk.sectors != event.disk.sectors

    def ring_up(self, **_: Any) -> bool:
        return self.ring_requested

    def is_offline(self, **_: Any) -> bool:
        return not self.wants_online

    # --- effects --------------------------------------------------------------------------

    def record_found(self, event: BackendFound, **_: Any) -> None:
        self.found = True
        self.found_keys = dict(event.keys)
        bits = VdiskInfo(0)
        if event.readonly:
            bits |= VdiskInfo.READONLY
        if event.cdrom:
            bits |= VdiskInfo.CDROM
        if event.cdrom or event.removable:  # a CD-ROM's medium can always be removed
            bits |= VdiskInfo.REMOVABLE
        self.info_bits = bits
        self.features = self.features.for_toolstack(event)
        # A published state the normal path can continue from without a step xenbus
        # forbids: InitWait (not written again), Connected (adoption), Closed (then
        # InitWait on reconnect).  Closing is not kept: 5 -> 2 is not a xenbus step.
        if event.state in (XenbusState.INIT_WAIT, XenbusState.CONNECTED, XenbusState.CLOSED):
            self.published = event.state

    def assume_ring(self, **_: Any) -> None:
        """Adoption: the back-end said Connected, so the tapdisk (probably) has the ring."""
        self.ring_requested = True

    def write_keys(self, keys: tuple[tuple[str, str], ...]) -> None:
        """Emit `WriteKeys` for what the store does not already hold (see `found_keys`)."""
        fresh = tuple((k, v) for k, v in keys if self.found_keys.pop(k, None) != v)
        if fresh:
            self.emit(WriteKeys(fresh, self.perms))

    def record_tapdisk(self, event: HotplugConnected, **_: Any) -> None:
        self.tapdisk = event.tapdisk
        self.emit(WatchTapdisk(event.tapdisk))

    def query_disk(self, **_: Any) -> None:
        assert self.tapdisk is not None  # asked only once hotplug named the tapdisk
        self.emit(SendControl(DiskInfoQuery(self.tapdisk.pid, self.tapdisk.minor)))

    def _with_bits(self, disk: DiskInfo) -> DiskInfo:
        return replace(disk, info=disk.info | self.info_bits)

    def record_disk(self, event: DiskInfoRead, **_: Any) -> None:
        self.disk = self._with_bits(event.disk)

    def write_probe_keys(self, **_: Any) -> None:
        if not self.probe_written:
            self.probe_written = True
            self.write_keys(self.features.probe_keys())

    def read_transport(self, **_: Any) -> None:
        self.emit(ReadFrontendTransport(self.features.max_ring_page_order,
                                        self.features.max_queues))

    def send_connect(self, event: TransportRead, **_: Any) -> None:
        assert self.tapdisk is not None  # reading_transport is only reached with a tapdisk
        self.transport = event.transport
        self.ring_requested = True
        message = XenblkifConnect(
            self.tapdisk.pid, self.tapdisk.minor, self.domid, self.devid, event.transport,
            self.features.max_indirect_segments,  # what the probe keys offered
            self.features.discard,
            self.features.polling_duration,
            self.features.polling_idle_threshold,
            self.features.persistent_with(event.transport),
        )
        self.emit(SendControl(message))

    def write_connect_keys(self, **_: Any) -> None:
        assert self.disk is not None and self.tapdisk is not None  # reached with a tapdisk
        # kthread-pid: the process serving the ring (blkback's kernel thread, for us the
        # tapdisk), written with the rest so that tools find it once Connected.
        keys = (*self.features.connect_keys(self.disk), (KTHREAD_PID, str(self.tapdisk.pid)))
        # Adoption of an image that grew while no tapback ran: Connected is already
        # published, so announce it again (as a resize does) for blkfront to re-read.
        found_sectors = self.found_keys.get("sectors")
        resized = found_sectors is not None and found_sectors != str(self.disk.sectors)
        self.write_keys(keys)
        if resized and self.published == XenbusState.CONNECTED:
            self.republish()

    def write_sectors(self, event: DiskInfoRead, **_: Any) -> None:
        self.write_keys((("sectors", str(event.disk.sectors)),))

    def send_disconnect(self, **_: Any) -> None:
        # disconnecting_ring awaits the answer: it is entered only with a ring asked
        # of a known tapdisk, and `release`/`report_failure` ask only then too.
        assert self.tapdisk is not None
        pid, minor = self.tapdisk.pid, self.tapdisk.minor
        self.emit(SendControl(XenblkifDisconnect(pid, minor, self.domid, self.devid)))

    def ring_down(self, **_: Any) -> None:
        self.ring_requested = False

    def report_failure(self, event: Event, **_: Any) -> None:
        self.emit(SetError(failure_text(event)))
        if self.ring_requested:
            self.send_disconnect()
            self.ring_requested = False

    def note_restart(self, **_: Any) -> None:
        self.restarting = True

    def restart_done(self, **_: Any) -> None:
        self.restarting = False

    def release(self, **_: Any) -> None:
        if self.ring_requested:
            self.send_disconnect()
            self.ring_requested = False
        self.emit(Unregister())

    def note_offline(self, **_: Any) -> None:
        self.wants_online = False

    def note_online(self, **_: Any) -> None:
        self.wants_online = True


def failure_text(event: Event) -> str:
    """The `error` node text for the event that made a VBD fail: says who broke what."""
    match event:
        case FrontendStateChanged(state=state):
            return f"front-end published state {state.value} ({state.name}), not a front-end state"
        case FrontendStateInvalid(raw=raw):
            return f"front-end state {raw!r} is not a xenbus state"
        case FrontendStateUnreadable():
            return "front-end state node unreadable: permission denied"
        case TransportInvalid(reason=reason):
            return f"front-end transport keys: {reason}"
        case RingConnectFailed(errno=code, message=message):
            return f"tapdisk refused XENBLKIF_CONNECT: {os.strerror(code)} {message}".strip()
        case HotplugFailed(reason=reason):
            return f"hotplug: {reason}"
        case DiskInfoFailed(errno=code, message=message):
            return f"hotplug: the tapdisk refused DISK_INFO: {os.strerror(code)} {message}".strip()
        case TapdiskDied(pid=pid):
            return f"tapdisk {pid} died"
        case DiskInfoRead(disk=disk):
            return f"image geometry changed (sector size {disk.sector_size}, info {disk.info})"
    return f"failed on {event!r}"
