"""Watches fire across dom0 (socket) and the guest (ring), on both daemons."""

from __future__ import annotations

import pytest

from blktap3.sim.host import Host
from blktap3.xenbus import WatchEvent, WatchStream, XenStore

from .conftest import Guest

pytestmark = pytest.mark.integration


def _next_for(stream: WatchStream, path: str, timeout: float = 5.0) -> WatchEvent:
    """The first event for `path` (a watch may also fire for other, earlier changes)."""
    while True:
        event = stream.wait(timeout)
        assert event is not None, f"no watch event for {path} within {timeout}s"
        assert isinstance(event, WatchEvent)
        if event.path == path:
            return event


def test_dom0_sees_the_guest_write_its_frontend_state(
    guest: Guest, host: Host
) -> None:
    with WatchStream.open(str(host.xenstored_path), timeout=5.0) as stream:
        stream.watch(guest.vbd.frontend_key("state"), "fe-state")
        assert _next_for(stream, guest.vbd.frontend_key("state")).token == "fe-state"
        guest.xs.write(guest.vbd.frontend_key("state"), "3")
        assert _next_for(stream, guest.vbd.frontend_key("state")).token == "fe-state"


def test_guest_sees_dom0_write_its_backend_state(guest: Guest, xs: XenStore) -> None:
    stream = WatchStream(lambda: guest.xs)  # the ring's one connection serves both
    stream.watch(guest.vbd.backend_key("state"), "be-state")
    assert _next_for(stream, guest.vbd.backend_key("state")).token == "be-state"
    xs.write(guest.vbd.backend_key("state"), "2")
    assert _next_for(stream, guest.vbd.backend_key("state")).token == "be-state"
    assert guest.xs.read(guest.vbd.backend_key("state")) == "2"


def test_transaction_writes_fire_once_committed(guest: Guest, host: Host) -> None:
    with WatchStream.open(str(host.xenstored_path), timeout=5.0) as stream:
        stream.watch(guest.vbd.frontend, "fe")
        _next_for(stream, guest.vbd.frontend)
        tx = guest.xs.transaction()
        tx.write(guest.vbd.frontend_key("event-channel"), "9")
        assert stream.wait(0.3) is None, "no event before commit"
        assert tx.commit()
        assert _next_for(stream, guest.vbd.frontend_key("event-channel")).token == "fe"
