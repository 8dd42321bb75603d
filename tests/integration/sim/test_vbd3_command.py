"""blktap3-vbd3 end to end on the simulated host: what libxl would do, on hosts without it.

The command runs as a process against the real xenstored, our tap-ctl and tapdisks
(xensim preloaded, as on the simulated dom0), with tapback serving either order.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap3.ctl import runtime
from blktap3.sim.guest import run_guest
from blktap3.sim.host import Host
from blktap3.sim.hotplug import tapdisk_env
from tests.support import wait_gone
from tests.support.processes import tapdisk_pids

from .conftest import serving

pytestmark = pytest.mark.integration
DOMID = 3
BACKEND = "/local/domain/0/backend/vbd3/3/51712"


@pytest.fixture
def xenstored_kind() -> str:
    return "c"


@pytest.fixture(params=["xapi", "libxl"])
def served(request: pytest.FixtureRequest, host: Host) -> Iterator[Host]:
    yield from serving(host, request.param, DOMID)


def vbd3(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**tapdisk_env(host.run_dir), **host.env()}
    return subprocess.run(
        [sys.executable, "-m", "blktap3.vbd3.cli", "--control-dir", str(host.control_dir),
         "--tap-ctl", str(Path(sys.executable).parent / "tap-ctl"),
         "--lock", str(host.run_dir / "hotplug.lock"), *args],
        env=env, capture_output=True, text=True, timeout=120)


def read(host: Host, key: str) -> str | None:
    with host.xs() as xs:
        return xs.read_optional(f"{BACKEND}/{key}")


def test_attach_io_detach_and_every_step_is_idempotent(served: Host) -> None:
    image = served.run_dir / "d.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    first = vbd3(served, "attach", str(DOMID), "xvda", str(image))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"{BACKEND}: tapdisk ")
    pid = int(read(served, "pid") or 0)
    assert pid in tapdisk_pids(served.control_dir)
    assert read(served, "params") == f"aio:{image}"
    # rerun (after a crash, or twice by mistake): the same tapdisk, nothing new
    again = vbd3(served, "attach", str(DOMID), "xvda", str(image))
    assert again.returncode == 0, again.stderr
    assert tapdisk_pids(served.control_dir) == [pid]
    listed = vbd3(served, "list").stdout
    assert f"3 xvda back-end=2 front-end=1 mode=w pid={pid} minor=0 hotplug=connected" in listed

    result = run_guest(served, DOMID, 51712, "linux", "verify", timeout=60.0)
    assert result.ok, result.summary()

    gone = vbd3(served, "detach", str(DOMID), "xvda")
    assert (gone.returncode, gone.stdout) == (0, f"{BACKEND}: detached\n"), gone.stderr
    wait_gone(pid, what="tapdisk destroyed")
    assert runtime.allocated_minors(served.control_dir) == []
    assert read(served, "state") is None
    twice = vbd3(served, "detach", str(DOMID), "xvda")
    assert (twice.returncode, twice.stdout) == (0, f"{BACKEND}: not attached\n")


def test_attach_after_a_crash_between_tapdisk_and_hotplug_keys_reuses_the_tapdisk(
        served: Host) -> None:
    image = served.run_dir / "c.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    assert vbd3(served, "attach", str(DOMID), "xvda", str(image)).returncode == 0
    pid = read(served, "pid")
    with served.xs() as xs:  # as if the command died after tap-ctl open
        for key in ("pid", "minor", "physical-device-path", "hotplug-status"):
            xs.rm(f"{BACKEND}/{key}")
    rerun = vbd3(served, "attach", str(DOMID), "xvda", str(image))
    assert rerun.returncode == 0, rerun.stderr
    assert read(served, "pid") == pid and read(served, "hotplug-status") == "connected"
    assert vbd3(served, "detach", str(DOMID), "xvda").returncode == 0


def test_bad_requests_are_one_line_errors(served: Host) -> None:
    image = served.run_dir / "e.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    other = served.run_dir / "f.img"
    other.write_bytes(b"\0" * 512)
    no_domain = vbd3(served, "attach", "9", "xvda", str(image))
    assert (no_domain.returncode, no_domain.stderr) == (1, "blktap3-vbd3: no domain 9\n")
    missing = vbd3(served, "attach", str(DOMID), "xvda", str(image) + ".nope")
    assert missing.returncode == 1 and "is not a file" in missing.stderr
    assert vbd3(served, "attach", str(DOMID), "xvda", str(image)).returncode == 0
    clash = vbd3(served, "attach", str(DOMID), "xvda", str(other))
    assert clash.returncode == 1 and clash.stderr.count("\n") == 1
    assert f"already has xvda with aio:{image}" in clash.stderr
    usage = vbd3(served, "attach", "0", "sda", str(image))
    assert usage.returncode == 2 and "usage:" in usage.stderr
    assert vbd3(served, "detach", str(DOMID), "xvda").returncode == 0
