"""A tiny in-process stand-in for xenstored, for the unit tests' error branches.

It speaks the real wire format (xsd_sockmsg header + payload) over a Unix socket or
through a handler called by a fake ring peer, keeps nodes in a dict, fires watches on
registration and on writes (to the connection that registered them), and has knobs for
the faults we must survive: never answer, answer EAGAIN to the next N commits, drop the
connections. The integration tests use the real xenstored; this is only for what a real
daemon will not do on demand.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

HEADER = struct.Struct("=IIII")
READ, DIRECTORY, GET_PERMS, WATCH, UNWATCH = 2, 1, 3, 4, 5
TX_START, TX_END, INTRODUCE, RELEASE, GET_DOMAIN_PATH = 6, 7, 8, 9, 10
WRITE, MKDIR, RM, SET_PERMS, WATCH_EVENT, ERROR, IS_INTRODUCED = 11, 12, 13, 14, 15, 16, 17

Reply = tuple[int, int, int, bytes]  # op, rq_id, tx_id, payload
Deliver = Callable[[bytes], None]


def pack(reply: Reply) -> bytes:
    op, rq_id, tx_id, body = reply
    return HEADER.pack(op, rq_id, tx_id, len(body)) + body


@dataclass
class FakeStore:
    """The node table and the fault knobs; `handle()` answers one request."""

    nodes: dict[str, bytes] = field(default_factory=lambda: {"/": b""})
    perms: dict[str, list[bytes]] = field(default_factory=dict)
    watches: list[tuple[bytes, bytes]] = field(default_factory=list)
    watchers: dict[tuple[bytes, bytes], Deliver] = field(default_factory=dict)
    requests: list[tuple[int, int, bytes]] = field(default_factory=list)  # op, tx, payload
    silent: bool = False
    eagain_commits: int = 0
    next_tx: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)
    _deliver: Deliver | None = None

    def handle(
        self, op: int, rq_id: int, tx_id: int, payload: bytes, deliver: Deliver | None = None
    ) -> list[Reply]:
        """Replies for the requester; watch events go to each watcher's `deliver`."""
        with self.lock:
            self._deliver = deliver
            self.requests.append((op, tx_id, payload))
            if self.silent:
                return []
            args = payload.split(b"\0")
            try:
                body, events = self._answer(op, args, payload)
            except KeyError:
                return [(ERROR, rq_id, tx_id, b"ENOENT\0")]
            except PermissionError:
                return [(ERROR, rq_id, tx_id, b"EACCES\0")]
            except BlockingIOError:
                return [(ERROR, rq_id, tx_id, b"EAGAIN\0")]
            out = [(op, rq_id, tx_id, body)]
            for p, t in events:
                event: Reply = (WATCH_EVENT, 0, 0, p + b"\0" + t + b"\0")
                send = self.watchers.get((p, t)) or self._watcher_of(p, t)
                if send is deliver:
                    out.append(event)
                elif send is not None:
                    with contextlib.suppress(OSError):
                        send(pack(event))
            return out

    def _watcher_of(self, path: bytes, token: bytes) -> Deliver | None:
        for (w, t), send in self.watchers.items():
            if t == token and (path == w or path.startswith(w + b"/")):
                return send
        return None

    def _parents(self, path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            self.nodes.setdefault("/" + "/".join(parts[:i]), b"")

    def _fired(self, path: bytes) -> list[tuple[bytes, bytes]]:
        return [(path, t) for w, t in self.watches if path == w or path.startswith(w + b"/")]

    def _answer(
        self, op: int, args: list[bytes], payload: bytes
    ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        path = args[0].decode()
        if op == READ:
            if path.startswith("/forbidden"):
                raise PermissionError
            return self.nodes[path], []
        if op == WRITE:
            value = payload[len(args[0]) + 1:]
            self._parents(path)
            self.nodes[path] = value
            return b"OK\0", self._fired(args[0])
        if op == MKDIR:
            self._parents(path)
            self.nodes.setdefault(path, b"")
            return b"OK\0", self._fired(args[0])
        if op == RM:
            if path not in self.nodes:
                raise KeyError(path)
            for name in [n for n in self.nodes if n == path or n.startswith(path + "/")]:
                del self.nodes[name]
            return b"OK\0", self._fired(args[0])
        if op == DIRECTORY:
            if path not in self.nodes:
                raise KeyError(path)
            prefix = path.rstrip("/") + "/"
            kids = sorted({n[len(prefix):].split("/")[0] for n in self.nodes
                           if n.startswith(prefix) and n != prefix})
            return b"".join(k.encode() + b"\0" for k in kids), []
        if op == GET_PERMS:
            self.nodes[path]  # KeyError -> ENOENT
            return b"".join(p + b"\0" for p in self.perms.get(path, [b"n0"])), []
        if op == SET_PERMS:
            self.perms[path] = [a for a in args[1:] if a]
            return b"OK\0", []
        if op == WATCH:
            self.watches.append((args[0], args[1]))
            if self._deliver is not None:
                self.watchers[(args[0], args[1])] = self._deliver
            return b"OK\0", [(args[0], args[1])]  # a watch fires once when registered
        if op == UNWATCH:
            self.watches.remove((args[0], args[1]))
            return b"OK\0", []
        if op == TX_START:
            self.next_tx += 1
            return b"%d\0" % self.next_tx, []
        if op == TX_END:
            if args[0] == b"T" and self.eagain_commits > 0:
                self.eagain_commits -= 1
                raise BlockingIOError
            return b"OK\0", []
        if op in (INTRODUCE, RELEASE):
            return b"OK\0", []
        if op == IS_INTRODUCED:
            return b"T\0", []
        if op == GET_DOMAIN_PATH:
            return b"/local/domain/" + args[0] + b"\0", []
        raise KeyError(op)


class FakeXenstored:
    """FakeStore served on a Unix socket, one thread per connection."""

    def __init__(self, path: str, store: FakeStore | None = None) -> None:
        self.path = path
        self.store = store or FakeStore()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.conns: list[socket.socket] = []
        self.accepted = 0
        # close() may run while accept() is returning a connection: the lock and the flag
        # make sure such a connection is closed too, never left open and unlisted
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self.conns.append(conn)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        send_lock = threading.Lock()

        def deliver(data: bytes) -> None:
            with send_lock:
                conn.sendall(data)

        with contextlib.suppress(OSError):
            while True:
                header = _recv_exact(conn, HEADER.size)
                op, rq_id, tx_id, size = HEADER.unpack(header)
                payload = _recv_exact(conn, size)
                for reply in self.store.handle(op, rq_id, tx_id, payload, deliver):
                    deliver(pack(reply))

    def drop_connections(self) -> None:
        """Reset every client connection (as a xenstored restart does)."""
        with self._lock:
            conns, self.conns = self.conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.listener.close()
        self.drop_connections()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data
