"""The tapdisk's control socket: accept connections, read one message, answer, close.

One thread per connection, so a client that connects and says nothing (or never reads)
holds only its own thread until the per-connection timeout, never the tapdisk. A
message that does not decode gets an ERROR reply (EINVAL) and the server goes on. The
accept loop waits on the listening socket and a wake-up pipe (signals and the "last VBD
detached" exit write to it). Python retries EINTR in every blocking call (PEP 475).
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import threading
from pathlib import Path

import structlog

from blktap3.ctl import protocol as p

from .control import Tapdisk, error_reply

log = structlog.get_logger(__name__)

CLIENT_TIMEOUT = 10.0


def _recv_message(conn: socket.socket) -> bytes:
    """Up to one message's bytes: fewer when the client closed its side or went silent
    part-way (a timeout with nothing received propagates)."""
    chunks: list[bytes] = []
    size = 0
    while size < p.MESSAGE_SIZE:
        try:
            chunk = conn.recv(p.MESSAGE_SIZE - size)
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
        self, tapdisk: Tapdisk, path: Path, *, client_timeout: float = CLIENT_TIMEOUT
    ) -> None:
        self.tapdisk = tapdisk
        self.path = path
        self.client_timeout = client_timeout
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = threading.Event()
        self._bound = False

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
            selector.register(self.listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select():
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
            log.warning("accept failed", errno=exc.errno, reason=exc.strerror)
            return
        conn.setblocking(True)
        conn.settimeout(self.client_timeout)
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._answer(conn)
            except TimeoutError:
                log.warning("client timed out", timeout=self.client_timeout)
            except OSError as exc:
                # The client went away mid-reply: its problem, not ours.
                log.info("client connection failed", errno=exc.errno, reason=exc.strerror)
        if self.tapdisk.exiting and not self._stop.is_set():
            log.info("exiting", reason="no VBD left")
            self.stop()

    def _answer(self, conn: socket.socket) -> None:
        raw = _recv_message(conn)
        if not raw:
            return  # connected and closed: a liveness probe
        try:
            request = p.decode(raw)
        except p.ProtocolError as exc:
            cookie = int.from_bytes(raw[2:4], "little") if len(raw) >= 4 else 0
            log.warning("bad message", reason=str(exc))
            reply = error_reply(cookie, errno.EINVAL, str(exc))
        else:
            reply = self.tapdisk.handle(request)
        conn.sendall(reply.encode())
