"""The xenbus states of io/xenbus.h, as the machines see them.

blktap3.fsm may not import blktap3.xenbus (that package does I/O), so the nine states are
declared here; they are the numbers of the public ABI and cannot drift.
"""

from __future__ import annotations

from enum import IntEnum


class XenbusState(IntEnum):
    """`enum xenbus_state` of io/xenbus.h."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8

    @property
    def trigger_suffix(self) -> str:
        """The word used in trigger names: `frontend_initwait`, `backend_connected`..."""
        return self.name.lower().replace("_", "")


_VALID = {str(s.value): s for s in XenbusState}


def parse_xenbus_state(raw: str) -> XenbusState | None:
    """Strictly parse a `state` node value; None when it is not one of 0..8.

    Strict on purpose: a front-end value is untrusted input (leading '+', spaces, '04'
    and the like are refused).
    """
    return _VALID.get(raw)
