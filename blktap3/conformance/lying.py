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

from .relay import Relay, recv_exact


class LyingTapdisk(Relay):
    """A relay in place of tapdisk `pid`'s control socket that reports `sector_size`."""

    name = "lying-tapdisk"

    def __init__(self, control_dir: Path, pid: int, sector_size: int) -> None:
        path = socket_path(control_dir, pid)
        super().__init__(path, path.with_name(path.name + ".real"))
        self.sector_size = sector_size

    def start(self) -> None:
        os.rename(self.path, self.upstream)
        super().start()

    def stop(self) -> None:
        super().stop()
        os.rename(self.upstream, self.path)

    def relay(self, client: socket.socket, tapdisk: socket.socket) -> None:
        threading.Thread(target=self._pump, args=(client, tapdisk), daemon=True).start()
        while True:
            message = recv_exact(tapdisk, p.MESSAGE_SIZE)
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
