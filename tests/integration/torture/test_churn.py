"""``blktap3-torture churn``: a short run, and its leak detector catching what it must."""

from __future__ import annotations

import subprocess
import sys

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


def test_every_process_does_its_work_with_no_capability() -> None:
    """xenstored, tapback, the tapdisks and the guests, all started under an empty
    bounding set (uid 0 owns their files, sockets and devices; no CAP_* is used)."""
    done = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--",
         sys.executable, "-c",
         "import sys; from blktap3.torture import churn; "
         "caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')]; "
         "assert caps == ['CapEff:\\t0000000000000000\\n'], caps; "
         "v = churn.run(count=3, seed=5); print(v.text()); sys.exit(0 if v.ok else 1)"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "\nchurn: ok\n" in done.stdout
