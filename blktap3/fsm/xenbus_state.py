"""The xenbus states as the machines see them: `blktap3.abi.XenbusState` and its parser.

Kept as a module of `blktap3.fsm` so the machines import from inside their room; the
table itself is the one in `blktap3.abi`.
"""

from __future__ import annotations

from blktap3.abi import XenbusState

__all__ = ["XenbusState", "parse_xenbus_state"]


def parse_xenbus_state(raw: str) -> XenbusState | None:
    """Strictly parse a `state` node value; None when it is not one of 0..8.

    Strict on purpose: a front-end value is untrusted input (leading '+', spaces, '04'
    and the like are refused).
    """
    return XenbusState.from_wire(raw)
