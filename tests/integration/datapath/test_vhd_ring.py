"""A guest's verified I/O over the ring on VHD images: dynamic (allocating as it writes),
differencing (reads falling through to the parent), fixed; the result judged by
qemu-img (dynamic, fixed) and by the chain read back through the driver."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from blktap3.datapath import vhdformat as vhd
from blktap3.datapath.lineproc import LineProcess
from tests.support.tools import run_tool

from .conftest import DISK_BYTES, GUEST_DOMID, Spawn, connect
from .test_ring_io import EOPNOTSUPP, stamp_block

pytestmark = pytest.mark.integration
OKAY = 0
SPAN = DISK_BYTES // 512    # every sector, so every block is allocated by the guest


def guest_run(guest: LineProcess, g: dict[str, object], *, read_pct: int, stamp: int,
              span: int = SPAN) -> dict[str, int]:
    res: dict[str, int] = guest.call("run", qd=g["slots"], bs=4096, read_pct=read_pct,
                                     span=span, ios=span // 8, verify=True, stamp=stamp)
    assert (res["errors"], res["duplicates"], res["lost"], res["mismatches"]) == (0, 0, 0, 0)
    return res


def raw_of(path: Path, tmp: Path) -> bytes:
    out = tmp / "out.raw"
    run_tool("qemu-img", "convert", "-f", "vpc", "-O", "raw", path, out)
    return out.read_bytes()


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-utils missing")
@pytest.mark.parametrize("fixed", [False, True])
def test_guest_writes_to_a_vhd_convert_to_what_it_wrote(
        host: LineProcess, guest: LineProcess, tmp_path: Path, fixed: bool) -> None:
    image = tmp_path / "d.vhd"
    vhd.create(image, DISK_BYTES, fixed=fixed)
    g = connect(host, guest, image, order=1, driver="vhd")
    guest_run(guest, g, read_pct=0, stamp=3)
    guest_run(guest, g, read_pct=100, stamp=3)
    # The same again: now every request is one extent, served by the io engine.
    guest_run(guest, g, read_pct=0, stamp=4)
    st = host.call("stats", name="r")
    assert st["in_flight"] == 0 and st["halted"] is None and sum(st["errors"].values()) == 0
    host.call("disconnect", name="r")
    host.call("close_image", name="r")
    content = raw_of(image, tmp_path)
    assert all(content[s * 512 : (s + 1) * 512] == stamp_block(s, 4) for s in range(SPAN))


def test_a_snapshot_reads_its_parent_and_keeps_the_guests_writes(
        host: LineProcess, guest: LineProcess, spawn: Spawn, tmp_path: Path) -> None:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    vhd.create(base, DISK_BYTES)
    g = connect(host, guest, base, driver="vhd")
    guest_run(guest, g, read_pct=0, stamp=5)
    host.call("disconnect", name="r")
    host.call("close_image", name="r")
    vhd.create(leaf, 0, parent=base)
    # The VM booted on its snapshot: another domain (a ring is not reopened in place).
    guest = spawn("blktap3.sim.guestdrv", GUEST_DOMID + 1)
    g = connect(host, guest, leaf, driver="vhd", name="s", domid=GUEST_DOMID + 1)
    guest_run(guest, g, read_pct=100, stamp=5)       # everything from the parent
    half = SPAN // 2
    guest_run(guest, g, read_pct=0, stamp=6, span=half)
    host.call("disconnect", name="s")
    host.call("close_image", name="s")
    chain = vhd.open_chain(leaf)
    got = vhd.read_chain(chain, 0, SPAN)
    want = [stamp_block(s, 6 if s < half else 5) for s in range(SPAN)]
    assert all(got[s * 512 : (s + 1) * 512] == want[s] for s in range(SPAN))
    # The parent was not written.
    assert vhd.read_chain(chain[1:], 0, 8) == b"".join(stamp_block(s, 5) for s in range(8))


def test_discard_on_a_snapshot_punches_the_leaf_and_reads_zeros(
        host: LineProcess, guest: LineProcess, tmp_path: Path) -> None:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    vhd.create(base, DISK_BYTES)
    vhd.create(leaf, 0, parent=base)
    g = connect(host, guest, leaf, driver="vhd")
    guest_run(guest, g, read_pct=0, stamp=7, span=4096 * 2)   # two whole blocks
    used = leaf.stat().st_blocks
    guest.call("submit", reqs=[
        {"op": 5, "sector": 0, "nr_sectors": 4096},           # block 0: punched
        {"op": 5, "sector": 4096, "nr_sectors": 8, "flag": 1},  # secure: refused, kept
        {"op": 5, "sector": 3 * 4096, "nr_sectors": 64},      # never written: nothing
    ])
    assert guest.call("collect", n=3) == [OKAY, EOPNOTSUPP, OKAY]
    host.call("disconnect", name="r")
    host.call("close_image", name="r")
    # Block 0's 2 MiB of data went back to the file system (st_blocks: 512-byte units).
    assert used - leaf.stat().st_blocks >= (2 << 20) // 512
    got = vhd.read_chain(vhd.open_chain(leaf), 0, 2 * 4096)
    assert got[: 4096 * 512] == bytes(4096 * 512)
    # No image of ours erases securely: a secure discard is refused and changes nothing.
    assert all(got[s * 512 : (s + 1) * 512] == stamp_block(s, 7) for s in range(4096, 8192))
