"""A restarted tapback adopts what the previous one left: `BackendFound` first.

The machine is told what the back-end directory holds; a Connected VBD is adopted (the
ring connect replayed, EALREADY accepted) without publishing a state or writing a key the
front-end already sees.  Other found states only spare redundant writes.
"""

from __future__ import annotations

import errno

import pytest

from blktap3.fsm import (
    BackendFeatures,
    BackendFound,
    BackendVbd,
    DiskInfo,
    DiskInfoFailed,
    DiskInfoQuery,
    DiskInfoRead,
    FrontendStateChanged,
    FrontendVanished,
    HotplugConnected,
    OurBug,
    PublishState,
    ReadFrontendTransport,
    RingConnected,
    RingConnectFailed,
    RingDisconnected,
    RingTransport,
    SendControl,
    SetError,
    TapdiskDied,
    TapdiskRef,
    TransportRead,
    WatchTapdisk,
    WriteKeys,
    XenblkifConnect,
    XenblkifDisconnect,
    XenbusState,
)

S = XenbusState
DISK = DiskInfo(sectors=2048, physical_sector_size=4096)
TAPDISK = TapdiskRef(pid=77, minor=3)
TRANSPORT = TransportRead(RingTransport((11,), 9))


def keys_of_a_connected_vbd() -> tuple[tuple[str, str], ...]:
    """What a tapback that connected this VBD wrote (probe and connect keys)."""
    features = BackendFeatures()
    return (*features.probe_keys(), *features.connect_keys(DISK), ("kthread-pid", "77"))


def hotplug(vbd: BackendVbd, disk: DiskInfo = DISK,
            tapdisk: TapdiskRef = TAPDISK) -> tuple[object, ...]:
    """hotplug-status=connected, then the answer to DISK_INFO: the effects of the answer."""
    assert vbd.handle(HotplugConnected(tapdisk)) == (
        WatchTapdisk(tapdisk), SendControl(DiskInfoQuery(tapdisk.pid, tapdisk.minor)))
    return vbd.handle(DiskInfoRead(disk))


def adopted(frontend: XenbusState | None = S.CONNECTED) -> BackendVbd:
    vbd = BackendVbd(domid=5, devid=768)
    assert vbd.handle(BackendFound(S.CONNECTED, keys_of_a_connected_vbd())) == ()
    assert vbd.state == "adopting" and vbd.published is S.CONNECTED
    vbd.handle(FrontendVanished() if frontend is None else FrontendStateChanged(frontend))
    return vbd


def test_connected_vbd_is_adopted_without_a_single_write() -> None:
    vbd = adopted()
    assert hotplug(vbd) == (ReadFrontendTransport(4),)  # no InitWait, no probe keys
    (connect,) = vbd.handle(TRANSPORT)
    assert connect == SendControl(XenblkifConnect(77, 3, 5, 768, TRANSPORT.transport))
    assert vbd.handle(RingConnectFailed(errno.EALREADY)) == ()
    assert vbd.state == "connected" and vbd.published is S.CONNECTED


def test_adoption_writes_only_the_keys_that_changed() -> None:
    vbd = adopted()
    hotplug(vbd, DiskInfo(4096, 512, 0, 4096), TapdiskRef(pid=78, minor=3))
    vbd.handle(TRANSPORT)
    effects = vbd.handle(RingConnected())  # a tapdisk that had lost the ring maps it again
    # The image grew while no tapback ran: new sectors, and Connected said again (a resize).
    assert effects == (WriteKeys((("sectors", "4096"), ("kthread-pid", "78")), vbd.perms),
                       PublishState(S.CONNECTED))


def test_adoption_with_another_tapdisk_says_nothing_but_its_pid() -> None:
    vbd = adopted()
    hotplug(vbd, DISK, TapdiskRef(pid=78, minor=3))
    vbd.handle(TRANSPORT)
    effects = vbd.handle(RingConnected())
    assert effects == (WriteKeys((("kthread-pid", "78"),), vbd.perms),)


def test_adopted_vbd_closes_and_reconnects_as_usual() -> None:
    vbd = adopted()
    hotplug(vbd)
    vbd.handle(TRANSPORT)
    vbd.handle(RingConnectFailed(errno.EALREADY))
    assert vbd.handle(FrontendStateChanged(S.CLOSING)) == (PublishState(S.CLOSING),)
    assert vbd.handle(FrontendStateChanged(S.CLOSED)) == (
        SendControl(XenblkifDisconnect(77, 3, 5, 768)),)
    assert vbd.handle(RingDisconnected()) == (PublishState(S.CLOSED),)
    vbd.handle(FrontendStateChanged(S.INITIALISING))
    vbd.handle(FrontendStateChanged(S.INITIALISED))
    vbd.handle(TRANSPORT)
    keys, state = vbd.handle(RingConnected())
    # Found keys are spared once; a reconnect writes the whole set as any connect does.
    assert isinstance(keys, WriteKeys) and "sectors" in keys.as_dict()
    assert state == PublishState(S.CONNECTED)


def test_frontend_that_closed_while_no_tapback_ran_gets_the_ring_taken_down() -> None:
    vbd = adopted(S.CLOSED)
    assert hotplug(vbd) == (SendControl(XenblkifDisconnect(77, 3, 5, 768)),)
    assert vbd.handle(RingDisconnected()) == (PublishState(S.CLOSED),)


def test_frontend_that_vanished_while_no_tapback_ran_gets_the_ring_taken_down() -> None:
    # Connected was published, so a front-end was there: its absent state node is a
    # vanished guest, not one yet to come; Closing would be said to nobody (found by the
    # conformance scenario adopt-frontend-vanished).
    for vbd in (adopted(None), BackendVbd(domid=5, devid=768)):
        if vbd.state == "waiting_hotplug":  # the daemon: nothing fed for an absent node
            vbd.handle(BackendFound(S.CONNECTED, keys_of_a_connected_vbd()))
        assert hotplug(vbd) == (SendControl(XenblkifDisconnect(77, 3, 5, 768)),)
        assert vbd.handle(RingDisconnected()) == (PublishState(S.CLOSED),)


@pytest.mark.parametrize("frontend", [S.INITIALISING, S.CLOSING])
def test_frontend_that_left_connected_is_asked_to_close(frontend: XenbusState | None) -> None:
    vbd = adopted(frontend)
    assert vbd.state == "adopting"
    assert hotplug(vbd) == (PublishState(S.CLOSING),)
    assert vbd.ring_requested  # the ring goes down on the front-end's Closed


def test_connect_refused_during_adoption_fails_and_drops_the_ring() -> None:
    vbd = adopted()
    hotplug(vbd)
    vbd.handle(TRANSPORT)
    effects = vbd.handle(RingConnectFailed(errno.EINVAL))
    assert vbd.state == "failed"
    assert isinstance(effects[0], SetError) and effects[-1] == PublishState(S.CLOSED)


def test_tapdisk_dead_at_adoption_fails_without_a_disconnect() -> None:
    vbd = adopted()
    vbd.handle(HotplugConnected(TAPDISK))
    effects = vbd.handle(DiskInfoFailed(errno.ECONNREFUSED))
    assert vbd.state == "failed"
    assert isinstance(effects[0], SetError)
    assert effects[1:] == (PublishState(S.CLOSED),)  # no ring was assumed yet


def test_tapdisk_dying_after_adoption_fails_with_a_disconnect() -> None:
    vbd = adopted(S.CLOSING)
    hotplug(vbd)
    assert vbd.state == "closing"
    effects = vbd.handle(TapdiskDied(77))
    assert effects[0] == SetError("tapdisk 77 died")
    assert effects[-1] == PublishState(S.CLOSED)


def test_found_initwait_is_not_published_again() -> None:
    vbd = BackendVbd(domid=5, devid=768)
    vbd.handle(BackendFound(S.INIT_WAIT, (("max-ring-page-order", "4"), ("max-ring-pages", "16"),
                                          ("multi-queue-max-queues", "1"))))
    vbd.handle(FrontendStateChanged(S.INITIALISING))
    assert hotplug(vbd) == ()
    assert vbd.state == "init_wait"


def test_found_closing_is_published_again_never_skipped_to_initwait() -> None:
    vbd = BackendVbd(domid=5, devid=768)
    vbd.handle(BackendFound(S.CLOSING))
    vbd.handle(FrontendStateChanged(S.INITIALISING))
    assert hotplug(vbd)[-1] == PublishState(S.INIT_WAIT)  # seen as 1 -> 2


def test_found_is_only_news_before_anything_happened() -> None:
    vbd = BackendVbd(domid=5, devid=768)
    hotplug(vbd)
    with pytest.raises(OurBug):
        vbd.handle(BackendFound(S.CONNECTED))
    assert vbd.state == "waiting_frontend"
