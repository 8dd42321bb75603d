"""One VBD inside a tapdisk: its spec'd state machine and the resources it holds.

The state lives in `blktap3.fsm.tapdisk.TapdiskVbd`, loaded from `specs/tapdisk_vbd.toml`
(the "VBD inside a tapdisk" machine of issue 3): nothing here changes it. This module
names its states with issue 3's words (`VbdState`), derives blktap's LIST state word
from it, and holds what the machine does not own: the flock on the minor's marker file,
the open image, the connected ring.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from blktap3.ctl.protocol import ImageInfo
from blktap3.fsm.tapdisk import TapdiskVbd

from . import images


class VbdState(enum.Enum):
    """Issue 3's names for the VBD's states."""

    ALLOCATED = "allocated"
    ATTACHED = "attached"
    OPEN = "open"
    CONNECTED = "connected"
    PAUSE_REQUESTED = "pause requested"
    PAUSED = "paused"
    CLOSING = "closing"
    CLOSED = "closed"
    DETACHED = "detached"


# The spec's (nested) state names -> issue 3's. Transient states map to where they came
# from: "opening" is not open yet, "resuming" is still paused. CLOSE is one step in the
# spec (the drain happens inside the ring's disconnect), so "closing" is never seen.
STATE_OF_SPEC: dict[str, VbdState] = {
    "allocated": VbdState.ALLOCATED,
    "attached": VbdState.ATTACHED,
    "opening": VbdState.ATTACHED,
    "open_ready": VbdState.OPEN,
    "open_connected": VbdState.CONNECTED,
    "open_quiescing": VbdState.PAUSE_REQUESTED,
    "open_paused": VbdState.PAUSED,
    "open_resuming": VbdState.PAUSED,
    "closed": VbdState.CLOSED,
    "detached": VbdState.DETACHED,
}


@dataclass
class Vbd:
    """A VBD: minor, marker flock, machine, and the image and ring it holds."""

    minor: int
    marker_fd: int
    machine: TapdiskVbd = field(init=False)
    spec: images.ImageSpec | None = None
    flags: int = 0
    image: images.Image | None = None
    # An image opened for OPEN/RESUME that the machine has not accepted yet.
    pending_image: images.Image | None = None
    pending_spec: images.ImageSpec | None = None
    info: ImageInfo | None = None
    ring: images.Ring | None = None
    ring_ids: tuple[int, int] | None = None
    # A ring connected for XENBLKIF_CONNECT, installed when the machine starts it.
    prepared_ring: images.Ring | None = None
    resize_requested: bool = False
    last_error: str = ""

    def __post_init__(self) -> None:
        self.machine = TapdiskVbd(self.minor)

    @property
    def state(self) -> VbdState:
        return STATE_OF_SPEC[self.machine.state]

    @property
    def bits(self) -> int:
        """blktap's TD_VBD_* word for LIST (open 0, paused 0x2a, closed 0x2...)."""
        return int(self.machine.state_bits)

    @property
    def params(self) -> str:
        """`type:/path` while the VBD has an image (paused included), else empty."""
        if self.spec is None or self.state in (
            VbdState.ALLOCATED, VbdState.ATTACHED, VbdState.CLOSED, VbdState.DETACHED
        ):
            return ""
        return str(self.spec)
