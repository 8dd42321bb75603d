"""The NBD export of one VBD: its sockets, one thread per client, and the pause gate.

blktap's tapdisk starts an NBD server on every OPEN (`tapdisk_vbd_start_nbdservers`) and
removes it on CLOSE; so does ours (`Exports`, called from the control handlers). The
sockets, in the tapdisk's control directory, as blktap names them:

- `nbd<pid>.<minor>`: fixed newstyle (the socket `physical-device-path` names);
- `nbd-old<pid>.<minor>`: blktap's "old" server; blktap 4 answers it with the fixed
  newstyle handshake too (its listener calls the newstyle handshake whatever the style,
  seen on v4.0.8), and so do we;
- `nbdserver<pid>.<minor>` and `nbdserver-new<pid>.<minor>`: fd receivers. A client
  connects, sends one message carrying a connected socket by SCM_RIGHTS (xapi-nbd hands
  over its TLS-terminated client this way) and is closed without a reply; the socket it
  passed is then served with the old-style greeting (`nbdserver`) or the fixed newstyle
  handshake (`nbdserver-new`).

`nbdclient<pid>` belongs to the other side, the NBD *client* of a mirror's `nbd:`
secondary: `passed` receives its sockets.

Threads: an acceptor per export (selectors over its listeners and a wake-up pipe) and a
thread per client, at most `max_clients`; a client over the limit is closed at once. All
of it runs beside the control socket and the C ring service, never on their threads; a
client thread blocks only on its own socket (bounded by `io_timeout` once a request has
started) or on the image.

Pause: as blktap's, a paused VBD queues. Requests wait at the gate (`_Gate`) until RESUME
installs the reopened image, then run on it; PAUSE waits for the I/O in flight (not for
replies to slow readers: data is sent after the image is released), then closes the
export's descriptor. CLOSE drops every client and removes the sockets.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import mmap
import os
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

from blktap3.abi import SECTOR_SIZE
from blktap3.ctl import runtime

from . import protocol as nbd
from .backend import Backend

log = structlog.get_logger(__name__)

MAX_CLIENTS = 16
HANDSHAKE_TIMEOUT = 60.0  # blktap: "we may need to wait up to 40 seconds" (storage motion)
IO_TIMEOUT = 30.0
IN_FLIGHT = 4  # requests of one client served at once
BACKLOG = 16
_ALIGN = 4096
_STOP_JOIN = 10.0


class Listener(enum.Enum):
    """The export's sockets, by name prefix (`runtime.NBD_SOCKET_PREFIXES`)."""

    NEWSTYLE = "nbd"
    OLD = "nbd-old"
    FD_OLDSTYLE = "nbdserver"
    FD_NEWSTYLE = "nbdserver-new"


def socket_name(kind: Listener, pid: int, minor: int) -> str:
    return runtime.nbd_socket_path(Path(), kind.value, pid, minor).name


def _set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Kernel timeouts on a blocking socket: one send of a whole reply is one system call
    (Python's own timeouts poll and send in socket-buffer pieces); a recv or send that
    makes no progress for `seconds` fails with EAGAIN (BlockingIOError)."""
    tv = struct.pack("@ll", int(seconds), int(seconds % 1 * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class ExportClosed(Exception):
    """The export was stopped while a request waited for it."""


class _Gate:
    """Who may use the image now: paused exports hold requests, PAUSE drains them.

    Each backend counts its users; one that PAUSE (or a RESUME's swap) retired is closed
    when its last user leaves, so a descriptor is never closed under a running request.
    """

    def __init__(self, backend: Backend) -> None:
        self._cv = threading.Condition()
        self._backend: Backend | None = backend
        self._users: dict[Backend, int] = {}
        self._closed = False

    @contextlib.contextmanager
    def use(self) -> Iterator[Backend]:
        with self._cv:
            self._cv.wait_for(lambda: self._closed or self._backend is not None)
            if self._closed or self._backend is None:
                raise ExportClosed
            backend = self._backend
            self._users[backend] = self._users.get(backend, 0) + 1
        try:
            yield backend
        finally:
            with self._cv:
                self._users[backend] -= 1
                if not self._users[backend]:
                    del self._users[backend]
                    if backend is not self._backend:
                        backend.close()
                self._cv.notify_all()

    def pause(self, timeout: float) -> bool:
        """Hold new requests, wait for those in flight, release the image; drained?"""
        with self._cv:
            backend, self._backend = self._backend, None
            drained = self._cv.wait_for(lambda: not self._users, timeout)
            if backend is not None and backend not in self._users:
                backend.close()
        return drained

    def resume(self, backend: Backend) -> None:
        with self._cv:
            old, self._backend = self._backend, backend
            if old is not None and old not in self._users:
                old.close()
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            backend, self._backend = self._backend, None
            if backend is not None and backend not in self._users:
                backend.close()
            self._cv.notify_all()


# blktap's `struct stats` of an NBD server (drivers/tapdisk-nbdserver.c): READ and WRITE
# requests submitted and completed, their sectors and time (us), the image's errors; one
# set per protocol style, as blktap's `nbd-<minor>` and `nbd-old-<minor>` files.
COUNTERS = ("read_reqs_submitted", "read_reqs_completed", "read_sectors", "read_total_ticks",
            "write_reqs_submitted", "write_reqs_completed", "write_sectors",
            "write_total_ticks", "io_errors")


class Export:
    """The NBD server of one VBD."""

    def __init__(self, root: Path, pid: int, minor: int, backend: Backend,
                 info: nbd.ExportInfo, *, max_clients: int = MAX_CLIENTS,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 io_timeout: float = IO_TIMEOUT) -> None:
        self.root = root
        self.minor = minor
        self.info = info
        self.paths = {kind: runtime.nbd_socket_path(root, kind.value, pid, minor)
                      for kind in Listener}
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.io_timeout = io_timeout
        self._gate = _Gate(backend)
        self._lock = threading.Lock()
        # Counted under _count_lock by the clients' workers; read by the stats files.
        self.counters = {style: dict.fromkeys(COUNTERS, 0) for style in ("new", "old")}
        self._count_lock = threading.Lock()
        self._clients: set[_Client] = set()
        self._listeners: dict[socket.socket, Listener] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._acceptor: threading.Thread | None = None
        self.stopping = False
        self._log = log.bind(minor=minor)

    # -- lifecycle (called by the control thread) ---------------------------------------

    def start(self) -> None:
        """Bind every socket (a stale file of a dead tapdisk with our pid goes first)."""
        try:
            for kind, path in self.paths.items():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                self._listeners[listener] = kind
                listener.bind(str(path))
                listener.listen(BACKLOG)
                listener.setblocking(False)
        except OSError:
            self._close_listeners()
            raise
        selector = selectors.DefaultSelector()
        for listener in self._listeners:
            selector.register(listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        self._acceptor = threading.Thread(target=self._accept_loop, args=(selector,),
                                          daemon=True, name=f"nbd-accept-{self.minor}")
        self._acceptor.start()
        self._log.info("nbd export started", socket=str(self.paths[Listener.NEWSTYLE]),
                       size=self.info.size, readonly=self.info.readonly)

    def pause(self, timeout: float) -> bool:
        """Hold new requests, wait (up to `timeout`) for those using the image, let the
        image go; whether they drained in time."""
        drained = self._gate.pause(timeout)
        if not drained:
            self._log.warning("nbd requests still in flight after pause; the image "
                              "descriptor closes when they finish", timeout=timeout)
        return drained

    def resume(self, backend: Backend, info: nbd.ExportInfo) -> None:
        self.info = info  # a resize grows it; clients connected before keep their size
        self._gate.resume(backend)

    def stop(self) -> None:
        """Remove the sockets, drop every client, release the image (once)."""
        if self.stopping:
            return
        self.stopping = True
        for path in self.paths.values():  # first: no new client finds us
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._acceptor is not None:
            self._acceptor.join(_STOP_JOIN)
        self._close_listeners()
        self._gate.close()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.hang_up()
        deadline = time.monotonic() + _STOP_JOIN
        for client in clients:
            client.thread.join(max(0.0, deadline - time.monotonic()))
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.info("nbd export stopped", clients_dropped=len(clients))

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()
        for path in self.paths.values():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def snapshot(self) -> dict[str, dict[str, int]]:
        """The counters of each style, copied at one instant."""
        with self._count_lock:
            return {style: dict(c) for style, c in self.counters.items()}

    def count(self, kind: Listener, cmd: int, phase: str, length: int = 0,
              usecs: int = 0) -> None:
        """One step of a READ/WRITE of a client on listener `kind`: "submitted",
        "completed" (with its bytes and time) or "failed"."""
        op = "read" if cmd == nbd.Cmd.READ else "write"
        with self._count_lock:
            c = self.counters["old" if kind in (Listener.OLD, Listener.FD_OLDSTYLE) else "new"]
            if phase == "submitted":
                c[f"{op}_reqs_submitted"] += 1
            elif phase == "completed":
                c[f"{op}_reqs_completed"] += 1
                c[f"{op}_sectors"] += length // SECTOR_SIZE
                c[f"{op}_total_ticks"] += usecs
            else:
                c["io_errors"] += 1

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._clients)

    # -- accepting -----------------------------------------------------------------------

    def _accept_loop(self, selector: selectors.BaseSelector) -> None:
        with selector:
            while not self.stopping:
                for key, _ in selector.select():
                    if key.fileobj == self._wake_r or self.stopping:
                        return
                    assert isinstance(key.fileobj, socket.socket)
                    self._accept(key.fileobj)

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            self._log.warning("nbd accept failed", errno=exc.errno, reason=exc.strerror)
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors: the connection stays queued; without a pause the
                # acceptor would spin on it.
                time.sleep(0.1)
            return
        conn.setblocking(True)
        kind = self._listeners[listener]
        with self._lock:
            full = len(self._clients) >= self.max_clients
            client = None if full else _Client(self, conn, kind)
            if client is not None:
                self._clients.add(client)
        if client is None:
            self._log.warning("nbd client refused: too many clients", limit=self.max_clients)
            conn.close()
            return
        try:
            client.thread.start()
        except RuntimeError as exc:  # "can't start new thread"
            self._log.warning("nbd client refused: no thread", reason=str(exc))
            self._forget(client)
            conn.close()

    def _forget(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)


class _Slot:
    """One request in flight: its page-aligned buffer (O_DIRECT), made on first use."""

    def __init__(self) -> None:
        self._buf: mmap.mmap | None = None

    def view(self, size: int) -> memoryview:
        if size == 0:
            return memoryview(b"")
        if self._buf is None:
            self._buf = mmap.mmap(-1, nbd.MAX_PAYLOAD + 2 * _ALIGN)
        return memoryview(self._buf)[:size]

    def close(self) -> None:
        if self._buf is not None:
            with contextlib.suppress(BufferError):  # a view still held: freed with it
                self._buf.close()


class _Client:
    """One connection: receive the fd if handed over, handshake, then serve requests.

    The client's thread reads requests (and write payloads) in order; each runs on a
    small pool of workers, at most `IN_FLIGHT` at once (blktap: 8 per client), each with
    its own buffer, and its reply is sent whole under `_send_lock` (replies may come out
    of order, as NBD allows). A request past the limit waits in the socket.
    """

    def __init__(self, export: Export, conn: socket.socket, kind: Listener) -> None:
        self.export = export
        self.conn = conn
        self.sock = conn
        self.kind = kind
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"nbd-client-{export.minor}")
        self._slots = [_Slot() for _ in range(IN_FLIGHT)]
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for slot in self._slots:
            self._free.put(slot)
        self._send_lock = threading.Lock()
        self._failed: BaseException | None = None
        self.requests = 0
        self.errors = 0

    def hang_up(self) -> None:
        """From another thread: wake the client's blocked recv/send, which then ends."""
        for sock in {self.conn, self.sock}:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        export = self.export
        reason = "client closed"
        try:
            if self.kind in (Listener.FD_OLDSTYLE, Listener.FD_NEWSTYLE):
                self.sock = self._receive_socket()
            if export.stopping:
                return
            if self.kind is Listener.FD_OLDSTYLE:
                _set_timeouts(self.sock, export.io_timeout)
                session = nbd.Session(export.info)
                self.sock.sendall(nbd.oldstyle_greeting(export.info))
            else:
                negotiated = self._negotiate()
                if negotiated is None:
                    reason = "client ended the handshake"
                    return
                session = negotiated
            reason = self._transmit(session)
        except nbd.ProtocolError as exc:
            reason = f"protocol error: {exc}"
        except ExportClosed:
            reason = "export stopped"
        except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO/SO_SNDTIMEO ran out
            reason = "timed out"
        except OSError as exc:
            reason = exc.strerror or str(exc)
        finally:
            for sock in {self.conn, self.sock}:
                sock.close()
            for slot in self._slots:
                slot.close()
            export._log.info("nbd client left", listener=self.kind.value, reason=reason,
                             requests=self.requests, errors=self.errors)
            export._forget(self)

    def _receive_socket(self) -> socket.socket:
        """The fd receivers: one message with one SCM_RIGHTS descriptor, then close."""
        _set_timeouts(self.conn, self.export.handshake_timeout)
        _, fds, _, _ = socket.recv_fds(self.conn, 16384, 1)
        self.conn.close()
        if not fds:
            raise nbd.ProtocolError("no descriptor was passed")
        try:
            sock = socket.socket(fileno=fds[0])
        except OSError:
            os.close(fds[0])
            raise nbd.ProtocolError("the passed descriptor is not a socket") from None
        if sock.type != socket.SOCK_STREAM:
            sock.close()
            raise nbd.ProtocolError("the passed socket is not a stream")
        sock.setblocking(True)
        return sock

    # -- handshake ----------------------------------------------------------------------

    def _negotiate(self) -> nbd.Session | None:
        export = self.export
        deadline = time.monotonic() + export.handshake_timeout
        _set_timeouts(self.sock, export.handshake_timeout)
        self.sock.sendall(nbd.newstyle_greeting())
        flags = nbd.parse_client_flags(self._recv(nbd.CLIENT_FLAGS.size, deadline))
        negotiation = nbd.Negotiation(export.info, flags)
        while negotiation.phase is nbd.Phase.OPTIONS:
            option, length = nbd.parse_option_header(
                self._recv(nbd.OPTION_HEADER.size, deadline))
            reply = negotiation.handle(option, self._recv(length, deadline))
            self.sock.sendall(reply)
        if negotiation.phase is nbd.Phase.CLOSED:
            return None
        return negotiation.session

    def _recv(self, n: int, deadline: float) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            if time.monotonic() > deadline:
                raise TimeoutError("handshake took too long")
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise nbd.ProtocolError("connection closed in the handshake")
            got += k
        return bytes(buf)

    # -- transmission -------------------------------------------------------------------

    def _transmit(self, session: nbd.Session) -> str:
        """Read requests until the client leaves; why it ended."""
        export = self.export
        _set_timeouts(self.sock, export.io_timeout)
        work: queue.SimpleQueue[tuple[nbd.Request, _Slot] | None] = queue.SimpleQueue()
        workers = [threading.Thread(target=self._worker, args=(work, session), daemon=True,
                                    name=f"nbd-io-{export.minor}") for _ in self._slots]
        for worker in workers:
            worker.start()
        header = bytearray(nbd.REQUEST.size)
        try:
            while self._recv_request(header):
                request = nbd.parse_request(bytes(header))
                length = nbd.write_payload(request)
                slot = self._free.get()  # at most IN_FLIGHT requests at once
                try:
                    self._recv_exact(slot.view(length))
                except BaseException:
                    self._free.put(slot)
                    raise
                if request.type == nbd.Cmd.DISC:
                    self._free.put(slot)
                    return "client disconnected"
                self.requests += 1
                work.put((request, slot))
                if self._failed is not None:
                    raise self._failed
            return "client closed"
        except BaseException:
            self.hang_up()  # workers blocked on this socket give up too
            raise
        finally:
            # A clean end still sends the replies in flight (the workers finish them).
            for _ in workers:
                work.put(None)
            for worker in workers:
                worker.join()

    def _worker(self, work: queue.SimpleQueue[tuple[nbd.Request, _Slot] | None],
                session: nbd.Session) -> None:
        while (item := work.get()) is not None:
            self._work(session, *item)

    def _work(self, session: nbd.Session, request: nbd.Request, slot: _Slot) -> None:
        """One request on a worker: run it, send its reply whole, free the slot."""
        try:
            payload = slot.view(nbd.write_payload(request))
            refusal = nbd.check_request(request, session, self.export.info.size)
            if refusal is None:
                reply = self._execute(request, session, slot, payload)
            else:
                reply = [nbd.error_reply(request.cookie, refusal, session)]
            with self._send_lock:
                if self._failed is None:
                    self._send(reply)
        except (ExportClosed, OSError) as exc:  # OSError here is the socket's
            self._fail(exc)
        except Exception as exc:  # our bug: the client must not wait for a lost reply
            self.export._log.exception("nbd request failed", cmd=request.type)
            self._fail(exc)
        finally:
            self._free.put(slot)

    def _fail(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = exc
        self.hang_up()  # the reader, blocked in recv, ends too

    def _recv_request(self, header: bytearray) -> bool:
        """The next request's header; False when the client closed between requests.
        A client may stay idle as long as it likes; a request begun must finish within
        the I/O timeout."""
        view = memoryview(header)
        got = 0
        while got < len(header):
            try:
                n = self.sock.recv_into(view[got:])
            except BlockingIOError:  # SO_RCVTIMEO: idle between requests is fine
                if got == 0 and not self.export.stopping:
                    continue
                raise
            if n == 0:
                if self._failed is not None:
                    raise self._failed
                if got:
                    raise nbd.ProtocolError("connection closed inside a request")
                return False
            got += n
        return True

    def _recv_exact(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:], 0, socket.MSG_WAITALL)
            if n == 0:
                raise nbd.ProtocolError("connection closed inside a write payload")
            got += n

    def _send(self, parts: list[bytes | memoryview]) -> None:
        total = sum(len(part) for part in parts)
        sent = self.sock.sendmsg(parts)
        if sent == total:
            return
        for part in parts:  # the rest, after a partial sendmsg
            if sent >= len(part):
                sent -= len(part)
                continue
            self.sock.sendall(memoryview(part)[sent:])
            sent = 0

    def _execute(self, request: nbd.Request, session: nbd.Session, slot: _Slot,
                 payload: memoryview) -> list[bytes | memoryview]:
        """Run one checked request on the image; the reply's parts (data not copied)."""
        cmd = nbd.Cmd(request.type)
        fua = bool(request.flags & nbd.CmdFlags.FUA)
        counted = cmd in (nbd.Cmd.READ, nbd.Cmd.WRITE)
        if counted:
            self.export.count(self.kind, cmd, "submitted")
        started = time.monotonic_ns()
        try:
            if cmd == nbd.Cmd.READ:
                data = self._read(request, slot)
                self.export.count(self.kind, cmd, "completed", request.length,
                                  (time.monotonic_ns() - started) // 1000)
                return [nbd.read_reply_header(request.cookie, request.offset,
                                              request.length, session), data]
            with self.export._gate.use() as backend:
                if cmd == nbd.Cmd.WRITE:
                    backend.write(payload, request.offset, fua=fua)
                    self.export.count(self.kind, cmd, "completed", request.length,
                                      (time.monotonic_ns() - started) // 1000)
                elif cmd == nbd.Cmd.FLUSH:
                    backend.flush()
                elif cmd == nbd.Cmd.TRIM:
                    backend.trim(request.offset, request.length)
                elif cmd == nbd.Cmd.WRITE_ZEROES:
                    may_punch = not request.flags & nbd.CmdFlags.NO_HOLE
                    backend.zero(request.offset, request.length, may_punch=may_punch)
                elif cmd == nbd.Cmd.BLOCK_STATUS:
                    length = min(request.length, backend.size - request.offset)
                    one = bool(request.flags & nbd.CmdFlags.REQ_ONE)
                    extents = backend.extents(request.offset, length,
                                              1 if one else nbd.MAX_EXTENTS)
                    return [nbd.block_status_reply(request.cookie, extents)]
                if fua and cmd in (nbd.Cmd.TRIM, nbd.Cmd.WRITE_ZEROES):
                    backend.flush()
        except OSError as exc:  # the image's error, told to the client
            self.errors += 1
            if counted:
                self.export.count(self.kind, cmd, "failed")
            refusal = nbd.Refusal(nbd.nbd_errno(exc.errno), exc.strerror or str(exc))
            return [nbd.error_reply(request.cookie, refusal, session)]
        return [nbd.simple_reply(request.cookie)]

    def _read(self, request: nbd.Request, slot: _Slot) -> memoryview:
        """Read through the gate; the data is sent after the image is released, so a
        slow reader never holds up a PAUSE. An unaligned range is read whole blocks
        around it (O_DIRECT), and the requested part is sent."""
        block = self.export.info.min_block
        start = request.offset // block * block
        end = -(-request.end // block) * block
        buf = slot.view(end - start)
        with self.export._gate.use() as backend:
            backend.read_into(buf, start)
        return buf[request.offset - start:request.end - start]
