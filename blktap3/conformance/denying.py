"""A fault the harness injects: XenStore refusing the back-end a front-end node (EACCES).

A guest owns its front-end directory and may take the back-end's read permission away;
xenstored enforces that for an unprivileged back-end (a driver domain's tapback), while
dom0's connection, the one the simulated host gives, passes every permission. So the
harness stands between the back-end and xenstored: `DenyingXenStore` relays the wire
protocol (xsd_sockmsg: type, req_id, tx_id, len, payload) unchanged, except that, once
armed, a READ of the denied path is answered `EACCES` as xenstored answers an
unprivileged reader (spec backend_vbd, `frontend_unreadable`).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from pathlib import Path

from .relay import Relay, recv_exact

HEADER = struct.Struct("<IIII")  # xsd_sockmsg: type, req_id, tx_id, len
XS_READ, XS_ERROR = 2, 16  # xen/io/xs_wire.h


def _recv_message(sock: socket.socket, size: int) -> bytes | None:
    """`size` bytes, or None when the peer closed first."""
    data = recv_exact(sock, size)
    return data if len(data) == size else None


class DenyingXenStore(Relay):
    """A relay at `path` to xenstored at `upstream`; `deny(node)` refuses its READs."""

    name = "denying-xs"

    def __init__(self, path: Path, upstream: Path) -> None:
        super().__init__(path, upstream)
        self.denied: str | None = None

    def deny(self, node: str) -> None:
        self.denied = node

    def relay(self, client: socket.socket, server: socket.socket) -> None:
        lock = threading.Lock()  # replies from xenstored and refusals share the client
        threading.Thread(target=self._pump, args=(server, client, lock), daemon=True).start()
        with contextlib.suppress(OSError):
            while (header := _recv_message(client, HEADER.size)) is not None:
                kind, req_id, tx_id, length = HEADER.unpack(header)
                payload = _recv_message(client, length) if length else b""
                if payload is None:
                    return
                if kind == XS_READ and self._denied(payload):
                    error = b"EACCES\0"
                    with lock:
                        client.sendall(HEADER.pack(XS_ERROR, req_id, tx_id, len(error))
                                       + error)
                    continue
                server.sendall(header + payload)

    def _denied(self, payload: bytes) -> bool:
        return self.denied is not None and payload.rstrip(b"\0").decode(
            errors="replace") == self.denied

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, lock: threading.Lock) -> None:
        """xenstored's replies and watch events, a whole message at a time (a refusal
        must not land inside one)."""
        with contextlib.suppress(OSError):
            while (header := _recv_message(source, HEADER.size)) is not None:
                length = HEADER.unpack(header)[3]
                payload = _recv_message(source, length) if length else b""
                if payload is None:
                    break
                with lock:
                    sink.sendall(header + payload)
            sink.shutdown(socket.SHUT_WR)
