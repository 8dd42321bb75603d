"""The state of one VBD inside a tapdisk, and blktap's state bits derived from it.

States are those of the "VBD inside a tapdisk" machine of issue 3: a minor is allocated,
ATTACH makes the VBD, OPEN gives it an image, XENBLKIF_CONNECT a ring, PAUSE drains and
closes the image until RESUME, CLOSE ends in closed, DETACH ends it. The table below is
the whole machine: nothing else changes `VbdMachine.state`, so it can be swapped for the
spec'd machine of `blktap3.fsm` without touching the control code's questions
(`can`, `fire`, `bits`).

LIST reports blktap's TD_VBD_* word: `bits` derives it (attached, open and connected
are 0, paused 0x2a, closed 0x2, as blktap's tapdisk reports them).
"""

from __future__ import annotations

import enum

from blktap3.ctl.protocol import VbdStateBits


class VbdState(enum.Enum):
    ALLOCATED = "allocated"
    ATTACHED = "attached"
    OPEN = "open"
    CONNECTED = "connected"
    PAUSE_REQUESTED = "pause requested"
    PAUSED = "paused"
    CLOSING = "closing"
    CLOSED = "closed"
    DETACHED = "detached"


class VbdEvent(enum.Enum):
    ATTACH = "attach"
    OPEN = "open"
    CONNECT = "connect"
    DISCONNECT = "disconnect"
    PAUSE = "pause"
    DRAINED = "drained"
    RESUME = "resume"
    RESUME_CONNECTED = "resume connected"
    CLOSE = "close"
    CLOSED = "closed"
    DETACH = "detach"


S, E = VbdState, VbdEvent

TRANSITIONS: dict[tuple[VbdState, VbdEvent], VbdState] = {
    (S.ALLOCATED, E.ATTACH): S.ATTACHED,
    (S.ATTACHED, E.OPEN): S.OPEN,
    (S.CLOSED, E.OPEN): S.OPEN,
    (S.OPEN, E.CONNECT): S.CONNECTED,
    (S.CONNECTED, E.DISCONNECT): S.OPEN,
    (S.OPEN, E.PAUSE): S.PAUSE_REQUESTED,
    (S.CONNECTED, E.PAUSE): S.PAUSE_REQUESTED,
    (S.PAUSE_REQUESTED, E.DRAINED): S.PAUSED,
    # A drain that failed (timeout) leaves the request standing: PAUSE again retries it.
    (S.PAUSE_REQUESTED, E.PAUSE): S.PAUSE_REQUESTED,
    # A paused VBD keeps its (masked) ring: resume returns to where it was.
    (S.PAUSED, E.RESUME): S.OPEN,
    (S.PAUSED, E.RESUME_CONNECTED): S.CONNECTED,
    (S.PAUSED, E.DISCONNECT): S.PAUSED,
    (S.OPEN, E.CLOSE): S.CLOSING,
    (S.CONNECTED, E.CLOSE): S.CLOSING,
    (S.PAUSED, E.CLOSE): S.CLOSING,
    (S.PAUSE_REQUESTED, E.CLOSE): S.CLOSING,
    (S.CLOSING, E.CLOSED): S.CLOSED,
    (S.ATTACHED, E.DETACH): S.DETACHED,
    (S.CLOSED, E.DETACH): S.DETACHED,
}

_BITS: dict[VbdState, VbdStateBits] = {
    S.ALLOCATED: VbdStateBits(0),
    S.ATTACHED: VbdStateBits(0),
    S.OPEN: VbdStateBits(0),
    S.CONNECTED: VbdStateBits(0),
    S.PAUSE_REQUESTED: VbdStateBits.QUIESCE_REQUESTED | VbdStateBits.PAUSE_REQUESTED,
    S.PAUSED: VbdStateBits.CLOSED | VbdStateBits.QUIESCED | VbdStateBits.PAUSED,
    S.CLOSING: VbdStateBits.QUIESCE_REQUESTED | VbdStateBits.SHUTDOWN_REQUESTED,
    S.CLOSED: VbdStateBits.CLOSED,
    S.DETACHED: VbdStateBits.DEAD,
}


class InvalidTransition(Exception):
    """An event the VBD's current state does not accept (the caller asked out of order)."""

    def __init__(self, state: VbdState, event: VbdEvent) -> None:
        super().__init__(f"{event.value} not allowed while {state.value}")
        self.state = state
        self.event = event


class VbdMachine:
    """The current state of one VBD; `fire` is the only way to change it."""

    def __init__(self) -> None:
        self.state = VbdState.ALLOCATED
        self.resume_failed = False

    def can(self, event: VbdEvent) -> bool:
        return (self.state, event) in TRANSITIONS

    def fire(self, event: VbdEvent) -> VbdState:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise InvalidTransition(self.state, event) from None
        if event in (VbdEvent.RESUME, VbdEvent.RESUME_CONNECTED, VbdEvent.CLOSE):
            self.resume_failed = False
        return self.state

    @property
    def bits(self) -> int:
        """blktap's TD_VBD_* state word for LIST."""
        bits = _BITS[self.state]
        if self.resume_failed:
            bits |= VbdStateBits.RESUME_FAILED
        return int(bits)

    @property
    def has_image(self) -> bool:
        """Whether the VBD holds an open image now (paused VBDs closed theirs)."""
        return self.state in (VbdState.OPEN, VbdState.CONNECTED, VbdState.PAUSE_REQUESTED)
