"""Handing a connected NBD socket to a tapdisk by name (blktap's `nbdclient<pid>`).

What xapi does before `tap-ctl unpause -2 nbd:NAME` when it connects to a migration's
target itself: one message on `<root>/nbdclient<pid>` whose data is NAME and NUL and
whose SCM_RIGHTS carries the socket (blktap3.tapdisk.nbd.passed is the receiving end).
"""

from __future__ import annotations

import array
import os
import socket
from pathlib import Path

from . import runtime

NAME_BYTES = 39                # blktap's id[40], NUL included: longer names collide


def pass_fd(root: Path, pid: int, name: str, fd: int, *, timeout: float = 10.0) -> None:
    """Hand the connected socket `fd` to tapdisk `pid` under `name` (what xapi does
    before `unpause -2 nbd:NAME`); returns once the tapdisk has it. OSError if not."""
    raw = name.encode()
    if not raw or b"\0" in raw or len(raw) > NAME_BYTES:
        raise OSError(22, f"an fd name is 1..{NAME_BYTES} bytes without NUL: {name!r}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(runtime.nbdclient_path(root, pid)))
        s.sendmsg([raw + b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", [fd]).tobytes())])
        while s.recv(4096):  # EOF: the tapdisk stashed it and hung up
            pass
