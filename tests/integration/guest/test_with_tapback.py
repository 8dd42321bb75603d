"""The simulated guest against the real system: xenstored, tapback, hotplug, tapdisk.

The same guest process as in test_guest.py, but the back-end is the real tapback daemon
and the disk is hotplugged as Xen's `block-tap` script does (blktap3.sim.hotplug).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from blktap3.abi import VdiskInfo
from blktap3.datapath import vhdformat
from blktap3.sim.guest import run_guest, start_guest
from blktap3.sim.host import Host
from blktap3.sim.hotplug import hotplug_add
from blktap3.sim.toolstack import Image
from blktap3.xenbus import VbdPaths
from tests.support import wait_until

from .conftest import DEVID, MiB

pytestmark = pytest.mark.integration


@pytest.fixture
def system(host: Host, tapback: int) -> Host:
    """The shared simulated host, with tapback running on it."""
    return host


@pytest.fixture
def disk(system: Host) -> Callable[..., VbdPaths]:
    """`disk(domid, size=..., mode=..., cdrom=...)`: a domain with one hotplugged vbd3 disk."""

    def make(domid: int, *, size: int = 16 * MiB, mode: str = "w",
             cdrom: bool = False, vhd: bool = False) -> VbdPaths:
        path = system.run_dir.parent / f"disk{domid}.img"
        if vhd:
            vhdformat.create(path, size)
        else:
            with open(path, "wb") as f:
                f.truncate(size)
        image = Image.parse(f"{'vhd' if vhd else 'aio'}:{path}")
        with system.toolstack() as ts:
            ts.create_domain(domid)
            paths = ts.add_vbd(domid, DEVID, image, mode=mode, cdrom=cdrom)
        hotplug_add(system, paths, image, mode=mode)
        return paths

    return make


def test_guest_with_tapback_on_a_vhd_verifies_every_byte(
        system: Host, disk: Callable[..., VbdPaths]) -> None:
    paths = disk(8, size=16 * MiB, vhd=True)
    result = run_guest(system, 8, DEVID, "linux", "randrw", timeout=60,
                       extra=["--seconds", "0.3"])
    assert result.ok, result.summary() + "\n" + result.timeline_text()
    assert result.sectors == 16 * MiB // 512
    assert result.report.io.writes > 0 and result.report.io.mismatches == 0
    assert wait_until(lambda: backend_key(system, paths, "state") == "6")
    # The image the guest wrote through tapdisk is still a valid VHD.
    vhdformat.open_chain(system.run_dir.parent / "disk8.img")


def backend_key(host: Host, paths: VbdPaths, key: str) -> str | None:
    with host.xs() as xs:
        return xs.read_optional(paths.backend_key(key))


@pytest.mark.parametrize("personality", ["linux", "minios", "linux-multipage"])
def test_guest_with_tapback_verifies_every_byte(system: Host, disk: Callable[..., VbdPaths],
                                                personality: str) -> None:
    paths = disk(3, size=16 * MiB)
    result = run_guest(system, 3, DEVID, personality, "randrw", timeout=60,
                       extra=["--seconds", "0.3"])
    assert result.ok, result.summary() + "\n" + result.timeline_text()
    assert result.sectors == 16 * MiB // 512
    assert result.report.io.writes > 0 and result.report.io.mismatches == 0
    assert wait_until(lambda: backend_key(system, paths, "state") == "6")


def test_cdrom_is_read_only_for_the_guest(system: Host, disk: Callable[..., VbdPaths]) -> None:
    disk(4, mode="r", cdrom=True)
    result = run_guest(system, 4, DEVID, "linux", "read", timeout=60, extra=["--seconds", "0.2"])
    assert result.ok, result.summary()
    disk = result.report.disk
    assert disk is not None and disk.info & VdiskInfo.CDROM and disk.info & VdiskInfo.READONLY


def test_tapback_closing_the_device_lets_the_guest_go(system: Host,
                                                      disk: Callable[..., VbdPaths]) -> None:
    paths = disk(5)
    with start_guest(system, 5, DEVID, "linux", "verify", hold=True) as guest:
        guest.wait_for_step("holding")
        with system.xs() as xs:
            xs.write(paths.backend_key("online"), "0")
            xs.write(paths.backend_key("state"), "5")  # as libxl does to detach a disk
        result = guest.result(30)
    assert result.ok, result.summary() + "\n" + result.timeline_text()
    assert "closed by the back-end" in [s.what for s in result.timeline]


def test_tapdisk_killed_the_guest_is_closed_with_the_reason(
        system: Host, disk: Callable[..., VbdPaths]) -> None:
    paths = disk(6)
    with start_guest(system, 6, DEVID, "linux", "verify", hold=True) as guest:
        guest.wait_for_step("holding")
        device = backend_key(system, paths, "physical-device-path")
        assert device is not None
        pid = int(Path(device).name.removeprefix("nbd").split(".")[0])
        os.kill(pid, signal.SIGKILL)
        result = guest.result(30)
    assert "closed by the back-end" in [s.what for s in result.timeline], result.summary()
    assert result.report.backend_error, result.timeline_text()
