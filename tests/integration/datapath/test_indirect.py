"""Indirect requests (BLKIF_OP_INDIRECT) through the real ring: guest driver (domU) ->
C ring service (dom0) -> file; every lie about them answered ERROR and counted."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.datapath.lineproc import LineProcess

from .conftest import DISK_BYTES, GUEST_DOMID

pytestmark = pytest.mark.integration
OKAY, ERROR, EOPNOTSUPP = 0, -1, -2
READ, WRITE, BARRIER, FLUSH, DISCARD, INDIRECT = 0, 1, 2, 3, 5, 6
SECTORS = DISK_BYTES // 512
MiB = 1 << 20
NOT_GRANTED = 0x7FFF0       # past the grant table
NEVER_GRANTED = 8000        # inside it, but no entry there
OFFER = 256                 # blkback's feature-max-indirect-segments


def connect(host: LineProcess, guest: LineProcess, disk: Path, *, offer: int = OFFER,
            protocol: BlkifProtocol = BlkifProtocol.NATIVE, order: int = 0,
            readonly: bool = False, data_slots: int = 4, slot_pages: int = 256,
            max_segs: int = OFFER) -> dict[str, Any]:
    """The image in the host, a guest ring with room for 1 MiB blocks, connected with
    `offer` segments per indirect request (what the back-end advertised)."""
    host.call("open", name="r", driver="aio", path=str(disk), readonly=readonly)
    g: dict[str, Any] = guest.call("open", backend=0, order=order, protocol=protocol,
                                   data_slots=data_slots, slot_pages=slot_pages,
                                   max_segs=max_segs)
    host.call("connect", name="r", image="r", domid=GUEST_DOMID, devid=51712,
              grefs=g["grefs"], order=order, port=g["port"], protocol=protocol,
              max_indirect_segments=offer)
    return g


def segs(grefs: list[int], n: int, first: int = 0, last: int = 7) -> list[list[int]]:
    return [[grefs[i % len(grefs)], first, last] for i in range(n)]


def no_errors(res: dict[str, Any]) -> bool:
    keys = ("errors", "duplicates", "lost", "mismatches", "bad_ops")
    return all(res[k] == 0 for k in keys)


@pytest.mark.parametrize("protocol", list(BlkifProtocol))
def test_1mib_writes_and_reads_are_byte_exact_in_every_layout(
        host: LineProcess, guest: LineProcess, disk: Path, protocol: BlkifProtocol) -> None:
    connect(host, guest, disk, protocol=protocol)
    data = os.urandom(MiB)
    # Not 1 MiB aligned on the disk: the segments are contiguous sectors from 24 on.
    assert guest.call("write", sector=24, data=data.hex()) == OKAY
    assert guest.call("raw_ops", n=1) == [WRITE]  # answered with indirect_op, as blkback
    assert disk.read_bytes()[24 * 512 : 24 * 512 + MiB] == data
    back = guest.call("read", sector=24, count=MiB // 512)
    assert back["status"] == OKAY and bytes.fromhex(back["data"]) == data
    assert guest.call("raw_ops", n=1) == [READ]
    st = host.call("stats", name="r")
    assert st["reqs"]["indirect"] == 2 and st["reqs"]["read"] == st["reqs"]["write"] == 0
    assert st["indirect"] == {"read": 1, "write": 1, "pages": 2, "max_segments": OFFER,
                              "buffers": 32}
    assert st["segments"] == 2 * 256
    assert st["sectors"] == {"read": 2048, "written": 2048}
    assert sum(st["errors"].values()) == 0 and st["in_flight"] == 0


@pytest.mark.parametrize(("max_segs", "requests_per_block"), [(256, 1), (32, 8), (11, 24)])
def test_blocks_split_into_requests_as_blkfront_does(
        host: LineProcess, guest: LineProcess, disk: Path, max_segs: int,
        requests_per_block: int) -> None:
    """1 MiB blocks at the offer (one INDIRECT each), at Linux blkfront's default 32
    segments (8 INDIRECT each), and without indirect (24 direct requests, 11 pages
    each), written then read back and checked by the guest, stamped per sector."""
    connect(host, guest, disk, data_slots=1)
    span = 8 * MiB // 512
    blocks = span // 2048
    w = guest.call("run", qd=1, bs=MiB, max_segs=max_segs, read_pct=0, span=span, ios=blocks,
                   verify=True, stamp=max_segs)
    r = guest.call("run", qd=1, bs=MiB, max_segs=max_segs, read_pct=100, span=span,
                   ios=blocks, verify=True, stamp=max_segs)
    for res in (w, r):
        assert no_errors(res) and res["ios"] == blocks
        assert res["requests"] == blocks * requests_per_block
        assert res["indirect"] == (0 if max_segs == 11 else res["requests"])
    st = host.call("stats", name="r")
    assert st["reqs"]["indirect"] == (0 if max_segs == 11 else 2 * blocks * requests_per_block)
    assert st["sectors"] == {"read": span, "written": span}


def test_indirect_buffers_bound_memory_and_requests_wait_for_one(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    """Offering 4096 segments (16 MiB a request) leaves room for 2 indirect requests in
    flight; a guest with 8 blocks of 1 MiB in flight waits, nothing is lost."""
    connect(host, guest, disk, offer=4096, order=1, data_slots=8)
    span = 16 * MiB // 512
    w = guest.call("run", qd=8, bs=MiB, read_pct=0, span=span, ios=64, verify=True, stamp=4)
    r = guest.call("run", qd=8, bs=MiB, read_pct=100, span=span, ios=64, verify=True,
                   stamp=4, random=True)
    assert no_errors(w) and no_errors(r) and w["ios"] == r["ios"] == 64
    st = host.call("stats", name="r")
    assert st["indirect"]["buffers"] == 2 and st["indirect"]["max_segments"] == 4096
    assert st["responses"] == 128 and st["in_flight"] == 0


def test_segments_of_partial_pages_are_packed_back_to_back(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    connect(host, guest, disk)
    grefs = guest.call("data_grefs", pages=20)
    pages = [os.urandom(4096) for _ in range(20)]
    guest.call("write", sector=0, data=b"".join(pages).hex())  # fills the guest's pages
    # 20 segments, sectors 1..6 of each page: 60 KiB from sector 4096 on.
    guest.call("submit", reqs=[{"op": INDIRECT, "indirect_op": WRITE, "sector": 4096,
                                "segs": segs(grefs, 20, 1, 6)}])
    assert guest.call("collect", n=1) == [OKAY]
    want = b"".join(p[512 : 7 * 512] for p in pages)
    assert disk.read_bytes()[4096 * 512 : 4096 * 512 + len(want)] == want


def hostile(grefs: list[int], own: list[int]) -> list[tuple[str, dict[str, Any], int]]:
    """(cause, request, status) for every lie about an indirect request; `own`: the
    indirect pages of the first request's ring slot."""
    good = segs(grefs, 16)
    return [
        # Only the pages the segments need are read: the other 7 grefs are not looked at.
        (None, {"op": INDIRECT, "indirect_op": WRITE, "segs": good,
                "indirect_grefs": [own[0], NOT_GRANTED, 1, 2, 3, 4, 5, 6]}, OKAY),
        ("indirect_op", {"op": INDIRECT, "indirect_op": BARRIER, "segs": good}, ERROR),
        ("indirect_op", {"op": INDIRECT, "indirect_op": FLUSH, "segs": good}, ERROR),
        ("indirect_op", {"op": INDIRECT, "indirect_op": DISCARD, "segs": good}, ERROR),
        ("indirect_op", {"op": INDIRECT, "indirect_op": INDIRECT, "segs": good}, ERROR),
        ("indirect_op", {"op": INDIRECT, "indirect_op": 200, "segs": good}, ERROR),
        ("indirect_segments", {"op": INDIRECT, "indirect_op": READ, "segs": []}, ERROR),
        ("indirect_segments",
         {"op": INDIRECT, "indirect_op": WRITE, "segs": segs(grefs, OFFER + 1)}, ERROR),
        ("indirect_segments",
         {"op": INDIRECT, "indirect_op": READ, "segs": good, "nr_segments": 0xFFFF}, ERROR),
        ("indirect_grant", {"op": INDIRECT, "indirect_op": WRITE, "segs": good,
                            "indirect_grefs": [NOT_GRANTED]}, ERROR),
        ("indirect_grant", {"op": INDIRECT, "indirect_op": READ, "segs": good,
                            "indirect_grefs": [NEVER_GRANTED]}, ERROR),
        ("sector", {"op": INDIRECT, "indirect_op": WRITE,
                    "segs": [*good[:15], [grefs[0], 0, 8]]}, ERROR),
        ("sector", {"op": INDIRECT, "indirect_op": READ,
                    "segs": [[grefs[0], 5, 4], *good]}, ERROR),
        ("range", {"op": INDIRECT, "indirect_op": READ, "sector": SECTORS - 127,
                   "segs": good}, ERROR),
        ("grant", {"op": INDIRECT, "indirect_op": WRITE,
                   "segs": [*good[:8], [NOT_GRANTED, 0, 7], *good[8:]]}, ERROR),
        ("grant", {"op": INDIRECT, "indirect_op": READ,
                   "segs": [*good, [NEVER_GRANTED, 0, 7]]}, ERROR),
        (None, {"op": INDIRECT, "indirect_op": READ, "sector": SECTORS - 128,
                "segs": good}, OKAY),
    ]


@pytest.mark.parametrize("protocol", list(BlkifProtocol))
def test_each_lie_about_an_indirect_request_is_an_error_counted_by_cause(
        host: LineProcess, guest: LineProcess, disk: Path, protocol: BlkifProtocol) -> None:
    # The guest can put more segments in its pages than offered: it lies about that too.
    connect(host, guest, disk, protocol=protocol, max_segs=OFFER + 1)
    grefs = guest.call("data_grefs", pages=16)
    # Raw request i writes its segments in ring request slot i's own indirect pages.
    cases = hostile(grefs, guest.call("indirect_grefs", slot=0))
    guest.call("submit", reqs=[spec for _, spec, _ in cases])
    assert guest.call("collect", n=len(cases)) == [want for _, _, want in cases]
    # blkback answers with the request's indirect_op, whatever it was.
    assert guest.call("raw_ops", n=len(cases)) == [spec["indirect_op"] for _, spec, _ in cases]
    st = host.call("stats", name="r")
    for cause in {c for c, _, _ in cases if c}:
        assert st["errors"][cause] == sum(1 for c, _, _ in cases if c == cause), cause
    assert sum(st["errors"].values()) == sum(1 for c, _, _ in cases if c)
    assert st["halted"] is None and st["in_flight"] == 0
    # The ring goes on.
    data = os.urandom(MiB)
    assert guest.call("write", sector=0, data=data.hex()) == OKAY
    assert disk.read_bytes()[:MiB] == data


def test_indirect_is_not_served_when_not_offered(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    connect(host, guest, disk, offer=0)
    grefs = guest.call("data_grefs", pages=12)
    guest.call("submit", reqs=[{"op": INDIRECT, "indirect_op": WRITE, "segs": segs(grefs, 12)}])
    assert guest.call("collect", n=1) == [EOPNOTSUPP]
    st = host.call("stats", name="r")
    assert st["errors"]["unsupported"] == 1 and st["indirect"]["max_segments"] == 0
    assert st["indirect"]["buffers"] == 0 and st["sectors"]["written"] == 0


def test_a_readonly_vbd_refuses_indirect_writes_and_serves_reads(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    disk.write_bytes(os.urandom(DISK_BYTES))
    before = disk.read_bytes()
    connect(host, guest, disk, readonly=True)
    assert guest.call("write", sector=0, data=bytes(MiB).hex()) == ERROR
    back = guest.call("read", sector=2048, count=2048)
    assert back["status"] == OKAY and bytes.fromhex(back["data"]) == before[MiB : 2 * MiB]
    st = host.call("stats", name="r")
    assert st["errors"]["readonly"] == 1 and st["indirect"] == {
        "read": 1, "write": 1, "pages": 2, "max_segments": OFFER, "buffers": 32}
    assert disk.read_bytes() == before


def test_two_indirect_pages_and_the_second_one_checked_too(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    """Offering 1024 segments: past 512 a request spans two indirect pages; a bad second
    page matters exactly when the segments reach it."""
    connect(host, guest, disk, offer=1024, max_segs=1024, data_slots=1, slot_pages=16)
    grefs = guest.call("data_grefs", pages=16)
    pages = [os.urandom(4096) for _ in range(16)]
    guest.call("write", sector=0, data=b"".join(pages).hex())
    own = guest.call("indirect_grefs", slot=2)
    assert len(own) == 2
    cases = [
        # 600 segments over 16 pages, round robin: 2.34 MiB from one guest page set.
        ({"op": INDIRECT, "indirect_op": WRITE, "sector": 8192, "segs": segs(grefs, 600)},
         OKAY),
        ({"op": INDIRECT, "indirect_op": READ, "segs": segs(grefs, 600),
          "indirect_grefs": [own[0], NOT_GRANTED]}, ERROR),
        ({"op": INDIRECT, "indirect_op": READ, "segs": segs(grefs, 512),
          "indirect_grefs": [own[0], NOT_GRANTED]}, OKAY),
        ({"op": INDIRECT, "indirect_op": READ, "segs": segs(grefs, 513),
          "indirect_grefs": [own[0], NEVER_GRANTED]}, ERROR),
    ]
    # Request i writes its segments in slot i's pages; cases 1 and 3 name slot 2's first
    # page (case 2's segments) and a bad second one, case 2 its own and a bad unused one.
    guest.call("submit", reqs=[spec for spec, _ in cases])
    assert guest.call("collect", n=len(cases)) == [want for _, want in cases]
    content = disk.read_bytes()[8192 * 512 : 8192 * 512 + 600 * 4096]
    assert content == b"".join(pages[i % 16] for i in range(600))
    st = host.call("stats", name="r")
    # Pages copied: the guest's 16-page write (1), cases 0 (2) and 2 (1); none of a
    # request whose copy failed counts.
    assert st["errors"]["indirect_grant"] == 2 and st["indirect"]["pages"] == 1 + 2 + 1


def test_disconnect_answers_indirect_requests_in_flight(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    connect(host, guest, disk, data_slots=8)
    grefs = guest.call("data_grefs", pages=8 * 256)
    reqs = [{"op": INDIRECT, "indirect_op": WRITE, "sector": i * 2048,
             "segs": segs(grefs[i * 256 : (i + 1) * 256], 256)} for i in range(8)]
    guest.call("submit", reqs=reqs)
    host.call("disconnect", name="r")  # returns once every queued request is answered
    assert guest.call("collect", n=8, timeout=5.0) == [OKAY] * 8
    assert os.stat(disk).st_blocks * 512 >= 8 * MiB
