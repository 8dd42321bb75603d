"""NBD sockets handed to the tapdisk by name on `<root>/nbdclient<pid>` (blktap's fd receiver).

A toolstack (xapi) connects to the NBD server of a migration's target itself, then hands
the connected socket over: it connects to `nbdclient<pid>`, sends one message whose data
is the name (NUL-terminated) and whose SCM_RIGHTS carries the socket, and the tapdisk
closes the connection. A later `-2 nbd:NAME` whose NAME is no socket path takes the
socket of that name and makes the NBD handshake on it. As blktap's
(drivers/tapdisk-fdreceiver.c, block-nbd.c: tdnbd_stash_passed_fd): one sender at a
time, at most 10 sockets kept, names compared on their first 39 bytes, a name passed
again replaces (and closes) the older socket, a socket is taken once.

Ours answers hostile senders without harm: a message without a descriptor, with an empty
or non-UTF-8 name, or with extra descriptors is logged and its descriptors closed; an
eleventh socket is closed; a sender that connects and sends nothing is dropped after
`RECV_TIMEOUT` (blktap's would block its event loop). The tapdisk closes the connection
only after the socket is stashed, so a sender that waits for EOF (`blktap3.ctl.passfd`) knows an
OPEN/RESUME naming it will find it.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import threading
from pathlib import Path

import structlog

from blktap3.ctl.passfd import NAME_BYTES

log = structlog.get_logger(__name__)

MAX_PASSED = 10                # blktap's N_PASSED_FDS
MESSAGE_BYTES = 16384          # blktap's UNIX_BUFFER_SIZE
RECV_TIMEOUT = 5.0


def _key(name: str) -> bytes:
    return name.encode(errors="surrogateescape")[:NAME_BYTES]


class PassedSockets:
    """The sockets received, by name; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: dict[bytes, int] = {}

    def stash(self, name: str, fd: int) -> bool:
        """Keep `fd` under `name` (closing an older one of that name); False (and `fd`
        closed) when MAX_PASSED others are kept already."""
        key = _key(name)
        with self._lock:
            old = self._fds.pop(key, None)
            if old is None and len(self._fds) >= MAX_PASSED:
                os.close(fd)
                return False
            self._fds[key] = fd
        if old is not None:
            os.close(old)
        return True

    def take(self, name: str) -> int | None:
        """The socket passed under `name`, now the caller's; None when there is none."""
        with self._lock:
            return self._fds.pop(_key(name), None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(k.decode(errors="replace") for k in self._fds)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


class FdReceiver:
    """The listener on `nbdclient<pid>` and its thread; `stop` removes the socket."""

    def __init__(self, path: Path, sockets: PassedSockets) -> None:
        self.path = path
        self.sockets = sockets
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a dead tapdisk's with our pid
        self._listener.bind(os.fspath(self.path))
        self._listener.listen(8)
        self._thread = threading.Thread(target=self._run, daemon=True, name="nbdclient")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        if self._thread is not None:
            self._thread.join(RECV_TIMEOUT + 1)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.sockets.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            with conn:  # one sender at a time, as blktap's
                conn.settimeout(RECV_TIMEOUT)
                try:
                    self._receive(conn)
                except OSError as exc:
                    log.warning("nbdclient: receive failed", errno=exc.errno,
                                reason=str(exc.strerror or exc))

    def _receive(self, conn: socket.socket) -> None:
        fds = array.array("i")
        data, ancdata, _, _ = conn.recvmsg(MESSAGE_BYTES, socket.CMSG_SPACE(
            MAX_PASSED * fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        received = list(fds)
        for extra in received[1:]:
            os.close(extra)
        name = data.split(b"\0", 1)[0]
        if not received:
            log.warning("nbdclient: a message without a descriptor", bytes=len(data))
            return
        fd = received[0]
        try:
            text = name.decode()
        except UnicodeDecodeError:
            text = ""
        if not text:
            log.warning("nbdclient: a descriptor without a (UTF-8) name")
            os.close(fd)
            return
        os.set_inheritable(fd, False)
        if not self.sockets.stash(text, fd):
            log.warning("nbdclient: too many sockets passed, this one closed", name=text,
                        kept=MAX_PASSED)
            return
        log.info("nbdclient: socket passed", name=text, extra_fds=len(received) - 1)
