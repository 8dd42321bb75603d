"""A guest domain's own XenStore connection over its xenstore ring page.

The domain must exist on the machine and be introduced to xenstored (the toolstack does
both): the test then maps its xenstore page and claims its xenstore port through
`blktap3.sim.xenlib`, as the guest's kernel would, and talks XenStore over the ring:
for xenstored it is a real unprivileged domain.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from blktap3.sim import xenlib
from blktap3.xenbus import BoundPort, XenStore


@dataclass
class GuestXenStore:
    """The guest's connection (`xs`) and the event channel it runs over."""

    xs: XenStore
    evtchn: xenlib.EventChannel

    def close(self) -> None:
        with contextlib.suppress(Exception):  # xenstored may be gone already
            self.xs.close()
        self.evtchn.close()


def guest_xenstore(run_dir: str | os.PathLike[str], domid: int, xenstore_port: int,
                   timeout: float = 5.0) -> GuestXenStore:
    """Connect as domain `domid` over its ring (close it when done)."""
    page = xenlib.map_xenstore_page(run_dir, domid)
    evtchn = xenlib.EventChannel(run_dir, domid)
    evtchn.claim(xenstore_port)
    port = BoundPort(evtchn, xenstore_port, evtchn.fd)
    xs = XenStore.over_ring(memoryview(page), port, timeout=timeout,
                            name=f"dom{domid}-xenstore")
    return GuestXenStore(xs, evtchn)
