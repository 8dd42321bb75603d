"""The real Linux xen-blkfront in a PV guest of a real Xen host (under QEMU TCG), served
by Linux's xen-blkback (the control) and by our back-end; fio in the guest against each,
and the ratio table at the end of the session.

Xen 4.17 (Debian 12) by default; BLKTAP3_REALXEN_DIST=trixie boots Debian 13's Xen 4.20,
where xl attaches, detaches and destroys our VBD through Xen's own block-tap script.
Each test builds the images from Debian packages (cached) and boots the whole host once:
~2-3 min each. They run only with BLKTAP3_REALXEN=1; a run spoilt twice by emulation
faults is skipped, never counted as a pass or as the back-end's failure.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.realxen import debs, rig
from tests.realxen.conftest import SUMMARIES

pytestmark = [
    pytest.mark.realxen,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.environ.get("BLKTAP3_REALXEN") != "1",
                       reason="boots Xen under QEMU (~1.5 min per mode): set BLKTAP3_REALXEN=1"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed (apt-get install "
                              "qemu-system-x86)"),
]


@pytest.mark.parametrize("mode", ["control", "blktap3"])
def test_guest_blkfront_workload(mode: str) -> None:
    dist = debs.dist()
    suffix = "" if dist == "bookworm" else f"-{dist}"
    with rig.claimed(debs.cache_dir() / "work" / f"pytest-{mode}{suffix}") as work:
        run, failure = rig.run_mode(mode, work, dist=dist)
    SUMMARIES[mode] = run.summary()  # the session's end prints the fio pair's table
    if failure is not None and failure.startswith("invalid:"):
        pytest.skip(failure)
    assert failure is None, f"{failure}\n-- log tail --\n{run.tail()}"
    assert run.blkfront_lines(), "the guest printed no blkfront line"
