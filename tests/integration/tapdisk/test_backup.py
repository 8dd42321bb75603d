"""Incremental backup, the second use case of CBT (issue 16), on a live VBD of a real
tapdisk: a full copy through the NBD export (nbdcopy), then the guest writes, then only
the 64 KiB blocks the changed-block log marks are read through NBD (qemu-io, a client
none of us wrote) and applied to the copy; the copy then equals the image, byte for
byte, and far fewer bytes moved than a second full copy would."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from blktap3.datapath import cbtlog
from tests.support.nbd import NbdClient

from . import test_ring as ring
from .conftest import MiB
from .test_cbt import new_log
from .test_nbd import run, uri

pytestmark = pytest.mark.integration
pytest.importorskip("blktap3.datapath", reason="the data path is not built")
for _tool in ("nbdcopy", "qemu-io"):
    if shutil.which(_tool) is None:
        pytest.skip(f"{_tool} is missing (Debian: libnbd-bin, qemu-utils)",
                    allow_module_level=True)

machine = ring.machine
guest = ring.guest
GUEST, DEVID = ring.GUEST, ring.DEVID
SIZE = 8 * MiB
BLOCK = cbtlog.BLOCK_SIZE


def test_an_incremental_backup_from_the_cbt_log_equals_the_image(
    guest: Any, machine: Any, ctl_root: Path, seen_pids: set[int]
) -> None:
    disk = ctl_root / "d.img"
    disk.write_bytes(os.urandom(SIZE))
    log = new_log(ctl_root / "d.cbt")
    client, minor = ring.guest_on(guest, machine, ctl_root, seen_pids, f"aio:{disk}",
                                  logpath=str(log))
    export = uri(ctl_root, client.pid, minor)
    backup = ctl_root / "backup.img"
    run("nbdcopy", export, str(backup))                        # the full copy
    assert backup.read_bytes() == disk.read_bytes()
    rng = random.Random(7)
    for _ in range(30):                                        # the guest goes on
        count = rng.randrange(1, 81)
        sector = rng.randrange(0, SIZE // 512 - count)
        assert guest.call("write", sector=sector, data=os.urandom(count * 512).hex()) == 0
    assert backup.read_bytes() != disk.read_bytes()
    marked = cbtlog.blocks_set(cbtlog.read_bitmap(str(log)))
    assert 0 < len(marked) < SIZE // BLOCK
    moved = 0
    with NbdClient(ctl_root / f"nbd{client.pid}.{minor}") as nbd, open(backup, "r+b") as f:
        for block in marked:                                   # only the changed blocks
            f.seek(block * BLOCK)
            f.write(nbd.read(block * BLOCK, BLOCK))
            moved += BLOCK
    assert backup.read_bytes() == disk.read_bytes()
    print(f"incremental backup: {len(marked)} of {SIZE // BLOCK} blocks marked, "
          f"{moved} bytes moved against {SIZE} for a full copy")
    assert moved <= SIZE // 2                                  # far less than a full copy
    client.disconnect_xenblkif(minor, domid=GUEST, devid=DEVID)
    client.close(minor)
    client.detach(minor)
