"""One VBD inside a tapdisk: its spec'd state machine and the resources it holds.

The state lives in `blktap3.fsm.tapdisk.TapdiskVbd`, loaded from `specs/tapdisk_vbd.toml`,
and is named by that module's `VbdState`: nothing here changes it or renames it.  This
module holds what the machine does not own - the flock on the minor's marker file, the
open image (and one just opened that the machine has not accepted yet), the connected
ring (its queues) - and reads blktap's LIST word and `type:/path` off the machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blktap3.fsm.tapdisk import TapdiskVbd, VbdState

from . import images
from .queues import Queues


@dataclass
class Vbd:
    """A VBD: minor, marker flock, machine, and the image and ring it holds."""

    minor: int
    marker_fd: int
    machine: TapdiskVbd = field(init=False)
    image: images.Image | None = None
    image_spec: images.ImageSpec | None = None
    # An image opened for OPEN/RESUME that the machine has not accepted yet.
    pending_image: images.Image | None = None
    pending_spec: images.ImageSpec | None = None
    ring: Queues | None = None  # the rings of the front-end's queues, served as one
    ring_ids: tuple[int, int] | None = None
    # blktap's req_timeout (OPEN's `-t`, seconds; 0: the data path's default, 120).
    req_timeout: int = 0

    def __post_init__(self) -> None:
        self.machine = TapdiskVbd(self.minor)

    @property
    def state(self) -> VbdState:
        return VbdState(self.machine.state)

    @property
    def bits(self) -> int:
        """blktap's TD_VBD_* word for LIST (open 0, paused 0x2a, closed 0x2...)."""
        return self.machine.state_bits

    @property
    def params(self) -> str:
        """`type:/path` while the VBD has an image (paused included), else empty."""
        return self.machine.params or ""
