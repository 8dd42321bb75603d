"""Waiting for a condition in a test: poll it until true or a deadline, then say what.

The poll interval is how often the condition is looked at, not a guess at how long
something takes: the wait ends as soon as the condition holds, and a timeout is a
failure that names what was awaited (the `what` given, else the predicate's source
line) and the last value the predicate returned.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
POLL_INTERVAL = 0.01


class WaitTimeout(AssertionError):
    """A condition a test waited for did not come true in time."""


def _describe(predicate: Callable[[], object]) -> str:
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return repr(predicate)


def wait_until(
    predicate: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT,
    what: str | Callable[[], str] | None = None,
    *,
    interval: float = POLL_INTERVAL,
) -> T:
    """Return `predicate()`'s first truthy value; raise `WaitTimeout` after `timeout` s.

    `what` names the condition in the failure (a callable is asked only then, so it
    may describe the state at that moment, e.g. "state Connected (now 2)"). `interval`:
    how often to look, shorter where the condition may not hold for long."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            said = what() if callable(what) else what
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for "
                              f"{said or _describe(predicate)} (last value: {value!r})")
        time.sleep(interval)
