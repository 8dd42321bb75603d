"""Data through the real ring: guest driver (domU) -> C ring service (dom0) -> file."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.datapath.lineproc import LineProcess
from tests.support import wait_until

from .conftest import DISK_BYTES, GUEST_DOMID, connect

pytestmark = pytest.mark.integration
OKAY, ERROR, EOPNOTSUPP = 0, -1, -2


def stamp_block(sector: int, stamp: int) -> bytes:
    """What the guest driver writes into each sector in verify mode."""
    return struct.pack("<QQ", sector, stamp) * 32


@pytest.mark.parametrize("protocol", list(BlkifProtocol))
@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_written_data_reads_back_from_file_and_ring(
        host: LineProcess, guest: LineProcess, disk: Path, protocol: str, order: int) -> None:
    g = connect(host, guest, disk, order=order, protocol=protocol)
    assert g["slots"] == 32 << order
    data = os.urandom(44 * 1024)
    assert guest.call("write", sector=24, data=data.hex()) == OKAY
    assert disk.read_bytes()[24 * 512 : 24 * 512 + len(data)] == data
    back = guest.call("read", sector=24, count=88)
    assert back["status"] == OKAY and bytes.fromhex(back["data"]) == data
    # A whole ring's worth at once, every slot busy, checked by the guest on read.
    span = 8 * g["slots"] * 4
    w = guest.call("run", qd=g["slots"], bs=4096, read_pct=0, span=span, ios=span // 8,
                   verify=True, stamp=order + 1)
    r = guest.call("run", qd=g["slots"], bs=4096, read_pct=100, span=span, ios=span // 8,
                   verify=True, stamp=order + 1)
    for res in (w, r):
        assert (res["errors"], res["duplicates"], res["lost"], res["mismatches"]) == (0, 0, 0, 0)
    assert r["ios"] == span // 8
    content = disk.read_bytes()
    assert all(content[s * 512 : (s + 1) * 512] == stamp_block(s, order + 1)
               for s in range(span))
    st = host.call("stats", name="r")
    assert st["reqs"]["write"] == 1 + span // 8 and st["reqs"]["read"] == 1 + span // 8
    assert st["in_flight"] == 0 and st["halted"] is None


def test_flush_barrier_and_discard(host: LineProcess, guest: LineProcess, disk: Path) -> None:
    connect(host, guest, disk)
    grefs = guest.call("data_grefs", pages=1)
    guest.call("write", sector=0, data=(b"\x11" * 8192).hex())
    guest.call("submit", reqs=[{"op": 3}])  # FLUSH_DISKCACHE, no segments
    assert guest.call("collect", n=1) == [OKAY]
    # Barrier with data: the guest's page 0 still holds 0x11... from the write.
    guest.call("submit", reqs=[{"op": 2, "sector": 64, "segs": [[grefs[0], 0, 7]]}])
    assert guest.call("collect", n=1) == [OKAY]
    assert disk.read_bytes()[64 * 512 : 72 * 512] == b"\x11" * 4096
    guest.call("submit", reqs=[
        {"op": 5, "sector": 0, "nr_sectors": 8},  # discard 4 KiB: punch a hole
        {"op": 5, "sector": 64, "nr_sectors": 8, "flag": 1},  # secure: not served
    ])
    assert guest.call("collect", n=2) == [OKAY, EOPNOTSUPP]
    content = disk.read_bytes()
    assert content[:4096] == bytes(4096) and content[4096:8192] == b"\x11" * 4096
    assert content[64 * 512 : 72 * 512] == b"\x11" * 4096  # untouched
    st = host.call("stats", name="r")
    assert (st["reqs"]["flush"], st["reqs"]["barrier"], st["reqs"]["discard"]) == (1, 1, 2)
    assert {cause: n for cause, n in st["errors"].items() if n} == {"unsupported": 1}


def test_discard_withheld_by_the_back_end_is_eopnotsupp(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    host.call("open", name="r", driver="aio", path=str(disk), readonly=False)
    g = guest.call("open", backend=0, order=0, protocol=BlkifProtocol.NATIVE)
    host.call("connect", name="r", image="r", domid=GUEST_DOMID, devid=51712, grefs=g["grefs"],
              order=0, port=g["port"], protocol=BlkifProtocol.NATIVE, discard=False)
    guest.call("write", sector=0, data=(b"\x22" * 4096).hex())
    guest.call("submit", reqs=[{"op": 5, "sector": 0, "nr_sectors": 8}])
    assert guest.call("collect", n=1) == [EOPNOTSUPP]
    assert disk.read_bytes()[:4096] == b"\x22" * 4096  # the image could punch; it did not
    assert host.call("stats", name="r")["errors"]["unsupported"] == 1


def test_pause_under_load_loses_and_duplicates_nothing(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    g = connect(host, guest, disk, order=1)
    span = DISK_BYTES // 512
    total = 8 * span // 8  # the region written 8 times over, same stamp
    guest.send("run", qd=g["slots"], bs=4096, read_pct=0, span=span, ios=total,
               verify=True, stamp=77, timeout=30.0)
    # Start pausing only once the guest's writes are flowing.
    wait_until(lambda: host.call("stats", name="r")["responses"], 20,
               "the guest's first responses", interval=0.001)
    under_load = 0
    for _ in range(20):
        host.call("pause", name="r")
        st = host.call("stats", name="r")
        assert st["paused"] and st["in_flight"] == 0
        under_load += 0 < st["responses"] < total
        host.call("resume", name="r")
    res = guest.reply()
    assert under_load > 0, "no pause landed while the guest was writing"
    assert res["ios"] == total and res["writes"] == total
    assert (res["errors"], res["duplicates"], res["lost"]) == (0, 0, 0)
    st = host.call("stats", name="r")
    assert st["responses"] == total and st["reqs"]["write"] == total
    content = disk.read_bytes()
    assert all(content[s * 512 : (s + 1) * 512] == stamp_block(s, 77) for s in range(span))


def test_disconnect_with_requests_in_flight_completes_them(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    connect(host, guest, disk)
    grefs = guest.call("data_grefs", pages=32 * 11)
    reqs = [{"op": 1, "sector": i * 88,
             "segs": [[grefs[i * 11 + k], 0, 7] for k in range(11)]} for i in range(32)]
    guest.call("submit", reqs=reqs)
    host.call("disconnect", name="r")  # returns once every queued request is answered
    assert guest.call("collect", n=32, timeout=5.0) == [OKAY] * 32
    # The guest's pages hold zeroes, so check the writes by allocation: a hole reads as
    # zero too, but takes no blocks.
    assert os.stat(disk).st_blocks * 512 >= 32 * 88 * 512


def test_polling_mode_serves_the_same_requests_without_kicks(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    host.call("open", name="r", driver="aio", path=str(disk))
    g = guest.call("open", backend=0, order=0, protocol=BlkifProtocol.NATIVE)
    host.call("connect", name="r", image="r", domid=7, devid=51712, grefs=g["grefs"],
              order=0, port=g["port"], protocol=BlkifProtocol.NATIVE, poll_us=200)
    span = 8 * 256
    w = guest.call("run", qd=1, bs=4096, read_pct=0, span=span, ios=256, verify=True,
                   stamp=5, poll_us=200)
    r = guest.call("run", qd=1, bs=4096, read_pct=100, span=span, ios=256, verify=True,
                   stamp=5, poll_us=200)
    assert (w["errors"], r["errors"], r["mismatches"], r["ios"]) == (0, 0, 0, 256)
    st = host.call("stats", name="r")
    # While both sides spin, req_event/rsp_event stay behind: far fewer kicks than I/Os.
    assert st["kicks"]["in"] < st["responses"]
    # No polling-idle-threshold: it spins every time it would sleep, never held back.
    assert st["polling"]["polls"] > 0 and st["polling"]["busy"] == 0
    assert st["polling"]["idle_threshold"] == 0


def test_polling_idle_threshold_reaches_the_ring_and_is_bounded(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    host.call("open", name="r", driver="aio", path=str(disk))
    g = guest.call("open", backend=0, order=0, protocol=BlkifProtocol.NATIVE)
    kwargs = dict(name="r", image="r", domid=7, devid=51712, grefs=g["grefs"], order=0,
                  port=g["port"], protocol=BlkifProtocol.NATIVE, poll_us=200)
    with pytest.raises(OSError) as info:
        host.call("connect", **kwargs, poll_idle_threshold=101)  # a percentage
    assert info.value.errno == 22
    host.call("connect", **kwargs, poll_idle_threshold=50)
    r = guest.call("run", qd=1, bs=4096, read_pct=100, span=8 * 64, ios=64, poll_us=200)
    assert (r["errors"], r["ios"]) == (0, 64)
    st = host.call("stats", name="r")["polling"]
    # Each time it would sleep, the monitor's verdict decided: spin or not, counted.
    assert st["idle_threshold"] == 50 and st["polls"] + st["busy"] > 0


@contextlib.contextmanager
def busy_host() -> Iterator[None]:
    """Every CPU busy, as /proc/stat counts it: a spinning process per CPU, at nice 19
    (nice time is not idle time, and the other processes of the machine still come
    first)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                             preexec_fn=lambda: os.nice(19))
            for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_a_busy_host_stops_the_spin_and_a_zero_threshold_spins_anyway(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    # blktap's rule: poll only while polling-idle-threshold % of all CPU time was idle
    # over the last interval (100 ms). With every CPU busy, a ring asking for 50 % idle
    # never spins, however long it runs: each time it would, the spin is skipped and
    # counted; the same host, the same ring with no threshold spins every time.
    host.call("open", name="r", driver="aio", path=str(disk))
    g = guest.call("open", backend=0, order=0, protocol=BlkifProtocol.NATIVE)
    kwargs = dict(name="r", image="r", domid=GUEST_DOMID, devid=51712, grefs=g["grefs"],
                  order=0, port=g["port"], protocol=BlkifProtocol.NATIVE, poll_us=200)
    with busy_host():
        figures = {}
        for threshold in (50, 0):
            host.call("connect", **kwargs, poll_idle_threshold=threshold)
            # Past several intervals of the CPU monitor: its verdict came, more than once.
            r = guest.call("run", qd=1, bs=4096, read_pct=100, span=8 * 64, duration=0.5)
            assert r["errors"] == r["lost"] == 0 and r["ios"] > 0
            figures[threshold] = host.call("stats", name="r")["polling"]
            host.call("disconnect", name="r")
    assert figures[50]["polls"] == 0 and figures[50]["busy"] > 0, figures
    assert figures[0]["polls"] > 0 and figures[0]["busy"] == 0, figures


@pytest.mark.parametrize("engine", ["uring", "sync"])
def test_both_ways_of_sleeping_serve_a_mixed_workload(
        host: LineProcess, guest: LineProcess, disk: Path, engine: str) -> None:
    """io_uring: the thread sleeps inside io_uring (watches on the event channel and the
    control eventfd); the sync engine: in poll(). Both answer every request, take kicks
    and wake up for pause/resume."""
    host.call("open", name="r", driver="aio", path=str(disk))
    g = guest.call("open", backend=0, order=0, protocol=BlkifProtocol.NATIVE)
    host.call("connect", name="r", image="r", domid=7, devid=51712, grefs=g["grefs"],
              order=0, port=g["port"], protocol=BlkifProtocol.NATIVE, engine=engine)
    span = 8 * 512
    w = guest.call("run", qd=1, bs=4096, read_pct=0, span=span, ios=512, verify=True,
                   stamp=9)
    host.call("pause", name="r")
    host.call("resume", name="r")
    r = guest.call("run", qd=g["slots"], bs=4096, read_pct=70, span=span, ios=2048,
                   verify=True, stamp=9, random=True)
    for res in (w, r):
        assert (res["errors"], res["duplicates"], res["lost"], res["mismatches"]) == (0, 0, 0, 0)
    st = host.call("stats", name="r")
    assert st["engine"] == engine and st["responses"] == 512 + 2048
    # The thread slept between requests and was kicked awake (a kick it missed would
    # have shown as lost requests above).
    assert st["kicks"]["in"] > 0 and st["in_flight"] == 0
