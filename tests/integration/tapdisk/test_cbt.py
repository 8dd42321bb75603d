"""Changed-block tracking on a live VBD: a real tapdisk (`tap-ctl create -C LOG`) marks
blktap's log for every write of the guest's ring and of the NBD export, before it is
answered; the log equals the set of 64 KiB blocks written; `unpause -c` switches logs;
bad logs are refused at open and leave nothing behind. The log is read by our
`cbt-util` and, independently, by parsing blktap's layout here."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest

from blktap3.ctl import ops, runtime
from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.datapath import cbtlog
from tests.unit.tools.test_cbt_util import cbt_util

from . import test_ring as ring
from .conftest import MiB, TapCtl, parse_list
from .test_nbd import run, uri

pytestmark = pytest.mark.integration
pytest.importorskip("blktap3.datapath", reason="the data path is not built")

machine = ring.machine
guest = ring.guest
GUEST, DEVID = ring.GUEST, ring.DEVID
SIZE = 8 * MiB
BLOCK = 64 * 1024


def new_log(path: Path, size: int = SIZE) -> Path:
    assert cbt_util("create", "-n", str(path), "-s", str(size)).returncode == 0
    return path


def marked(log: Path) -> set[int]:
    """The blocks set in the log, parsed here from blktap's layout: 48 bytes of
    `struct cbt_log_metadata` (uuid, uuid, int, 4 bytes of padding, u64 size), then bit
    n at byte n/8, bit n%8."""
    data = log.read_bytes()
    size = int.from_bytes(data[40:48], "little")
    bitmap = data[48:48 + (size // BLOCK + 7) // 8]
    return {n for n in range(size // BLOCK) if bitmap[n // 8] >> (n % 8) & 1}


def test_the_log_marks_every_block_the_ring_and_nbd_wrote(
    guest: Any, machine: Any, ctl_root: Path, seen_pids: set[int], tap_ctl: TapCtl
) -> None:
    disk = ctl_root / "d.img"
    disk.write_bytes(bytes(SIZE))
    log = new_log(ctl_root / "d.cbt")
    client, minor = ring.guest_on(guest, machine, ctl_root, seen_pids, f"aio:{disk}",
                                  logpath=str(log))
    rng = random.Random(16)
    want: set[int] = set()
    for _ in range(40):  # writes of 512 B .. 40 KiB, some across a 64 KiB boundary
        count = rng.randrange(1, 81)
        sector = rng.randrange(0, SIZE // 512 - count)
        assert guest.call("write", sector=sector, data=os.urandom(count * 512).hex()) == 0
        want |= set(range(sector * 512 // BLOCK, ((sector + count) * 512 - 1) // BLOCK + 1))
    # Marked before the write was answered: the log shows it with no flush yet.
    assert marked(log) == want
    run("qemu-io", "-f", "raw", "-c", "write -P 0x3 6M 4k", "-c", "write -z 7M 128k",
        "-c", "flush", uri(ctl_root, client.pid, minor))
    want |= {6 * MiB // BLOCK, 7 * MiB // BLOCK, 7 * MiB // BLOCK + 1}
    assert marked(log) == want and len(want) < SIZE // BLOCK  # not every block
    got = cbt_util("get", "-n", str(log), "-b")
    assert got.returncode == 0 and cbtlog.blocks_set(got.stdout) == sorted(want)
    # unpause -c switches logs: the new one has only what follows.
    second = new_log(ctl_root / "d2.cbt")
    assert tap_ctl("pause", "-p", str(client.pid), "-m", str(minor)).code == 0
    res = tap_ctl("unpause", "-p", str(client.pid), "-m", str(minor), "-c", str(second))
    assert res.code == 0, res.err
    assert guest.call("write", sector=0, data=(b"\x01" * 512).hex()) == 0
    assert marked(second) == {0} and marked(log) == want
    client.disconnect_xenblkif(minor, domid=GUEST, devid=DEVID)
    client.close(minor)
    client.detach(minor)


def _bad_logs(root: Path) -> dict[str, tuple[Path, int, str]]:
    missing = root / "missing.cbt"
    readonly = new_log(root / "ro.cbt")
    readonly.chmod(0o444)
    small = new_log(root / "small.cbt", SIZE // 2)
    corrupt = new_log(root / "corrupt.cbt")
    with open(corrupt, "r+b") as f:
        f.seek(32)
        f.write((7).to_bytes(4, "little"))  # consistent = 7
    short = new_log(root / "short.cbt")
    os.truncate(short, 56)  # the header and half of the 16-byte bitmap
    return {"missing": (missing, errno.ENOENT, "No such file"),
            "read-only": (readonly, errno.EACCES, "read-only"),
            "wrong size": (small, errno.EINVAL, f"made for {SIZE // 2} bytes"),
            "corrupt header": (corrupt, errno.EINVAL, "corrupt header"),
            "truncated": (short, errno.EINVAL, "needs")}


def test_bad_logs_are_refused_at_open_and_leave_nothing(
    tap_ctl: TapCtl, ctl_root: Path, seen_pids: set[int]
) -> None:
    disk = ctl_root / "d.img"
    disk.write_bytes(bytes(SIZE))
    pid = ops.spawn()
    seen_pids.add(pid)
    client = TapdiskClient(pid)
    minor = runtime.allocate_minor(ctl_root)
    client.attach(minor)
    for what, (log, code, reason) in _bad_logs(ctl_root).items():
        before = log.read_bytes() if log.exists() else None
        # tap-ctl says strerror, as blktap's; the tapdisk's answer says why.
        res = tap_ctl("create", "-a", f"aio:{disk}", "-C", str(log))
        assert (res.code, res.err) == (code, os.strerror(code) + "\n"), what
        with pytest.raises(CtlError) as refused:
            client.open(minor, f"aio:{disk}", logpath=str(log))
        assert refused.value.errno == code, what
        assert reason in refused.value.detail and str(log) in refused.value.detail, what
        # Nothing half-opened: the VBD is still closed, no other tapdisk or minor.
        assert [(r["pid"], r["state"]) for r in parse_list(tap_ctl("list").out)] == \
            [(str(pid), "0")], what
        assert (log.read_bytes() if log.exists() else None) == before, what
    # The same VBD then opens with a good log.
    client.open(minor, f"aio:{disk}", logpath=str(new_log(ctl_root / "good.cbt")))
    client.close(minor)
    client.detach(minor)
