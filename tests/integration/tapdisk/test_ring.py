"""XENBLKIF_CONNECT/DISCONNECT on the simulated Xen host: a guest's ring served by a
real tapdisk process, driven through libblktapctl, with pause/resume under it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.ctl import ops, runtime
from blktap3.ctl.client import CtlError, TapdiskClient

from .conftest import MiB

pytestmark = pytest.mark.integration
xensim = pytest.importorskip("blktap3.sim.xensim", reason="the simulated Xen host is missing")
lineproc = pytest.importorskip("blktap3.datapath.lineproc", reason="the data path is missing")

GUEST = 7
DEVID = 51712
BLKIF_PROTOCOL_NATIVE = 1


@pytest.fixture
def machine(machine: Any) -> Any:
    """The shared simulated machine, with the guest domain."""
    machine.create_domain(GUEST, 4096)
    return machine


@pytest.fixture
def guest(machine: Any) -> Iterator[Any]:
    proc = lineproc.LineProcess([sys.executable, "-m", "blktap3.sim.guestdrv"],
                                xensim.process_env(machine.run_dir, GUEST))
    yield proc
    proc.close()


@pytest.fixture
def vbd(machine: Any, ctl_root: Path, seen_pids: set[int]) -> tuple[TapdiskClient, int, Path]:
    disk = ctl_root / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 * MiB)
    # The tapdisk runs as dom0 of the simulated machine: its environment carries it.
    env = {**os.environ, **xensim.process_env(machine.run_dir, 0)}
    pid = ops.spawn(env=env)
    seen_pids.add(pid)
    minor = runtime.allocate_minor(ctl_root)
    client = TapdiskClient(pid)
    client.attach(minor)
    client.open(minor, f"aio:{disk}")
    return client, minor, disk


def test_a_guest_ring_is_served_paused_swapped_and_disconnected(
    guest: Any, vbd: tuple[TapdiskClient, int, Path], ctl_root: Path
) -> None:
    client, minor, disk = vbd
    g = guest.call("open", backend=0, order=1, protocol=BlkifProtocol.NATIVE)
    blkif = {"domid": GUEST, "devid": DEVID, "grefs": tuple(g["grefs"]), "order": 1,
             "port": g["port"], "proto": BLKIF_PROTOCOL_NATIVE}
    client.connect_xenblkif(minor, **blkif)
    # tapback restarting replays its VBDs: the tapdisk says "already".
    with pytest.raises(CtlError) as err:
        client.connect_xenblkif(minor, **blkif)
    assert err.value.errno == errno.EALREADY

    data = os.urandom(8192)
    assert guest.call("write", sector=16, data=data.hex()) == 0
    assert disk.read_bytes()[16 * 512 : 16 * 512 + 8192] == data
    stats = json.loads(client.stats(minor))
    assert stats["xenbus"]["domid"] == GUEST and stats["xenbus"]["devid"] == DEVID
    assert stats["secs"][1] == 16 and stats["images"][0]["hits"][1] == 1

    # PAUSE drains and closes the image; RESUME on a copy swaps it under the guest.
    client.pause(minor)
    assert client.list()[0].state == 0x2A
    copy = ctl_root / "copy.img"
    shutil.copy(disk, copy)
    client.resume(minor, f"aio:{copy}")
    back = guest.call("read", sector=16, count=16)
    assert back["status"] == 0 and bytes.fromhex(back["data"]) == data
    assert guest.call("write", sector=0, data=(b"\x5a" * 512).hex()) == 0
    assert copy.read_bytes()[:512] == b"\x5a" * 512
    assert disk.read_bytes()[:512] == bytes(512)

    with pytest.raises(CtlError) as err:
        client.disconnect_xenblkif(minor, domid=GUEST, devid=DEVID + 1)
    assert err.value.errno == errno.ENODEV
    client.disconnect_xenblkif(minor, domid=GUEST, devid=DEVID)
    assert "xenbus" not in json.loads(client.stats(minor))
    client.close(minor)
    client.detach(minor)


def test_poll_duration_reaches_the_ring_and_is_bounded(
    guest: Any, vbd: tuple[TapdiskClient, int, Path]
) -> None:
    client, minor, _ = vbd
    g = guest.call("open", backend=0, order=0, protocol=BlkifProtocol.NATIVE)
    blkif = {"domid": GUEST, "devid": DEVID, "grefs": tuple(g["grefs"]), "order": 0,
             "port": g["port"], "proto": BLKIF_PROTOCOL_NATIVE}
    with pytest.raises(CtlError) as err:
        client.connect_xenblkif(minor, **blkif, poll_duration=2_000_000)
    assert err.value.errno == errno.EINVAL
    client.connect_xenblkif(minor, **blkif, poll_duration=50)
    data = os.urandom(4096)
    assert guest.call("write", sector=8, data=data.hex()) == 0
    back = guest.call("read", sector=8, count=8)
    assert back["status"] == 0 and bytes.fromhex(back["data"]) == data
    client.disconnect_xenblkif(minor, domid=GUEST, devid=DEVID)
