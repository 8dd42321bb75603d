"""tapback's status file on the simulated host: what the diagram tool reads."""

from __future__ import annotations

import json
from typing import Any

import pytest

from blktap3.sim.host import Host
from blktap3.tapback import service
from tests.support import wait_until

from .conftest import DEVID, GuestFactory, remove

pytestmark = pytest.mark.integration


def read(host: Host) -> dict[str, Any]:
    content: dict[str, Any] = json.loads(service.status_path(host.run_dir).read_text())
    return content


def test_status_file_follows_a_vbd_from_connected_to_gone(host: Host,
                                                         guests: GuestFactory) -> None:
    assert read(host) == {"pid": service.status(host.run_dir), "vbds": []}  # at start
    guest = guests(domid=5)
    guest.connect()
    connected = {"domid": 5, "devid": DEVID, "machine": "backend_vbd", "state": "connected",
                 "published": 4}
    # written after the step that published 4, which the guest may see first
    wait_until(lambda: read(host)["vbds"] == [connected],
               what=lambda: f"connected in {read(host)}")
    guest.close()
    remove(host, guest)
    wait_until(lambda: read(host)["vbds"] == [], what=lambda: f"the VBD gone from {read(host)}")
    service.stop(host.run_dir)
    assert not service.status_path(host.run_dir).exists()  # removed on a clean exit
