"""dom0 parses what a guest really wrote: good keys parse, hostile ones give typed errors."""

from __future__ import annotations

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.xenbus import (
    RingQueue,
    Transaction,
    XenbusState,
    XenbusValueError,
    XenStore,
    parse_frontend_transport,
    parse_state,
    reader_for,
)

from .conftest import Guest

pytestmark = pytest.mark.integration


def test_transport_keys_written_by_the_guest_parse(guest: Guest, xs: XenStore) -> None:
    def publish(tx: Transaction) -> None:
        tx.write(guest.vbd.frontend_key("ring-page-order"), "1")
        tx.write(guest.vbd.frontend_key("ring-ref0"), "8")
        tx.write(guest.vbd.frontend_key("ring-ref1"), "9")
        tx.write(guest.vbd.frontend_key("event-channel"), "5")
        tx.write(guest.vbd.frontend_key("protocol"), "x86_64-abi")
        tx.write(guest.vbd.frontend_key("state"), XenbusState.INITIALISED.wire())

    guest.xs.transact(publish)
    transport = xs.transact(
        lambda tx: parse_frontend_transport(reader_for(tx, guest.vbd.frontend)))
    assert transport.queues == (RingQueue((8, 9), 5),)
    assert transport.protocol is BlkifProtocol.X86_64
    assert parse_state(xs.read(guest.vbd.frontend_key("state"))) is XenbusState.INITIALISED


def test_hostile_values_from_the_guest_are_typed_errors(guest: Guest, xs: XenStore) -> None:
    guest.xs.write(guest.vbd.frontend_key("ring-ref"), "8")
    guest.xs.write(guest.vbd.frontend_key("event-channel"), "0x10")
    guest.xs.write(guest.vbd.frontend_key("state"), "\xff4")
    with pytest.raises(XenbusValueError) as info:
        parse_frontend_transport(reader_for(xs, guest.vbd.frontend))
    assert (info.value.key, info.value.value) == ("event-channel", "0x10")
    state_key = guest.vbd.frontend_key("state")
    with pytest.raises(XenbusValueError) as state_info:
        parse_state(xs.read(state_key), key=state_key)
    assert state_info.value.key == state_key
