"""A stream of XenStore watch events that survives the loss of its connection.

A watch says "something at or below this path may have changed", nothing more: it fires
once when registered, may fire spuriously, and several changes may give one event. A
consumer therefore treats an event as a prompt to re-read, never as the news itself.

When the connection dies (xenstored restarted, socket reset, the reader thread failed),
`WatchStream.wait()` opens a new connection with bounded, growing back-off, registers
every watch again and returns `Reconnected()`: the consumer must then re-read everything
it cares about, since changes made while we were away produced no event for us.

Threads: one thread calls `wait()`; any thread may call `watch()`/`unwatch()` meanwhile.
A lock guards the set of watches and the connection: `wait()` matches an event against a
snapshot, and a reconnection registers the watches and swaps the connection under the
lock, so a watch added at any moment is either in what the new connection registers or
registered by `watch()` on the new connection, never lost between the two.

On dom0's socket give the stream its own connection (`WatchStream.open()`). A guest's
ring carries exactly one connection (one reader of the response ring), so there the
factory returns the guest's one `XenStore` (`WatchStream(lambda: xs)`), which also
serves its requests; after a loss the factory must build a new ring connection.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .client import DEFAULT_TIMEOUT, XenStore
from .errors import XenStoreConnectionError, XenStoreError
from .router import LOST


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A watch fired: `path` (the node that changed, or the watched path) and `token`."""

    path: str
    token: str


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The connection was lost and re-made; all watches are registered again. Re-read."""

    attempts: int


StreamEvent = WatchEvent | Reconnected


def _covers(watched: str, path: str) -> bool:
    if watched.startswith("@"):
        return path == watched
    return path == watched or path.startswith(watched.rstrip("/") + "/")


class WatchStream:
    """Watches on one private connection; `wait()` returns the next typed event."""

    def __init__(
        self,
        connect: Callable[[], XenStore],
        *,
        reconnect_attempts: int = 30,
        backoff: float = 0.05,
        max_backoff: float = 1.0,
    ) -> None:
        self._connect = connect
        self.reconnect_attempts = reconnect_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._watches: dict[tuple[str, str], None] = {}  # ordered: re-registered in order
        self._lock = threading.Lock()  # guards _watches and _xs (see the module docstring)
        self._xs = connect()

    @classmethod
    def open(
        cls, path: str | None = None, timeout: float = DEFAULT_TIMEOUT, reconnect_attempts: int = 30
    ) -> WatchStream:
        """A stream on dom0's socket (see `client.default_socket_path`)."""
        return cls(lambda: XenStore.open(path, timeout), reconnect_attempts=reconnect_attempts)

    @property
    def watches(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._watches)

    def watch(self, path: str, token: str) -> None:
        """Add a watch (from any thread). If the connection is down, it is registered at
        reconnection."""
        # The request is made under the lock so that a reconnection cannot swap the
        # connection between our registration and its own (see the module docstring).
        with self._lock:
            self._watches[(path, token)] = None
            try:
                self._xs.watch(path, token)
            except XenStoreConnectionError:
                pass  # wait() sees the loss and re-registers everything, this one included
            except XenStoreError:
                del self._watches[(path, token)]
                raise

    def unwatch(self, path: str, token: str) -> None:
        with self._lock:
            self._watches.pop((path, token), None)
            # Nothing to remove on a dead connection, and it is not re-registered.
            with contextlib.suppress(XenStoreConnectionError):
                self._xs.unwatch(path, token)

    def wait(self, timeout: float) -> StreamEvent | None:
        """The next event, or None when `timeout` seconds pass without one.

        Raises `XenStoreConnectionError` only when reconnection failed for good.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            item = self._xs.next_raw_watch_event(remaining)
            if item is None:
                return None
            if item is LOST:
                return self._reconnect()
            assert isinstance(item, tuple)
            event = WatchEvent(
                item[0].decode("utf-8", "surrogateescape"),
                item[1].decode("utf-8", "surrogateescape"),
            )
            # Drop late events of watches removed since (as pyxs's Monitor does).
            with self._lock:
                watches = list(self._watches)  # watch() may add one from another thread
            if any(t == event.token and _covers(p, event.path) for p, t in watches):
                return event
            if remaining <= 0:
                return None

    def _reconnect(self) -> Reconnected:
        self._xs.close()
        delay = self.backoff
        last: Exception | None = None
        for attempt in range(1, self.reconnect_attempts + 1):
            try:
                xs = self._connect()
            except XenStoreError as e:
                last = e
            else:
                try:
                    with self._lock:
                        for path, token in self._watches:
                            xs.watch(path, token)
                        self._xs = xs
                except XenStoreError as e:
                    last = e
                    xs.close()
                else:
                    return Reconnected(attempt)
            time.sleep(delay)
            delay = min(delay * 2, self.max_backoff)
        raise XenStoreConnectionError(
            f"XenStore watch connection not re-made after {self.reconnect_attempts} tries: "
            f"{last}"
        )

    def close(self) -> None:
        self._xs.close()

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
