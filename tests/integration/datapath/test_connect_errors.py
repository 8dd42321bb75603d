"""A ring that cannot connect says which step failed and on which values (issue 15):
the grant map of the ring pages or the event-channel bind, through the real xensim."""

from __future__ import annotations

from pathlib import Path

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.datapath.lineproc import LineProcess

from .conftest import GUEST_DOMID

pytestmark = pytest.mark.integration


def _connect(host: LineProcess, guest: LineProcess, disk: Path, **override: object) -> str:
    host.call("open", name="r", driver="aio", path=str(disk))
    g = guest.call("open", backend=0, order=0, protocol=BlkifProtocol.NATIVE)
    args = {"name": "r", "image": "r", "domid": GUEST_DOMID, "devid": 51712,
            "grefs": g["grefs"], "order": 0, "port": g["port"],
            "protocol": BlkifProtocol.NATIVE, **override}
    with pytest.raises(OSError) as exc:
        host.call("connect", **args)
    return str(exc.value)


def test_a_grant_the_guest_did_not_give_names_the_grant_map(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    message = _connect(host, guest, disk, grefs=[4000])
    assert f"connect ring d{GUEST_DOMID}/51712: grant map of the ring: domain {GUEST_DOMID}, " \
           "1 page(s), first ref 4000" in message


def test_a_port_the_guest_did_not_offer_names_the_bind(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    message = _connect(host, guest, disk, port=999)
    assert f"connect ring d{GUEST_DOMID}/51712: event-channel bind: domain {GUEST_DOMID}, " \
           "port 999" in message

