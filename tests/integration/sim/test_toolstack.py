"""The simulated toolstack in both orders, end to end on the real xenstored and tapdisks.

- libxl's (Xen >= 4.19 with its block-tap script): nodes, the back-end's InitWait
  (tapback --toolstack libxl), then block-tap's tap-ctl steps through the real `tap-ctl`
  command; removal: online=0, Closed, block-tap remove (tap-ctl destroy), nodes removed;
- a guest that vanishes (domain destroyed, or its own state node removed): the back-end
  publishes Closed and keeps the toolstack's directory, so the toolstack's remove still
  runs and no tapdisk is left;
- the toolstack destroys what it created even when the back-end directory vanished.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap3.abi import MAX_RING_PAGE_ORDER
from blktap3.ctl import runtime
from blktap3.sim.guest import run_guest
from blktap3.sim.host import Host, HostError
from blktap3.sim.hotplug import HotplugError
from blktap3.sim.toolstack import BLOCK_TAP_SCRIPT, Image
from blktap3.xenbus import XenbusState
from tests.support import wait_gone, wait_until
from tests.support.processes import tapdisk_pids

from .conftest import serving

pytestmark = pytest.mark.integration
DOMID = 4
XVDA = 51712
XVDB = 51728


@pytest.fixture
def xenstored_kind() -> str:
    return "c"


def _image(host: Host, name: str) -> Image:
    path = Path(host.run_dir) / name
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    return Image.parse(f"aio:{path}")


@pytest.fixture
def libxl(host: Host) -> Iterator[Host]:
    yield from serving(host, "libxl", DOMID)


@pytest.fixture
def xapi(host: Host) -> Iterator[Host]:
    yield from serving(host, "xapi", DOMID)


def _state(host: Host, key: str) -> str | None:
    with host.xs() as xs:
        return xs.read_optional(key)


def test_libxl_order_attach_io_detach(libxl: Host) -> None:
    image = _image(libxl, "a.img")
    paths, attached = libxl.attach_disk(DOMID, XVDA, image)
    with libxl.xs() as xs:
        keys = {k: xs.read(paths.backend_key(k)) for k in xs.ls(paths.backend)}
    # what libxl and block-tap wrote, and tapback's InitWait (before hotplug) kept
    assert keys["script"] == BLOCK_TAP_SCRIPT
    assert (keys["pid"], keys["minor"]) == (str(attached.pid), str(attached.minor))
    assert keys["physical-device-path"] == str(libxl.control_dir
                                               / f"nbd{attached.pid}.{attached.minor}")
    assert keys["hotplug-status"] == "connected"
    assert keys["max-ring-page-order"] == str(MAX_RING_PAGE_ORDER)
    assert keys["state"] == "2"

    result = run_guest(libxl, DOMID, XVDA, "linux", "verify", timeout=60.0)
    assert result.ok, result.summary()

    assert libxl.detach_disk(DOMID, XVDA) is XenbusState.CLOSED
    wait_gone(attached.pid, what="tapdisk destroyed by block-tap remove")
    assert runtime.allocated_minors(libxl.control_dir) == []
    assert _state(libxl, paths.backend_key("state")) is None
    assert _state(libxl, paths.frontend_key("state")) is None


def test_libxl_block_tap_shares_a_read_only_file_between_domains(libxl: Host) -> None:
    image = _image(libxl, "shared.img")
    with libxl.toolstack() as ts:
        ts.create_domain(DOMID + 1)
    _, first = libxl.attach_disk(DOMID, XVDA, image, mode="r")
    _, second = libxl.attach_disk(DOMID + 1, XVDA, image, mode="r")
    assert (second.pid, second.minor) == (first.pid, first.minor)  # tap-ctl list -t -f
    libxl.detach_disk(DOMID + 1, XVDA)
    assert first.pid in tapdisk_pids(libxl.control_dir)  # still used by the other VBD
    libxl.detach_disk(DOMID, XVDA)
    wait_gone(first.pid, what="tapdisk destroyed with its last VBD")


def test_libxl_refuses_a_file_another_domain_writes(libxl: Host) -> None:
    image = _image(libxl, "busy.img")
    with libxl.toolstack() as ts:
        ts.create_domain(DOMID + 1)
    libxl.attach_disk(DOMID, XVDA, image)
    with pytest.raises(HotplugError, match="in use by domain 4"):
        libxl.attach_disk(DOMID + 1, XVDA, image)
    with libxl.toolstack() as ts:
        paths = ts.vbd_paths(DOMID + 1, XVDA)
    assert _state(libxl, paths.backend_key("hotplug-status")) == "error"
    assert "in use" in (_state(libxl, paths.backend_key("hotplug-error")) or "")


@pytest.mark.parametrize("how", ["state node", "domain destroy"])
def test_vanished_guest_leaves_the_directory_to_the_toolstack_and_no_tapdisk(
        libxl: Host, how: str) -> None:
    paths, attached = libxl.attach_disk(DOMID, XVDA, _image(libxl, "v.img"))
    _, other = libxl.attach_disk(DOMID, XVDB, _image(libxl, "w.img"))
    if how == "state node":
        with libxl.xs() as xs:
            xs.rm(paths.frontend_key("state"))  # what a guest may do to its own node
        wait_until(lambda: _state(libxl, paths.backend_key("state")) == "6",
                   what="back-end Closed")
        assert _state(libxl, paths.backend_key("params")) is not None  # not removed
        assert libxl.detach_disk(DOMID, XVDA) is XenbusState.CLOSED
        wait_gone(attached.pid, what="tapdisk destroyed")
        libxl.detach_disk(DOMID, XVDB)
    else:
        libxl.destroy_domain(DOMID)
    wait_gone([attached.pid, other.pid], what="every tapdisk of the domain destroyed")
    assert tapdisk_pids(libxl.control_dir) == []
    assert runtime.allocated_minors(libxl.control_dir) == []
    assert _state(libxl, "/local/domain/0/backend/vbd3/4") is None


def test_xapi_domain_destroy_detaches_its_disks(xapi: Host) -> None:
    _, attached = xapi.attach_disk(DOMID, XVDA, _image(xapi, "x.img"))
    xapi.destroy_domain(DOMID)
    wait_gone(attached.pid, what="tapdisk destroyed")
    assert runtime.allocated_minors(xapi.control_dir) == []


def test_toolstack_destroys_its_tapdisk_when_the_directory_vanished(xapi: Host) -> None:
    paths, attached = xapi.attach_disk(DOMID, XVDA, _image(xapi, "y.img"))
    with xapi.xs() as xs:
        xs.rm(paths.backend)  # not by tapback: by anything else
    assert xapi.detach_disk(DOMID, XVDA) is None
    wait_gone(attached.pid, what="tapdisk destroyed")
    assert _state(xapi, paths.frontend_key("state")) is None
    with pytest.raises(HostError, match="no device"):
        xapi.detach_disk(DOMID, XVDA)  # nothing left to destroy: said, not ignored
