"""The h11 trick: a front-end and a back-end machine wired through an in-memory store."""

from __future__ import annotations

from blktap3.abi import BlkifProtocol
from blktap3.fsm.effects import (
    PublishState,
    SendControl,
    Unregister,
    WriteKeys,
    XenblkifConnect,
    XenblkifDisconnect,
)
from blktap3.fsm.events import DeviceClose, DeviceReconnect
from blktap3.fsm.frontend import FrontendTransportConfig
from blktap3.fsm.xenbus_state import XenbusState as S
from blktap3.sim.memory import VbdPair


def kinds(effects: list[object]) -> list[str]:
    out = []
    for e in effects:
        if isinstance(e, PublishState):
            out.append(f"state={e.state.value}")
        elif isinstance(e, SendControl):
            out.append(type(e.message).__name__)
        else:
            out.append(type(e).__name__)
    return out


def connected_pair() -> VbdPair:
    pair = VbdPair()
    pair.create()
    assert (pair.backend.state, pair.frontend.state) == ("connected", "connected")
    return pair


def test_normal_handshake_follows_protocol_order() -> None:
    pair = connected_pair()
    assert [(who, k) for (who, _), k in zip(pair.trace, kinds([e for _, e in pair.trace]),
                                              strict=True)] == [
        ("backend", "WatchTapdisk"),  # hotplug named the tapdisk
        ("backend", "DiskInfoQuery"),  # the machine asks it for the disk
        ("backend", "WriteKeys"),  # max-ring-page-order
        ("backend", "state=2"),
        ("frontend", "OfferRing"),  # the ring granted, its event channel bound
        ("frontend", "WriteKeys"),  # ring-ref, event-channel, protocol: one transaction
        ("frontend", "state=3"),
        ("backend", "ReadFrontendTransport"),
        ("backend", "XenblkifConnect"),
        ("backend", "WriteKeys"),  # features + sectors + info + sector-size: one transaction
        ("backend", "state=4"),
        ("frontend", "ReadBackendInfo"),
        ("frontend", "state=4"),
        # Its watch on our `state` fires once more (for the write of 4, delivered after
        # it read 4 already): blkfront reads the size again, as Linux's does.
        ("frontend", "ReadBackendInfo"),
    ]
    be = pair.be_path
    assert pair.store.read(f"{be}/sectors") == str(pair.tapdisk.disk.sectors)
    assert pair.store.read(f"{be}/sector-size") == "512"
    assert pair.store.read(f"{be}/max-ring-page-order") == "4"
    assert pair.store.perms[f"{be}/sectors"] == ("n0", "r1")
    assert pair.backend_states() == [1, 2, 4]  # no redundant state write
    connect = next(e for _, e in pair.trace
                   if isinstance(e, SendControl) and isinstance(e.message, XenblkifConnect))
    assert isinstance(connect.message, XenblkifConnect)
    assert connect.message.transport.ring_refs == (8,)
    assert connect.message.transport.protocol is BlkifProtocol.X86_64
    assert (1, 51712) in pair.tapdisk.rings


def test_connect_keys_are_one_transaction_before_state_4() -> None:
    pair = connected_pair()
    be_effects = pair.effects("backend")
    i = be_effects.index(PublishState(S.CONNECTED))
    keys = be_effects[i - 1]
    assert isinstance(keys, WriteKeys)
    assert {"sectors", "info", "sector-size", "feature-barrier"} <= set(keys.as_dict())


def test_hotplug_is_awaited_before_initwait() -> None:
    pair = VbdPair()
    pair.create_backend_dir()
    pair.create_frontend_dir()
    pair.store.pump()
    assert pair.backend.state == "waiting_hotplug"
    assert pair.backend_states() == [1]
    pair.hotplug()
    pair.store.pump()
    assert pair.backend.state == "connected"
    assert pair.backend_states() == [1, 2, 4]


def test_guest_close_then_reconnect() -> None:
    pair = connected_pair()
    mark = len(pair.trace)
    pair.guest(DeviceClose())
    assert (pair.backend.state, pair.frontend.state) == ("closed", "closed")
    assert pair.tapdisk.rings == set()
    pair.guest(DeviceReconnect())
    assert (pair.backend.state, pair.frontend.state) == ("connected", "connected")
    assert pair.backend_states() == [1, 2, 4, 5, 6, 2, 4]
    assert kinds([e for _, e in pair.trace[mark:]]) == [
        "state=5",  # front-end Closing
        "state=5",  # back-end Closing
        "state=6",  # front-end Closed (blkfront lets go on the back-end's Closing)
        "XenblkifDisconnect",
        "state=6",  # back-end Closed
        "ReleaseRing",  # the back-end unmapped it: the front-end ungrants its ring
        "state=1",  # front-end starts over
        "state=2",  # back-end InitWait again
        "OfferRing",
        "WriteKeys",
        "state=3",
        "ReadFrontendTransport",
        "XenblkifConnect",
        "WriteKeys",
        "state=4",
        "ReadBackendInfo",
        "state=4",
    ]


def test_resize_reannounces_connected_with_new_sectors() -> None:
    pair = connected_pair()
    mark = len(pair.trace)
    pair.resize(1 << 21)
    assert pair.store.read(f"{pair.be_path}/sectors") == str(1 << 21)
    assert pair.frontend.disk is not None and pair.frontend.disk.sectors == 1 << 21
    new = pair.trace[mark:]
    assert [(who, k) for (who, _), k in zip(new, kinds([e for _, e in new]), strict=True)] == [
        ("backend", "DiskInfoQuery"),  # the image was reopened: what size now?
        ("backend", "WriteKeys"),
        ("backend", "state=4"),
        ("frontend", "ReadBackendInfo"),
    ]
    assert pair.frontend.state == "connected"


def test_frontend_vanishing_mid_handshake_closes_and_leaves_the_backend_dir() -> None:
    pair = VbdPair()
    pair.create_backend_dir()
    pair.create_frontend_dir()
    pair.hotplug()
    # run only until the back-end said InitWait, before the front-end answers
    while pair.backend.state != "init_wait":
        callback, path = pair.store.pending.popleft()
        callback(path)
    pair.store.pending.clear()
    pair.remove_frontend()
    assert pair.backend.state == "closed"
    assert not pair.backend.is_final
    # The directory is the toolstack's: only Closed was written (libxl now runs
    # block-tap remove, then removes it).
    assert pair.store.read(f"{pair.be_path}/state") == "6"
    assert pair.store.read(f"{pair.be_path}/params") == "aio:/dev/null"
    assert kinds(pair.effects("backend"))[-1:] == ["state=6"]
    pair.set_offline()
    assert pair.backend.is_final
    assert pair.store.read(f"{pair.be_path}/state") == "6"


def test_frontend_vanishing_while_connected_takes_the_ring_down() -> None:
    pair = connected_pair()
    pair.remove_frontend()
    tail = pair.effects("backend")[-2:]
    assert isinstance(tail[0], SendControl) and isinstance(tail[0].message, XenblkifDisconnect)
    assert tail[1] == PublishState(S.CLOSED)
    assert pair.tapdisk.rings == set()
    assert pair.store.exists(pair.be_path)
    assert pair.backend.state == "closed"


def test_tapdisk_dying_while_connected_closes_with_an_error() -> None:
    pair = connected_pair()
    pair.kill_tapdisk()
    assert pair.backend.state == "failed"
    assert pair.frontend.state == "closed"
    assert pair.store.read(f"{pair.be_path}/error") == f"tapdisk {pair.tapdisk.pid} died"
    assert pair.backend_states()[-1] == 6
    # error node first, then Closed; nothing sent to the dead tapdisk
    assert kinds(pair.effects("backend"))[-2:] == ["SetError", "state=6"]
    assert not [e for e in pair.effects("backend")[-2:] if isinstance(e, SendControl)]


def test_backend_dir_before_frontend_waits_for_it() -> None:
    pair = VbdPair()
    pair.create_backend_dir()
    pair.hotplug()
    pair.store.pump()
    assert pair.backend.state == "waiting_frontend"
    assert any(p.startswith(pair.be_path) for p in pair.store.nodes)  # not deleted
    pair.create_frontend_dir()
    pair.store.pump()
    assert (pair.backend.state, pair.frontend.state) == ("connected", "connected")


def test_bad_frontend_state_value_sets_error_and_closes() -> None:
    pair = connected_pair()
    pair.store.write("guest", f"{pair.fe_path}/state", "+4")
    pair.store.pump()
    assert pair.backend.state == "failed"
    assert "'+4' is not a xenbus state" in (pair.store.read(f"{pair.be_path}/error") or "")
    effects = kinds(pair.effects("backend"))
    assert effects[-3:] == ["SetError", "XenblkifDisconnect", "state=6"]


def test_online_zero_unregisters_after_the_guest_closed() -> None:
    pair = connected_pair()
    pair.set_offline()
    assert pair.backend.state == "connected"  # the guest still uses the disk
    pair.guest(DeviceClose())
    assert pair.backend.state == "unregistered"
    assert pair.backend_states()[-1] == 6
    assert pair.effects("backend")[-1] == Unregister()


def test_bad_transport_fails_with_the_reason_in_the_error_node() -> None:
    pair = VbdPair(transport=FrontendTransportConfig(protocol="x86_16-abi"))
    pair.create()
    assert pair.backend.state == "failed"
    assert pair.frontend.state == "closed"
    assert "protocol: 'x86_16-abi': unknown protocol" in (
        pair.store.read(f"{pair.be_path}/error") or "")
    assert kinds(pair.effects("backend"))[-3:] == ["ReadFrontendTransport", "SetError", "state=6"]
    assert pair.tapdisk.rings == set()


def test_multi_page_ring_transport_reaches_the_tapdisk() -> None:
    pair = VbdPair(transport=FrontendTransportConfig(ring_refs=(10, 11, 12, 13)))
    pair.create()
    assert pair.store.read(f"{pair.fe_path}/ring-page-order") == "2"
    connect = next(e for e in pair.effects("backend")
                   if isinstance(e, SendControl) and isinstance(e.message, XenblkifConnect))
    assert isinstance(connect.message, XenblkifConnect)
    assert connect.message.transport.ring_refs == (10, 11, 12, 13)


def test_ring_order_above_our_maximum_is_refused() -> None:
    pair = VbdPair(transport=FrontendTransportConfig(ring_refs=tuple(range(32))))
    pair.create()
    assert pair.backend.state == "failed"
    assert "ring-page-order: '5': out of range 0..4" in (
        pair.store.read(f"{pair.be_path}/error") or "")
