"""A 4 KiB-sector disk (a loop device with 4 KiB logical blocks) served through O_DIRECT.

blkif.h: `sectors` and every request field stay in 512-byte units; `sector-size` states
the alignment only. The oracle is the kernel: O_DIRECT on a 4 KiB-block device refuses
anything unaligned, so a request that passed our checks must be whole blocks.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap3.abi import SECTOR_SIZE, BlkifProtocol
from blktap3.datapath.lineproc import LineProcess

from .conftest import GUEST_DOMID

pytestmark = pytest.mark.integration
OKAY, ERROR = 0, -1
BLOCK = 4096
DISK = 8 << 20


@pytest.fixture
def device(tmp_path: Path) -> Iterator[str]:
    backing = tmp_path / "backing.img"
    backing.write_bytes(b"")
    os.truncate(backing, DISK)
    try:
        dev = subprocess.run(
            ["losetup", "--sector-size", str(BLOCK), "--direct-io=on", "-f", "--show",
             str(backing)], check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no loop device with 4 KiB sectors here: {exc}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_4k_sector_disk_is_served_in_512_byte_units_aligned_to_4k(
        host: LineProcess, guest: LineProcess, device: str) -> None:
    info = host.call("open", name="r", driver="aio", path=device, readonly=False)
    assert (info["sector_size"], info["sectors"], info["o_direct"]) == (
        BLOCK, DISK // SECTOR_SIZE, True)
    g = guest.call("open", backend=0, order=0, protocol=BlkifProtocol.NATIVE)
    host.call("connect", name="r", image="r", domid=GUEST_DOMID, devid=51712, grefs=g["grefs"],
              order=0, port=g["port"], protocol=BlkifProtocol.NATIVE)
    data = os.urandom(3 * BLOCK)
    assert guest.call("write", sector=8, data=data.hex()) == OKAY  # 512-byte units
    back = guest.call("read", sector=8, count=len(data) // SECTOR_SIZE)
    assert back["status"] == OKAY and bytes.fromhex(back["data"]) == data
    with open(device, "rb") as f:
        f.seek(8 * SECTOR_SIZE)
        assert f.read(len(data)) == data
    (gref,) = guest.call("data_grefs", pages=1)
    guest.call("submit", reqs=[
        {"op": 0, "sector": 1, "segs": [[gref, 0, 7]]},   # starts inside a block
        {"op": 1, "sector": 8, "segs": [[gref, 0, 3]]},   # half a block
        {"op": 0, "sector": 16, "segs": [[gref, 0, 7]]},  # whole: served
    ])
    assert sorted(guest.call("collect", n=3)) == [ERROR, ERROR, OKAY]
    st = host.call("stats", name="r")
    assert st["errors"]["sector"] == 2 and st["errors"]["io"] == 0
    host.call("disconnect", name="r")
