"""``blktap3-torture faults``: the FUSE layer under the image, a short run, and the
fsyncgate rule pinned on a real tapdisk: a FLUSH after a failed sync is never OKAY until
the image is opened again."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from blktap3.abi import BlkifStatus
from blktap3.torture import faults
from blktap3.torture.faultfs import FaultFs, Rule, Volume, missing
from blktap3.torture.rig import Rig
from blktap3.torture.tapdisk import TapdiskVbd

needs_fuse = pytest.mark.skipif(missing() is not None, reason=f"no FUSE layer: {missing()}")

OKAY, ERROR = int(BlkifStatus.OKAY), int(BlkifStatus.ERROR)


def test_a_volume_keeps_writes_until_settled_and_a_cut_keeps_a_subset(tmp_path: Path) -> None:
    f = tmp_path / "v"
    f.write_bytes(bytes(16384))
    v = Volume(f)
    v.write(100, b"a" * 5000)
    v.write(20000, b"b" * 10)     # beyond the end: the size follows
    assert v.read(98, 4) == b"\0\0aa" and v.size == 20010
    assert f.read_bytes() == bytes(16384), "nothing reaches the file before a sync"
    assert v.settle([False, True]) == (1, 1)
    data = f.read_bytes()
    assert data[100:5100] == bytes(5000) and data[20000:] == b"b" * 10
    assert v.read(0, 1 << 20) == data and not v.pending
    v.close()


@pytest.mark.integration
@needs_fuse
def test_a_failed_fsync_loses_pending_writes_then_the_next_one_succeeds(
        tmp_path: Path) -> None:
    """The model of Linux after a failed writeback, under a real mount."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.img").write_bytes(bytes(65536))
    with FaultFs(tmp_path / "b", tmp_path / "m") as fs:
        fd = os.open(fs.path("x.img"), os.O_RDWR)
        try:
            os.pwrite(fd, b"x" * 4096, 0)
            fs.rules(Rule("fsync", count=1))
            with pytest.raises(OSError) as exc:
                os.fdatasync(fd)
            assert exc.value.errno == errno.EIO
            os.fdatasync(fd)            # reported once: the next sync says nothing
            assert os.pread(fd, 4, 0) == bytes(4), "the write is gone"
            fs.rules(Rule("write", start=8192, end=8193, errno=errno.ENOSPC))
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"y" * 4096, 8192)
            assert exc.value.errno == errno.ENOSPC
            assert fs.injected()[-1] == {"op": "write", "file": "x.img", "off": 8192,
                                         "len": 4096, "kind": "error",
                                         "errno": errno.ENOSPC}
        finally:
            os.close(fd)


@pytest.mark.integration
@needs_fuse
def test_a_flush_after_a_failed_sync_stays_error_until_the_image_is_reopened() -> None:
    with Rig() as rig:
        backing = rig.scratch / "backing"
        backing.mkdir()
        (backing / "d.img").write_bytes(bytes(1 << 20))
        rig.machine.create_domain(faults.GUEST["raw"], 4096)
        with FaultFs(backing, rig.scratch / "mnt") as fs:
            vbd = TapdiskVbd(rig, f"aio:{fs.path('d.img')}")
            try:
                guest = rig.spawn("blktap3.sim.guestdrv", faults.GUEST["raw"])
                vbd.attach(guest, faults.GUEST["raw"])
                write = {"op": "write", "sector": 0, "count": 8, "stamp": 1}
                flush = {"op": "flush"}

                def status(item: dict[str, object]) -> int:
                    return int(guest.call("batch", items=[item])[0]["status"])

                assert status(write) == OKAY
                fs.rules(Rule("fsync", count=1))
                assert status(flush) == ERROR
                assert fs.injected()
                # The file system's next sync succeeds (the lost write is not its
                # problem any more): tapdisk must not say OKAY.
                assert status(write) == OKAY
                assert status(flush) == ERROR
                assert status(flush) == ERROR
                vbd.client.pause(vbd.minor, timeout=30)
                vbd.client.resume(vbd.minor, timeout=30)
                assert status(flush) == OKAY
            finally:
                vbd.close()


@pytest.mark.integration
@needs_fuse
def test_a_short_fault_run_judges_every_answer() -> None:
    v = faults.run(count=30, seed=2)
    assert v.ok, v.text()
    assert v.figures["faults injected"] > 5
    assert v.figures["reopened after a failed sync"] > 0
    assert v.figures["vhd-util check"] == "ok"
    raw_seen, raw_counted = v.figures[
        "raw: ERROR seen by the guest / counted by tap-ctl stats"].split(" / ")
    assert raw_seen == raw_counted and int(raw_seen) > 0
