"""The whole xenbus handshake against the real xenstored, tapback and tapdisk."""

from __future__ import annotations

import os

import pytest

from blktap3.abi import SECTOR_SIZE
from blktap3.ctl import runtime
from blktap3.ctl.protocol import DEFAULT_MAX_INDIRECT_SEGMENTS
from blktap3.sim.host import Host
from blktap3.sim.hotplug import HotplugError, hotplug_add
from blktap3.sim.toolstack import Image
from blktap3.tapback import service
from blktap3.xenbus import Transaction, XenbusState, XenStore
from tests.support import log_events, tapdisk_pids, wait_until

from .conftest import GuestFactory, remove

pytestmark = pytest.mark.integration



def test_handshake_connects_and_io_reads_back(host: Host, dom0: XenStore,
                                              guests: GuestFactory) -> None:
    guest = guests(size=8 << 20)
    guest.wait_backend(XenbusState.INIT_WAIT)
    assert guest.backend("max-ring-page-order") == "4"  # blkback's and QEMU's
    assert guest.backend("max-ring-pages") == "16"  # the same, for FreeBSD's blkfront
    guest.publish_transport()
    guest.wait_backend(XenbusState.CONNECTED)
    assert guest.backend("sectors") == str((8 << 20) // SECTOR_SIZE)
    assert guest.backend("sector-size") == "512"
    assert guest.backend("info") == "0"
    assert guest.backend("feature-barrier") == "1"
    assert guest.backend("feature-flush-cache") == "1"
    assert guest.backend("feature-discard") == "1"
    assert guest.backend("discard-granularity") == "512"
    assert guest.backend("physical-sector-size") is not None
    assert guest.backend("kthread-pid") == str(guest.attached.pid)
    # The guest may read what tapback wrote, and may not write it.
    perms = [str(p) for p in dom0.get_perms(guest.paths.backend_key("sectors"))]
    assert perms == ["n0", f"r{guest.domid}"]
    assert guest.xs.read(guest.paths.backend_key("sectors")) == guest.backend("sectors")
    guest.set_state(XenbusState.CONNECTED)

    pattern = bytes(range(256)) * 16
    assert guest.write(8, pattern) == 0
    status, data = guest.read(8, len(pattern) // SECTOR_SIZE)
    assert status == 0 and data == pattern

    guest.close()
    lines = log_events(host.tapback_log, "step")
    assert lines and all(line["domid"] == guest.domid for line in lines)
    assert {"pid", "minor", "devid"} <= set(lines[-1])


def test_indirect_descriptors_are_served_as_advertised(guests: GuestFactory) -> None:
    """tapback advertises feature-max-indirect-segments at probe and hands the same value
    to the tapdisk at connect: up to it an indirect request is served, past it refused."""
    guest = guests(size=8 << 20)
    guest.wait_backend(XenbusState.INIT_WAIT)
    offer = int(guest.backend("feature-max-indirect-segments") or 0)
    assert offer == DEFAULT_MAX_INDIRECT_SEGMENTS
    guest.publish_transport(max_segs=offer + 1)
    guest.wait_backend(XenbusState.CONNECTED)
    guest.set_state(XenbusState.CONNECTED)
    data = os.urandom(offer * 4096)
    assert guest.write(8, data) == 0  # one INDIRECT request of `offer` segments
    status, back = guest.read(8, offer * 8)
    assert status == 0 and back == data
    assert guest.ring is not None
    [gref] = guest.ring.call("data_grefs", pages=1)
    guest.ring.call("submit", reqs=[{"op": 6, "indirect_op": 0,
                                     "segs": [[gref, 0, 7]] * (offer + 1)}])
    assert guest.ring.call("collect", n=1) == [-1]  # BLKIF_RSP_ERROR
    guest.close()


def test_reconnect_after_closed(host: Host, guests: GuestFactory) -> None:
    guest = guests()
    guest.connect()
    guest.close()
    guest.set_state(XenbusState.INITIALISING)
    guest.connect()  # a fresh ring, as after a resume
    assert guest.write(0, b"\xab" * SECTOR_SIZE) == 0
    assert guest.read(0, 1) == (0, b"\xab" * SECTOR_SIZE)


def test_frontend_vanishing_while_connected_closes_and_leaves_the_dir_to_the_toolstack(
        host: Host, dom0: XenStore, guests: GuestFactory) -> None:
    guest = guests()
    guest.connect()
    before = set(dom0.ls(guest.paths.backend))
    dom0.rm(guest.paths.frontend)  # the guest went (domain destroyed)
    guest.wait_backend(XenbusState.CLOSED)
    # Nothing of the toolstack's removed (libxl waits for Closed, then runs block-tap
    # remove with pid/minor read from this directory, then removes it).
    assert before <= set(dom0.ls(guest.paths.backend))
    assert guest.backend("params") == f"aio:{guest.image}"
    assert guest.attached.pid in tapdisk_pids(host.control_dir)
    remove(host, guest)
    wait_until(lambda: tapdisk_pids(host.control_dir) == [], what="tapdisk gone")
    assert runtime.allocated_minors(service.control_dir(host.run_dir)) == []


def test_nothing_left_after_the_vbd_goes(host: Host, dom0: XenStore,
                                         guests: GuestFactory) -> None:
    guest = guests()
    guest.connect()
    guest.close()
    remove(host, guest)
    root = service.control_dir(host.run_dir)
    wait_until(lambda: tapdisk_pids(host.control_dir) == [], what="tapdisk gone")
    assert runtime.socket_pids(root) == []
    assert runtime.allocated_minors(root) == []
    assert not dom0.exists(guest.paths.backend)


def test_online_0_unregisters_after_closed(host: Host, dom0: XenStore,
                                           guests: GuestFactory) -> None:
    guest = guests()
    guest.connect()
    dom0.write(guest.paths.backend_key("online"), "0")
    guest.close()
    wait_until(lambda: any(line.get("state") == "unregistered"
                           for line in log_events(host.tapback_log, "vbd released")),
               what="unregistered")
    assert guest.backend_state() is XenbusState.CLOSED


def test_backend_waits_for_a_late_frontend(host: Host, dom0: XenStore,
                                           guests: GuestFactory) -> None:
    """blktap's tapback deleted a back-end dir that appeared before its front-end."""
    service.stop(host.run_dir)
    guest = guests()
    saved = {key: dom0.read(guest.paths.frontend_key(key)) for key in dom0.ls(guest.paths.frontend)}
    perms = dom0.get_perms(guest.paths.frontend)
    dom0.rm(guest.paths.frontend)
    service.start(host.run_dir, xenstored_path=str(host.xenstored_path))
    wait_until(lambda: guest.backend("max-ring-page-order") == "4", what="probe keys")
    assert dom0.exists(guest.paths.backend)
    assert guest.backend_state() is XenbusState.INITIALISING

    def recreate(tx: Transaction) -> None:
        tx.mkdir(guest.paths.frontend, perms)
        for key, value in saved.items():
            tx.write(guest.paths.frontend_key(key), value, perms)

    dom0.transact(recreate)
    guest.connect()


def test_three_guests_with_four_disks_each_at_once(host: Host, guests: GuestFactory) -> None:
    disks = [guests(domid=domid, devid=51712 + 16 * n, size=2 << 20)
             for domid in (5, 6, 7) for n in range(4)]
    for disk in disks:
        disk.wait_backend(XenbusState.INIT_WAIT)
    for disk in disks:  # every front-end publishes before any back-end connects
        disk.publish_transport(data_slots=4)
    for n, disk in enumerate(disks):
        disk.wait_backend(XenbusState.CONNECTED)
        disk.set_state(XenbusState.CONNECTED)
        data = bytes([n + 1]) * 4096
        assert disk.write(8 * n, data) == 0
    for n, disk in enumerate(disks):
        assert disk.read(8 * n, 8) == (0, bytes([n + 1]) * 4096)
    assert len({disk.attached.pid for disk in disks}) == 12
    for disk in disks:
        disk.close()
    for disk in disks:
        remove(host, disk)
    wait_until(lambda: tapdisk_pids(host.control_dir) == [], what="every tapdisk gone")


@pytest.mark.parametrize("xenstored_kind", ["ocaml"])
def test_handshake_on_oxenstored(host: Host, guests: GuestFactory) -> None:
    guest = guests()
    guest.connect()
    assert guest.write(0, b"\x11" * 512) == 0
    guest.close()


def test_hotplug_failure_reaches_the_error_node(host: Host, dom0: XenStore) -> None:
    image = host.run_dir / "gone.img"
    image.write_bytes(b"\0" * 4096)
    with host.toolstack() as ts:
        ts.create_domain(5)
        paths = ts.add_vbd(5, 51712, Image.parse(f"aio:{image}"))
    image.unlink()  # the tapdisk cannot open it
    with pytest.raises(HotplugError):
        hotplug_add(host, paths, Image.parse(f"aio:{image}", must_exist=False))
    wait_until(lambda: dom0.read_optional(paths.backend_key("state")) == "6", what="Closed")
    error = dom0.read(paths.backend_key("error"))
    assert "tap-ctl create" in error and str(image) in error
    # create's rollback detached the last VBD: the tapdisk exits after its answer.
    wait_until(lambda: tapdisk_pids(host.control_dir) == [], what="no tapdisk left")
