"""Request checks on a private copy, on rings in local memory, in the three layouts."""

from __future__ import annotations

import pytest

from blktap3.datapath._datapath import ffi, lib

LAYOUTS = {
    lib.TD_PROTO_NATIVE: ("struct blkif_request", "struct blkif_request_discard"),
    lib.TD_PROTO_X86_32: ("struct blkif_x86_32_request", "struct blkif_x86_32_request_discard"),
    lib.TD_PROTO_X86_64: ("struct blkif_x86_64_request", "struct blkif_x86_64_request_discard"),
}
DEV_SECTORS = 2048
ERR = {"ok": 0, "op": 1, "segments": 2, "sector": 3, "range": 4, "readonly": 5,
       "unsupported": 8}
Segs = list[tuple[int, int, int]]


def test_x86_32_layout_packs_id_on_4_bytes_and_x86_64_on_8() -> None:
    assert ffi.sizeof("struct blkif_x86_32_request") == 108
    assert ffi.offsetof("struct blkif_x86_32_request", "id") == 4
    assert ffi.sizeof("struct blkif_x86_64_request") == 112
    assert ffi.offsetof("struct blkif_x86_64_request", "id") == 8
    assert ffi.sizeof("struct blkif_x86_32_response") == 12
    assert ffi.sizeof("struct blkif_x86_64_response") == 16
    # On x86-64 the native layout is the 64-bit one.
    assert ffi.sizeof("struct blkif_request") == ffi.sizeof("struct blkif_x86_64_request")


def _request(proto: int, op: int, sector: int, segs: Segs, nr_segments: int | None = None
             ) -> object:
    req = ffi.new(LAYOUTS[proto][0] + " *")
    req.operation = op
    req.nr_segments = len(segs) if nr_segments is None else nr_segments
    req.id = 0xDEADBEEF00000000 | proto
    req.sector_number = sector
    for i, (gref, first, last) in enumerate(segs):
        req.seg[i].gref, req.seg[i].first_sect, req.seg[i].last_sect = gref, first, last
    return req


def _check(proto: int, req: object, *, readonly: bool = False, discard: bool = True
           ) -> tuple[int, object]:
    priv = ffi.new("struct td_req *")
    lib.td_req_fetch(proto, req, priv)
    return lib.td_req_check(priv, DEV_SECTORS, int(readonly), int(discard), 0), priv


@pytest.mark.parametrize("proto", list(LAYOUTS))
def test_fetch_reads_each_layout_into_the_same_private_request(proto: int) -> None:
    req = _request(proto, lib.BLKIF_OP_WRITE, 100, [(7, 0, 7), (9, 2, 3)])
    err, priv = _check(proto, req)
    p: object = priv
    assert err == ERR["ok"]
    assert (p.operation, p.nr_segments, p.sector_number) == (1, 2, 100)  # type: ignore[attr-defined]
    assert p.id == 0xDEADBEEF00000000 | proto  # type: ignore[attr-defined]
    assert p.nr_sectors == 8 + 2  # type: ignore[attr-defined]
    seg = p.seg[1]  # type: ignore[attr-defined]
    assert (seg.gref, seg.first_sect, seg.last_sect) == (9, 2, 3)


@pytest.mark.parametrize("proto", list(LAYOUTS))
@pytest.mark.parametrize(
    ("op", "sector", "segs", "nseg", "readonly", "cause"),
    [
        (9, 0, [(1, 0, 7)], None, False, "op"),
        (4, 0, [(1, 0, 7)], None, False, "op"),
        (lib.BLKIF_OP_READ, 0, [], 0, False, "segments"),
        (lib.BLKIF_OP_WRITE, 0, [(1, 0, 7)] * 11, 12, False, "segments"),
        (lib.BLKIF_OP_WRITE, 0, [(1, 0, 7)] * 11, 255, False, "segments"),
        (lib.BLKIF_OP_READ, 0, [(1, 5, 4)], None, False, "sector"),
        (lib.BLKIF_OP_READ, 0, [(1, 0, 8)], None, False, "sector"),
        (lib.BLKIF_OP_READ, DEV_SECTORS - 7, [(1, 0, 7)], None, False, "range"),
        (lib.BLKIF_OP_READ, 2**64 - 4, [(1, 0, 7)], None, False, "range"),
        (lib.BLKIF_OP_WRITE, 0, [(1, 0, 7)], None, True, "readonly"),
        (lib.BLKIF_OP_WRITE_BARRIER, 0, [], None, True, "readonly"),
        (lib.BLKIF_OP_INDIRECT, 0, [], None, False, "unsupported"),
        (lib.BLKIF_OP_READ, DEV_SECTORS - 8, [(1, 0, 7)], None, True, "ok"),
        (lib.BLKIF_OP_WRITE_BARRIER, 0, [], None, False, "ok"),
        (lib.BLKIF_OP_FLUSH_DISKCACHE, 0, [], None, True, "ok"),
        (lib.BLKIF_OP_FLUSH_DISKCACHE, 0, [(1, 0, 7)], None, False, "segments"),
    ],
)
def test_check_refuses_what_blkback_refuses(proto: int, op: int, sector: int, segs: Segs,
                                            nseg: int | None, readonly: bool,
                                            cause: str) -> None:
    err, _ = _check(proto, _request(proto, op, sector, segs, nseg), readonly=readonly)
    assert err == ERR[cause]


@pytest.mark.parametrize("proto", list(LAYOUTS))
def test_discard_range_readonly_and_support(proto: int) -> None:
    # A ring slot is always a whole request: the discard view lies over one.
    slot = ffi.new(LAYOUTS[proto][0] + " *")
    req = ffi.cast(LAYOUTS[proto][1] + " *", slot)
    req.operation, req.sector_number, req.nr_sectors = lib.BLKIF_OP_DISCARD, 8, 16
    assert _check(proto, slot)[0] == ERR["ok"]
    assert _check(proto, slot, discard=False)[0] == ERR["unsupported"]
    assert _check(proto, slot, readonly=True)[0] == ERR["readonly"]
    req.nr_sectors = DEV_SECTORS
    assert _check(proto, slot)[0] == ERR["range"]


@pytest.mark.parametrize("proto", list(LAYOUTS))
def test_fetch_copies_the_slot_so_later_guest_writes_change_nothing(proto: int) -> None:
    req: object = _request(proto, lib.BLKIF_OP_READ, 0, [(1, 0, 7)])
    priv = ffi.new("struct td_req *")
    lib.td_req_fetch(proto, req, priv)
    req.nr_segments = 200  # type: ignore[attr-defined]  # the guest rewrites the slot
    req.seg[0].last_sect = 9  # type: ignore[attr-defined]
    assert lib.td_req_check(priv, DEV_SECTORS, 0, 1, 0) == ERR["ok"]


@pytest.mark.parametrize("proto", list(LAYOUTS))
def test_responses_go_field_by_field_into_the_slot_of_their_index(proto: int) -> None:
    sring = ffi.new("char[]", 4096)
    ffi.memmove(sring, b"\xaa" * 4096, 4096)
    lib.td_ring_put_rsp(proto, sring, 1, 32 + 3, 0x1122334455667788, 1, -1)
    rsp_t = {lib.TD_PROTO_X86_32: "struct blkif_x86_32_response"}.get(
        proto, "struct blkif_x86_64_response")
    rsp = ffi.cast(rsp_t + " *", lib.td_ring_req_slot(proto, sring, 1, 3))
    assert (rsp.id, rsp.operation, rsp.status) == (0x1122334455667788, 1, -1)
    # Index 35 wraps to slot 3 of a 32-slot page; slot 2 was not touched.
    assert ffi.buffer(lib.td_ring_req_slot(proto, sring, 1, 2), 8)[:] == b"\xaa" * 8


# ---- indirect requests (BLKIF_OP_INDIRECT) ----

INDIRECT_LAYOUTS = {
    lib.TD_PROTO_NATIVE: "struct blkif_request_indirect",
    lib.TD_PROTO_X86_32: "struct blkif_x86_32_request_indirect",
    lib.TD_PROTO_X86_64: "struct blkif_x86_64_request_indirect",
}
IND_ERR = {"indirect_op": 10, "indirect_segments": 11}


@pytest.mark.parametrize(("proto", "offsets"), [
    # nr_segments, id, sector_number, handle, indirect_grefs, size: Linux's common.h
    (lib.TD_PROTO_X86_32, (2, 4, 12, 20, 24, 64)),
    (lib.TD_PROTO_X86_64, (2, 8, 16, 24, 28, 64)),
])
def test_indirect_layouts_are_blkbacks(proto: int, offsets: tuple[int, ...]) -> None:
    t = INDIRECT_LAYOUTS[proto]
    fields = ("nr_segments", "id", "sector_number", "handle", "indirect_grefs")
    assert (*(ffi.offsetof(t, f) for f in fields), ffi.sizeof(t)) == offsets
    assert ffi.offsetof(t, "indirect_op") == 1
    # Native on x86-64 is the 64-bit layout, from Xen's own header.
    native = INDIRECT_LAYOUTS[lib.TD_PROTO_NATIVE]
    if proto == lib.TD_PROTO_X86_64:
        assert [ffi.offsetof(native, f) for f in fields] == list(offsets[:5])


def _indirect(proto: int, indirect_op: int, nseg: int, sector: int = 64) -> object:
    # A ring slot is a whole request: the indirect view lies over one.
    slot = ffi.new(LAYOUTS[proto][0] + " *")
    req = ffi.cast(INDIRECT_LAYOUTS[proto] + " *", slot)
    req.operation, req.indirect_op, req.nr_segments = lib.BLKIF_OP_INDIRECT, indirect_op, nseg
    req.id, req.sector_number, req.handle = 0xFEEDFACE00000000 | proto, sector, 0x1234
    for i in range(8):
        req.indirect_grefs[i] = 100 + i
    return slot


@pytest.mark.parametrize("proto", list(LAYOUTS))
def test_fetch_reads_an_indirect_request_of_each_layout(proto: int) -> None:
    priv = ffi.new("struct td_req *")
    lib.td_req_fetch(proto, _indirect(proto, lib.BLKIF_OP_WRITE, 300), priv)
    assert (priv.operation, priv.indirect_op, priv.nr_segments) == (6, 1, 300)
    assert (priv.id, priv.sector_number, priv.handle) == (0xFEEDFACE00000000 | proto, 64, 0x1234)
    assert list(priv.indirect_grefs) == [100 + i for i in range(8)]
    assert lib.td_rsp_operation(priv) == lib.BLKIF_OP_WRITE  # blkback answers indirect_op


@pytest.mark.parametrize("proto", list(LAYOUTS))
@pytest.mark.parametrize(("indirect_op", "nseg", "offered", "cause"), [
    (lib.BLKIF_OP_READ, 12, 0, "unsupported"),        # not offered: EOPNOTSUPP
    (lib.BLKIF_OP_WRITE_BARRIER, 1, 256, "indirect_op"),
    (lib.BLKIF_OP_FLUSH_DISKCACHE, 1, 256, "indirect_op"),
    (lib.BLKIF_OP_DISCARD, 1, 256, "indirect_op"),
    (lib.BLKIF_OP_INDIRECT, 1, 256, "indirect_op"),
    (200, 1, 256, "indirect_op"),
    (lib.BLKIF_OP_READ, 0, 256, "indirect_segments"),
    (lib.BLKIF_OP_WRITE, 257, 256, "indirect_segments"),
    (lib.BLKIF_OP_READ, 4097, 4096, "indirect_segments"),
    (lib.BLKIF_OP_READ, 65535, 65535, "indirect_segments"),  # never past 8 pages
    (lib.BLKIF_OP_READ, 256, 256, "ok"),
    (lib.BLKIF_OP_WRITE, 1, 256, "ok"),
    (lib.BLKIF_OP_WRITE, 4096, 4096, "ok"),
])
def test_indirect_header_is_checked_before_any_page_is_read(
        proto: int, indirect_op: int, nseg: int, offered: int, cause: str) -> None:
    priv = ffi.new("struct td_req *")
    lib.td_req_fetch(proto, _indirect(proto, indirect_op, nseg), priv)
    err = lib.td_req_check(priv, DEV_SECTORS, 0, 1, offered)
    assert err == {**ERR, **IND_ERR}[cause]


def _segs_check(segs: Segs, *, op: int = lib.BLKIF_OP_WRITE, sector: int = 64,
                readonly: bool = False) -> tuple[int, object]:
    priv = ffi.new("struct td_req *")
    lib.td_req_fetch(lib.TD_PROTO_NATIVE, _indirect(lib.TD_PROTO_NATIVE, op, len(segs), sector),
                     priv)
    assert lib.td_req_check(priv, DEV_SECTORS, int(readonly), 1, 256) == 0
    private = ffi.new("struct td_seg[]", len(segs))
    for i, (gref, first, last) in enumerate(segs):
        private[i].gref, private[i].first_sect, private[i].last_sect = gref, first, last
    return lib.td_req_check_segs(priv, private, DEV_SECTORS, int(readonly)), priv


@pytest.mark.parametrize(("segs", "op", "sector", "readonly", "cause"), [
    ([(1, 0, 7)] * 200 + [(1, 0, 8)], lib.BLKIF_OP_WRITE, 0, False, "sector"),
    ([(1, 0, 7)] * 30 + [(1, 5, 4)], lib.BLKIF_OP_READ, 0, False, "sector"),
    ([(1, 0, 7)] * 256, lib.BLKIF_OP_READ, DEV_SECTORS - 2047, False, "range"),
    ([(1, 0, 7)] * 256, lib.BLKIF_OP_READ, DEV_SECTORS - 2048, True, "ok"),
    ([(1, 0, 7)] * 12, lib.BLKIF_OP_WRITE, 0, True, "readonly"),
    ([(1, 0, 7)] * 200 + [(1, 0, 8)], lib.BLKIF_OP_WRITE, 0, True, "sector"),  # blkback's order
    ([(1, 0, 7)] * 12, lib.BLKIF_OP_READ, 2**64 - 8, False, "range"),
])
def test_every_indirect_segment_is_checked_as_a_direct_one(
        segs: Segs, op: int, sector: int, readonly: bool, cause: str) -> None:
    err, _ = _segs_check(segs, op=op, sector=sector, readonly=readonly)
    assert err == ERR[cause]


def test_indirect_sectors_are_the_sum_of_its_segments() -> None:
    err, priv = _segs_check([(1, 0, 7)] * 100 + [(2, 3, 5), (3, 7, 7)])
    assert err == 0 and priv.nr_sectors == 800 + 3 + 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(("sector", "segs", "sector_size", "want"), [
    (8, [(1, 0, 7)], 4096, "ok"),                     # a whole 4 KiB block
    (8, [(1, 0, 7), (2, 0, 7)], 4096, "ok"),
    (1, [(1, 0, 7)], 4096, "sector"),                 # starts inside a block
    (8, [(1, 0, 3)], 4096, "sector"),                 # half a block
    (8, [(1, 0, 7), (2, 0, 0)], 4096, "sector"),      # its last segment is not whole
    (2, [(1, 0, 1)], 1024, "ok"),
    (3, [(1, 0, 0)], 512, "ok"),                      # 512: everything aligns
    (3, [(1, 0, 0)], 3000, "ok"),                     # not a power of two: no alignment
])
def test_sector_size_is_alignment_only(sector: int, segs: Segs, sector_size: int,
                                       want: str) -> None:
    # blkif.h: sector_number and the segments stay 512-byte units; `sector-size` says
    # what a request must align to (blkback's "Misaligned I/O request").
    err, priv = _check(lib.TD_PROTO_NATIVE, _request(lib.TD_PROTO_NATIVE, 0, sector, segs))
    assert err == ERR["ok"]
    p: object = priv
    assert lib.td_req_check_align(priv, p.seg, sector_size) == ERR[want]  # type: ignore[attr-defined]


def test_a_flush_carries_no_data_to_align() -> None:
    err, priv = _check(lib.TD_PROTO_NATIVE, _request(lib.TD_PROTO_NATIVE, 3, 5, []))
    p: object = priv
    assert err == ERR["ok"] and lib.td_req_check_align(priv, p.seg, 4096) == ERR["ok"]  # type: ignore[attr-defined]


def _times(total: int, idle: int) -> object:
    t = ffi.new("struct td_cpu_times *")
    t.total, t.idle = total, idle
    return t


@pytest.mark.parametrize(("before", "after", "pct"), [
    ((1000, 400), (2000, 1150), 75),    # 750 of 1000 jiffies idle
    ((1000, 400), (2000, 400), 0),      # fully busy: polling would hurt
    ((1000, 400), (1100, 500), 100),
    ((1000, 400), (1000, 400), -1),     # no time passed: unknown
    ((1000, 400), (900, 300), -1),      # counters went back: unknown
    ((1000, 400), (1100, 600), -1),     # more idle than time: nonsense
])
def test_cpu_idle_share_between_two_readings(before: tuple[int, int], after: tuple[int, int],
                                             pct: int) -> None:
    assert lib.td_cpu_idle_pct(_times(*before), _times(*after)) == pct


def test_cpu_times_come_from_proc_stat() -> None:
    t = ffi.new("struct td_cpu_times *")
    assert lib.td_cpu_read(t) == 0
    assert t.total > 0 and t.idle <= t.total
