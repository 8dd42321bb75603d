"""``blktap3-torture powercut``: a short run, and its checker catching a disk that lies
about its cache flushes; the shadow's rules."""

from __future__ import annotations

import pytest

from blktap3.sim.guestdrv import ZEROS
from blktap3.torture import powercut
from blktap3.torture.faultfs import missing
from blktap3.torture.shadow import Shadow

needs_fuse = pytest.mark.skipif(missing() is not None, reason=f"no FUSE layer: {missing()}")


@pytest.mark.integration
@needs_fuse
def test_power_cuts_lose_no_flushed_sector_and_leave_a_valid_vhd() -> None:
    v = powercut.run(count=2, seed=3)
    assert v.ok, v.text()
    assert v.figures["power cuts"] == 2
    assert v.figures["VHD checks passed (vhd-util check)"] == 2
    assert v.figures["FLUSHes answered OKAY"] > 0
    assert v.figures["raw: sectors lost"] == v.figures["vhd: sectors lost"] == 0


@pytest.mark.integration
@needs_fuse
def test_a_disk_that_acknowledges_flushes_it_did_not_do_is_caught() -> None:
    v = powercut.run(count=2, seed=3, lying_disk=True)
    assert not v.ok
    assert any("holds" in f and "allowed" in f for f in v.failures), v.text()


def test_the_shadow_follows_answers_flushes_failed_syncs_and_cuts() -> None:
    s = Shadow()
    s.write(0, 2, 7, ok=True)
    s.write(1, 1, 8, ok=False)          # may or may not have been done
    assert s.may_read(0) == {7} and s.may_read(1) == {7, 8}
    assert s.must_survive(0) == {ZEROS, 7}, "nothing flushed yet"
    s.flushed()
    assert s.must_survive(0) == {7}
    s.write(0, 1, 9, ok=True)
    s.sync_failed()                     # the write of 9 may be gone
    assert s.may_read(0) == {7, 9}
    s.after_cut()
    assert s.may_read(0) == s.must_survive(0) == {7, 9}
    assert s.may_read(5) == {ZEROS}
