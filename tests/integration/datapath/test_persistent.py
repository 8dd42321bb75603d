"""Persistent grants in the ring service: data grants mapped once and kept (bounded, all
unmapped at disconnect), grant copy when not negotiated, and guests that lie about them."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.datapath.lineproc import LineProcess

from .conftest import DISK_BYTES, GUEST_DOMID

pytestmark = pytest.mark.integration
OKAY, ERROR = 0, -1
NOT_GRANTED = 0x7FF0


def connect(host: LineProcess, guest: LineProcess, disk: Path, *, persistent: bool,
            max_indirect_segments: int = 0, **guest_args: object) -> None:
    host.call("open", name="r", driver="aio", path=str(disk))
    g = guest.call("open", backend=0, protocol=BlkifProtocol.NATIVE, **guest_args)
    host.call("connect", name="r", image="r", domid=GUEST_DOMID, devid=51712,
              grefs=g["grefs"], order=0, port=g["port"], protocol=BlkifProtocol.NATIVE,
              persistent=persistent, max_indirect_segments=max_indirect_segments)


def test_with_persistent_grants_each_page_is_mapped_once_and_unmapped_at_disconnect(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    connect(host, guest, disk, persistent=True)
    data = bytes(range(256)) * 16 * 4  # four pages
    for sector in (0, 64, 128):
        assert guest.call("write", sector=sector, data=data.hex()) == OKAY
        got = guest.call("read", sector=sector, count=len(data) // 512)
        assert got["status"] == OKAY and bytes.fromhex(got["data"]) == data
    assert disk.read_bytes()[64 * 512 : 64 * 512 + len(data)] == data
    pg = host.call("stats", name="r")["persistent"]
    assert pg["negotiated"] is True
    assert pg["maps"] == 4 and pg["mapped"] == 4, "the same four pages every time"
    assert pg["hits"] == 6 * 4 - 4
    assert pg["map_failures"] == 0 and pg["evictions"] == 0
    # Xen pins what is mapped: the guest cannot take it back while we hold it.
    assert guest.call("revoke", page=0) == -errno.EBUSY
    host.call("disconnect", name="r")
    assert guest.call("revoke", page=0) == 0, "disconnect unmapped every grant"
    assert guest.call("revoke", page=3) == 0


@pytest.mark.parametrize("persistent", [True, False])
def test_indirect_pages_are_persistent_grants_too_when_negotiated(
        host: LineProcess, guest: LineProcess, disk: Path, persistent: bool) -> None:
    # Linux blkfront takes a request's indirect pages from its pool of persistent grants
    # and blkback maps them persistently: ours keeps them mapped beside the data pages
    # (and the guest cannot end access to them meanwhile); without persistent grants
    # they are grant-copied, as the data is.
    connect(host, guest, disk, persistent=persistent, data_slots=1, slot_pages=256,
            max_segs=256, max_indirect_segments=256)
    data = bytes(range(256)) * 4096  # 1 MiB: one INDIRECT request of 256 segments
    for sector in (0, 2048):
        assert guest.call("write", sector=sector, data=data.hex()) == OKAY
        got = guest.call("read", sector=sector, count=2048)
        assert got["status"] == OKAY and bytes.fromhex(got["data"]) == data
    st = host.call("stats", name="r")
    assert st["indirect"]["pages"] == 4, "one indirect page a request (256 x 8 bytes)"
    pg = st["persistent"]
    if persistent:
        assert pg["maps"] == pg["mapped"] == 256 + 1, "data pages and the indirect page"
        assert pg["hits"] == 4 * 257 - 257
        assert guest.call("revoke_indirect", slot=0, page=0) == -errno.EBUSY
        host.call("disconnect", name="r")
    else:
        assert pg["maps"] == 0
    assert guest.call("revoke_indirect", slot=0, page=0) == 0
    assert guest.call("revoke_indirect", slot=0, page=1) == -errno.EINVAL, "no second page"
    assert disk.read_bytes()[2048 * 512 : 4096 * 512] == data


def test_without_persistent_grants_the_data_is_grant_copied(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    connect(host, guest, disk, persistent=False)
    assert guest.call("write", sector=8, data=(b"c" * 4096).hex()) == OKAY
    pg = host.call("stats", name="r")["persistent"]
    assert pg == {"negotiated": False, "mapped": 0, "max": 0, "maps": 0, "hits": 0,
                  "evictions": 0, "map_failures": 0, "full": 0}
    assert guest.call("revoke", page=0) == 0, "nothing of the guest's stays mapped"
    assert disk.read_bytes()[8 * 512 : 9 * 512] == b"c" * 512


def test_a_revoked_or_never_granted_grant_is_an_error_and_the_ring_goes_on(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    connect(host, guest, disk, persistent=True)
    grefs = guest.call("data_grefs", pages=3)
    assert guest.call("revoke", page=1) == 0  # before the back-end ever mapped it
    reqs = [
        {"op": 1, "sector": 0, "segs": [[grefs[0], 0, 7], [grefs[1], 0, 7]]},
        {"op": 0, "sector": 0, "segs": [[grefs[1], 0, 7]]},
        {"op": 0, "sector": 0, "segs": [[NOT_GRANTED, 0, 7]]},
        {"op": 1, "sector": 0, "segs": [[NOT_GRANTED, 0, 7]]},
        {"op": 0, "sector": 0, "segs": [[grefs[2], 0, 7]]},
    ]
    guest.call("submit", reqs=reqs)
    assert guest.call("collect", n=len(reqs)) == [ERROR, ERROR, ERROR, ERROR, OKAY]
    st = host.call("stats", name="r")
    assert st["errors"]["grant"] == 4
    assert st["persistent"]["map_failures"] == 4
    assert st["halted"] is None
    assert disk.read_bytes()[:8192] == bytes(8192), "the failed write wrote nothing"
    assert guest.call("write", sector=16, data=(b"k" * 4096).hex()) == OKAY


@pytest.mark.parametrize("blocks", [8, 20])
def test_more_grants_than_the_cache_holds_are_copied_or_evicted_and_the_data_stays_right(
        host: LineProcess, guest: LineProcess, disk: Path, blocks: int) -> None:
    # Blocks of 1 MiB (INDIRECT, 256 pages each) in rounds: each run issues one block per
    # slot, so every page is touched once a round whatever order the back-end answers in.
    # 8 blocks touch 2048 grants a round, more than the 1056 a single-page ring keeps
    # mapped: the rest are grant-copied, and a mapped page is used again within two
    # rounds (4096 uses), before it goes cold (4 x 1056): nothing is evicted. 20 blocks
    # touch 5120 distinct grants in the first round alone: past 4 x 1056 the oldest
    # mappings have gone cold and are evicted. (Free-running QD, where one slow request
    # leaves its pages idle for any number of uses, decides neither way.)
    connect(host, guest, disk, persistent=True, data_slots=blocks, slot_pages=256,
            max_segs=256, max_indirect_segments=256)
    span = min(blocks, DISK_BYTES >> 20) * 2048  # sectors; 20 blocks write 16 twice
    for rnd in range(3):
        w = guest.call("run", qd=blocks, bs=1 << 20, read_pct=0, span=span, ios=blocks,
                       verify=True, stamp=5, timeout=60.0)
        assert w["ios"] == blocks and w["errors"] == w["lost"] == 0, rnd
    for rnd in range(3):
        r = guest.call("run", qd=blocks, bs=1 << 20, read_pct=100, random=True, span=span,
                       ios=blocks, seed=rnd + 1, verify=True, stamp=5, timeout=60.0)
        assert r["ios"] == r["indirect"] == blocks, rnd
        assert r["errors"] == r["mismatches"] == r["lost"] == 0, rnd
    pg = host.call("stats", name="r")["persistent"]
    assert pg["max"] == 1056 and pg["mapped"] == 1056
    assert pg["maps"] == pg["mapped"] + pg["evictions"]
    assert (pg["evictions"] > 0) is (blocks == 20), pg
    assert pg["full"] > 0 and pg["map_failures"] == 0
    host.call("disconnect", name="r")
    assert all(guest.call("revoke", page=p) == 0 for p in (0, 700, blocks * 256 - 1))
