"""What the console scripts share: argument types that refuse bad values, and SIGTERM.

Command-line arguments are untrusted input: a bad one must give argparse's one-line error
and the usage (exit 2), never a traceback, a hang (`--runtime -1`) or a directory made
where nobody asked (`--root /nonexistent/x`). Each type here raises
`argparse.ArgumentTypeError`, which argparse turns into that line. A leaf module: it
imports nothing of ours.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import argparse


def _bad(text: str) -> argparse.ArgumentTypeError:
    """The error argparse turns into its one line. argparse is imported here, not above:
    tap-ctl, whose start-up is counted, takes only `terminate_as_interrupt`."""
    import argparse

    return argparse.ArgumentTypeError(text)


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds, timeouts): not 0, negative, nan or inf."""
    try:
        value = float(text)
    except ValueError:
        raise _bad(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise _bad(f"must be a finite number > 0, not {text}")
    return value


def float_in(low: float, high: float, *, above_low: bool = False) -> Callable[[str], float]:
    """A finite number type for argparse (seconds, timeouts), in [low, high], or in
    (low, high] when `above_low`: nan, inf and anything outside are refused."""
    interval = f"({low:g}, {high:g}]" if above_low else f"[{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise _bad(f"not a number: {text!r}") from None
        inside = (low < value if above_low else low <= value) and value <= high
        if not inside:  # also refuses nan, and inf past any finite high
            raise _bad(f"must be in {interval}, not {text}")
        return value

    parse.__name__ = "number"
    return parse


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer type for argparse, in [low, high] (no upper bound when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise _bad(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"in {low}..{high}" if high is not None else f">= {low}"
            raise _bad(f"must be {bound}, not {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def existing_dir(text: str) -> Path:
    """A directory that exists and that we may write into."""
    path = Path(text)
    if not path.is_dir():
        raise _bad(f"{text}: not an existing directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise _bad(f"{text}: not writable")
    return path


def dir_to_create(text: str) -> Path:
    """A directory that exists, or that can be made in an existing directory (its
    parents are never made: a typo must not build a tree)."""
    path = Path(text).absolute()
    if path.exists():
        if not path.is_dir():
            raise _bad(f"{text}: not a directory")
        return path
    if not path.parent.is_dir():
        raise _bad(f"{text}: {path.parent} is not an existing directory")
    return path


def file_to_write(text: str) -> Path:
    """A file to create or append to: not a directory, in an existing directory."""
    path = Path(text).absolute()
    if path.is_dir():
        raise _bad(f"{text}: is a directory")
    if not path.parent.is_dir():
        raise _bad(f"{text}: {path.parent} is not an existing directory")
    return path


def cpu(text: str) -> int:
    """A CPU this process may run on."""
    value = int_in(0)(text)
    allowed = os.sched_getaffinity(0)
    if value not in allowed:
        raise _bad(
            f"CPU {value} is not one this process may use ({min(allowed)}..{max(allowed)})")
    return value


def die_like(interrupt: KeyboardInterrupt) -> NoReturn:
    """After cleaning up, end as the signal that stopped us would have (status 128+n to
    a shell), as a command without handlers does: scripts can tell it was stopped."""
    name = interrupt.args[0] if interrupt.args else "SIGINT"
    signum = getattr(signal, name, signal.SIGINT)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    raise SystemExit(128 + signum)  # a blocked signal: end with its status all the same


def terminate_as_interrupt() -> None:
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt as SIGINT does, so a command's
    `finally` blocks and context managers clean up whichever way it is stopped."""

    def interrupt(signum: int, _: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGHUP, interrupt)
    except ValueError:  # not the main thread (a command's main called as a library)
        pass
