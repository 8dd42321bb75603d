"""Least privilege in XenStore: every node of a VBD's back-end directory (what tapback
and the toolstack write, an `error` node included) is owned by dom0, readable by its
guest, writable by nobody else, and invisible to every other guest; checked on the real
xenstored, from the guests' own connections over their rings."""

from __future__ import annotations

import pytest

from blktap3.xenbus import Permission, XenbusState, XenStore
from blktap3.xenbus.errors import XenStorePermissionError
from blktap3.xenbus.perms import Access

from .conftest import Guest, GuestFactory

pytestmark = pytest.mark.integration


def _tree(xs: XenStore, path: str) -> list[str]:
    return [path] + [node for child in xs.ls(path) for node in _tree(xs, f"{path}/{child}")]


def _check_backend(dom0: XenStore, guest: Guest, other: Guest) -> list[str]:
    nodes = _tree(dom0, guest.paths.backend)
    assert len(nodes) > 10  # tapback's keys are there, not only the toolstack's
    for node in nodes:
        # Owner dom0 (default: none), the guest may only read.
        assert dom0.get_perms(node) == [Permission(0, Access.NONE),
                                        Permission(guest.domid, Access.READ)], node
        assert guest.xs.read_optional(node) == dom0.read_optional(node), node
        with pytest.raises(XenStorePermissionError):
            guest.xs.write(node, "1")
        with pytest.raises(XenStorePermissionError):
            other.xs.read(node)
    return nodes


def test_connected_backend_nodes_are_read_only_to_their_guest_and_hidden_from_others(
        dom0: XenStore, guests: GuestFactory) -> None:
    guest, other = guests(domid=5), guests(domid=6)
    guest.connect()
    other.connect()
    nodes = _check_backend(dom0, guest, other)
    assert guest.paths.backend_key("sectors") in nodes
    assert guest.paths.backend_key("feature-flush-cache") in nodes
    # Nothing the guest tried to write landed.
    assert guest.backend_state() is XenbusState.CONNECTED
    guest.close()
    other.close()


def test_an_error_node_is_read_only_to_its_guest_and_hidden_from_others(
        dom0: XenStore, guests: GuestFactory) -> None:
    guest, other = guests(domid=5), guests(domid=6)
    guest.wait_backend(XenbusState.INIT_WAIT)
    guest.publish_transport(extra={"ring-ref": "zz"})
    guest.wait_backend(XenbusState.CLOSED)
    nodes = _check_backend(dom0, guest, other)
    assert guest.paths.backend_key("error") in nodes
