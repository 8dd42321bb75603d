"""The strict parser of xenbus states (the enum itself is `blktap3.abi.XenbusState`).

A `state` node of a front-end is written by the guest, so it is untrusted input: the
parser accepts only the canonical decimal numbers 0..8 and raises `XenbusValueError`
(naming the key and the value) for anything else, never an uncaught exception.
"""

from __future__ import annotations

import re

from blktap3.abi import XenbusState

from .errors import XenbusValueError

_DECIMAL = re.compile(r"\A(?:0|[1-9][0-9]{0,9})\Z")


def parse_decimal(value: str | None, key: str, *, lo: int = 0, hi: int = 0xFFFFFFFF) -> int:
    """A canonical unsigned decimal in [lo, hi]: no sign, spaces, leading zeros or hex."""
    if value is None:
        raise XenbusValueError(key, value, "missing")
    if not _DECIMAL.match(value):
        raise XenbusValueError(key, value, "not an unsigned decimal number")
    number = int(value)
    if not lo <= number <= hi:
        raise XenbusValueError(key, value, f"out of range {lo}..{hi}")
    return number


def parse_state(value: str | None, key: str = "state") -> XenbusState:
    """The `XenbusState` a state node holds; `XenbusValueError` for anything else."""
    return XenbusState(parse_decimal(value, key, lo=0, hi=max(XenbusState)))
