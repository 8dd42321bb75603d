"""Hostile ring input against the C checks: fuzzed slots, ring indices, sizes near 2**64.

The fuzz feeds random bytes as a request slot of each layout through the same
fetch + check the ring service runs, and compares the verdict with a model of
Linux blkback's checks written here from blkif.h (not from checks.c). Indirect requests
get the same: a random slot and random indirect-page contents, checked in the ring's
order (header, the private copy of the indirect pages, every segment).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blktap3.datapath._datapath import ffi, lib

OK, ERR_OP, ERR_NSEG, ERR_SECT, ERR_RANGE, ERR_READONLY, ERR_UNSUPPORTED = 0, 1, 2, 3, 4, 5, 8
ERR_INDIRECT_OP, ERR_INDIRECT_NSEG = 10, 11
READ, WRITE, BARRIER, FLUSH, DISCARD, INDIRECT = 0, 1, 2, 3, 5, 6
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1

# Offsets of each layout: (size, id, sector_number, first segment / discard nr_sectors).
LAYOUT = {
    lib.TD_PROTO_NATIVE: (112, 8, 16, 24),
    lib.TD_PROTO_X86_64: (112, 8, 16, 24),
    lib.TD_PROTO_X86_32: (108, 4, 12, 20),
}


def model(proto: int, raw: bytes, dev: int, readonly: bool, discard: bool) -> int:
    """blkback's verdict on one slot (dispatch_rw_block_io, dispatch_discard_io)."""
    _, _, o_sector, o_tail = LAYOUT[proto]
    op, nseg = raw[0], raw[1]
    (sector,) = struct.unpack_from("<Q", raw, o_sector)
    if op in (READ, WRITE, BARRIER, FLUSH):
        if nseg > 11 or (op in (READ, WRITE) and nseg == 0) or (op == FLUSH and nseg):
            return ERR_NSEG
        n = 0
        for i in range(nseg):
            _, first, last = struct.unpack_from("<IBB", raw, o_tail + 8 * i)
            if first > last or last > 7:
                return ERR_SECT
            n += last - first + 1
        if op != READ and op != FLUSH and readonly:
            return ERR_READONLY
        # xen_vbd_translate: the range is checked only when the request moves data.
        if n and (sector > dev or n > dev - sector):
            return ERR_RANGE
        return OK
    if op == DISCARD:
        (count,) = struct.unpack_from("<Q", raw, o_tail)
        if readonly:
            return ERR_READONLY
        if not discard:
            return ERR_UNSUPPORTED
        if raw[1] & 1:  # BLKIF_DISCARD_SECURE: never offered, no image erases securely
            return ERR_UNSUPPORTED
        return ERR_RANGE if sector > dev or count > dev - sector else OK
    return ERR_UNSUPPORTED if op == INDIRECT else ERR_OP  # both answered EOPNOTSUPP


def check(proto: int, raw: bytes, dev: int, readonly: bool = False, discard: bool = True
          ) -> tuple[int, object]:
    slot = ffi.new("uint8_t[]", raw)
    priv = ffi.new("struct td_req *")
    lib.td_req_fetch(proto, slot, priv)
    return lib.td_req_check(priv, dev, int(readonly), int(discard), 0), priv


def slots() -> st.SearchStrategy[tuple[int, bytes]]:
    """A layout and a slot of its size: random bytes, biased toward the known ops,
    small segment counts and sectors near the end of the device or of 2**64."""

    def build(proto: int, body: bytes, op: int, nseg: int, sector: int, segs: list[int]
              ) -> tuple[int, bytes]:
        size, _, o_sector, o_tail = LAYOUT[proto]
        raw = bytearray(body[:size].ljust(size, b"\0"))
        raw[0], raw[1] = op, nseg
        struct.pack_into("<Q", raw, o_sector, sector)
        for i, packed in enumerate(segs[:11]):
            struct.pack_into("<BB", raw, o_tail + 8 * i + 4, packed & 7, (packed >> 3) & 0xF)
        return proto, bytes(raw)

    edge = st.sampled_from([0, 1, 2040, 2047, 2048, 2049, U64, U64 - 7, 1 << 63, U32])
    return st.builds(
        build,
        st.sampled_from(list(LAYOUT)),
        st.binary(min_size=112, max_size=112),
        st.one_of(st.sampled_from([READ, WRITE, BARRIER, FLUSH, DISCARD, INDIRECT, 4, 7]),
                  st.integers(0, 255)),
        st.one_of(st.integers(0, 12), st.integers(0, 255)),
        st.one_of(edge, st.integers(0, U64)),
        st.lists(st.integers(0, 127), max_size=11),
    )


@settings(max_examples=3000, deadline=None)
@given(slots(), st.sampled_from([0, 8, 2048, U64]), st.booleans(), st.booleans())
def test_fuzzed_slots_get_blkbacks_verdict(slot: tuple[int, bytes], dev: int, readonly: bool,
                                           discard: bool) -> None:
    proto, raw = slot
    err, priv = check(proto, raw, dev, readonly, discard)
    assert err == model(proto, raw, dev, readonly, discard)
    p: object = priv
    if err == OK and raw[0] in (READ, WRITE, BARRIER):
        # What the ring service will use: bounded, whatever the slot said.
        assert 0 <= p.nr_sectors <= 88  # type: ignore[attr-defined]
        if p.nr_sectors:  # type: ignore[attr-defined]
            assert p.sector_number + p.nr_sectors <= dev  # type: ignore[attr-defined]


@pytest.mark.parametrize("proto", list(LAYOUT))
@pytest.mark.parametrize("op", [FLUSH, BARRIER])
def test_a_flush_without_data_is_not_range_checked(proto: int, op: int) -> None:
    size, _, o_sector, _ = LAYOUT[proto]
    raw = bytearray(size)
    raw[0] = op
    struct.pack_into("<Q", raw, o_sector, U64)
    assert check(proto, bytes(raw), 2048)[0] == OK


@pytest.mark.parametrize("proto", list(LAYOUT))
def test_sector_number_near_2_to_the_64_cannot_wrap_into_the_device(proto: int) -> None:
    size, _, o_sector, o_tail = LAYOUT[proto]
    for op, sector in ((READ, U64 - 7), (WRITE, U64), (DISCARD, U64 - 3)):
        raw = bytearray(size)
        raw[0], raw[1] = op, 0 if op == DISCARD else 1  # a discard's byte 1 is its flag
        struct.pack_into("<Q", raw, o_sector, sector)
        struct.pack_into("<IBB", raw, o_tail, 8, 0, 7)
        if op == DISCARD:
            struct.pack_into("<Q", raw, o_tail, 8)
        assert check(proto, bytes(raw), 2048)[0] == ERR_RANGE


PROD_OK, PROD_PAST_RING, PROD_BEHIND = 0, 1, 2


@pytest.mark.parametrize(("rp", "req_cons", "rsp_prod", "want"), [
    (10, 10, 10, PROD_OK),               # idle
    (42, 10, 10, PROD_OK),               # a full ring queued
    (43, 10, 10, PROD_PAST_RING),        # RING_REQUEST_PROD_OVERFLOW
    (9, 10, 10, PROD_PAST_RING),         # behind with nothing in flight: wraps to 2**32-1
    (12, 15, 10, PROD_BEHIND),           # behind what we took, within a ring of responses
    (3, U32 - 1, U32 - 4, PROD_OK),      # across the 2**32 wrap
    (U32 - 2, U32 - 1, U32 - 4, PROD_BEHIND),
])
def test_req_prod_is_checked_against_both_back_end_indices(
        rp: int, req_cons: int, rsp_prod: int, want: int) -> None:
    assert lib.td_ring_prod_check(rp, req_cons, rsp_prod, 32) == want


def test_image_rw_refuses_a_count_whose_byte_length_wraps() -> None:
    out = ffi.new("struct td_image **")
    assert lib.td_image_open(b"null", b"", 0, 0, out) == 0
    try:
        buf = ffi.new("char[]", 512)
        # 2**23 + 1 sectors is 4 GiB + 512 bytes: len used to wrap to 512 and "succeed".
        assert lib.td_image_rw(out[0], lib.TD_ENGINE_NULL, 0, buf, 0, (1 << 23) + 1) == -22
        assert lib.td_image_rw(out[0], lib.TD_ENGINE_NULL, 0, buf, 0, 1) == 0
    finally:
        lib.td_image_close(out[0])


# ---- indirect requests ----

# Offsets of each layout's indirect view: (nr_segments, id, sector_number, indirect_grefs).
INDIRECT_LAYOUT = {
    lib.TD_PROTO_NATIVE: (2, 8, 16, 28),
    lib.TD_PROTO_X86_64: (2, 8, 16, 28),
    lib.TD_PROTO_X86_32: (2, 4, 12, 24),
}
SEGS_PER_PAGE = 512  # 4096 / sizeof(struct blkif_request_segment)
OFFERS = [0, 11, 256, 600]


def indirect_model(proto: int, raw: bytes, pages: bytes, dev: int, readonly: bool,
                   offered: int) -> int:
    """blkback's verdict on an INDIRECT slot whose indirect pages hold `pages`
    (dispatch_rw_block_io, xen_blkbk_parse_indirect, xen_vbd_translate)."""
    o_nseg, _, o_sector, _ = INDIRECT_LAYOUT[proto]
    if offered == 0:
        return ERR_UNSUPPORTED  # blkif.h: not advertised
    indirect_op = raw[1]
    (nseg,) = struct.unpack_from("<H", raw, o_nseg)
    (sector,) = struct.unpack_from("<Q", raw, o_sector)
    if indirect_op not in (READ, WRITE):
        return ERR_INDIRECT_OP
    if nseg == 0 or nseg > offered:
        return ERR_INDIRECT_NSEG
    n = 0
    for i in range(nseg):
        _, first, last = struct.unpack_from("<IBB", pages, 8 * i)
        if first > last or last > 7:
            return ERR_SECT
        n += last - first + 1
    if indirect_op == WRITE and readonly:
        return ERR_READONLY
    return ERR_RANGE if sector > dev or n > dev - sector else OK


def check_indirect(proto: int, raw: bytes, pages: bytes, dev: int, readonly: bool,
                   offered: int) -> tuple[int, object]:
    """What consume() + take_indirect() do, with a memcpy for the grant copy: fetch,
    header, the nr_segments entries of the indirect pages into private memory, segments."""
    slot = ffi.new("uint8_t[]", raw)
    priv = ffi.new("struct td_req *")
    lib.td_req_fetch(proto, slot, priv)
    err = lib.td_req_check(priv, dev, int(readonly), 1, offered)
    if err != OK:
        return err, priv
    nseg = priv.nr_segments
    private = ffi.new("struct td_seg[]", nseg)
    ffi.memmove(private, pages[: 8 * nseg], 8 * nseg)
    return lib.td_req_check_segs(priv, private, dev, int(readonly)), priv


@st.composite
def indirect_requests(draw: st.DrawFn) -> tuple[int, bytes, bytes, int]:
    """A layout, an INDIRECT slot (random bytes under the fields that matter), the
    contents of its indirect pages (mostly sane segments, some not) and an offer."""
    proto = draw(st.sampled_from(list(INDIRECT_LAYOUT)))
    offered = draw(st.sampled_from(OFFERS + OFFERS[1:]))  # "not offered" less often
    size, *_ = LAYOUT[proto]
    o_nseg, _, o_sector, _ = INDIRECT_LAYOUT[proto]
    raw = bytearray(draw(st.binary(min_size=size, max_size=size)))
    raw[0] = INDIRECT
    raw[1] = draw(st.one_of(st.sampled_from([READ, WRITE]), st.sampled_from([READ, WRITE]),
                            st.sampled_from([READ, WRITE]),
                            st.sampled_from([BARRIER, FLUSH, DISCARD, INDIRECT, 4, 7]),
                            st.integers(0, 255)))
    edges = [0, 1, 11, 12, offered, offered + 1, SEGS_PER_PAGE, SEGS_PER_PAGE + 1, 4096, 4097]
    nseg = draw(st.one_of(st.sampled_from(edges), st.integers(1, max(offered, 1)),
                          st.integers(0, 0xFFFF)))
    struct.pack_into("<H", raw, o_nseg, nseg)
    sector = draw(st.one_of(st.sampled_from([0, 1, 2047, 2048, U64, U64 - 7, 1 << 63]),
                            st.integers(0, 4096), st.integers(0, U64)))
    struct.pack_into("<Q", raw, o_sector, sector)
    # Segments: (first, last) drawn, repeated to fill what nr_segments asks (bounded by
    # the largest offer: more is refused before any page is read).
    pairs = draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1,
                          max_size=40))
    if draw(st.sampled_from([True, True, True, False])):
        pairs = [(min(a, b) % 8, max(a, b) % 8) for a, b in pairs]  # mostly sane
    count = min(nseg, max(OFFERS))
    pages = b"".join(struct.pack("<IBBxx", 1000 + i, *pairs[i % len(pairs)])
                     for i in range(count))
    return proto, bytes(raw), pages, offered


@settings(max_examples=1500, deadline=None)
@given(indirect_requests(), st.sampled_from([0, 8, 2048, 1 << 20, U64]), st.booleans())
def test_fuzzed_indirect_requests_get_blkbacks_verdict(
        req: tuple[int, bytes, bytes, int], dev: int, readonly: bool) -> None:
    proto, raw, pages, offered = req
    err, priv = check_indirect(proto, raw, pages, dev, readonly, offered)
    assert err == indirect_model(proto, raw, pages, dev, readonly, offered)
    p: object = priv
    # The id (echoed in the response) and the indirect grefs come from the indirect view.
    _, o_id, _, o_grefs = INDIRECT_LAYOUT[proto]
    assert p.id == struct.unpack_from("<Q", raw, o_id)[0]  # type: ignore[attr-defined]
    assert list(p.indirect_grefs) == list(  # type: ignore[attr-defined]
        struct.unpack_from("<8I", raw, o_grefs))
    if err == OK:
        nseg = p.nr_segments  # type: ignore[attr-defined]
        # What the ring service will move: bounded by the offer, within the device.
        assert 1 <= nseg <= offered
        assert nseg <= p.nr_sectors <= 8 * nseg  # type: ignore[attr-defined]
        assert p.sector_number + p.nr_sectors <= dev  # type: ignore[attr-defined]
        assert lib.td_rsp_operation(priv) == raw[1]


@pytest.mark.parametrize("proto", list(INDIRECT_LAYOUT))
def test_an_indirect_request_never_reads_past_its_8_pages(proto: int) -> None:
    """nr_segments is 16 bits: 65535 segments would be 128 pages. Whatever is offered,
    more than the 8 pages of Xen's protocol is refused on the header alone."""
    size, *_ = LAYOUT[proto]
    o_nseg, *_ = INDIRECT_LAYOUT[proto]
    raw = bytearray(size)
    raw[0], raw[1] = INDIRECT, READ
    struct.pack_into("<H", raw, o_nseg, 8 * SEGS_PER_PAGE + 1)
    assert check_indirect(proto, bytes(raw), b"", 2048, False, 0xFFFFFFFF)[0] == ERR_INDIRECT_NSEG
