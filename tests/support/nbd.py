"""A small blocking NBD client for tests, written from the protocol document, not from
our codec (blktap3.tapdisk.nbd.protocol), so that a bug there is not shared here.

It negotiates fixed newstyle (structured replies and `base:allocation` unless told not
to, then GO), sends requests one at a time or several before reading replies, and
raises `NbdError` with the server's error value. `raw()` gives the socket to tests that
misbehave on purpose.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REP_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE = 1, 2, 4, 8
T_READ_ONLY, T_SEND_FLUSH, T_SEND_FUA, T_SEND_TRIM, T_SEND_WRITE_ZEROES = 2, 4, 8, 32, 64
T_CAN_MULTI_CONN = 256
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR = 1 << 15


class NbdError(Exception):
    def __init__(self, error: int, message: str = "") -> None:
        super().__init__(error, message)
        self.error = error
        self.message = message


@dataclass
class Reply:
    cookie: int
    error: int = 0
    message: str = ""
    data: bytes = b""
    extents: list[tuple[int, int]] = field(default_factory=list)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def option(sock: socket.socket, code: int, data: bytes = b"") -> list[tuple[int, bytes]]:
    """Send one option, read its replies up to the final one: [(reply type, data)]."""
    sock.sendall(IHAVEOPT + struct.pack(">II", code, len(data)) + data)
    replies = []
    while True:
        magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(sock, 20))
        assert magic == REP_MAGIC and opt == code, (hex(magic), opt, code)
        replies.append((rtype, recv_exact(sock, length)))
        if rtype not in (REP_SERVER, REP_INFO, REP_META_CONTEXT):
            return replies


def greet(sock: socket.socket) -> int:
    """Read the fixed-newstyle greeting, answer FIXED_NEWSTYLE|NO_ZEROES: its flags."""
    head = recv_exact(sock, 18)
    assert head[:16] == NBDMAGIC + IHAVEOPT, head
    (flags,) = struct.unpack(">H", head[16:])
    sock.sendall(struct.pack(">I", 3))
    return int(flags)


class NbdClient:
    """One connection to an export, through GO (or `EXPORT_NAME` with `go=False`)."""

    def __init__(self, path: Path | str, *, structured: bool = True, meta: bool = True,
                 go: bool = True, timeout: float = 30.0,
                 sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(timeout)
            sock.connect(str(path))
        self.sock = sock
        self.handshake_flags = greet(sock)
        self.structured = False
        self.meta_id: int | None = None
        self.block_sizes: tuple[int, int, int] | None = None
        if structured:
            assert option(sock, OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
            self.structured = True
        if structured and meta:
            query = b"base:allocation"
            data = struct.pack(">II", 0, 1) + struct.pack(">I", len(query)) + query
            for rtype, body in option(sock, OPT_SET_META_CONTEXT, data):
                if rtype == REP_META_CONTEXT:
                    assert body[4:] == query
                    self.meta_id = struct.unpack(">I", body[:4])[0]
        if go:
            replies = option(sock, OPT_GO, struct.pack(">IH", 0, 1) + struct.pack(">H", 3))
            assert replies[-1][0] == REP_ACK, replies
            for rtype, body in replies:
                (kind,) = struct.unpack(">H", body[:2]) if rtype == REP_INFO else (None,)
                if kind == INFO_EXPORT:
                    self.size, self.flags = struct.unpack(">QH", body[2:])
                elif kind == INFO_BLOCK_SIZE:
                    self.block_sizes = struct.unpack(">III", body[2:])
        else:
            sock.sendall(IHAVEOPT + struct.pack(">II", OPT_EXPORT_NAME, 0))
            self.size, self.flags = struct.unpack(">QH", recv_exact(sock, 10))
        self._cookie = 0
        self._reads: dict[int, tuple[int, int]] = {}  # cookie -> (offset, length)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------

    def send(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes = b"") -> int:
        self._cookie += 1
        cookie = self._cookie
        if cmd == READ:
            self._reads[cookie] = (offset, length)
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset,
                                      length) + payload)
        return cookie

    def receive(self) -> Reply:
        """One whole reply (every chunk up to DONE)."""
        magic = struct.unpack(">I", recv_exact(self.sock, 4))[0]
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", recv_exact(self.sock, 12))
            _, length = self._reads.pop(cookie, (0, 0))
            payload = recv_exact(self.sock, length) if length and not error else b""
            return Reply(cookie, error, data=payload)
        reply: Reply | None = None
        data = bytearray()
        start = 0
        while True:
            assert magic == STRUCTURED_MAGIC, hex(magic)
            flags, ctype, cookie, chunk_length = struct.unpack(
                ">HHQI", recv_exact(self.sock, 16))
            body = recv_exact(self.sock, chunk_length)
            if reply is None:
                reply = Reply(cookie)
                start, length = self._reads.get(cookie, (0, 0))
                data = bytearray(length)
            assert cookie == reply.cookie
            if ctype == CHUNK_OFFSET_DATA:
                (offset,) = struct.unpack(">Q", body[:8])
                at = offset - start
                assert at >= 0 and at + len(body) - 8 <= len(data), (offset, start)
                data[at:at + len(body) - 8] = body[8:]
            elif ctype == CHUNK_OFFSET_HOLE:
                offset, hole = struct.unpack(">QI", body)
                data[offset - start:offset - start + hole] = bytes(hole)
            elif ctype == CHUNK_BLOCK_STATUS:
                words = struct.unpack(f">{len(body) // 4}I", body)
                reply.extents = list(zip(words[1::2], words[2::2], strict=True))
            elif ctype & CHUNK_ERROR:
                reply.error, mlen = struct.unpack(">IH", body[:6])
                reply.message = body[6:6 + mlen].decode(errors="replace")
            if flags & 1:
                reply.data = bytes(data) if not reply.error else b""
                self._reads.pop(cookie, None)
                return reply
            magic = struct.unpack(">I", recv_exact(self.sock, 4))[0]

    def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes = b"") -> Reply:
        cookie = self.send(cmd, offset, length, flags, payload)
        reply = self.receive()
        assert reply.cookie == cookie
        if reply.error:
            raise NbdError(reply.error, reply.message)
        return reply

    def read(self, offset: int, length: int) -> bytes:
        return self.call(READ, offset, length).data

    def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.call(WRITE, offset, len(data), flags, data)

    def flush(self) -> None:
        self.call(FLUSH)

    def trim(self, offset: int, length: int) -> None:
        self.call(TRIM, offset, length)

    def zero(self, offset: int, length: int, flags: int = 0) -> None:
        self.call(WRITE_ZEROES, offset, length, flags)

    def block_status(self, offset: int, length: int, flags: int = 0) -> list[tuple[int, int]]:
        return self.call(BLOCK_STATUS, offset, length, flags).extents

    def disconnect(self) -> None:
        self.send(DISC)
        self.sock.shutdown(socket.SHUT_WR)
