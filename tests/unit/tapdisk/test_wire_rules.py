"""The spec's answers to control requests, on the control socket through libblktapctl.

Each step is a rule of specs/tapdisk_vbd.toml that was an `if` of the control server
before: the client must see blktap's errno (or success) for it. Images are real files;
rings are stand-ins (mapping a real one needs a simulated front-end: see
tests/integration/tapdisk/test_ring.py).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blktap3.ctl import protocol as p
from blktap3.ctl import runtime
from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.tapdisk.control import Tapdisk
from blktap3.tapdisk.server import ControlServer

pytest.importorskip("blktap3.datapath", reason="the data path (Image.open) is not built")

MiB = 1 << 20


class StandInRing:
    def __init__(self) -> None:
        self.paused = False

    def pause(self, timeout: float = 30.0) -> None:
        self.paused = True

    def resume(self, image: Any = None) -> None:
        self.paused = False

    def disconnect(self, timeout: float = 30.0) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TapdiskClient]:
    runtime.ensure_dirs(tmp_path)
    tapdisk = Tapdisk(tmp_path, drain_timeout=2.0,
                      connect_ring=lambda image, **_: StandInRing())
    server = ControlServer(tapdisk, tmp_path / "ctl1", client_timeout=2)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield TapdiskClient(os.getpid(), path=server.path, timeout=5)
    server.stop()
    thread.join(5)
    server.close()
    tapdisk.shutdown()
    assert not thread.is_alive()


def refused(call: Callable[[], object]) -> int:
    with pytest.raises(CtlError) as err:
        call()
    return err.value.errno


def test_the_moved_rules_answer_on_the_socket(client: TapdiskClient, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)
    minor = runtime.allocate_minor(tmp_path)
    ring = {"domid": 1, "devid": 51712, "grefs": (8,), "order": 0, "port": 3, "proto": 0}

    client.attach(minor)
    assert refused(lambda: client.attach(minor)) == errno.EEXIST
    client.close(minor)  # nothing open: success
    client.close(minor, force=True)
    assert refused(lambda: client.disk_info(minor)) == errno.EINVAL
    empty = runtime.allocate_minor(tmp_path)
    client.attach(empty)
    client.pause(empty)  # no image: accepted as blktap v4.0.8 does (state 0x2a)
    assert refused(lambda: client.resume(empty)) == errno.EINVAL  # nothing to reopen
    client.close(empty)  # succeeds; the VBD stays paused, as blktap's
    client.detach(empty)  # no image: detaches (blktap's detach_vbd: no name)
    assert refused(lambda: client.connect_xenblkif(minor, **ring)) == errno.EINVAL
    assert refused(lambda: client.disconnect_xenblkif(minor, domid=1, devid=51712)) == (
        errno.ENODEV
    )

    client.open(minor, f"aio:{disk}")
    assert refused(lambda: client.open(minor, f"aio:{disk}")) == errno.EALREADY
    assert refused(lambda: client.detach(minor)) == errno.EBUSY
    assert refused(lambda: client.resume(minor)) == errno.EINVAL
    client.connect_xenblkif(minor, **ring)
    assert refused(lambda: client.connect_xenblkif(minor, **ring)) == errno.EALREADY
    other = {**ring, "devid": 51728}
    assert refused(lambda: client.connect_xenblkif(minor, **other)) == errno.EBUSY
    assert refused(lambda: client.disconnect_xenblkif(minor, domid=1, devid=51728)) == (
        errno.ENODEV
    )

    client.pause(minor)
    client.pause(minor)  # paused already: success
    assert client.disk_info(minor).sectors == 4 * MiB // 512  # kept while paused
    assert refused(lambda: client.disconnect_xenblkif(minor, domid=1, devid=51712)) == (
        errno.EINVAL
    )
    assert refused(lambda: client.open(minor, f"aio:{disk}")) == errno.EALREADY
    assert refused(lambda: client.detach(minor)) == errno.EBUSY
    os.truncate(disk, 8 * MiB)
    assert refused(lambda: client.resume(minor)) == errno.EMEDIUMTYPE  # no resize asked
    client.resume(minor, flags=p.ResumeFlags.RESIZE)  # a larger disk is accepted
    assert client.disk_info(minor).sectors == 8 * MiB // 512
    client.disconnect_xenblkif(minor, domid=1, devid=51712)

    client.close(minor)
    client.close(minor)  # closed already: success
    assert refused(lambda: client.disk_info(minor)) == errno.EINVAL
    client.detach(minor)
