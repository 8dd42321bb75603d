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
from blktap3.ctl import protocol as p
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


def open_in_dom0(machine: Any, ctl_root: Path, seen_pids: set[int],
                 params: str, **open_options: Any) -> tuple[TapdiskClient, int]:
    """A new tapdisk of the simulated dom0 with `params` attached and open (with
    `TapdiskClient.open`'s options)."""
    # The tapdisk runs as dom0 of the simulated machine: its environment carries it.
    env = {**os.environ, **xensim.process_env(machine.run_dir, 0)}
    pid = ops.spawn(env=env)
    seen_pids.add(pid)
    minor = runtime.allocate_minor(ctl_root)
    client = TapdiskClient(pid)
    client.attach(minor)
    client.open(minor, params, **open_options)
    return client, minor


def guest_on(guest: Any, machine: Any, ctl_root: Path, seen_pids: set[int], params: str,
             **open_options: Any) -> tuple[TapdiskClient, int]:
    """`open_in_dom0`, then the guest's ring (order 1) connected to the VBD."""
    client, minor = open_in_dom0(machine, ctl_root, seen_pids, params, **open_options)
    g = guest.call("open", backend=0, order=1, protocol=BlkifProtocol.NATIVE)
    client.connect_xenblkif(minor, domid=GUEST, devid=DEVID, grefs=tuple(g["grefs"]),
                            order=1, port=g["port"], proto=1)
    return client, minor


@pytest.fixture
def vbd(machine: Any, ctl_root: Path, seen_pids: set[int]) -> tuple[TapdiskClient, int, Path]:
    disk = ctl_root / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 * MiB)
    client, minor = open_in_dom0(machine, ctl_root, seen_pids, f"aio:{disk}")
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


@pytest.mark.parametrize("protocol", list(BlkifProtocol))
def test_indirect_requests_are_served_as_offered_in_connect(
    guest: Any, vbd: tuple[TapdiskClient, int, Path], protocol: BlkifProtocol
) -> None:
    """XENBLKIF_CONNECT carries the offer (our extension of u.blkif); the tapdisk serves
    1 MiB indirect requests up to it and refuses one segment more."""
    client, minor, disk = vbd
    offer = p.DEFAULT_MAX_INDIRECT_SEGMENTS
    g = guest.call("open", backend=0, order=0, protocol=protocol, data_slots=1,
                   slot_pages=offer, max_segs=offer + 1)
    client.connect_xenblkif(minor, domid=GUEST, devid=DEVID, grefs=tuple(g["grefs"]),
                            order=0, port=g["port"], proto=int(protocol),
                            max_indirect_segments=offer)
    data = os.urandom(offer * 4096)
    assert guest.call("write", sector=8, data=data.hex()) == 0
    assert disk.read_bytes()[8 * 512 : 8 * 512 + len(data)] == data
    back = guest.call("read", sector=8, count=offer * 8)
    assert back["status"] == 0 and bytes.fromhex(back["data"]) == data
    grefs = guest.call("data_grefs", pages=1)
    guest.call("submit", reqs=[{"op": 6, "indirect_op": 0,
                                "segs": [[grefs[0], 0, 7]] * (offer + 1)}])
    assert guest.call("collect", n=1) == [-1]  # BLKIF_RSP_ERROR
    stats = json.loads(client.stats(minor))
    assert stats["images"][0]["hits"] == [1, 1]
    assert stats["secs"] == [offer * 8, offer * 8]
    assert stats["xenbus"]["reqs"] == [3, 3]
    assert stats["xenbus"]["errors"]["vbd"] == 1
    client.disconnect_xenblkif(minor, domid=GUEST, devid=DEVID)


def test_an_offer_past_the_data_path_is_refused_and_none_means_eopnotsupp(
    guest: Any, vbd: tuple[TapdiskClient, int, Path]
) -> None:
    client, minor, _ = vbd
    g = guest.call("open", backend=0, order=0, protocol=BlkifProtocol.NATIVE, max_segs=16)
    blkif = {"domid": GUEST, "devid": DEVID, "grefs": tuple(g["grefs"]), "order": 0,
             "port": g["port"], "proto": BLKIF_PROTOCOL_NATIVE}
    with pytest.raises(CtlError) as err:
        client.connect_xenblkif(minor, **blkif, max_indirect_segments=4097)
    assert err.value.errno == errno.EINVAL
    # blktap's tapback sends zero there (it clears the message): not offered.
    client.connect_xenblkif(minor, **blkif)
    assert guest.call("write", sector=0, data=bytes(16 * 4096).hex()) == -2  # EOPNOTSUPP
    assert guest.call("write", sector=0, data=bytes(11 * 4096).hex()) == 0
    client.disconnect_xenblkif(minor, domid=GUEST, devid=DEVID)
