"""What tapback tells the front-end about the disk: read-only and CD-ROM bits, resize."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blktap3.abi import VdiskInfo
from blktap3.ctl import runtime
from blktap3.sim.host import Host
from blktap3.tapback import service
from blktap3.xenbus import WatchStream, XenbusState
from tests.support import wait_until

from .conftest import GuestFactory

pytestmark = pytest.mark.integration

TAP_CTL = str(Path(sys.executable).parent / "tap-ctl")


def test_read_only_disk(host: Host, guests: GuestFactory) -> None:
    guest = guests(mode="r")
    guest.connect()
    assert int(guest.backend("info") or "0") == VdiskInfo.READONLY
    assert guest.backend("feature-discard") == "0"
    assert guest.read(0, 1)[0] == 0
    assert guest.write(0, b"\x01" * 512) != 0  # refused by the data path


def test_cdrom(host: Host, guests: GuestFactory) -> None:
    guest = guests(mode="r", cdrom=True)
    guest.connect()
    cdrom = VdiskInfo.CDROM | VdiskInfo.REMOVABLE | VdiskInfo.READONLY
    assert int(guest.backend("info") or "0") == cdrom
    assert guest.backend("feature-discard") == "0"


def test_resize_after_tap_ctl_resize(host: Host, guests: GuestFactory) -> None:
    guest = guests(size=4 << 20)
    guest.connect()
    assert guest.backend("sectors") == str((4 << 20) // 512)
    with WatchStream.open(str(host.xenstored_path)) as stream:
        stream.watch(guest.paths.backend_key("state"), "s")
        assert stream.wait(2.0) is not None  # the initial fire
        os.truncate(guest.image, 6 << 20)
        done = subprocess.run(
            [TAP_CTL, "resize", "-p", str(guest.attached.pid), "-m", str(guest.attached.minor)],
            env={**os.environ, runtime.ROOT_ENV: str(service.control_dir(host.run_dir))},
            capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: guest.backend("sectors") == str((6 << 20) // 512), what="new sectors")
        # Connected is announced again (state rewritten) so that blkfront re-reads sectors.
        assert stream.wait(2.0) is not None
    assert guest.backend_state() is XenbusState.CONNECTED
    last = (6 << 20) // 512 - 8
    assert guest.write(last, b"\xee" * 4096) == 0
    assert guest.read(last, 8) == (0, b"\xee" * 4096)


def test_resize_while_tapback_is_down_is_announced_when_it_adopts(
        host: Host, guests: GuestFactory) -> None:
    guest = guests(size=4 << 20)
    guest.connect()
    pid = guest.backend("kthread-pid")
    assert pid == str(guest.attached.pid)
    service.stop(host.run_dir)
    os.truncate(guest.image, 8 << 20)
    done = subprocess.run(
        [TAP_CTL, "resize", "-p", str(guest.attached.pid), "-m", str(guest.attached.minor)],
        env={**os.environ, runtime.ROOT_ENV: str(service.control_dir(host.run_dir))},
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert guest.backend("sectors") == str((4 << 20) // 512)  # nobody told the guest yet
    with WatchStream.open(str(host.xenstored_path)) as stream:
        stream.watch(guest.paths.backend_key("state"), "s")
        assert stream.wait(2.0) is not None  # the initial fire
        service.start(host.run_dir, xenstored_path=str(host.xenstored_path))
        wait_until(lambda: guest.backend("sectors") == str((8 << 20) // 512), what="new sectors")
        # Connected said again (never InitWait): blkfront re-reads sectors.
        assert stream.wait(5.0) is not None
    assert guest.backend_state() is XenbusState.CONNECTED
    assert guest.backend("kthread-pid") == pid
    last = (8 << 20) // 512 - 8
    assert guest.write(last, b"\xab" * 4096) == 0
    assert guest.read(last, 8) == (0, b"\xab" * 4096)
