"""A guest on its ring is a real unprivileged domain: xenstored enforces libxl's perms."""

from __future__ import annotations

import pytest

from blktap3.xenbus import (
    Access,
    Permission,
    XenStore,
    XenStoreNotFound,
    XenStorePermissionError,
)

from .conftest import Guest

pytestmark = pytest.mark.integration


def test_guest_cannot_write_its_backend_nodes(guest: Guest, xs: XenStore) -> None:
    with pytest.raises(XenStorePermissionError) as info:
        guest.xs.write(guest.vbd.backend_key("state"), "4")
    assert info.value.errno == 13
    with pytest.raises(XenStorePermissionError):
        guest.xs.write(guest.vbd.backend_key("sectors"), "1")
    with pytest.raises(XenStorePermissionError):
        guest.xs.rm(guest.vbd.backend)
    assert xs.read(guest.vbd.backend_key("state")) == "1"
    assert not xs.exists(guest.vbd.backend_key("sectors"))


def test_guest_writes_its_frontend_and_dom0_reads_both(guest: Guest, xs: XenStore) -> None:
    guest.xs.write(guest.vbd.frontend_key("ring-ref"), "8")
    guest.xs.write(guest.vbd.frontend_key("state"), "3")
    xs.write(guest.vbd.backend_key("state"), "2")
    assert xs.read(guest.vbd.frontend_key("ring-ref")) == "8"
    assert xs.read(guest.vbd.frontend_key("state")) == "3"
    assert guest.xs.read(guest.vbd.backend_key("state")) == "2"  # readable by the guest
    # A node the guest creates is the guest's, readable by nobody else but dom0.
    assert xs.get_perms(guest.vbd.frontend_key("ring-ref"))[0] == Permission(5, Access.NONE)


def test_guest_cannot_see_dom0_private_nodes(guest: Guest, xs: XenStore) -> None:
    xs.write("/local/domain/0/secret", "x")
    with pytest.raises(XenStorePermissionError):
        guest.xs.read("/local/domain/0/secret")
    with pytest.raises(XenStorePermissionError):
        guest.xs.set_perms(guest.vbd.backend, [Permission(5, Access.BOTH)])
    with pytest.raises(XenStoreNotFound):
        guest.xs.read(guest.vbd.frontend_key("nothing"))


def test_guest_relative_paths_and_domain_facts(guest: Guest, xs: XenStore) -> None:
    assert xs.is_domain_introduced(guest.domid)
    assert not xs.is_domain_introduced(77)
    assert guest.xs.get_domain_path(guest.domid) == f"/local/domain/{guest.domid}"
    assert sorted(xs.ls(guest.vbd.frontend)) == ["backend", "state"]


def test_values_larger_than_the_ring_cross_it_both_ways(guest: Guest, xs: XenStore) -> None:
    # 1900 bytes: more than the 1 KiB ring, within a guest's 2 KiB node quota.
    value = "".join(chr(ord("a") + i % 26) for i in range(1900))
    guest.xs.write(guest.vbd.frontend_key("big"), value)
    assert xs.read(guest.vbd.frontend_key("big")) == value
    xs.write(guest.vbd.backend_key("big"), value[::-1])
    for _ in range(5):  # several round trips: the indices run past the ring's end
        assert guest.xs.read(guest.vbd.backend_key("big")) == value[::-1]
