"""A simulated guest domain that reaches the real xenstored through its ring page.

The toolstack part does what libxl does for a vbd3 device (back-end directory owned by
dom0 and readable by the guest, front-end directory owned by the guest and readable by
dom0), then introduces the domain. The guest part connects over the domain's xenstore ring
(`tests.support.sim.guest_xenstore`): for xenstored it is a real unprivileged domain.
The host (`host`, `xs`) is the shared fixture: these tests run on both xenstoreds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from blktap3.sim.host import Host
from blktap3.xenbus import Transaction, VbdPaths, XenStore, owned_by
from tests.support.sim import guest_xenstore

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
def guest(host: Host, xs: XenStore) -> Iterator[Guest]:
    info = host.machine.create_domain(GUEST_DOMID)
    home = f"/local/domain/{GUEST_DOMID}"
    xs.mkdir(home, perms=owned_by(0, readers=[GUEST_DOMID]))
    xs.mkdir(f"{home}/device", perms=owned_by(GUEST_DOMID, readers=[0]))
    vbd = VbdPaths(GUEST_DOMID, DEVID)
    create_vbd_nodes(xs, vbd)
    xs.introduce(GUEST_DOMID, info.xenstore_mfn, info.xenstore_port)

    connection = guest_xenstore(host.run_dir, GUEST_DOMID, info.xenstore_port)
    try:
        yield Guest(GUEST_DOMID, connection.xs, vbd)
    finally:
        connection.close()
