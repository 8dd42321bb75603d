"""The tapdisk machines: the process lifecycle and one VBD inside it.

`TapdiskProcess` (specs/tapdisk_process.toml) is what tap-ctl and tapback track per
tapdisk; `TapdiskVbd` (specs/tapdisk_vbd.toml) is what the tapdisk's control server runs
per minor, and gives the blktap VBD state bits `tap-ctl list` prints.  Every control
request fed to `TapdiskVbd` gets exactly one `Reply` effect, refusals included (the
errnos are in the spec); an out-of-order completion (`ImageOpened`, `Drained`...) is
our bug and raises.
"""

from __future__ import annotations

import enum
import errno
from typing import Any, ClassVar

from blktap3.abi import VbdStateBits

from .effects import (
    AcceptImage,
    CleanupRuntime,
    CloseImage,
    DiscardImage,
    ExitProcess,
    OpenImage,
    QuiesceRing,
    ReleaseMinor,
    Reply,
    StartRing,
    StopRing,
    UnquiesceRing,
)
from .events import (
    BlkifRing,
    Close,
    ConnectRing,
    ControlSocketReady,
    DisconnectRing,
    DiskInfo,
    EffectFailed,
    ImageOpened,
    Open,
    Resume,
    VbdAdded,
    VbdRemoved,
)
from .machine import SpecMachine

# `unpause -2 null`: blktap's name for "no secondary any more".
NO_SECONDARY = "null"


class ProcessState(enum.StrEnum):
    """The states of specs/tapdisk_process.toml, as code names them."""

    SPAWNING = "spawning"
    RUNNING_IDLE = "running_idle"
    RUNNING_SERVING = "running_serving"
    EXITING = "exiting"
    DEAD = "dead"


class VbdState(enum.StrEnum):
    """The states of specs/tapdisk_vbd.toml, as code names them."""

    ALLOCATED = "allocated"
    ATTACHED = "attached"
    EMPTY_PAUSED = "emptypaused"
    OPENING = "opening"
    OPEN_READY = "open_ready"
    OPEN_CONNECTING = "open_connecting"
    OPEN_CONNECTED = "open_connected"
    OPEN_QUIESCING = "open_quiescing"
    OPEN_PAUSED = "open_paused"
    OPEN_RESUMING = "open_resuming"
    CLOSED = "closed"
    DETACHED = "detached"


class TapdiskProcess(SpecMachine):
    """One tapdisk process: spawning, running{idle, serving}, exiting, dead."""

    SPEC: ClassVar[str] = "tapdisk_process"
    STATES: ClassVar[type[enum.StrEnum]] = ProcessState

    def __init__(self) -> None:
        self.pid: int | None = None
        self.minors: set[int] = set()
        super().__init__()

    def record_pid(self, event: ControlSocketReady, **_: Any) -> None:
        self.pid = event.pid

    def add_vbd(self, event: VbdAdded, **_: Any) -> None:
        self.minors.add(event.minor)

    def remove_vbd(self, event: VbdRemoved, **_: Any) -> None:
        self.minors.discard(event.minor)

    def known_vbd(self, event: VbdRemoved, **_: Any) -> bool:
        return event.minor in self.minors

    def last_vbd(self, event: VbdRemoved, **_: Any) -> bool:
        return self.minors == {event.minor}

    def exit_process(self, **_: Any) -> None:
        self.emit(ExitProcess())

    def cleanup(self, **_: Any) -> None:
        if self.pid is not None:
            self.emit(CleanupRuntime(self.pid))


class TapdiskVbd(SpecMachine):
    """One VBD (minor) inside a tapdisk; `state_bits` is blktap's `state` for `list`.

    What it remembers: `path`/`flags` to (re)open, `params` the `type:/path` it serves
    (set when an image is accepted, kept while paused, dropped by CLOSE), `disk` the
    accepted geometry (DISK_INFO, and what RESUME compares with), `ring` the ring served
    (its queue 0) and `queues` how many of its queues are served (multi-queue: one
    XENBLKIF_CONNECT per queue, queue 0 first, then each next one in order).
    """

    SPEC: ClassVar[str] = "tapdisk_vbd"
    STATES: ClassVar[type[enum.StrEnum]] = VbdState

    def __init__(self, minor: int) -> None:
        self.minor = minor
        self.path: str | None = None
        self.flags = 0
        self.logpath = ""
        self.secondary = ""
        self.params: str | None = None
        self.disk: DiskInfo | None = None
        self.image_open = False
        self.ring: BlkifRing | None = None
        self.ring_requested: BlkifRing | None = None
        self.queues = 0
        self.resize = False
        self.resume_failed = False
        super().__init__()
        declared = {b for s in self.spec.all_states() for b in s.bits}
        unknown = declared - set(VbdStateBits.__members__)
        if unknown:
            raise ValueError(f"tapdisk_vbd.toml: unknown state bits {sorted(unknown)}")

    @property
    def state_bits(self) -> int:
        bits = VbdStateBits(0)
        for name in self.spec.state(self.state).bits:
            bits |= VbdStateBits[name]
        if self.resume_failed:
            bits |= VbdStateBits.RESUME_FAILED
        return int(bits)

    # conditions
    def geometry_changed(self, event: ImageOpened, **_: Any) -> bool:
        return self.disk is not None and self.disk != event.disk

    def size_grows(self, event: ImageOpened, **_: Any) -> bool:
        """A RESUME that asked for a resize found a larger disk, same sector size and info."""
        old, new = self.disk, event.disk
        return (self.resize and old is not None and new.sectors > old.sectors
                and (new.sector_size, new.info) == (old.sector_size, old.info))

    def has_ring(self, **_: Any) -> bool:
        return self.ring is not None

    def same_ring(self, event: ConnectRing | DisconnectRing, **_: Any) -> bool:
        return self.ring is not None and self.ring.ids == event.ids

    def first_queue(self, event: ConnectRing, **_: Any) -> bool:
        return event.ring.queue == 0

    def next_queue(self, event: ConnectRing, **_: Any) -> bool:
        """The queue after the last one served, of as many queues as queue 0 said."""
        return (self.ring is not None and event.ring.nr_queues == self.ring.nr_queues
                and event.ring.queue == self.queues < self.ring.nr_queues)

    def queue_served(self, event: ConnectRing, **_: Any) -> bool:
        return event.ring.queue < self.queues

    def other_ring(self, event: ConnectRing, **_: Any) -> bool:
        """The VBD serves a ring, not the one the event names."""
        return self.ring is not None and self.ring.ids != event.ids

    def is_forced(self, event: Close, **_: Any) -> bool:
        return event.force

    # effects
    def open_image(self, event: Open, **_: Any) -> None:
        self.path, self.flags, self.disk = event.path, event.flags, None
        secondary = "" if event.secondary == NO_SECONDARY else event.secondary
        self.logpath, self.secondary = event.logpath, secondary
        self.emit(OpenImage(event.path, event.flags, event.logpath, secondary))

    def reopen_image(self, event: Resume, **_: Any) -> None:
        """As blktap's tapdisk (tapdisk-control.c, resume_vbd): the log goes unless one
        is named again (a RESUME without ADD_LOG stops tracking); the secondary stays
        unless a new one is named, `null` removing it (tapdisk_vbd_add_secondary), or
        the image is swapped (ours: `unpause -a`, the swap that ends a migration, makes
        the mirror's target the primary)."""
        assert self.path is not None  # paused implies it was opened
        if event.secondary is not None:
            self.secondary = "" if event.secondary == NO_SECONDARY else event.secondary
        elif event.path and event.path != self.path:
            self.secondary = ""
        self.logpath = event.logpath or ""
        self.path = event.path or self.path
        self.resize = event.resize
        self.emit(OpenImage(self.path, self.flags, self.logpath, self.secondary))

    def accept_image(self, event: ImageOpened, **_: Any) -> None:
        self.disk = event.disk
        self.params = self.path
        self.image_open = True
        self.resume_failed = False
        self.emit(AcceptImage())

    def discard_image(self, **_: Any) -> None:
        self.emit(DiscardImage())

    def close_image(self, **_: Any) -> None:
        if self.image_open:
            self.image_open = False
            self.emit(CloseImage())

    def forget_image(self, **_: Any) -> None:
        self.params, self.disk, self.resume_failed = None, None, False

    def start_ring(self, event: ConnectRing, **_: Any) -> None:
        self.ring_requested = event.ring
        self.emit(StartRing(event.ring))

    def record_ring(self, **_: Any) -> None:
        assert self.ring_requested is not None  # ring_started answers start_ring only
        if self.ring_requested.queue == 0:
            self.ring = self.ring_requested
        self.queues += 1
        self.ring_requested = None

    def stop_ring(self, **_: Any) -> None:
        if self.ring is not None:
            self.ring, self.queues = None, 0
            self.emit(StopRing())

    def quiesce(self, **_: Any) -> None:
        self.emit(QuiesceRing())

    def unquiesce(self, **_: Any) -> None:
        self.emit(UnquiesceRing())

    def mark_resume_failed(self, **_: Any) -> None:
        self.resume_failed = True

    def release_minor(self, **_: Any) -> None:
        self.emit(ReleaseMinor())

    def reply_ok(self, **_: Any) -> None:
        self.emit(Reply())

    def reply_disk(self, **_: Any) -> None:
        self.emit(Reply(disk=self.disk))

    def reply_error(self, event: EffectFailed, **_: Any) -> None:
        self.emit(Reply(error=event.errno, message=event.reason))

    def reply_medium_changed(self, event: ImageOpened, **_: Any) -> None:
        assert self.disk is not None  # the condition geometry_changed held
        self.emit(Reply(error=errno.EMEDIUMTYPE,
                        message=medium_change(self.disk, event.disk, self.resize)))


def medium_change(old: DiskInfo, new: DiskInfo, resize: bool) -> str:
    """Why RESUME refuses a reopened image of geometry `new` (was `old`)."""
    if (new.sector_size, new.info) != (old.sector_size, old.info):
        return (f"sector size/info {new.sector_size}/{new.info:#x} differ from "
                f"{old.sector_size}/{old.info:#x}")
    if new.sectors != old.sectors:
        why = " (a resize only grows)" if resize else " (resize not requested)"
        return f"size changed from {old.sectors} to {new.sectors} sectors{why}"
    return (f"physical sector size/discard {new.physical_sector_size}/{new.discard} "
            f"differ from {old.physical_sector_size}/{old.discard}")
