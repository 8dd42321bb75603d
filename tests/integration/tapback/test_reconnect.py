"""A front-end that starts again on the same VBD: the back-end reconnects (issue 17).

- a guest that dies while Connected and a new one that writes Initialising: the old ring
  goes down and the back-end says InitWait (no Closed between), the new one connects;
- a VBD that failed reconnects when its front-end initialises again (as Linux blkback
  from Closed).
Each against the real xenstored, tapback and tapdisk.
"""

from __future__ import annotations

import pytest

from blktap3.abi import SECTOR_SIZE
from blktap3.xenbus import XenbusState

from .conftest import GuestFactory

pytestmark = pytest.mark.integration
OLD = b"\x11" * SECTOR_SIZE
NEW = b"\x22" * SECTOR_SIZE


@pytest.fixture
def xenstored_kind() -> str:
    return "c"


def test_a_new_guest_after_one_died_connected_gets_the_vbd(guests: GuestFactory) -> None:
    guest = guests()
    guest.connect()
    assert guest.write(0, OLD) == 0
    guest.shutdown()  # the guest's ring driver is gone: it died while Connected
    guest.set_state(XenbusState.INITIALISING)  # a new guest's blkfront
    guest.wait_backend(XenbusState.INIT_WAIT)
    guest.connect()  # a fresh ring
    assert guest.read(0, 1) == (0, OLD)  # what the dead guest wrote is there
    assert guest.write(1, NEW) == 0
    assert guest.read(1, 1) == (0, NEW)


def test_a_failed_vbd_reconnects_when_its_frontend_initialises_again(
        guests: GuestFactory) -> None:
    guest = guests()
    guest.wait_backend(XenbusState.INIT_WAIT)
    guest.publish_transport(extra={"event-channel": "not a port"})
    guest.wait_backend(XenbusState.CLOSED)
    assert "event-channel" in (guest.backend("error") or "")
    guest.set_state(XenbusState.CLOSED)
    guest.set_state(XenbusState.INITIALISING)  # rebooted, or kexec'd
    guest.wait_backend(XenbusState.INIT_WAIT)
    guest.connect()
    assert guest.write(0, NEW) == 0
    assert guest.read(0, 1) == (0, NEW)
