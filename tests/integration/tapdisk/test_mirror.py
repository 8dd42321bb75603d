"""Mirroring (`-2 SECONDARY`) on a live VBD of a real tapdisk: every write of the guest's
ring and of the NBD export goes to the primary and the secondary before it is answered;
the secondary is a file (`aio:`) or an NBD server (qemu-nbd, a peer none of us wrote).
A secondary that fails (qemu-nbd killed mid-workload) is dropped and counted
(`nbd_mirror_failed`); the guest sees no error and the primary keeps every write.

In-flight writes when the secondary fails: a guest's write goes to both sides at once
(to a raw file secondary in the same io_uring batch as the primary's; to an NBD one sent
beside it, several in flight, the reply read once the primary's half completed) and is
answered when both halves completed; writes the image cannot map and the NBD export's
reach the secondary one at a time, after the primary. Either way a write is answered by
the primary's result alone: the writes in flight when the secondary fails are answered
OKAY (the primary holds them), the secondary is dropped once and counted; every later
write goes to the primary alone. The secondary then holds every write answered before
the failure and any part of those in flight: a mirror that failed is not a copy (the
migration is retried).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from blktap3.ctl.client import CtlError, TapdiskClient
from tests.support.waiting import wait_until

from . import test_ring as ring
from .conftest import MiB, TapCtl
from .test_nbd import run, uri

pytestmark = pytest.mark.integration
pytest.importorskip("blktap3.datapath", reason="the data path is not built")
if shutil.which("qemu-nbd") is None or shutil.which("qemu-io") is None:
    pytest.skip("qemu-nbd/qemu-io missing (Debian: qemu-utils)", allow_module_level=True)

machine = ring.machine
guest = ring.guest
GUEST, DEVID = ring.GUEST, ring.DEVID
SIZE = 8 * MiB
FLUSH = 3


def blank(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def workload(guest: Any, rng: random.Random, n: int) -> None:
    """`n` writes of 512 B .. 40 KiB at random places, a FLUSH every 8."""
    for i in range(n):
        count = rng.randrange(1, 81)
        sector = rng.randrange(0, SIZE // 512 - count)
        assert guest.call("write", sector=sector, data=os.urandom(count * 512).hex()) == 0
        if i % 8 == 7:
            guest.call("submit", reqs=[{"op": FLUSH}])
            assert guest.call("collect", n=1) == [0]


def connected(guest: Any, machine: Any, ctl_root: Path, seen_pids: set[int], primary: Path,
              secondary: str) -> tuple[TapdiskClient, int]:
    return ring.guest_on(guest, machine, ctl_root, seen_pids, f"aio:{primary}", flags=0x80,
                         secondary=secondary)


def stats(client: TapdiskClient, minor: int) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(client.stats(minor))
    return result


def qemu_nbd(target: Path, sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["qemu-nbd", "-t", "-f", "raw", "-k", str(sock), str(target)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until(lambda: sock.is_socket() or proc.poll() is not None, what="qemu-nbd listening")
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


def test_a_file_mirror_equals_the_primary_after_ring_and_nbd_writes_and_can_change(
    guest: Any, machine: Any, ctl_root: Path, seen_pids: set[int]
) -> None:
    primary, secondary = blank(ctl_root / "p.img"), blank(ctl_root / "s.img")
    client, minor = connected(guest, machine, ctl_root, seen_pids, primary, f"aio:{secondary}")
    workload(guest, random.Random(1), 48)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x7 5M 64k", "-c", "write -z 1M 8k",
        "-c", "flush", uri(ctl_root, client.pid, minor))
    got = stats(client, minor)
    assert got["nbd_mirror_failed"] == 0 and got["mirror"]["kind"] == "image"
    assert got["mirror"]["active"] and got["mirror"]["writes"] >= 48
    assert primary.read_bytes() == secondary.read_bytes() != bytes(SIZE)
    # unpause -2 changes the secondary: the new one gets what follows, the old one not.
    other = blank(ctl_root / "o.img")
    client.pause(minor)
    client.resume(minor, flags=0x80, secondary=f"aio:{other}")
    assert guest.call("write", sector=8, data=(b"\x42" * 4096).hex()) == 0
    assert other.read_bytes()[4096:8192] == b"\x42" * 4096
    assert secondary.read_bytes()[4096:8192] != b"\x42" * 4096
    client.disconnect_xenblkif(minor, domid=GUEST, devid=DEVID)
    client.close(minor)
    client.detach(minor)


def test_an_nbd_mirror_follows_then_is_dropped_when_its_server_dies(
    guest: Any, machine: Any, ctl_root: Path, seen_pids: set[int]
) -> None:
    primary, target = blank(ctl_root / "p.img"), blank(ctl_root / "t.img")
    sock = ctl_root / "target.sock"
    server = qemu_nbd(target, sock)
    try:
        client, minor = connected(guest, machine, ctl_root, seen_pids, primary, f"nbd:{sock}")
        rng = random.Random(2)
        workload(guest, rng, 40)
        got = stats(client, minor)
        assert got["mirror"]["kind"] == "nbd" and got["mirror"]["active"]
        assert got["mirror"]["flushes"] == 5 and got["nbd_mirror_failed"] == 0
        assert primary.read_bytes() == target.read_bytes() != bytes(SIZE)
        # The target dies: the guest goes on, unaware; the mirror is dropped, counted.
        server.send_signal(signal.SIGKILL)
        server.wait(60)
        workload(guest, rng, 24)
        got = stats(client, minor)
        assert got["nbd_mirror_failed"] == 1 and not got["mirror"]["active"]
        assert got["xenbus"]["errors"]["img"] == 0
        assert primary.read_bytes() != target.read_bytes()
        client.disconnect_xenblkif(minor, domid=GUEST, devid=DEVID)
        client.close(minor)
        client.detach(minor)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(60)


def test_a_file_secondary_failing_under_writes_in_flight_is_dropped_the_guest_unaware(
    guest: Any, machine: Any, ctl_root: Path, seen_pids: set[int]
) -> None:
    """The secondary's halves of QD16 writes fail (the file made immutable: EPERM, from
    the kernel, on writes already queued beside the primary's): each write is answered
    OKAY, the secondary is dropped once and counted, the primary has every write."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr missing (Debian: e2fsprogs)")
    primary, secondary = blank(ctl_root / "p.img"), blank(ctl_root / "s.img")
    client, minor = connected(guest, machine, ctl_root, seen_pids, primary, f"aio:{secondary}")
    run = {"qd": 16, "bs": 4096, "read_pct": 0, "random": True, "span": SIZE // 512,
           "ios": 400, "timeout": 30.0}
    assert guest.call("run", seed=1, verify=True, stamp=3, **run)["errors"] == 0
    assert primary.read_bytes() == secondary.read_bytes() != bytes(SIZE)
    before = primary.read_bytes()
    if subprocess.run(["chattr", "+i", str(secondary)], capture_output=True).returncode:
        pytest.skip("this file system takes no immutable flag")
    try:
        res = guest.call("run", seed=2, verify=True, stamp=7, **run)
        # Read back through the ring: what was answered is on the primary.
        back = guest.call("run", seed=2, verify=True, stamp=7, **{**run, "read_pct": 100})
    finally:
        subprocess.run(["chattr", "-i", str(secondary)], check=True)
    assert res["errors"] == res["lost"] == 0 and res["writes"] == 400
    assert back["errors"] == back["mismatches"] == 0
    got = stats(client, minor)
    assert got["nbd_mirror_failed"] == 1 and not got["mirror"]["active"]
    assert got["mirror"]["last_error"] == errno.EPERM
    assert got["xenbus"]["errors"]["img"] == 0
    assert primary.read_bytes() != before and secondary.read_bytes() == before
    client.disconnect_xenblkif(minor, domid=GUEST, devid=DEVID)
    client.close(minor)
    client.detach(minor)


def test_a_secondary_that_cannot_be_a_mirror_is_refused_at_open(
    tap_ctl: TapCtl, ctl_root: Path
) -> None:
    primary = blank(ctl_root / "p.img")
    small = blank(ctl_root / "small.img", SIZE // 2)
    # nbd:NAME (no path): a socket passed under that name on nbdclient<pid>; none was.
    cases = {f"aio:{small}": 22, f"aio:{ctl_root / 'none.img'}": 2,
             f"nbd:{ctl_root / 'none.sock'}": 2, "nbd:never-passed": 2}
    for secondary, code in cases.items():
        res = tap_ctl("create", "-a", f"aio:{primary}", "-2", secondary)
        assert (res.code, res.err) == (code, os.strerror(code) + "\n"), secondary
        assert tap_ctl("list").out == "", secondary
    res = tap_ctl("create", "-a", f"aio:{primary}", "-2", f"aio:{small}", "-s")
    assert res.code == 95  # STANDBY (fail over on ENOSPC) is not served: EOPNOTSUPP


def test_the_refusal_says_why(ctl_root: Path, seen_pids: set[int], machine: Any) -> None:
    primary, small = blank(ctl_root / "p.img"), blank(ctl_root / "small.img", MiB)
    with pytest.raises(CtlError) as refused:
        ring.open_in_dom0(machine, ctl_root, seen_pids, f"aio:{primary}", flags=0x80,
                          secondary=f"aio:{small}")
    assert "secondary" in refused.value.detail and str(small) in refused.value.detail
