"""What the harness's fault-injecting relays share: a Unix socket that stands where a
peer listens, a thread accepting clients, one connection upstream per client.

A relay subclass says where its upstream is and what it does to each client's traffic
(`relay`); starting, stopping and accepting are here.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

ACCEPT_POLL = 0.1  # how often the relay looks whether it was stopped


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """`size` bytes, or fewer when the peer closed first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return data
        data += chunk
    return data


class Relay:
    """Listens at `path` once started; each client is handed to `relay` with a socket
    already connected to `upstream` (a client whose upstream refuses is dropped)."""

    name = "relay"

    def __init__(self, path: Path, upstream: Path) -> None:
        self.path = path
        self.upstream = upstream
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._listener.bind(str(self.path))
        self._listener.listen(8)
        self._listener.settimeout(ACCEPT_POLL)
        self._thread = threading.Thread(target=self._serve, daemon=True, name=self.name)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        with client, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as upstream:
            try:
                upstream.connect(str(self.upstream))
            except OSError:
                return
            self.relay(client, upstream)

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        raise NotImplementedError
