"""The simulated guest against the real system: xenstored, tapback, hotplug, tapdisk.

The same guest process as in test_guest.py, but the back-end is the real tapback daemon
and the disk is hotplugged as Xen's `block-tap` script does (blktap3.sim.hotplug).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from blktap3.tools import vbdstat

from blktap3.abi import VdiskInfo
from blktap3.ctl import runtime
from blktap3.ctl.client import TapdiskClient
from blktap3.datapath import vhdformat
from blktap3.sim.guest import run_guest, start_guest
from blktap3.sim.host import Host
from blktap3.sim.hotplug import hotplug_add
from blktap3.sim.toolstack import Image
from blktap3.xenbus import VbdPaths
from tests.support import log_events, wait_until

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
             cdrom: bool = False, discard: bool | None = None,
             vhd: bool = False) -> VbdPaths:
        path = system.run_dir.parent / f"disk{domid}.img"
        if vhd:
            vhdformat.create(path, size)
        else:
            with open(path, "wb") as f:
                f.truncate(size)
        image = Image.parse(f"{'vhd' if vhd else 'aio'}:{path}")
        with system.toolstack() as ts:
            ts.create_domain(domid)
            paths = ts.add_vbd(domid, DEVID, image, mode=mode, cdrom=cdrom, discard=discard)
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


def test_order_4_ring_through_tapback_and_the_control_message(
        system: Host, disk: Callable[..., VbdPaths]) -> None:
    """16 ring pages: tapback offers order 4 (and 16 pages for FreeBSD), the 16 grant refs
    reach the tapdisk in XENBLKIF_CONNECT (8 of them in our gref_hi), and serve I/O."""
    paths = disk(13, size=16 * MiB)
    assert wait_until(lambda: backend_key(system, paths, "max-ring-pages") == "16")
    assert backend_key(system, paths, "max-ring-page-order") == "4"
    with start_guest(system, 13, DEVID, "linux-order4", "randrw", hold=True,
                     extra=["--qd", "64", "--seconds", "0.3"]) as guest:
        guest.wait_for_step("holding")
        with system.xs() as xs:
            assert xs.read(paths.frontend_key("ring-page-order")) == "4"
            # Each queue's 16 refs: under queue-N/ when the guest uses more than one.
            queues = int(xs.read(paths.frontend_key("multi-queue-num-queues")) or "1")
            where = [f"queue-{n}/" for n in range(queues)] if queues > 1 else [""]
            assert all(xs.read(paths.frontend_key(f"{w}ring-ref15")) for w in where)
        guest.detach()
        result = guest.result(60)
    assert result.ok, result.summary() + "\n" + result.timeline_text()
    assert result.report.io.writes > 0 and result.report.io.mismatches == 0


@pytest.mark.parametrize(("enable", "feature"), [(None, "1"), (False, "0")])
def test_toolstacks_discard_enable_decides_feature_discard(
        system: Host, disk: Callable[..., VbdPaths], enable: bool | None, feature: str) -> None:
    paths = disk(14, discard=enable)
    with start_guest(system, 14, DEVID, "linux", "none", hold=True) as guest:
        guest.wait_for_step("holding")
        assert backend_key(system, paths, "feature-discard") == feature
        assert backend_key(system, paths, "discard-secure") is None  # a file never erases
        guest.detach()
        assert guest.result(30).ok


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


def test_stats_files_follow_the_guests_io_and_go_with_the_vbd(
        system: Host, disk: Callable[..., VbdPaths]) -> None:
    """blktap's stats files of a live VBD, read as libxenstat (xentop) reads them, agree
    with what the guest itself counted; they go with the ring, then with the tapdisk."""
    paths = disk(7)
    root = runtime.shm_dir(system.run_dir)
    ring_dir = root / f"vbd3-7-{DEVID}"
    with start_guest(system, 7, DEVID, "linux", "randrw", hold=True,
                     extra=["--seconds", "0.3"]) as guest:
        guest.wait_for_step("holding")
        pid = backend_key(system, paths, "kthread-pid")
        assert pid is not None
        vbd_file = root / f"td3-{pid}" / f"vbd-7-{DEVID}"
        device = backend_key(system, paths, "physical-device-path")
        assert device is not None
        vdi_file = root / f"td3-{pid}" / f"vdi-{device.rsplit('.', 1)[1]}"

        def settled() -> tuple[dict[str, int], ...] | None:
            # Refreshed from the C counters every second, file after file: wait for every
            # I/O answered, in all of them.
            try:
                st, vdi = vbdstat.read_vbd3_stats(vbd_file), vbdstat.read_vbd3_stats(vdi_file)
                blk = vbdstat.read_blkback(ring_dir / "statistics")
            except vbdstat.StatsFileError:
                return None
            done = (st["read_reqs_completed"] == st["read_reqs_submitted"] > 0
                    and st["write_reqs_completed"] == st["write_reqs_submitted"] > 0
                    and vdi == st and blk["st_wr_cnt"] == st["write_reqs_completed"]
                    and blk["st_rd_cnt"] == st["read_reqs_completed"])
            return (st, blk) if done else None

        st, blk = wait_until(settled, what=f"{vbd_file}: every request counted")
        with system.xs() as xs:  # other tests' disks may be on this host too
            found, errors = vbdstat.collect(xs, root)
        assert [e for e in errors if f"vbd-7-{DEVID}" in e] == []
        assert [v for v in found if v.domid == 7] == [vbdstat.VbdCounters(
            7, DEVID, 0, st["read_reqs_submitted"], st["write_reqs_submitted"],
            st["read_sectors"], st["write_sectors"])]
        assert (blk["st_rd_req"], blk["st_rd_sect"], blk["st_wr_req"], blk["st_wr_sect"]) == (
            st["read_reqs_submitted"], st["read_sectors"], st["write_reqs_submitted"],
            st["write_sectors"])
        assert blk["st_rd_max_usecs"] <= blk["st_rd_sum_usecs"] == st["read_total_ticks"]
        ring = vbdstat.read_io_ring(ring_dir / "io_ring")
        assert ring["nr_ents"] == 32  # one page, native layout
        assert ring["req_prod"] == ring["req_cons"] == ring["rsp_prod_pvt"]
        guest.detach()
        result = guest.result(30)
    assert result.ok, result.summary()
    # What the guest counted on its side of the ring: every one of its requests.
    io = result.report.io
    assert (st["read_reqs_submitted"], st["write_reqs_submitted"]) == (io.reads, io.writes)
    assert (st["read_sectors"] + st["write_sectors"]) * 512 == io.bytes
    # The ring's files go with the ring; td3-<pid> with the tapdisk.
    wait_until(lambda: not ring_dir.exists() and not vbd_file.exists(),
               what="the ring's stats files removed")
    system.detach_disk(7, DEVID)
    wait_until(lambda: not (root / f"td3-{pid}").exists(), what="td3-<pid> removed")
    # An orderly detach (libxl's order: Closed, then tap-ctl destroy) is no death.
    exited = wait_until(lambda: [e for e in log_events(system.tapback_log, "tapdisk exited")
                                 if e["pid"] == int(pid)], what="tapdisk exit logged")
    assert exited[0]["level"] == "info"
    assert [e for e in log_events(system.tapback_log, "tapdisk died")
            if e["pid"] == int(pid)] == []


@pytest.mark.parametrize(("personality", "negotiated"), [("linux", True), ("minios", False)])
def test_persistent_grants_are_used_only_with_a_front_end_that_asks(
        system: Host, disk: Callable[..., VbdPaths], personality: str,
        negotiated: bool) -> None:
    """tapback advertises feature-persistent (its default); Linux's blkfront asks too and
    the tapdisk maps its pool of data pages once, Mini-OS does not and gets grant copy."""
    paths = disk(15)
    with start_guest(system, 15, DEVID, personality, "randrw", hold=True,
                     extra=["--seconds", "0.2"]) as guest:
        guest.wait_for_step("holding")
        assert backend_key(system, paths, "feature-persistent") == "1"
        pid = int(backend_key(system, paths, "kthread-pid") or 0)
        client = TapdiskClient(pid, root=system.control_dir)
        xenbus = json.loads(client.stats(0))["xenbus"]
        guest.detach()
        result = guest.result(30)
    assert result.ok, result.summary()
    assert result.report.io.writes > 0 and result.report.io.mismatches == 0
    pg = xenbus["persistent"]
    assert pg["negotiated"] is negotiated
    assert (pg["maps"] > 0 and pg["hits"] > pg["maps"]) is negotiated


def test_the_linux_guest_spreads_its_io_over_every_queue_it_negotiated(
        system: Host, disk: Callable[..., VbdPaths]) -> None:
    """As Linux blkfront: min(4, multi-queue-max-queues, CPUs) queues, a ring each under
    queue-N/, every queue fed at once; the tapdisk's count of each queue (and their sum)
    is what the guest sent on that queue."""
    paths = disk(16)
    with start_guest(system, 16, DEVID, "linux", "randrw", hold=True,
                     extra=["--seconds", "0.3"]) as guest:
        guest.wait_for_step("holding")
        offered = int(backend_key(system, paths, "multi-queue-max-queues") or "1")
        queues = min(4, offered, os.sysconf("SC_NPROCESSORS_ONLN"))
        with system.xs() as xs:
            written = xs.read_optional(paths.frontend_key("multi-queue-num-queues"))
        pid = int(backend_key(system, paths, "kthread-pid") or 0)
        xenbus = json.loads(TapdiskClient(pid, root=system.control_dir).stats(0))["xenbus"]
        guest.detach()
        result = guest.result(30)
    assert result.ok, result.summary() + "\n" + result.timeline_text()
    if queues < 2:
        pytest.skip(f"{queues} queue here (one CPU, or tapback offers one)")
    assert written == str(queues)
    sent = [sum(p.queues[q] for c in result.report.cycles for p in c.phases)
            for q in range(queues)]
    assert all(n > 0 for n in sent), sent
    assert [q["reqs"] for q in xenbus["queues"]] == [[n, n] for n in sent]
    assert xenbus["reqs"] == [sum(sent), sum(sent)]
    assert sum(sent) == result.report.io.ios and result.report.io.mismatches == 0


def test_the_linux_guest_sends_indirect_requests_of_the_segments_it_negotiated(
        system: Host, disk: Callable[..., VbdPaths]) -> None:
    """Linux blkfront takes min(its max_indirect_segments, 32, and the back-end's
    feature-max-indirect-segments, 256): a 128 KiB block is one INDIRECT request of 32
    segments, and a 256 KiB one two; every byte verified through tapdisk."""
    disk(17)
    for bs, per_block in ((128 << 10, 1), (256 << 10, 2)):
        result = run_guest(system, 17, DEVID, "linux", "randrw", timeout=60,
                           extra=["--bs", str(bs), "--qd", "4", "--seconds", "0.2"])
        assert result.ok, result.summary() + "\n" + result.timeline_text()
        assert result.report.features["feature-max-indirect-segments"] == "256"
        assert "32 segments per indirect request" in result.timeline_text()
        phases = [p for c in result.report.cycles for p in c.phases]
        assert all(p.indirect == sum(p.queues) == per_block * p.ios > 0 for p in phases)
        assert result.report.io.mismatches == 0
