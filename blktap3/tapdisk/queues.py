"""A VBD's rings: one per queue of a multi-queue front-end, served as one ring.

A front-end that uses N queues (`multi-queue-num-queues`) shares N rings, each with its
own event channel; the tapdisk serves each with its own C service thread (one
`datapath.Ring` per queue, all on the VBD's one image).  `Queues` is that set seen as the
single ring the rest of the tapdisk knows (`images.Ring`): pause, resume and disconnect
act on every queue; `stats()` and `io_stats()` sum the queues' counters, so that blktap's
layouts (tap-ctl stats, the stats files) read the VBD as a whole, and `stats()` lists each
queue's own under "queues".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .images import Ring

# Counters that are not summed over the queues: the largest counts (a time), any true
# is true (a state), and the first queue's word stands for text and ring indices.
_MAX_KEYS = frozenset({"max_usecs"})
_FIRST_KEYS = frozenset({"domid", "devid", "engine", "halted", "idle_threshold",
                         "max_segments", "ring"})


def merge(counters: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The queues' counters as one ring's: numbers summed (see the keys above)."""
    items = list(counters)
    out: dict[str, Any] = dict(items[0]) if items else {}
    for key, first in items[0].items() if items else ():
        values = [c.get(key) for c in items]
        if key in _FIRST_KEYS:
            if key == "halted":
                out[key] = next((v for v in values if v), None)
            continue
        if isinstance(first, Mapping):
            out[key] = merge(v for v in values if isinstance(v, Mapping))
        elif isinstance(first, bool):
            out[key] = any(values)
        elif isinstance(first, int | float):
            numbers = [v for v in values if isinstance(v, int | float)]
            out[key] = max(numbers) if key in _MAX_KEYS else sum(numbers)
    return out


class Queues:
    """The rings of one VBD, queue 0 first (see the module docstring)."""

    def __init__(self, first: Ring) -> None:
        self.rings: list[Ring] = [first]

    def add(self, ring: Ring) -> None:
        self.rings.append(ring)

    def pause(self, timeout: float = 30.0) -> None:
        for ring in self.rings:
            ring.pause(timeout=timeout)

    def resume(self, image: Any = None) -> None:
        for ring in self.rings:
            ring.resume(image=image)

    def disconnect(self, timeout: float = 30.0) -> None:
        """Disconnect every queue (each is idempotent); the first failure is raised once
        all were tried, so that a repeat finishes what is left."""
        failure: OSError | None = None
        for ring in self.rings:
            try:
                ring.disconnect(timeout=timeout)
            except OSError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def stats(self) -> dict[str, Any]:
        each = [ring.stats() for ring in self.rings]
        return merge(each) | {"queues": each}

    def io_stats(self) -> dict[str, Any]:
        return merge(ring.io_stats() for ring in self.rings)

    def set_req_timeout(self, seconds: int) -> None:
        for ring in self.rings:
            ring.set_req_timeout(seconds)
