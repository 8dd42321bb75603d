"""The reader thread under a XenStore connection: pyxs's Router with its traps removed.

pyxs 0.4.1 multiplexes one connection with a `Router` thread that matches replies to
requests by id. As shipped it has three traps (reference/machine.md, "pyxs"):

- `RVar.get()` waits forever, so when the router thread dies (xenstored restarted, socket
  reset) every caller blocks for good. Here a dying router records why, wakes every
  waiter with a "lost" marker, and a waiter also gives up at its own deadline.
- request ids come from a module-global counter bumped without a lock. Here each router
  numbers its own requests under its send lock.
- an unexpected reply (e.g. the late answer to a request we stopped waiting for) kills
  the thread. Here it is dropped.

Watch events do not go to pyxs `Monitor`s (one queue per token, no timeout): they go to
one queue per router, read with a timeout by `blktap3.xenbus.watch`.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import itertools
import os
import queue
import select
import threading
import time
from typing import Any, Final

import pyxs.client
import pyxs.exceptions
from pyxs._internal import NUL, Op, Packet

from .errors import XenStoreConnectionError, XenStoreTimeout, os_errno_of

# Wakes a waiter (an RVar target or a watch queue item) whose router has died.
LOST: Final = object()

# How often a waiter re-checks that the router thread is alive, in case it died between
# our check and the registration of the waiter.
_LIVENESS_POLL = 0.25

RawWatchEvent = tuple[bytes, bytes]


class Router(pyxs.client.Router):  # type: ignore[misc]  # pyxs is untyped
    """One connection's reader thread; single use (a reconnect makes a new Router)."""

    def __init__(self, connection: Any) -> None:
        super().__init__(connection)
        self.thread = threading.Thread(target=self, name=f"xenstore-{connection!r}", daemon=True)
        self.watch_events: queue.Queue[RawWatchEvent | object] = queue.Queue()
        self.failure: BaseException | None = None
        self._rq_ids = itertools.count(1)

    def start(self) -> None:
        try:
            self.connection.connect()
        except (pyxs.exceptions.PyXSError, OSError) as e:
            self._close_terminators()  # the thread that would close them never runs
            found = os_errno_of(e)
            reason = os.strerror(found) if found else str(e)
            where = getattr(self.connection, "path", "?")
            raise XenStoreConnectionError(
                f"cannot connect to XenStore at {where}: {reason}",
                found or _errno.ECONNRESET) from e
        self.thread.start()

    def _close_terminators(self) -> None:
        for sock in (self.r_terminator, self.w_terminator):
            sock.close()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.failure is None

    def __call__(self) -> None:
        # Connections over a shared ring may hold more than one packet per wake-up; they
        # say so with `has_buffered()` and we read on without select()ing.
        has_buffered = getattr(self.connection, "has_buffered", lambda: False)
        try:
            while True:
                if not has_buffered():
                    rlist, _, _ = select.select([self.connection, self.r_terminator], [], [])
                    if self.r_terminator in rlist:
                        break
                packet = self.connection.recv()
                if packet is None:  # a ring connection woke without a whole packet
                    continue
                if packet.op == Op.WATCH_EVENT:
                    parts = packet.payload.split(NUL)
                    if len(parts) >= 2:
                        self.watch_events.put((parts[0], parts[1]))
                    continue
                rvar = self.rvars.pop(packet.rq_id, None)
                if rvar is not None:
                    rvar.set(packet)
        except BaseException as e:  # the thread must record any death, then wake waiters
            self.failure = e
        finally:
            if self.failure is None:
                self.failure = XenStoreConnectionError("connection closed")
            for rvar in list(self.rvars.values()):
                rvar.set(LOST)
            self.watch_events.put(LOST)
            with contextlib.suppress(Exception):
                self.connection.close()
            self.r_terminator.close()

    def request(self, op: int, payload: bytes, tx_id: int) -> pyxs.client.RVar:
        """Send one request; return the variable its reply will be set in."""
        with self.send_lock:
            if not self.alive:
                raise XenStoreConnectionError(f"XenStore connection lost: {self.failure}")
            rq_id = next(self._rq_ids) & 0xFFFFFFFF
            packet = Packet(op, payload, rq_id, tx_id)
            # Registered before sending: the reply may come before send() returns.
            self.rvars[rq_id] = rvar = pyxs.client.RVar()
            try:
                self.connection.send(packet)
            except (pyxs.exceptions.PyXSError, OSError) as e:
                self.rvars.pop(rq_id, None)
                # If the reader died first, its reason is the useful one.
                why = self.failure if self.failure is not None else e
                raise XenStoreConnectionError(f"XenStore connection lost: {why}") from e
            return rvar

    def wait(self, rvar: pyxs.client.RVar, timeout: float, what: str) -> Packet:
        """The reply set in `rvar`, or `XenStoreTimeout` / `XenStoreConnectionError`."""
        deadline = time.monotonic() + timeout
        with rvar.condition:
            while rvar.target is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._forget(rvar)
                    raise XenStoreTimeout(f"no XenStore answer to {what} within {timeout}s")
                rvar.condition.wait(min(remaining, _LIVENESS_POLL))
                if rvar.target is None and not self.thread.is_alive():
                    raise XenStoreConnectionError(f"XenStore connection lost: {self.failure}")
        if rvar.target is LOST:
            raise XenStoreConnectionError(f"XenStore connection lost: {self.failure}")
        packet: Packet = rvar.target
        return packet

    def _forget(self, rvar: pyxs.client.RVar) -> None:
        for rq_id, other in list(self.rvars.items()):
            if other is rvar:
                self.rvars.pop(rq_id, None)

    def terminate(self, timeout: float = 2.0) -> None:
        """Stop the thread and close the connection; never blocks longer than ~2*timeout."""
        if self.thread.is_alive():
            with contextlib.suppress(OSError):
                self.w_terminator.sendall(NUL)
            self.thread.join(timeout)
            if self.thread.is_alive():
                # Stuck inside recv() in the middle of a packet: closing the transport
                # makes that recv fail, which ends the thread.
                with contextlib.suppress(Exception):
                    self.connection.close()
                self.thread.join(timeout)
        else:
            with contextlib.suppress(Exception):
                self.connection.close()
            if self.thread.ident is None:
                self.r_terminator.close()  # never started: its finally never ran
        with contextlib.suppress(OSError):
            self.w_terminator.close()
