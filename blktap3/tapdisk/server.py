"""The tapdisk's control socket: accept connections, read one message, answer, close.

One thread per connection, so a client that connects and says nothing (or never reads)
holds only its own thread until the per-connection timeout, never the tapdisk. The
timeout bounds the whole message (a client trickling a byte at a time is cut off too),
and at most `max_clients` connections are served at once: beyond that the listener is
not polled and further clients wait in the kernel's backlog, so a flood of connections
costs neither unbounded threads nor descriptors. When accept() fails for want of
descriptors (EMFILE...), the pending connection stays queued and the listener stays
readable, so the loop backs off instead of spinning. A message that does not decode
gets an ERROR reply (EINVAL), so does a request whose handling fails unexpectedly (EIO),
and the server goes on. What a client sends after OPEN or RESUME on the same connection
(`protocol.Trailer`: a changed-block log path, an encryption key) is read before the
request is handled, so it is never taken for a message; the request is then refused
(EOPNOTSUPP) by the flag check until those features exist. An ERROR answer to STATS
carries no text: blktap's tap-ctl reads a STATS reply's length without looking at its
type, and the text would land where the length is. The accept loop waits on the
listening socket and a wake-up pipe (signals, a freed connection slot and the "last VBD
detached" exit write to it).
Python retries EINTR in every blocking call (PEP 475).
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import threading
import time
from pathlib import Path

import structlog

from blktap3.ctl import protocol as p

from .control import Reply, Tapdisk, error_reply

log = structlog.get_logger(__name__)

CLIENT_TIMEOUT = 10.0
MAX_CLIENTS = 64
# How long the loop stops accepting after accept() failed for want of resources.
ACCEPT_BACKOFF = 0.1
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _recv_message(conn: socket.socket, timeout: float, wanted: int = p.MESSAGE_SIZE) -> bytes:
    """Up to `wanted` bytes (one message) within `timeout` seconds: fewer when the
    client closed its side or went silent part-way (a timeout with nothing received
    propagates)."""
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + timeout
    while size < wanted:
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            conn.settimeout(remaining)
            chunk = conn.recv(wanted - size)
        except TimeoutError:
            if not size:
                raise
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class ControlServer:
    """Serves `tapdisk` on `<root>/ctl<pid>` until it exits."""

    def __init__(
        self, tapdisk: Tapdisk, path: Path, *, client_timeout: float = CLIENT_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.tapdisk = tapdisk
        self.path = path
        self.client_timeout = client_timeout
        self.max_clients = max_clients
        self._clients = 0  # connections being served, guarded by _clients_lock
        self._clients_lock = threading.Lock()
        self._backoff_until = 0.0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = threading.Event()
        self._bound = False

    @property
    def clients(self) -> int:
        """How many connections are being served now (each holds a thread)."""
        with self._clients_lock:
            return self._clients

    def bind(self) -> None:
        """Create the socket file (a stale one of a dead tapdisk with our pid is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.listener.bind(os.fspath(self.path))
        self._bound = True
        self.listener.listen(128)
        self.listener.setblocking(False)

    def stop(self) -> None:
        """Ask the accept loop to end (safe from signal handlers and other threads)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def serve_forever(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            listening = False
            while not self._stop.is_set():
                wait = self._backoff_until - time.monotonic()
                with self._clients_lock:
                    accepting = wait <= 0 and self._clients < self.max_clients
                if accepting != listening:
                    if accepting:
                        selector.register(self.listener, selectors.EVENT_READ)
                    else:
                        selector.unregister(self.listener)
                    listening = accepting
                for key, _ in selector.select(wait if wait > 0 else None):
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)

    def close(self) -> None:
        self.listener.close()
        if self._bound:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._bound = False
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return  # another wake-up took it
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRNOS:
                # The connection stays queued: retrying at once would spin (and log) at
                # full speed until a descriptor is freed.
                if time.monotonic() >= self._backoff_until + ACCEPT_BACKOFF:
                    log.warning("accept failed, backing off", errno=exc.errno,
                                reason=exc.strerror, seconds=ACCEPT_BACKOFF)
                self._backoff_until = time.monotonic() + ACCEPT_BACKOFF
            else:
                log.warning("accept failed", errno=exc.errno, reason=exc.strerror)
            return
        conn.setblocking(True)
        conn.settimeout(self.client_timeout)
        with self._clients_lock:
            self._clients += 1
        try:
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
        except RuntimeError as exc:  # "can't start new thread": the client is dropped
            log.warning("no thread for a client", reason=str(exc))
            conn.close()
            self._release_slot()

    def _release_slot(self) -> None:
        with self._clients_lock:
            self._clients -= 1
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"s")  # the loop may listen again

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    self._answer(conn)
                except TimeoutError:
                    log.warning("client timed out", timeout=self.client_timeout)
                except OSError as exc:
                    # The client went away mid-reply: its problem, not ours.
                    log.info("client connection failed", errno=exc.errno,
                             reason=exc.strerror)
        finally:
            self._release_slot()
        if self.tapdisk.exiting and not self._stop.is_set():
            log.info("exiting", reason="no VBD left")
            self.stop()

    def _answer(self, conn: socket.socket) -> None:
        raw = _recv_message(conn, self.client_timeout)
        if not raw:
            return  # connected and closed: a liveness probe
        cookie = int.from_bytes(raw[2:4], "little") if len(raw) >= 4 else 0
        try:
            request = p.decode(raw)
        except p.ProtocolError as exc:
            log.warning("bad message", reason=str(exc))
            reply = error_reply(cookie, errno.EINVAL, str(exc))
        else:
            refusal, logpath = self._read_trailer(conn, request)
            try:
                reply = refusal or self.tapdisk.handle(request, logpath=logpath)
                if request.type is p.MessageType.STATS:
                    reply = _without_text(reply)
                data = reply.encode()
            except Exception:
                # A bug met by one request must not cost the client its answer (it
                # would wait for its timeout) nor the tapdisk its other clients.
                log.exception("request failed", request=request.type.name, minor=cookie)
                reply = error_reply(cookie, errno.EIO, "internal error in the tapdisk")
            else:
                conn.settimeout(self.client_timeout)
                conn.sendall(data)
                return
        conn.settimeout(self.client_timeout)
        conn.sendall(reply.encode())

    def _read_trailer(self, conn: socket.socket,
                      request: p.Message) -> tuple[Reply | None, str]:
        """Read what follows an OPEN/RESUME (drivers/tapdisk-control.c, open_image and
        resume_vbd: a char[256] log path; then a u8 key size, 1..128, and the key);
        an ERROR reply when it is missing (EIO), its size is not 1..128 or the path is
        not a C string (EINVAL), else None; and the log path ("" when none)."""
        logpath, key = p.Trailer.expected(request)
        path = ""

        def missing(what: str) -> tuple[Reply, str]:
            log.warning("trailer missing", request=request.type.name, part=what)
            return error_reply(request.cookie, errno.EIO, f"no {what} after the request"), ""

        if logpath:
            raw = self._read(conn, p.STRING_MAX)
            if raw is None:
                return missing("log path")
            try:
                path = p.unpack_string(raw)
            except p.ProtocolError as exc:
                return error_reply(request.cookie, errno.EINVAL, f"log path: {exc}"), ""
            if not path:
                return error_reply(request.cookie, errno.EINVAL, "empty log path"), ""
        if key:
            size = self._read(conn, 1)
            if size is None:
                return missing("key size")
            # Read even a key too long to take (blktap's tapdisk leaves it unread), so
            # that closing the connection does not reset it under our answer.
            if size[0] and self._read(conn, size[0]) is None:
                return missing("key")
            if not 0 < size[0] <= p.MAX_KEY:
                return error_reply(request.cookie, errno.EINVAL,
                                   f"key size {size[0]} is not in 1..{p.MAX_KEY}"), ""
        return None, path

    def _read(self, conn: socket.socket, size: int) -> bytes | None:
        """Exactly `size` bytes within the client timeout, or None."""
        try:
            data = _recv_message(conn, self.client_timeout, size)
        except TimeoutError:
            return None
        return data if len(data) == size else None


def _without_text(reply: Reply) -> Reply:
    """The reply with the detail text of its ERROR messages removed."""
    return Reply([
        p.Message(m.type, m.cookie, p.Response(m.payload.error))
        if m.type is p.MessageType.ERROR and isinstance(m.payload, p.Response) else m
        for m in reply.messages
    ], reply.data)
