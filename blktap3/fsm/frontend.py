"""The front-end VBD machine (specs/frontend_vbd.toml): what a blkfront does.

Used by the simulated guests and by tests that wire a front-end and a back-end together
(`blktap3.sim.memory`).  Same contract as the back-end: `ReadBackendInfo` is answered
with `BackendInfoRead` before the next event.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from blktap3.abi import BlkifProtocol

from .effects import Perms, ReadBackendInfo, WriteKeys
from .events import BackendInfoRead, DiskInfo
from .machine import SpecMachine
from .xenbus_state import XenbusState


@dataclass(frozen=True)
class FrontendTransportConfig:
    """What this front-end offers: its granted ring pages and event channel."""

    ring_refs: tuple[int, ...] = (8,)  # one page, or 2**order pages
    event_channel: int = 8
    # The `protocol` key as written (None: left out, native); a string, so that tests
    # can write what a hostile guest would.
    protocol: str | None = BlkifProtocol.X86_64.xenstore
    persistent: bool = False

    def keys(self) -> tuple[tuple[str, str], ...]:
        if len(self.ring_refs) == 1:
            keys = [("ring-ref", str(self.ring_refs[0]))]
        else:
            order = (len(self.ring_refs) - 1).bit_length()
            keys = [("ring-page-order", str(order))]
            keys += [(f"ring-ref{i}", str(r)) for i, r in enumerate(self.ring_refs)]
        keys.append(("event-channel", str(self.event_channel)))
        if self.protocol is not None:
            keys.append(("protocol", self.protocol))
        keys.append(("feature-persistent", "1" if self.persistent else "0"))
        return tuple(keys)


class FrontendState(enum.StrEnum):
    """The states of specs/frontend_vbd.toml, as code names them."""

    INITIALISING = "initialising"
    INITIALISED = "initialised"
    READING_INFO = "reading_info"
    CONNECTED = "connected"
    CLOSING = "closing"
    CLOSED = "closed"


class FrontendVbd(SpecMachine):
    """A blkfront's handshake for one VBD."""

    SPEC: ClassVar[str] = "frontend_vbd"
    STATES: ClassVar[type[enum.StrEnum]] = FrontendState
    INITIAL_PUBLISHED: ClassVar[XenbusState | None] = XenbusState.INITIALISING

    def __init__(
        self, domid: int, backend_domid: int = 0, transport: FrontendTransportConfig | None = None
    ) -> None:
        self.domid = domid
        self.transport = transport or FrontendTransportConfig()
        self.perms = Perms(owner=domid, readers=(backend_domid,))
        self.disk: DiskInfo | None = None
        super().__init__()

    def write_transport(self, **_: Any) -> None:
        self.emit(WriteKeys(self.transport.keys(), self.perms))

    def read_backend_info(self, **_: Any) -> None:
        self.emit(ReadBackendInfo())

    def record_disk(self, event: BackendInfoRead, **_: Any) -> None:
        self.disk = event.disk
