"""A XenStore client with a str API, a timeout on every call and typed errors.

Built on pyxs 0.4.1's connections, packets and (patched) router; none of pyxs's `Client`
state is used, which removes its remaining traps: the transaction id is carried by a
`Transaction` handle instead of living on the client (so one `XenStore` is safe to share
between threads), and introduce/release are sent whatever `Client.SU` guessed from
/proc/xen/capabilities (xenstored itself decides who may do them).

Missing nodes: `read()` raises `XenStoreNotFound`; `read_optional()` returns None. A node's
value is bytes on the wire: it is decoded as UTF-8 with `surrogateescape`, so whatever a
guest wrote comes back as a str without an exception and round-trips unchanged; the
schema parsers reject what is not plain ASCII.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pyxs.connection
import pyxs.exceptions
import pyxs.helpers
from pyxs._internal import NUL, Op

from .errors import (
    XenStoreAgain,
    XenStoreError,
    XenStoreInvalid,
    XenStoreNotFound,
    XenStoreTransactionConflict,
    error_from_wire,
)
from .perms import Permission, format_perms, parse_perms
from .ring import EventChannel, RingConnection
from .router import RawWatchEvent, Router

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
PAYLOAD_MAX = 4096  # XENSTORE_PAYLOAD_MAX, xen/io/xs_wire.h
XENBUS_DEVICE = "/dev/xen/xenbus"


def default_socket_path() -> str:
    """Where dom0's xenstored listens, as libxenstore finds it.

    `XENSTORED_PATH`, else `$XENSTORED_RUNDIR/socket`, else `/var/run/xenstored/socket`;
    when that socket does not exist but `/dev/xen/xenbus` does (a domU or a driver
    domain), the xenbus device.
    """
    explicit = os.environ.get("XENSTORED_PATH")
    if explicit:
        return explicit
    rundir = os.environ.get("XENSTORED_RUNDIR")
    if rundir:
        return os.path.join(rundir, "socket")
    socket_path = "/var/run/xenstored/socket"
    if not os.path.exists(socket_path) and os.path.exists(XENBUS_DEVICE):
        return XENBUS_DEVICE
    return socket_path


class _UnixSocketTransport(pyxs.connection._UnixSocketTransport):  # type: ignore[misc]
    """pyxs's socket transport, minus two descriptor leaks: its socket stays open when
    connect() fails, and when shutdown() fails on close (the peer is gone)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise pyxs.exceptions.ConnectionError(
                f"error connecting to {path!r}: {e.args}") from e

    def close(self) -> None:
        try:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        finally:
            self.sock.close()


class _UnixSocketConnection(pyxs.connection.UnixSocketConnection):  # type: ignore[misc]
    def create_transport(self) -> _UnixSocketTransport:
        return _UnixSocketTransport(self.path)


def connection_for(path: str) -> Any:
    """The pyxs connection object for a socket path or a xenbus device path."""
    if path.startswith("/dev/") or path.startswith("/proc/xen"):
        return pyxs.connection.XenBusConnection(path)
    return _UnixSocketConnection(path)


def _encode_path(path: str) -> bytes:
    try:
        raw = path.encode("ascii")
        if raw.startswith(b"@"):
            pyxs.helpers.check_watch_path(raw)
        else:
            pyxs.helpers.check_path(raw)
    except (UnicodeEncodeError, pyxs.exceptions.InvalidPath) as e:
        raise XenStoreInvalid(22, f"invalid XenStore path {path!r}") from e
    return raw


def _encode_value(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class _Operations:
    """The node operations, shared by the client (no transaction) and a `Transaction`."""

    _xs: XenStore
    _tx_id: int

    def _call(self, op: int, *args: bytes, path: str | None = None) -> bytes:
        return self._xs.call(op, *args, tx_id=self._tx_id, path=path)

    def _ack(self, op: int, *args: bytes, path: str | None = None) -> None:
        reply = self._call(op, *args, path=path)
        if reply.rstrip(NUL) != b"OK":
            raise XenStoreError(5, f"unexpected XenStore reply {reply!r}", path)

    def read(self, path: str) -> str:
        """The node's value; `XenStoreNotFound` when the node does not exist."""
        return _decode(self._call(Op.READ, _encode_path(path) + NUL, path=path))

    def read_optional(self, path: str) -> str | None:
        """The node's value, or None when the node does not exist."""
        try:
            return self.read(path)
        except XenStoreNotFound:
            return None

    def write(self, path: str, value: str, perms: Sequence[Permission | str] | None = None) -> None:
        """Write a value (creating missing parents), then set `perms` if given."""
        self._ack(Op.WRITE, _encode_path(path) + NUL, _encode_value(value), path=path)
        if perms is not None:
            self.set_perms(path, perms)

    def mkdir(self, path: str, perms: Sequence[Permission | str] | None = None) -> None:
        """Create a node (and parents) with an empty value if missing, then set `perms`."""
        self._ack(Op.MKDIR, _encode_path(path) + NUL, path=path)
        if perms is not None:
            self.set_perms(path, perms)

    def rm(self, path: str) -> None:
        """Remove a node and its children; a node already gone is not an error."""
        with contextlib.suppress(XenStoreNotFound):
            self._ack(Op.RM, _encode_path(path) + NUL, path=path)

    def ls(self, path: str) -> list[str]:
        """Names of the node's children (not full paths), in xenstored's order."""
        reply = self._call(Op.DIRECTORY, _encode_path(path) + NUL, path=path)
        return [_decode(name) for name in reply.split(NUL) if name]

    directory = ls

    def exists(self, path: str) -> bool:
        """Whether the node exists (`XenStorePermissionError` if we may not see it)."""
        try:
            self._call(Op.DIRECTORY, _encode_path(path) + NUL, path=path)
        except XenStoreNotFound:
            return False
        return True

    def get_perms(self, path: str) -> list[Permission]:
        """The node's permission list; the first entry is the owner."""
        reply = self._call(Op.GET_PERMS, _encode_path(path) + NUL, path=path)
        return parse_perms([_decode(p) for p in reply.split(NUL) if p])

    def set_perms(self, path: str, perms: Sequence[Permission | str]) -> None:
        """Replace the node's permission list."""
        try:
            wire = format_perms(perms)
        except ValueError as e:
            raise XenStoreInvalid(22, str(e), path) from e
        args = [p.encode("ascii") + NUL for p in wire]
        self._ack(Op.SET_PERMS, _encode_path(path) + NUL, *args, path=path)


class Transaction(_Operations):
    """An open XenStore transaction; its operations carry its id. Single use."""

    def __init__(self, xs: XenStore, tx_id: int) -> None:
        self._xs = xs
        self._tx_id = tx_id
        self._ended = False

    @property
    def tx_id(self) -> int:
        return self._tx_id

    def _call(self, op: int, *args: bytes, path: str | None = None) -> bytes:
        if self._ended:
            raise XenStoreInvalid(22, f"transaction {self._tx_id} already ended", path)
        return super()._call(op, *args, path=path)

    def commit(self) -> bool:
        """Commit; False when xenstored refused it for a conflict (EAGAIN): re-run it."""
        try:
            self._ack(Op.TRANSACTION_END, b"T" + NUL)
        except XenStoreAgain:
            return False
        finally:
            self._ended = True
        return True

    def abort(self) -> None:
        """Abandon the transaction; errors are swallowed (it may already be gone)."""
        if self._ended:
            return
        try:
            self._ack(Op.TRANSACTION_END, b"F" + NUL)
        except XenStoreError:
            pass
        finally:
            self._ended = True


class XenStore(_Operations):
    """One connection to xenstored. Thread-safe; close it (or use `with`).

    `timeout` bounds every call (seconds); a call past it raises `XenStoreTimeout`, a
    lost connection `XenStoreConnectionError`. After either, open a new `XenStore`.
    """

    def __init__(self, connection: Any, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._xs = self
        self._tx_id = 0
        self.timeout = timeout
        self.connection = connection
        self._router = Router(connection)
        self._connected = False

    @classmethod
    def open(cls, path: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> XenStore:
        """Connect to the socket or xenbus device at `path` (default: see above)."""
        xs = cls(connection_for(path or default_socket_path()), timeout)
        xs.connect()
        return xs

    @classmethod
    def over_ring(
        cls,
        page: memoryview | bytearray,
        evtchn: EventChannel,
        timeout: float = DEFAULT_TIMEOUT,
        name: str = "xenstore-ring",
    ) -> XenStore:
        """Connect as a guest through its xenstore ring page and event channel.

        A ring carries one connection: use this one `XenStore` for all of the guest's
        requests and its `WatchStream` (`WatchStream(lambda: xs)`).
        """
        xs = cls(RingConnection(page, evtchn, name=name), timeout)
        xs.connect()
        return xs

    def connect(self) -> None:
        self._router.start()
        self._connected = True

    def close(self) -> None:
        self._router.terminate()

    def __enter__(self) -> XenStore:
        if not self._connected:
            self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"XenStore({self.connection!r})"

    @property
    def alive(self) -> bool:
        """False once the connection is lost or closed."""
        return bool(self._router.alive)

    def call(
        self,
        op: int,
        *args: bytes,
        tx_id: int = 0,
        path: str | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """Send one raw request and return its reply payload, or raise a typed error."""
        payload = b"".join(args)
        if len(payload) > PAYLOAD_MAX:
            raise XenStoreInvalid(7, f"request of {len(payload)} bytes > {PAYLOAD_MAX}", path)
        rvar = self._router.request(op, payload, tx_id)
        reply = self._router.wait(rvar, self.timeout if timeout is None else timeout,
                                  f"{_op_name(op)} {path or ''}".strip())
        if reply.op == Op.ERROR:
            raise error_from_wire(reply.payload, path)
        if reply.op != op:
            raise XenStoreError(5, f"reply {_op_name(reply.op)} to {_op_name(op)}", path)
        payload_out: bytes = reply.payload
        return payload_out

    # -- domains (dom0 / a privileged toolstack only; xenstored checks) --------------------

    def introduce(self, domid: int, mfn: int, port: int) -> None:
        """Tell xenstored to serve domain `domid` through its ring page `mfn` and `port`."""
        if domid <= 0:
            raise XenStoreInvalid(22, f"cannot introduce domain {domid}")
        self._ack(Op.INTRODUCE, b"%d\0" % domid, b"%d\0" % mfn, b"%d\0" % port)

    def release(self, domid: int) -> None:
        """Tell xenstored to stop serving domain `domid`."""
        self._ack(Op.RELEASE, b"%d\0" % domid)

    def is_domain_introduced(self, domid: int) -> bool:
        reply = self._call(Op.IS_DOMAIN_INTRODUCED, b"%d\0" % domid).rstrip(NUL)
        if reply not in (b"T", b"F"):
            raise XenStoreError(5, f"unexpected IS_DOMAIN_INTRODUCED reply {reply!r}")
        return reply == b"T"

    def get_domain_path(self, domid: int) -> str:
        """`/local/domain/<domid>` as xenstored says it."""
        return _decode(self._call(Op.GET_DOMAIN_PATH, b"%d\0" % domid).rstrip(NUL))

    # -- watches (events are read by blktap3.xenbus.watch.WatchStream) ---------------------

    def watch(self, path: str, token: str) -> None:
        """Register a watch; it fires once at once, then on every change below `path`."""
        self._ack(Op.WATCH, _encode_path(path) + NUL, _encode_value(token) + NUL, path=path)

    def unwatch(self, path: str, token: str) -> None:
        self._ack(Op.UNWATCH, _encode_path(path) + NUL, _encode_value(token) + NUL, path=path)

    def next_raw_watch_event(self, timeout: float) -> RawWatchEvent | object | None:
        """The next (path, token) bytes pair, `router.LOST`, or None after `timeout`."""
        try:
            return self._router.watch_events.get(timeout=timeout)
        except queue.Empty:
            return None

    # -- transactions -----------------------------------------------------------------------

    def transaction(self) -> Transaction:
        """Start a transaction; end it with `commit()` or `abort()` (or use `transact`)."""
        reply = self._call(Op.TRANSACTION_START, NUL)
        try:
            tx_id = int(reply.rstrip(NUL))
        except ValueError as e:
            raise XenStoreError(5, f"bad TRANSACTION_START reply {reply!r}") from e
        return Transaction(self, tx_id)

    def transact(
        self,
        body: Callable[[Transaction], T],
        *,
        attempts: int = 16,
        backoff: float = 0.005,
        max_backoff: float = 0.25,
    ) -> T:
        """Run `body(tx)` in a transaction and commit; re-run all of it on EAGAIN.

        `body` must only touch XenStore through `tx` and be safe to run again: it is
        re-run from the start after each conflict (at commit, or an EAGAIN raised inside
        it), with a jittered exponential backoff, at most `attempts` times; then
        `XenStoreTransactionConflict`. Any other exception aborts the transaction and
        propagates. Returns what the successful run of `body` returned.
        """
        delay = backoff
        for attempt in range(1, attempts + 1):
            tx = self.transaction()
            try:
                result = body(tx)
            except XenStoreAgain:
                tx.abort()
            except BaseException:
                tx.abort()
                raise
            else:
                if tx.commit():
                    return result
            if attempt < attempts:
                # Jitter so two writers that collided do not collide again in lock step.
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, max_backoff)
        raise XenStoreTransactionConflict(11, f"transaction still conflicting after {attempts}")


def _op_name(op: int) -> str:
    try:
        return str(Op._fields[list(Op).index(op)])
    except ValueError:
        return f"op{op}"
