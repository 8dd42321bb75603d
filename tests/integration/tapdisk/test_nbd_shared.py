"""The NBD export served through the ring's own image object: a VHD that the guest's
ring allocates as it writes is read and written over NBD by qemu-io, and what each side
wrote is what the other sees; qemu-img (an oracle none of us wrote) then converts the
VHD file to exactly those bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.datapath import vhdformat as vhd
from blktap3.tapdisk import metrics
from tests.support.waiting import wait_until

from . import test_ring as ring
from .conftest import MiB, TapCtl
from .test_nbd import run, uri
from .test_tap_ctl import create

pytestmark = pytest.mark.integration
pytest.importorskip("blktap3.datapath", reason="the data path is not built")
for _tool in ("qemu-img", "qemu-io"):
    if shutil.which(_tool) is None:
        pytest.skip(f"{_tool} is missing (Debian: qemu-utils)", allow_module_level=True)

machine = ring.machine
guest = ring.guest
GUEST, DEVID = ring.GUEST, ring.DEVID
SIZE = 8 * MiB


def test_a_vhd_export_sees_the_blocks_the_ring_allocates_and_the_other_way(
    guest: Any, machine: Any, ctl_root: Path, seen_pids: set[int], tap_ctl: TapCtl
) -> None:
    image = ctl_root / "d.vhd"
    vhd.create(image, SIZE)
    client, minor = ring.open_in_dom0(machine, ctl_root, seen_pids, f"vhd:{image}")
    pid = client.pid
    g = guest.call("open", backend=0, order=1, protocol=BlkifProtocol.NATIVE)
    client.connect_xenblkif(minor, domid=GUEST, devid=DEVID, grefs=tuple(g["grefs"]),
                            order=1, port=g["port"], proto=1)
    export = uri(ctl_root, pid, minor)
    info = json.loads(run("qemu-img", "info", "--output=json", export).stdout)
    assert info["virtual-size"] == SIZE
    # The guest allocates block 0 (2 MiB blocks) through its ring; NBD reads it.
    assert guest.call("write", sector=2048, data=(b"\x6b" * 32768).hex()) == 0
    run("qemu-io", "-f", "raw", "-c", "read -P 0x6b 1M 32k", "-c", "read -P 0 0 1M", export)
    # NBD allocates block 2; the guest reads it through its ring.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x2c 4M 32k", "-c", "flush", export)
    back = guest.call("read", sector=8192, count=64)
    assert back["status"] == 0 and bytes.fromhex(back["data"]) == b"\x2c" * 32768
    # Both write the same new block 3: the ring's first, then NBD's, one allocation.
    assert guest.call("write", sector=6 * 2048, data=(b"\x11" * 4096).hex()) == 0
    run("qemu-io", "-f", "raw", "-c", "write -P 0x22 6148k 4k", "-c", "flush", export)
    # The oracle, with the VBD closed: the file holds what both wrote, and no more.
    client.disconnect_xenblkif(minor, domid=GUEST, devid=DEVID)
    client.close(minor)
    client.detach(minor)
    out = ctl_root / "out.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", str(image), str(out))
    want = bytearray(SIZE)
    want[MiB:MiB + 32768] = b"\x6b" * 32768
    want[4 * MiB:4 * MiB + 32768] = b"\x2c" * 32768
    want[6 * MiB:6 * MiB + 4096] = b"\x11" * 4096
    want[6 * MiB + 4096:6 * MiB + 8192] = b"\x22" * 4096
    assert out.read_bytes() == bytes(want)
    assert len(vhd.open_chain(str(image))) == 1  # still one valid VHD


def test_a_vhd_export_alone_round_trips_with_qemu_io(tap_ctl: TapCtl, ctl_root: Path) -> None:
    image = ctl_root / "e.vhd"
    vhd.create(image, SIZE)
    pid, minor = create(tap_ctl, f"vhd:{image}")
    export = uri(ctl_root, pid, minor)
    done = run("qemu-io", "-f", "raw", "-c", "write -P 0xab 3M 1M", "-c", "write -z 0 64k",
               "-c", "read -P 0xab 3M 1M", "-c", "read -P 0 0 3M", "-c", "flush", export)
    assert "read 1048576/1048576 bytes at offset 3145728" in done.stdout
    wrong = run("qemu-io", "-f", "raw", "-c", "read -P 0xac 3M 4k", export, check=False)
    assert "Pattern verification failed" in wrong.stdout + wrong.stderr
    assert tap_ctl("destroy", "-p", str(pid), "-m", str(minor)).code == 0
    out = ctl_root / "e.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", str(image), str(out))
    assert out.read_bytes() == bytes(3 * MiB) + b"\xab" * MiB + bytes(4 * MiB)


def nbd_stats(path: Path) -> dict[str, int]:
    version, _, *values = metrics.STATS.unpack(path.read_bytes()[:metrics.STATS.size])
    assert version == metrics.STATS_VERSION and path.stat().st_size == metrics.PAGE
    return dict(zip(metrics.STATS_FIELDS, values, strict=True))


def test_the_nbd_stats_file_counts_the_exports_requests(
    tap_ctl: TapCtl, ctl_root: Path, run_dir: Path
) -> None:
    image = ctl_root / "s.vhd"
    vhd.create(image, SIZE)
    pid, minor = create(tap_ctl, f"vhd:{image}")
    export = uri(ctl_root, pid, minor)
    stats = run_dir / "shm" / f"td3-{pid}" / f"nbd-{minor}"
    old = stats.with_name(f"nbd-old-{minor}")
    assert nbd_stats(stats)["write_reqs_submitted"] == 0 and nbd_stats(old)["io_errors"] == 0
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5 0 64k", "-c", "write -P 0x6 1M 64k",
        "-c", "read -P 0x5 0 64k", export)
    got = wait_until(lambda: (s := nbd_stats(stats))["read_reqs_completed"] and s,
                     what="the NBD stats file's read counted")
    assert got["write_reqs_submitted"] == got["write_reqs_completed"] == 2
    assert got["write_sectors"] == 256 and got["read_sectors"] >= 128
    assert got["read_reqs_submitted"] >= 1 and got["io_errors"] == 0
    assert nbd_stats(old)["write_reqs_submitted"] == 0  # nobody used the old-style socket
    assert tap_ctl("destroy", "-p", str(pid), "-m", str(minor)).code == 0
    wait_until(lambda: not stats.exists() and not old.exists(), what="the NBD files gone")


def test_a_vhd_over_a_raw_file_serves_the_raw_data_on_a_live_vbd(
    tap_ctl: TapCtl, ctl_root: Path
) -> None:
    """`vhd:` of a snapshot whose parent is a raw file (blktap's `snapshot -m`): the
    export reads the raw file's bytes through the leaf, and writes land in the leaf."""
    raw, leaf = ctl_root / "base.raw", ctl_root / "over-raw.vhd"
    raw.write_bytes(b"\x3c" * (3 * MiB) + b"\x5a" * (SIZE - 3 * MiB))
    vhd.create(leaf, 0, parent=raw, parent_raw=True)
    pid, minor = create(tap_ctl, f"vhd:{leaf}")
    export = uri(ctl_root, pid, minor)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x3c 0 3M", "-c", "read -P 0x5a 3M 5M",
        "-c", "write -P 0x77 2M 2M", "-c", "write -P 0x11 7M 4k", "-c", "flush",
        "-c", "read -P 0x3c 0 2M", "-c", "read -P 0x77 2M 2M", "-c", "read -P 0x5a 4M 3M",
        export)
    live = ctl_root / "live.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", export, str(live))
    assert tap_ctl("destroy", "-p", str(pid), "-m", str(minor)).code == 0
    want = bytearray(raw.read_bytes())
    want[2 * MiB:4 * MiB] = b"\x77" * (2 * MiB)
    want[7 * MiB:7 * MiB + 4096] = b"\x11" * 4096
    assert live.read_bytes() == bytes(want)
    assert raw.read_bytes()[2 * MiB:4 * MiB] != b"\x77" * (2 * MiB)   # not written
    # qemu-img's vpc driver knows no parent: it sees the leaf's own sectors over zeros.
    alone = ctl_root / "alone.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", str(leaf), str(alone))
    only = bytearray(SIZE)
    only[2 * MiB:4 * MiB] = b"\x77" * (2 * MiB)
    only[7 * MiB:7 * MiB + 4096] = b"\x11" * 4096
    assert alone.read_bytes() == bytes(only)
