"""Typed errors of the state machines: each one says who is to blame.

A machine raises one of these when an event arrives that its spec does not allow in the
current state.  The class names the party whose behaviour broke the protocol, so the
caller knows whether to log-and-close (a front-end or an image misbehaved) or to treat it
as a defect of blktap3 itself.  `SpecError` is separate: a spec file that is malformed.
"""

from __future__ import annotations

from enum import Enum


class Blame(Enum):
    """Who caused an event (declared per trigger in the spec)."""

    OURS = "ours"
    FRONTEND = "frontend"
    BACKEND = "backend"
    TAPDISK = "tapdisk"
    IMAGE = "image"
    TOOLSTACK = "toolstack"


class SpecError(ValueError):
    """A machine spec is malformed (unknown key, undefined state, unbound callback, ...)."""


class FsmError(Exception):
    """An event the machine does not accept in its state; subclasses name the culprit."""

    blame: Blame = Blame.OURS

    def __init__(self, machine: str, state: str, event: object, detail: str = "") -> None:
        self.machine = machine
        self.state = state
        self.event = event
        self.detail = detail
        who = self.blame.value
        text = f"{machine}: event {event!r} not allowed in state {state!r} (blame: {who})"
        super().__init__(f"{text}: {detail}" if detail else text)


class OurBug(FsmError):
    """blktap3 itself fed an event it should not have (a defect in our code or spec)."""

    blame = Blame.OURS


class FrontendError(FsmError):
    """The guest's front-end broke the xenbus protocol."""

    blame = Blame.FRONTEND


class BackendError(FsmError):
    """The back-end broke the xenbus protocol (seen from a front-end machine)."""

    blame = Blame.BACKEND


class TapdiskError(FsmError):
    """The tapdisk process replied or behaved out of protocol."""

    blame = Blame.TAPDISK


class ImageError(FsmError):
    """The disk image failed or changed in a way the protocol cannot carry."""

    blame = Blame.IMAGE


class ToolstackError(FsmError):
    """The toolstack (tap-ctl, hotplug scripts, xl) asked for something out of order."""

    blame = Blame.TOOLSTACK


ERROR_FOR_BLAME: dict[Blame, type[FsmError]] = {
    Blame.OURS: OurBug,
    Blame.FRONTEND: FrontendError,
    Blame.BACKEND: BackendError,
    Blame.TAPDISK: TapdiskError,
    Blame.IMAGE: ImageError,
    Blame.TOOLSTACK: ToolstackError,
}
