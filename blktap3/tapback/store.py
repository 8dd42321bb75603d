"""The one XenStore connection tapback's VBD workers share, re-made after a loss.

`XenStore` is thread-safe, so every VBD worker uses the same connection; when xenstored
restarts that connection is dead for good, and the first caller to notice opens a new
one (callers retry their step once through `call`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from blktap3.xenbus import XenStore, XenStoreConnectionError, XenStoreTimeout

T = TypeVar("T")


class SharedStore:
    """A `XenStore` factory plus the current connection."""

    def __init__(self, connect: Callable[[], XenStore]) -> None:
        self._connect = connect
        self._lock = threading.Lock()
        self._xs: XenStore | None = None

    def get(self) -> XenStore:
        with self._lock:
            if self._xs is None or not self._xs.alive:
                if self._xs is not None:
                    self._xs.close()
                self._xs = self._connect()
            return self._xs

    def reset(self) -> None:
        """Drop the connection (after the watch stream saw xenstored go away)."""
        with self._lock:
            if self._xs is not None:
                self._xs.close()
                self._xs = None

    def call(self, body: Callable[[XenStore], T]) -> T:
        """`body(xs)`; on a lost connection, once more on a fresh one."""
        try:
            return body(self.get())
        except (XenStoreConnectionError, XenStoreTimeout):
            self.reset()
            return body(self.get())

    def close(self) -> None:
        self.reset()
