"""A fake xenstored on the far side of a xenstore ring page, for the ring unit tests.

Its index arithmetic is written out here independently of blktap3.xenbus.ring (free
running u32 indices, masked by 1023, byte by byte), so a bug in ours is not mirrored by
the peer.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import struct
import threading

from .fakexs import HEADER, FakeStore, pack

U32 = struct.Struct("=I")
REQ, RSP, REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD = 0, 1024, 2048, 2052, 2056, 2060


class PipeEventChannel:
    """One end of an event channel made of two pipes; notify() wakes the other end."""

    def __init__(self, read_fd: int, peer_write_fd: int, port: int) -> None:
        self.read_fd = read_fd
        self.peer_write_fd = peer_write_fd
        self.port = port
        self.notifications = 0

    def fileno(self) -> int:
        return self.read_fd

    def notify(self) -> None:
        self.notifications += 1
        with contextlib.suppress(BlockingIOError):
            os.write(self.peer_write_fd, b"\0")

    def pending(self) -> int:
        os.read(self.read_fd, 1)
        return self.port

    def unmask(self, port: int) -> None:
        assert port == self.port

    def close(self) -> None:
        for fd in (self.read_fd, self.peer_write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def event_channel_pair() -> tuple[PipeEventChannel, PipeEventChannel]:
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    for fd in (a_r, a_w, b_r, b_w):
        os.set_blocking(fd, False)
    return PipeEventChannel(a_r, b_w, 3), PipeEventChannel(b_r, a_w, 7)


def new_page(start_index: int = 0) -> mmap.mmap:
    page = mmap.mmap(-1, 4096)
    for offset in (REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD):
        U32.pack_into(page, offset, start_index & 0xFFFFFFFF)
    return page


class FakeRingPeer:
    """Serves FakeStore requests from the request ring; `max_chunk` makes it slow."""

    def __init__(self, page: mmap.mmap, evtchn: PipeEventChannel, store: FakeStore,
                 max_chunk: int = 1024) -> None:
        self.page = page
        self.evtchn = evtchn
        self.store = store
        self.max_chunk = max_chunk
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def get(self, offset: int) -> int:
        value: int = U32.unpack_from(self.page, offset)[0]
        return value

    def put(self, offset: int, value: int) -> None:
        U32.pack_into(self.page, offset, value & 0xFFFFFFFF)

    def deliver(self, data: bytes) -> None:
        with self.lock:
            self.outbox += data

    def run(self) -> None:
        while not self.stop:
            readable, _, _ = select.select([self.evtchn.fileno()], [], [], 0.01)
            if readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.evtchn.fileno(), 4096)
            self.consume()
            self.produce()

    def consume(self) -> None:
        cons, prod = self.get(REQ_CONS), self.get(REQ_PROD)
        n = min((prod - cons) & 0xFFFFFFFF, self.max_chunk)
        for i in range(n):  # byte by byte: the simplest correct wrap-around
            self.inbox.append(self.page[REQ + ((cons + i) & 1023)])
        if n:
            self.put(REQ_CONS, cons + n)
            self.evtchn.notify()
        while len(self.inbox) >= HEADER.size:
            op, rq_id, tx_id, size = HEADER.unpack_from(self.inbox)
            if len(self.inbox) < HEADER.size + size:
                break
            payload = bytes(self.inbox[HEADER.size:HEADER.size + size])
            del self.inbox[:HEADER.size + size]
            for reply in self.store.handle(op, rq_id, tx_id, payload, self.deliver):
                self.deliver(pack(reply))

    def produce(self) -> None:
        with self.lock:
            cons, prod = self.get(RSP_CONS), self.get(RSP_PROD)
            space = 1024 - ((prod - cons) & 0xFFFFFFFF)
            n = min(space, len(self.outbox), self.max_chunk)
            for i in range(n):
                self.page[RSP + ((prod + i) & 1023)] = self.outbox[i]
            del self.outbox[:n]
        if n:
            self.put(RSP_PROD, prod + n)
            self.evtchn.notify()

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
