"""``blktap3-torture churn``: a short run, and its leak detector catching what it must."""

from __future__ import annotations

import pytest

from blktap3.sim.host import Host
from blktap3.sim.toolstack import Image
from blktap3.sim.xenstored import Kind
from blktap3.torture import churn

pytestmark = pytest.mark.integration


@pytest.fixture
def xenstored_kind() -> Kind:
    return "c"


def test_churn_cycles_leak_nothing_and_the_next_guest_connects() -> None:
    v = churn.run(count=6, seed=4)
    assert v.ok, v.text()
    assert v.figures["cycles"] == 6
    assert sum(v.figures["faults"].values()) == 6
    assert len(v.figures["faults"]) >= 3  # this seed draws several kinds of fault


def test_the_leak_detector_sees_a_domain_and_disk_not_destroyed(host: Host,
                                                                 tapback: int) -> None:
    image = host.run_dir / "d.img"
    image.write_bytes(bytes(1 << 20))
    with host.toolstack() as ts:
        ts.create_domain(7)
    _, attached = host.attach_disk(7, churn.DEVID, Image("aio", image))
    found = "\n".join(churn.leaks(host))
    assert f"tapdisk processes left: [{attached.pid}]" in found
    assert f"control sockets left: [{attached.pid}]" in found
    assert f"minors left: [{attached.minor}]" in found
    assert "simulated domains left: [7]" in found
    assert "guest XenStore directories left: ['7']" in found
    assert "back-end nodes left under /local/domain/0/backend/vbd3: ['7']" in found
    host.destroy_domain(7)
    assert churn.settled_leaks(host) == []
