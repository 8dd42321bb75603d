"""libblktapctl's message layer: one typed call per control message to one tapdisk.

Each call is one connection, as in blktap: connect to `<root>/ctl<pid>`, send one
544-byte message, read the reply (LIST: replies until `count == 0`; STATS: a header then
`length` bytes), close. Failures are `CtlError` (an OSError with a positive errno): the
tapdisk's ERROR reply, a timeout (ETIMEDOUT), a missing tapdisk (ENOENT/ECONNREFUSED) or a
reply of the wrong type (EPROTO). Python retries EINTR itself (PEP 475), so no signal can
make a call fail half-way, the bug of blktap#352.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from blktap3 import lazylog

from . import protocol as p
from .runtime import root_dir, socket_path

log = lazylog.get_logger(__name__)

LIST_TIMEOUT = 10.0  # blktap's client timeout for list and stats
DEFAULT_TIMEOUT = 120.0  # other requests: long enough for a drain, short of "an hour"


class CtlError(OSError):
    """A control operation failed with `errno`; `detail` is the tapdisk's own message.
    `refused`: the request the tapdisk answered with an ERROR message (None: the failure
    was not the tapdisk's answer, e.g. no tapdisk, a timeout, a broken connection)."""

    def __init__(self, code: int, detail: str = "", *,
                 refused: p.MessageType | None = None) -> None:
        super().__init__(code, os.strerror(code))
        self.detail = detail
        self.refused = refused

    def __str__(self) -> str:
        if self.detail:
            return f"{self.strerror}: {self.detail}"
        return str(self.strerror)


@dataclass(frozen=True)
class VbdEntry:
    """One VBD of a tapdisk's LIST reply: minor, state bits, `type:/path` (may be empty)."""

    minor: int
    state: int
    params: str


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            got = size - remaining
            raise CtlError(errno.EPROTO, f"connection closed after {got} of {size} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class Connection:
    """One request's connection to a tapdisk socket."""

    def __init__(self, path: Path, timeout: float | None) -> None:
        self.path = path
        self.sent: p.MessageType | None = None  # the request, for CtlError.refused
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
        except (ValueError, OverflowError) as exc:  # negative, nan, too large
            self.sock.close()
            raise CtlError(errno.EINVAL, f"timeout {timeout}: {exc}") from None
        try:
            self.sock.connect(os.fspath(path))
        except TimeoutError:
            self.sock.close()
            raise CtlError(errno.ETIMEDOUT, f"connecting to {path}") from None
        except OSError as exc:
            self.sock.close()
            raise CtlError(exc.errno or errno.EIO, f"cannot reach a tapdisk at {path}") from None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, message: p.Message, trailer: p.Trailer | None = None) -> None:
        log.debug("send", socket=str(self.path), type=message.type.name,
                  cookie=message.cookie, payload=message.payload)
        data = message.encode() + (trailer or p.Trailer()).encode(message)
        self.sent = message.type
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise CtlError(errno.ETIMEDOUT, "sending to the tapdisk") from None
        except OSError as exc:  # EPIPE/ECONNRESET: the tapdisk died or dropped us
            raise CtlError(exc.errno or errno.EIO, "sending to the tapdisk") from None

    def receive(self, expected: p.MessageType) -> p.Message:
        """The next message; an ERROR reply becomes a CtlError."""
        try:
            raw = _recv_exact(self.sock, p.MESSAGE_SIZE)
        except TimeoutError:
            raise CtlError(errno.ETIMEDOUT, "waiting for the tapdisk's reply") from None
        except CtlError:
            raise
        except OSError as exc:  # ECONNRESET: the tapdisk died mid-request
            raise CtlError(exc.errno or errno.EIO, "waiting for the tapdisk's reply") from None
        try:
            reply = p.decode(raw)
        except p.ProtocolError as exc:
            raise CtlError(errno.EPROTO, str(exc)) from None
        log.debug("receive", type=reply.type.name, cookie=reply.cookie, payload=reply.payload)
        if reply.type in (p.MessageType.ERROR, p.MessageType.RUNTIME_ERROR):
            assert isinstance(reply.payload, p.Response)
            raise CtlError(reply.payload.error or errno.EIO, reply.payload.message,
                           refused=self.sent)
        if reply.type is not expected:
            raise CtlError(errno.EPROTO, f"expected {expected.name}, got {reply.type.name}")
        return reply

    def receive_bytes(self, size: int) -> bytes:
        try:
            return _recv_exact(self.sock, size)
        except TimeoutError:
            raise CtlError(errno.ETIMEDOUT, "waiting for the tapdisk's data") from None
        except CtlError:
            raise
        except OSError as exc:
            raise CtlError(exc.errno or errno.EIO, "waiting for the tapdisk's data") from None


class TapdiskClient:
    """The control messages of one tapdisk, identified by its pid (or socket path)."""

    def __init__(
        self,
        pid: int,
        *,
        root: str | os.PathLike[str] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        path: Path | None = None,
    ) -> None:
        self.pid = pid
        self.path = path if path is not None else socket_path(root_dir(root), pid)
        self.timeout = timeout

    def request(self, message: p.Message, timeout: float | None = None,
                trailer: p.Trailer | None = None) -> p.Message:
        """Send one message (and what follows it) and return its (non-error) reply."""
        with Connection(self.path, timeout or self.timeout) as conn:
            conn.send(message, trailer)
            return conn.receive(p.reply_type(message.type))

    def _simple(
        self, mtype: p.MessageType, minor: int, payload: p.Payload | None = None,
        timeout: float | None = None,
    ) -> p.Message:
        message = p.Message(mtype, minor, payload if payload is not None else p.Empty())
        return self.request(message, timeout)

    def get_pid(self) -> int:
        """PID: the tapdisk's own pid (confirms a socket belongs to a live tapdisk)."""
        reply = self._simple(p.MessageType.PID, 0, timeout=LIST_TIMEOUT)
        assert isinstance(reply.payload, p.Pid)
        return reply.payload.pid

    def attach(self, minor: int) -> None:
        """ATTACH: create the VBD of `minor` (its marker must exist; EEXIST if present)."""
        self._simple(p.MessageType.ATTACH, minor, p.Params(devnum=minor))

    def open(
        self,
        minor: int,
        params: str,
        flags: int = 0,
        *,
        prt_minor: int = p.NO_PARENT,
        req_timeout: int = 0,
        secondary: str = "",
        domid: int = 0,
        logpath: str | None = None,
        key: bytes | None = None,
    ) -> p.ImageInfo:
        """OPEN `type:/path` on an attached VBD; returns the image's size and info.
        A `logpath` (changed-block log) or `key` (encryption) follows the message and
        sets its flag."""
        if logpath is not None:
            flags |= p.OpenFlags.ADD_LOG
        if key is not None:
            flags |= p.OpenFlags.OPEN_ENCRYPTED
        payload = p.Params(
            flags=flags, devnum=minor, domid=domid, path=params, prt_devnum=prt_minor,
            req_timeout=req_timeout, secondary=secondary,
        )
        reply = self.request(p.Message(p.MessageType.OPEN, minor, payload),
                             trailer=p.Trailer(logpath or "", key or b""))
        assert isinstance(reply.payload, p.ImageInfo)
        return reply.payload

    def close(self, minor: int, *, force: bool = False, timeout: float | None = None) -> None:
        """CLOSE (drains in-flight requests) or FORCE_SHUTDOWN (does not wait)."""
        mtype = p.MessageType.FORCE_SHUTDOWN if force else p.MessageType.CLOSE
        self._simple(mtype, minor, timeout=timeout)

    def pause(self, minor: int, *, timeout: float | None = None) -> None:
        """PAUSE: returns once in-flight I/O drained and the image is closed."""
        self._simple(p.MessageType.PAUSE, minor, timeout=timeout)

    def resume(
        self, minor: int, params: str = "", flags: int = 0, secondary: str = "",
        *, timeout: float | None = None, logpath: str | None = None,
    ) -> None:
        """RESUME a paused VBD, optionally on a new `type:/path`; add
        `ResumeFlags.RESIZE` to accept an image that grew. A `logpath` follows the
        message and sets ADD_LOG."""
        if logpath is not None:
            flags |= p.OpenFlags.ADD_LOG
        payload = p.Resume(flags=flags, new_params=params, secondary=secondary)
        self.request(p.Message(p.MessageType.RESUME, minor, payload), timeout,
                     p.Trailer(logpath or ""))

    def detach(self, minor: int) -> None:
        """DETACH a closed VBD (EBUSY while open); the tapdisk exits after its last one."""
        self._simple(p.MessageType.DETACH, minor)

    def disk_info(self, minor: int) -> p.ImageInfo:
        """DISK_INFO: the image's size in sectors, sector size and VDISK_* info."""
        reply = self._simple(p.MessageType.DISK_INFO, minor)
        assert isinstance(reply.payload, p.ImageInfo)
        return reply.payload

    def list_minors(self) -> list[int]:
        """LIST_MINORS: the minors of this tapdisk's VBDs."""
        reply = self._simple(p.MessageType.LIST_MINORS, 0, timeout=LIST_TIMEOUT)
        assert isinstance(reply.payload, p.Minors)
        return list(reply.payload.minors)

    def list(self) -> list[VbdEntry]:
        """LIST: every VBD of this tapdisk (replies stream until `count == 0`)."""
        entries: list[VbdEntry] = []
        message = p.Message(p.MessageType.LIST, p.LIST_COOKIE)
        with Connection(self.path, LIST_TIMEOUT) as conn:
            conn.send(message)
            while True:
                reply = conn.receive(p.MessageType.LIST_RSP)
                assert isinstance(reply.payload, p.ListEntry)
                if reply.payload.count <= 0:
                    return entries
                entry = reply.payload
                entries.append(VbdEntry(entry.minor, entry.state, entry.path))

    def stats(self, minor: int) -> str:
        """STATS: the VBD's statistics as blktap's JSON text; `p.ALL_VBDS` as the minor:
        every VBD's, as a JSON array."""
        with Connection(self.path, LIST_TIMEOUT) as conn:
            conn.send(p.Message(p.MessageType.STATS, minor))
            reply = conn.receive(p.MessageType.STATS_RSP)
            assert isinstance(reply.payload, p.StatInfo)
            return conn.receive_bytes(reply.payload.length).decode(errors="replace")

    def connect_xenblkif(
        self,
        minor: int,
        *,
        domid: int,
        devid: int,
        grefs: tuple[int, ...],
        order: int,
        port: int,
        proto: int,
        pool: str = "",
        poll_duration: int = 0,
        poll_idle_threshold: int = 0,
        max_indirect_segments: int = 0,
        discard: bool = True,
        persistent: bool = False,
        extra_queues: Sequence[tuple[tuple[int, ...], int]] = (),
    ) -> None:
        """XENBLKIF_CONNECT: serve the front-end's ring (EALREADY if already served).

        `poll_duration`: microseconds the ring spins for more work before sleeping (0:
        the tapdisk's default), only while `poll_idle_threshold` % of CPU time is idle
        (0: always). `max_indirect_segments`: the
        `feature-max-indirect-segments` advertised to this front-end, enforced by the
        tapdisk (0: not advertised, indirect requests answered EOPNOTSUPP). `discard`
        False: withheld from this front-end (BlkifFlags.NO_DISCARD: EOPNOTSUPP).
        `persistent`: persistent grants were negotiated (BlkifFlags.PERSISTENT).
        `extra_queues`: multi-queue, the (ring refs, port) of queues 1..N-1 (`grefs` and
        `port` are queue 0's): one CONNECT per queue, in order; when one is refused the
        queues already connected are disconnected again (best effort) and the refusal
        raised, so that the VBD serves all its queues or none.
        """
        flags = p.BlkifFlags.NONE if discard else p.BlkifFlags.NO_DISCARD
        if persistent:
            flags |= p.BlkifFlags.PERSISTENT
        nr_queues = 1 + len(extra_queues)
        payload = p.Blkif(
            domid=domid, devid=devid, grefs=grefs, order=order, proto=proto, pool=pool,
            port=port, poll_duration=poll_duration, poll_idle_threshold=poll_idle_threshold,
            max_indirect_segments=max_indirect_segments,
            flags=flags,
            nr_queues=nr_queues if extra_queues else 0,  # one queue: blktap's message
        )
        self._simple(p.MessageType.XENBLKIF_CONNECT, minor, payload)
        for index, (queue_grefs, queue_port) in enumerate(extra_queues, start=1):
            try:
                self._simple(p.MessageType.XENBLKIF_CONNECT, minor, dataclasses.replace(
                    payload, grefs=queue_grefs, port=queue_port, queue=index))
            except CtlError:
                with contextlib.suppress(CtlError):
                    self.disconnect_xenblkif(minor, domid=domid, devid=devid)
                raise

    def disconnect_xenblkif(self, minor: int, *, domid: int, devid: int) -> None:
        """XENBLKIF_DISCONNECT: stop serving that ring (ENODEV if unknown)."""
        payload = p.Blkif(domid=domid, devid=devid)
        self._simple(p.MessageType.XENBLKIF_DISCONNECT, minor, payload)

    def exit(self) -> None:
        """EXIT: ask an idle tapdisk (no VBD) to exit (EBUSY otherwise)."""
        with Connection(self.path, self.timeout) as conn:
            conn.send(p.Message(p.MessageType.EXIT, 0))
            conn.receive(p.MessageType.EXIT)
