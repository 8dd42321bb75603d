"""The back-end rules chosen per toolstack and for a front-end that goes or starts again.

- libxl's order: InitWait (after the probe keys) as soon as the directory is found,
  before hotplug; xapi's (the default, blktap's): InitWait only once hotplug is connected;
- a vanished front-end: Closed, the ring down, and the toolstack's directory left alone;
- a failed VBD reconnects when its front-end starts again (as Linux blkback from Closed);
- Connected -> Initialising (a new guest on the VBD): the ring down, then InitWait.
"""

from __future__ import annotations

import errno

from blktap3.abi import MAX_RING_PAGE_ORDER, BlkifProtocol
from blktap3.fsm import (
    BackendFeatures,
    BackendFound,
    BackendRemoved,
    BackendVbd,
    DiskInfo,
    FrontendVanished,
    HotplugFailed,
    OnlineChanged,
    PublishState,
    ReadFrontendTransport,
    RingConnectFailed,
    RingDisconnected,
    RingDisconnectFailed,
    RingTransport,
    SendControl,
    SetError,
    Toolstack,
    TransportInvalid,
    TransportRead,
    Unregister,
    WriteKeys,
    XenblkifConnect,
    XenblkifDisconnect,
)

from . import steps
from .steps import S, fe

DISK = DiskInfo(sectors=2048)
TRANSPORT = TransportRead(RingTransport((11,), 9, BlkifProtocol.X86_64))
DISCONNECT = SendControl(XenblkifDisconnect(77, 3, 5, 768))


def libxl_vbd() -> BackendVbd:
    return BackendVbd(domid=5, devid=768, toolstack=Toolstack.LIBXL)


def connect(vbd: BackendVbd) -> None:
    steps.connect(vbd, TRANSPORT)


def hotplug(vbd: BackendVbd, via: str | None = "querying_disk") -> tuple[object, ...]:
    return steps.hotplug(vbd, DISK, via)


def connected(toolstack: Toolstack = Toolstack.XAPI) -> BackendVbd:
    return steps.connected(DISK, TRANSPORT, toolstack)


# --- the toolstack's order ------------------------------------------------------------------


def test_libxl_gets_initwait_with_the_probe_keys_when_the_directory_appears() -> None:
    vbd = libxl_vbd()
    effects = vbd.handle(BackendFound(S.INITIALISING))
    assert effects == (WriteKeys(BackendFeatures().probe_keys(), vbd.perms),
                       PublishState(S.INIT_WAIT))
    assert vbd.state == "probed"


def test_xapi_gets_initwait_only_after_hotplug() -> None:
    vbd = BackendVbd(domid=5, devid=768)
    assert vbd.handle(BackendFound(S.INITIALISING)) == ()
    vbd.handle(fe(S.INITIALISING))
    assert vbd.state == "waiting_hotplug" and vbd.published == S.INITIALISING
    effects = hotplug(vbd)
    assert effects == (WriteKeys(BackendFeatures().probe_keys(), vbd.perms),
                       PublishState(S.INIT_WAIT))


def test_libxl_hotplug_after_initwait_writes_nothing_twice() -> None:
    vbd = libxl_vbd()
    vbd.handle(BackendFound(S.INITIALISING))
    vbd.handle(fe(S.INITIALISING))
    assert hotplug(vbd) == ()  # probe keys and InitWait went out already
    assert vbd.state == "init_wait"
    connect(vbd)


def test_libxl_frontend_ready_before_hotplug_is_read_once_hotplug_named_the_tapdisk() -> None:
    vbd = libxl_vbd()
    vbd.handle(BackendFound(S.INITIALISING))
    assert vbd.handle(fe(S.INITIALISED)) == ()  # no tapdisk to give the ring to yet
    assert hotplug(vbd) == (ReadFrontendTransport(MAX_RING_PAGE_ORDER),)
    (effect,) = vbd.handle(TRANSPORT)
    assert effect == SendControl(XenblkifConnect(77, 3, 5, 768, TRANSPORT.transport))


def test_libxl_found_closed_waits_for_hotplug_as_xapi() -> None:
    vbd = libxl_vbd()
    assert vbd.handle(BackendFound(S.CLOSED)) == ()
    assert vbd.state == "waiting_hotplug"


def test_libxl_hotplug_failure_after_initwait_fails_the_vbd() -> None:
    vbd = libxl_vbd()
    vbd.handle(BackendFound(S.INITIALISING))
    effects = vbd.handle(HotplugFailed("tap-ctl open failed"))
    assert effects == (SetError("hotplug: tap-ctl open failed"), PublishState(S.CLOSED))


def test_libxl_removal_before_hotplug_unregisters_with_closed() -> None:
    vbd = libxl_vbd()
    vbd.handle(BackendFound(S.INITIALISING))
    assert vbd.handle(OnlineChanged(False)) == (PublishState(S.CLOSED), Unregister())
    assert vbd.is_final


# --- a vanished front-end -------------------------------------------------------------------


def test_vanished_frontend_of_a_connected_vbd_closes_and_keeps_the_directory() -> None:
    for toolstack in Toolstack:
        vbd = connected(toolstack)
        assert vbd.handle(FrontendVanished()) == (DISCONNECT,)
        assert vbd.handle(RingDisconnected()) == (PublishState(S.CLOSED),)
        assert vbd.state == "closed" and not vbd.is_final
        # libxl then sets online=0 (Closed is not written again) and removes the directory
        assert vbd.handle(OnlineChanged(False)) == (Unregister(),)
        assert vbd.is_final


def test_vanished_frontend_with_a_dead_tapdisk_still_closes() -> None:
    vbd = connected()
    vbd.handle(FrontendVanished())
    assert vbd.handle(RingDisconnectFailed(errno.ECONNREFUSED)) == (PublishState(S.CLOSED),)
    assert vbd.handle(BackendRemoved()) == (Unregister(),)  # the toolstack removed it
    assert vbd.is_final


def test_vanished_frontend_in_libxl_initwait_before_hotplug_closes() -> None:
    vbd = libxl_vbd()
    vbd.handle(BackendFound(S.INITIALISING))
    vbd.handle(fe(S.INITIALISING))
    assert vbd.handle(FrontendVanished()) == (PublishState(S.CLOSED),)
    # block-tap's add may still finish: the disk is learnt, nothing else happens
    hotplug(vbd, via=None)
    assert vbd.state == "closed"


def test_vanished_frontend_after_closed_changes_nothing() -> None:
    vbd = connected()
    vbd.handle(fe(S.CLOSED))
    vbd.handle(RingDisconnected())
    assert vbd.state == "closed"
    assert vbd.handle(FrontendVanished()) == ()
    assert vbd.state == "closed"


# --- a front-end that starts again --------------------------------------------------------


def failed_on_bad_transport() -> BackendVbd:
    vbd = BackendVbd(domid=5, devid=768)
    vbd.handle(fe(S.INITIALISING))
    hotplug(vbd)
    vbd.handle(fe(S.INITIALISED))
    vbd.handle(TransportInvalid("ring-ref missing"))
    assert vbd.state == "failed" and vbd.published == S.CLOSED
    return vbd


def test_failed_vbd_reconnects_when_its_frontend_initialises_again() -> None:
    vbd = failed_on_bad_transport()
    assert vbd.handle(fe(S.CLOSED)) == ()
    assert vbd.handle(fe(S.INITIALISING)) == (PublishState(S.INIT_WAIT),)
    connect(vbd)


def test_failed_before_hotplug_named_a_tapdisk_does_not_reconnect() -> None:
    vbd = BackendVbd(domid=5, devid=768)
    vbd.handle(fe(S.CLOSED))
    vbd.handle(HotplugFailed("no such file"))
    assert vbd.state == "failed"
    assert vbd.handle(fe(S.INITIALISING)) == ()
    assert vbd.state == "failed"


def test_failed_ring_connect_reconnects_and_fails_again_if_the_tapdisk_still_refuses() -> None:
    vbd = BackendVbd(domid=5, devid=768)
    vbd.handle(fe(S.INITIALISING))
    hotplug(vbd)
    vbd.handle(fe(S.INITIALISED))
    vbd.handle(TRANSPORT)
    vbd.handle(RingConnectFailed(errno.ECONNREFUSED))
    assert vbd.state == "failed"
    vbd.handle(fe(S.CLOSED))
    vbd.handle(fe(S.INITIALISING))
    vbd.handle(fe(S.INITIALISED))
    vbd.handle(TRANSPORT)
    effects = vbd.handle(RingConnectFailed(errno.ECONNREFUSED))
    assert vbd.state == "failed"
    assert effects[-1] == PublishState(S.CLOSED)


def test_connected_to_initialising_takes_the_ring_down_then_initwait_without_closed() -> None:
    vbd = connected()
    assert vbd.handle(fe(S.INITIALISING)) == (DISCONNECT,)
    assert vbd.state == "disconnecting_ring"
    # no Closed: a Linux blkfront that initialises closes itself on a back-end Closed
    assert vbd.handle(RingDisconnected()) == (PublishState(S.INIT_WAIT),)
    connect(vbd)  # the new front-end's ring


def test_connected_to_initialising_with_the_ring_already_gone_still_reconnects() -> None:
    vbd = connected()
    vbd.handle(fe(S.INITIALISING))
    assert vbd.handle(RingDisconnectFailed(errno.ENODEV)) == (PublishState(S.INIT_WAIT),)
    assert vbd.state == "init_wait"


def test_connected_to_initialising_then_offline_unregisters() -> None:
    vbd = connected()
    vbd.handle(OnlineChanged(False))
    vbd.handle(fe(S.INITIALISING))
    assert vbd.handle(RingDisconnected()) == (PublishState(S.CLOSED), Unregister())
    assert vbd.is_final
