"""A pyxs connection over a guest's xenstore ring page: the guest side of XenStore.

A guest (an unprivileged domain) has no socket to xenstored: it shares one page with it,
laid out as `struct xenstore_domain_interface` (xen/io/xs_wire.h), and one event
channel. The page holds two 1 KiB byte rings, requests (guest -> xenstored) and
responses (xenstored -> guest, replies and watch events), each with free-running 32-bit
`cons`/`prod` indices masked by `XENSTORE_RING_IDX`. The producer copies bytes in, then
publishes `prod`; the consumer reads `prod`, copies bytes out, then publishes `cons`;
either side notifies the event channel after publishing. Messages are byte streams: a
4 KiB payload crosses a 1 KiB ring in pieces, and a message may wrap around the end.

`RingConnection` has the interface of pyxs's connections (`connect`, `close`, `send`,
`recv`, `fileno`, `is_connected`) so `XenStore(RingConnection(page, evtchn))` makes the
process a real unprivileged domain for xenstored. The page is any writable buffer (an
mmap of the simulated guest's memory, or a bytearray in tests); the event channel is any
object with the small `EventChannel` interface below (`BoundPort` adapts a
libxenevtchn-style handle: xensim's, or a real /dev/xen/evtchn binding).
"""

from __future__ import annotations

import select
import struct
import threading
import time
from typing import Protocol

import pyxs.exceptions
from pyxs._internal import Packet

RING_SIZE = 1024  # XENSTORE_RING_SIZE
REQ_OFFSET = 0  # char req[XENSTORE_RING_SIZE]
RSP_OFFSET = 1024  # char rsp[XENSTORE_RING_SIZE]
REQ_CONS = 2048  # XENSTORE_RING_IDX req_cons, req_prod, rsp_cons, rsp_prod
REQ_PROD = 2052
RSP_CONS = 2056
RSP_PROD = 2060
SERVER_FEATURES = 2064
CONNECTION = 2068
ERROR = 2072
INTERFACE_SIZE = 2076
HEADER = struct.Struct("=IIII")  # struct xsd_sockmsg: type, req_id, tx_id, len
PAYLOAD_MAX = 4096
_U32 = struct.Struct("=I")
_IDX_MASK = 0xFFFFFFFF

_fence_lock = threading.Lock()


def memory_barrier() -> None:
    """A full memory barrier between our accesses to the shared page.

    Python has no fence primitive. Taking and releasing a lock executes an atomic
    read-modify-write (a `lock`-prefixed instruction on x86, which orders all earlier
    loads and stores before all later ones), and each access to the page is a separate
    C call the compiler cannot move across it. That is what virt_mb()/virt_rmb()/
    virt_wmb() give Linux's xenbus_comms.c at the same places.
    """
    with _fence_lock:
        pass


class EventChannel(Protocol):
    """The local end of an event channel bound to xenstored's port.

    `fileno()` is readable while a notification is pending; `pending()` consumes one
    and returns its port (call it only when readable, as libxenevtchn's blocks
    otherwise); `unmask(port)` re-enables delivery after it.
    """

    def fileno(self) -> int: ...

    def notify(self) -> None: ...

    def pending(self) -> int: ...

    def unmask(self, port: int) -> None: ...


class PortHandle(Protocol):
    """A libxenevtchn-style handle: one fd for all its ports, `notify(port)`."""

    def notify(self, port: int) -> None: ...

    def pending(self) -> int: ...

    def unmask(self, port: int) -> None: ...


class BoundPort:
    """An `EventChannel` for one port of a libxenevtchn-style handle.

    The handle's fd is given explicitly (`handle.fd`, `handle.fileno()`, ...), since
    wrappers name it differently.
    """

    def __init__(self, handle: PortHandle, port: int, fd: int) -> None:
        self.handle = handle
        self.port = port
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def notify(self) -> None:
        self.handle.notify(self.port)

    def pending(self) -> int:
        return self.handle.pending()

    def unmask(self, port: int) -> None:
        self.handle.unmask(port)


def consume_notifications(evtchn: EventChannel, timeout: float = 0.0) -> bool:
    """Wait up to `timeout` for a notification; consume all pending ones. True if any."""
    got = False
    wait = timeout
    while True:
        readable, _, _ = select.select([evtchn.fileno()], [], [], wait)
        if not readable:
            return got
        evtchn.unmask(evtchn.pending())
        got = True
        wait = 0.0


def ring_free(cons: int, prod: int) -> int:
    """Free bytes in a ring with these indices."""
    return RING_SIZE - ((prod - cons) & _IDX_MASK)


def ring_used(cons: int, prod: int) -> int:
    """Unconsumed bytes in a ring with these indices."""
    return (prod - cons) & _IDX_MASK


class RingConnection:
    """pyxs connection over a xenstore_domain_interface page and its event channel.

    One ring carries one connection (one reader of the response ring): never open two
    `RingConnection`s on the same page at once.
    """

    def __init__(
        self,
        page: memoryview | bytearray,
        evtchn: EventChannel,
        *,
        name: str = "xenstore-ring",
        send_timeout: float = 10.0,
    ) -> None:
        view = memoryview(page).cast("B")
        if view.readonly or len(view) < INTERFACE_SIZE:
            raise ValueError("the xenstore page must be writable and hold the interface")
        self.page = view
        self.evtchn = evtchn
        self.path = name
        self.send_timeout = send_timeout
        self._connected = False
        self._inbox = bytearray()  # response bytes taken off the ring, not yet a packet

    def __repr__(self) -> str:
        return f"RingConnection({self.path!r})"

    # -- the pyxs connection interface ----------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        error = self._get(ERROR)
        if error:
            raise pyxs.exceptions.ConnectionError(f"xenstore ring reports error {error}")
        self._connected = True

    def close(self) -> None:
        self._connected = False

    def fileno(self) -> int:
        return self.evtchn.fileno()

    def send(self, packet: Packet) -> None:
        """Copy one request into the request ring, waiting for room as needed."""
        if not self._connected:
            raise pyxs.exceptions.ConnectionError("not connected")
        data = HEADER.pack(packet.op, packet.rq_id, packet.tx_id, packet.size) + packet.payload
        deadline = time.monotonic() + self.send_timeout
        pause = 0.0005
        view = memoryview(data)
        while view:
            written = self._write_some(view)
            if written:
                view = view[written:]
                self.evtchn.notify()
                pause = 0.0005
                continue
            # Ring full: xenstored is still reading. It notifies the channel when it
            # consumes, but that channel is read by the router thread, so poll the index.
            if time.monotonic() > deadline or not self._connected:
                raise pyxs.exceptions.ConnectionError("xenstore request ring stays full")
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def recv(self) -> Packet | None:
        """The next whole packet from the response ring, or None if not arrived yet.

        Consumes pending notifications first, then reads the ring: a notification
        sent after our read of `rsp_prod` stays pending and wakes the router again.
        """
        if not self._connected:
            raise pyxs.exceptions.ConnectionError("not connected")
        consume_notifications(self.evtchn)
        if self._read_available():
            # Tell xenstored there is room again (it may be waiting to send more).
            self.evtchn.notify()
        return self._take_packet()

    def has_buffered(self) -> bool:
        """Whether a packet (or part of one) is waiting without a fresh notification."""
        if self._whole_packet_len() is not None:
            return True
        return ring_used(self._get(RSP_CONS), self._get(RSP_PROD)) > 0

    # -- the two rings ----------------------------------------------------------------------

    def _get(self, offset: int) -> int:
        value: int = _U32.unpack_from(self.page, offset)[0]
        return value

    def _put(self, offset: int, value: int) -> None:
        _U32.pack_into(self.page, offset, value & _IDX_MASK)

    def _write_some(self, data: memoryview) -> int:
        cons = self._get(REQ_CONS)
        prod = self._get(REQ_PROD)
        if ring_used(cons, prod) > RING_SIZE:
            raise pyxs.exceptions.ConnectionError("xenstore request ring indices corrupt")
        # Write the data only after reading the consumer index (xenbus_comms.c: virt_mb).
        memory_barrier()
        start = prod % RING_SIZE
        chunk = min(len(data), ring_free(cons, prod), RING_SIZE - start)
        if chunk <= 0:
            return 0
        self.page[REQ_OFFSET + start:REQ_OFFSET + start + chunk] = data[:chunk]
        # xenstored must not see the new producer index before the data (virt_wmb).
        memory_barrier()
        self._put(REQ_PROD, prod + chunk)
        return chunk

    def _read_available(self) -> int:
        total = 0
        while True:
            cons = self._get(RSP_CONS)
            prod = self._get(RSP_PROD)
            used = ring_used(cons, prod)
            if used > RING_SIZE:
                raise pyxs.exceptions.ConnectionError("xenstore response ring indices corrupt")
            if not used:
                return total
            # Read the data only after reading the producer index (virt_rmb).
            memory_barrier()
            start = cons % RING_SIZE
            chunk = min(used, RING_SIZE - start)
            self._inbox += self.page[RSP_OFFSET + start:RSP_OFFSET + start + chunk]
            # xenstored must not reuse the space before we copied it out (virt_mb).
            memory_barrier()
            self._put(RSP_CONS, cons + chunk)
            total += chunk

    def _whole_packet_len(self) -> int | None:
        if len(self._inbox) < HEADER.size:
            return None
        size = HEADER.unpack_from(self._inbox)[3]
        if size > PAYLOAD_MAX:
            raise pyxs.exceptions.ConnectionError(f"xenstore reply of {size} bytes")
        total = HEADER.size + size
        return total if len(self._inbox) >= total else None

    def _take_packet(self) -> Packet | None:
        total = self._whole_packet_len()
        if total is None:
            return None
        op, rq_id, tx_id, _size = HEADER.unpack_from(self._inbox)
        payload = bytes(self._inbox[HEADER.size:total])
        del self._inbox[:total]
        return Packet(op, payload, rq_id, tx_id)
