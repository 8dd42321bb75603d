"""Every check of the ring service, answered with an error and counted, never a crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.datapath.lineproc import LineProcess

from .conftest import DISK_BYTES, GUEST_DOMID, Spawn, connect

pytestmark = pytest.mark.integration
OKAY, ERROR, EOPNOTSUPP = 0, -1, -2
SECTORS = DISK_BYTES // 512
NOT_GRANTED = 0x7FFF0


def bad_requests(gref: int) -> list[tuple[str, dict[str, Any], int]]:
    seg = [[gref, 0, 7]]
    return [
        # Unknown and reserved operations: EOPNOTSUPP, as Linux blkback and blktap (since 2025).
        ("op", {"op": 9, "segs": seg}, EOPNOTSUPP),
        ("op", {"op": 4, "segs": seg}, EOPNOTSUPP),
        ("op", {"op": 255}, EOPNOTSUPP),
        ("unsupported", {"op": 5, "nr_sectors": 8, "flag": 1}, EOPNOTSUPP),  # secure discard
        ("segments", {"op": 0, "segs": []}, ERROR),
        ("segments", {"op": 1, "segs": seg * 11, "nr_segments": 12}, ERROR),
        ("sector", {"op": 0, "segs": [[gref, 6, 5]]}, ERROR),
        ("sector", {"op": 0, "segs": [[gref, 0, 8]]}, ERROR),
        ("range", {"op": 0, "sector": SECTORS - 4, "segs": seg}, ERROR),
        ("range", {"op": 5, "sector": SECTORS - 4, "nr_sectors": 8}, ERROR),
        ("grant", {"op": 1, "segs": [[NOT_GRANTED, 0, 7]]}, ERROR),
        ("grant", {"op": 0, "segs": [[NOT_GRANTED, 0, 7]]}, ERROR),
        ("unsupported", {"op": 6}, EOPNOTSUPP),
    ]


@pytest.mark.parametrize("protocol", [BlkifProtocol.NATIVE, BlkifProtocol.X86_32])
def test_each_bad_request_gets_an_error_and_its_counter(
        host: LineProcess, guest: LineProcess, disk: Path, protocol: str) -> None:
    connect(host, guest, disk, protocol=protocol)
    gref = guest.call("data_grefs", pages=1)[0]
    cases = bad_requests(gref)
    guest.call("submit", reqs=[spec for _, spec, _ in cases])
    assert guest.call("collect", n=len(cases)) == [want for _, _, want in cases]
    st = host.call("stats", name="r")
    for cause in {c for c, _, _ in cases}:
        assert st["errors"][cause] == sum(1 for c, _, _ in cases if c == cause), cause
    assert st["halted"] is None
    # The ring still works afterwards.
    assert guest.call("write", sector=0, data=(b"z" * 512).hex()) == OKAY


def test_write_to_a_readonly_vbd_is_refused_and_counted(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    connect(host, guest, disk, readonly=True)
    assert guest.call("write", sector=0, data=(b"w" * 4096).hex()) == ERROR
    assert guest.call("read", sector=0, count=8)["status"] == OKAY
    st = host.call("stats", name="r")
    assert st["errors"]["readonly"] == 1
    assert disk.read_bytes()[:4096] == bytes(4096)


def test_req_prod_past_the_ring_halts_that_ring_only(
        host: LineProcess, guest: LineProcess, disk: Path, spawn: Spawn,
        tmp_path: Path) -> None:
    connect(host, guest, disk)
    other_disk = tmp_path / "other.img"
    other_disk.write_bytes(bytes(1 << 20))
    other = spawn("blktap3.sim.guestdrv", GUEST_DOMID + 1)
    connect(host, other, other_disk, name="r2", domid=GUEST_DOMID + 1)

    guest.call("overflow", extra=5)
    for _ in range(200):
        st = host.call("stats", name="r")
        if st["halted"]:
            break
    assert st["halted"] == "req_prod overflow"
    assert st["errors"]["overflow"] == 1
    # The other VBD goes on.
    assert other.call("write", sector=8, data=(b"o" * 512).hex()) == OKAY
    assert other_disk.read_bytes()[4096:4608] == b"o" * 512
    assert host.call("stats", name="r2")["halted"] is None
    # And the halted ring still disconnects cleanly.
    host.call("disconnect", name="r")


def test_edge_requests_blkback_accepts_are_answered_okay(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    connect(host, guest, disk)
    reqs = [
        {"op": 3, "sector": 2**64 - 1},                  # flush: no data, no range
        {"op": 2, "sector": SECTORS + 100},              # empty barrier: the same
        {"op": 5, "sector": SECTORS, "nr_sectors": 0},   # discard of nothing at the end
    ]
    guest.call("submit", reqs=reqs)
    assert guest.call("collect", n=len(reqs)) == [OKAY] * len(reqs)
    assert host.call("stats", name="r")["halted"] is None


def test_the_guest_driver_refuses_more_raw_requests_than_slots_even_after_overflow(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    g = connect(host, guest, disk)
    slots = g["slots"]
    guest.call("overflow", extra=0)
    # After the overflow the driver's own in-flight count wrapped: it used to accept
    # any number and write the statuses past their 32-slot array.
    with pytest.raises(OSError) as exc:
        guest.call("submit", reqs=[{"op": 3}] * (slots + 1))
    assert exc.value.errno == 16  # EBUSY
    assert len(guest.call("data_grefs", pages=1)) == 1, "the guest process lives on"
