"""A fault the harness injects: a tapdisk that lies about its disk.

Our tapdisk refuses to change a disk's sector size or info under a ring (RESUME answers
EMEDIUMTYPE), but a back-end must not trust that of whatever tapdisk it talks to: when
DISK_INFO says the sector size changed under a connected front-end, the protocol has no
way to announce it, and the back-end must close the VBD with an error (spec backend_vbd,
`disk_info_read` from `connected` if `geometry_changed`).

`LyingTapdisk` takes the tapdisk's control socket's place: the real socket is renamed,
a relay listens at its path, forwards every message both ways unchanged, except that
each DISK_INFO_RSP carries the sector size it was told to say. `stop` puts the real
socket back, so that the toolstack's detach meets the real tapdisk.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

from blktap3.ctl import protocol as p
from blktap3.ctl.runtime import socket_path

ACCEPT_POLL = 0.1  # how often the relay looks whether it was stopped


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return data
        data += chunk
    return data


class LyingTapdisk:
    """A relay in place of tapdisk `pid`'s control socket that reports `sector_size`."""

    def __init__(self, control_dir: Path, pid: int, sector_size: int) -> None:
        self.path = socket_path(control_dir, pid)
        self.real = self.path.with_name(self.path.name + ".real")
        self.sector_size = sector_size
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        os.rename(self.path, self.real)
        self._listener.bind(str(self.path))
        self._listener.listen(8)
        self._listener.settimeout(ACCEPT_POLL)
        self._thread = threading.Thread(target=self._serve, daemon=True, name="lying-tapdisk")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.rename(self.real, self.path)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as tapdisk:
            try:
                tapdisk.connect(str(self.real))
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client, tapdisk), daemon=True).start()
            while True:
                message = _recv_exact(tapdisk, p.MESSAGE_SIZE)
                if len(message) < p.MESSAGE_SIZE:
                    with contextlib.suppress(OSError):
                        client.sendall(message)
                    return
                with contextlib.suppress(OSError):
                    client.sendall(self._lie(message))

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(p.MESSAGE_SIZE):
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)

    def _lie(self, message: bytes) -> bytes:
        kind = int.from_bytes(message[:2], "little")
        if kind != p.MessageType.DISK_INFO_RSP:
            return message
        info = p.ImageInfo.FORMAT.unpack_from(message, p.UNION_OFFSET)
        lied = p.ImageInfo.FORMAT.pack(info[0], self.sector_size, *info[2:])
        at = p.UNION_OFFSET
        return message[:at] + lied + message[at + len(lied):]
