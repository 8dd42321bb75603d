"""A simulated guest domain that reaches the real xenstored through its ring page.

The toolstack part does what libxl does for a vbd3 device (back-end directory owned by
dom0 and readable by the guest, front-end directory owned by the guest and readable by
dom0), then introduces the domain. The guest part maps the domain's xenstore page and
claims its xenstore port through blktap3.sim.xenlib, and talks XenStore over
`RingConnection`: for xenstored it is a real unprivileged domain.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from blktap3.sim import xenlib, xensim
from blktap3.sim.xenstored import Xenstored
from blktap3.xenbus import BoundPort, Transaction, VbdPaths, XenStore, owned_by

GUEST_DOMID = 5
DEVID = 51712


@dataclass
class Guest:
    domid: int
    xs: XenStore  # the guest's own connection, over its ring
    vbd: VbdPaths


def create_vbd_nodes(xs: XenStore, vbd: VbdPaths) -> None:
    """The back-end and front-end directories with libxl's permissions."""

    def body(tx: Transaction) -> None:
        tx.mkdir(vbd.backend, perms=owned_by(vbd.backend_domid, readers=[vbd.domid]))
        tx.write(vbd.backend_key("frontend"), vbd.frontend)
        tx.write(vbd.backend_key("state"), "1")
        tx.mkdir(vbd.frontend, perms=owned_by(vbd.domid, readers=[vbd.backend_domid]))
        tx.write(vbd.frontend_key("backend"), vbd.backend)
        tx.write(vbd.frontend_key("state"), "1")

    xs.transact(body)


@pytest.fixture
def guest(xenstored: Xenstored, xs: XenStore) -> Iterator[Guest]:
    machine = xensim.Machine(xenstored.run_dir)
    info = machine.create_domain(GUEST_DOMID)
    home = f"/local/domain/{GUEST_DOMID}"
    xs.mkdir(home, perms=owned_by(0, readers=[GUEST_DOMID]))
    xs.mkdir(f"{home}/device", perms=owned_by(GUEST_DOMID, readers=[0]))
    vbd = VbdPaths(GUEST_DOMID, DEVID)
    create_vbd_nodes(xs, vbd)
    xs.introduce(GUEST_DOMID, info.xenstore_mfn, info.xenstore_port)

    page = xenlib.map_xenstore_page(xenstored.run_dir, GUEST_DOMID)
    evtchn = xenlib.EventChannel(xenstored.run_dir, GUEST_DOMID)
    evtchn.claim(info.xenstore_port)
    port = BoundPort(evtchn, info.xenstore_port, evtchn.fd)
    guest_xs = XenStore.over_ring(memoryview(page), port, timeout=5.0,
                                  name=f"dom{GUEST_DOMID}-xenstore")
    try:
        yield Guest(GUEST_DOMID, guest_xs, vbd)
    finally:
        guest_xs.close()
        evtchn.close()
