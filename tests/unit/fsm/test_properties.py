"""Property tests: random event sequences never make the back-end break the protocol.

Whatever happens, the back-end only publishes state transitions xenbus allows, publishes
Connected only right after the keys that go with it, and raises nothing but the typed
errors (leaving its state untouched when it does).
"""

from __future__ import annotations

import errno
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from blktap3.fsm import (
    BackendFeatures,
    BackendFound,
    BackendRemoved,
    BackendVbd,
    DeviceClose,
    DeviceReconnect,
    DiskInfo,
    DiskInfoFailed,
    DiskInfoQuery,
    DiskInfoRead,
    Event,
    FrontendStateChanged,
    FrontendStateInvalid,
    FrontendStateUnreadable,
    FrontendVanished,
    FsmError,
    HotplugConnected,
    HotplugFailed,
    ImageChanged,
    OnlineChanged,
    PublishState,
    ReadFrontendTransport,
    RingConnected,
    RingConnectFailed,
    RingDisconnected,
    RingDisconnectFailed,
    RingTransport,
    SendControl,
    TapdiskDied,
    TapdiskRef,
    TransportInvalid,
    TransportRead,
    WriteKeys,
    XenblkifConnect,
    XenblkifDisconnect,
    XenbusState,
)
from blktap3.sim.memory import VbdPair

# Back-end state changes the xenbus protocol allows (protocol.md steps 2-7): InitWait
# after the toolstack's 1, Connected from InitWait, Closing/Closed from anywhere live,
# InitWait again after Closed (reconnect), Connected again (resize), and InitWait straight
# from Connected when the front-end starts again (a new guest: no Closed between, which
# would make a Linux blkfront that initialises close itself; specs/backend_vbd.toml).
ALLOWED = {
    (1, 2), (1, 5), (1, 6),
    (2, 4), (2, 5), (2, 6),
    (4, 2), (4, 4), (4, 5), (4, 6),
    (5, 6),
    (6, 2),
}

DISK = DiskInfo(sectors=4096)
# What a previous tapback left in a Connected back-end directory.
FOUND_KEYS = (*BackendFeatures().probe_keys(), *BackendFeatures().connect_keys(DISK),
              ("kthread-pid", "10"))
EVENTS: list[Event] = [
    BackendFound(XenbusState.CONNECTED, FOUND_KEYS),
    BackendFound(XenbusState.INIT_WAIT, BackendFeatures().probe_keys()),
    BackendFound(XenbusState.CLOSING),
    BackendFound(XenbusState.CLOSED),
    *(FrontendStateChanged(s) for s in XenbusState),
    FrontendStateInvalid("x"),
    FrontendStateUnreadable(),
    FrontendVanished(),
    HotplugConnected(TapdiskRef(10, 1)),
    HotplugConnected(TapdiskRef(11, 0)),
    DiskInfoRead(DISK),
    DiskInfoFailed(errno.ECONNREFUSED),
    ImageChanged(),
    HotplugFailed("error"),
    OnlineChanged(False),
    OnlineChanged(True),
    BackendRemoved(),
    TransportRead(RingTransport((1,), 2)),
    TransportInvalid("ring-ref missing"),
    RingConnected(),
    RingConnectFailed(errno.EALREADY),
    RingConnectFailed(errno.EIO),
    RingDisconnected(),
    RingDisconnectFailed(errno.ENODEV),
    TapdiskDied(10),
    TapdiskDied(11),
    DiskInfoRead(DiskInfo(sectors=8192)),
    DiskInfoRead(DiskInfo(sectors=8192, sector_size=4096)),
]


def check_batch(event: Event, effects: tuple[object, ...], published: int,
                hotplug_seen: bool, transport_seen: bool, store: set[str]) -> int:
    """Assert the protocol rules on one batch; returns the new published state.

    `store` holds the keys the back-end directory has (found, or written since): a key
    a previous tapback left needs no write for Connected to be announced with it.
    """
    keys_written: set[str] = set(store)
    for effect in effects:
        if isinstance(effect, WriteKeys):
            keys_written |= set(effect.as_dict())
            store |= set(effect.as_dict())
        elif isinstance(effect, PublishState):
            new = effect.state.value
            assert (published, new) in ALLOWED, f"{published} -> {new} on {event!r}"
            if new == 4:
                # Connected goes with sectors (resize) or with the full set (connect)
                assert "sectors" in keys_written
                if published != 4:
                    assert {"sector-size", "info", "feature-barrier"} <= keys_written
            if new == 2:
                assert hotplug_seen, "InitWait before hotplug-status=connected"
            published = new
        elif isinstance(effect, SendControl) and isinstance(effect.message, XenblkifConnect):
            assert isinstance(event, TransportRead) and transport_seen
    return published


# Starting points, so that short random walks also explore the later states.
PREFIXES: dict[str, list[Event]] = {
    "fresh": [],
    "adopted": [BackendFound(XenbusState.CONNECTED, FOUND_KEYS),
                FrontendStateChanged(XenbusState.CONNECTED),
                HotplugConnected(TapdiskRef(10, 1)), DiskInfoRead(DISK),
                TransportRead(RingTransport((1,), 2)),
                RingConnectFailed(errno.EALREADY)],
    "initwait": [FrontendStateChanged(XenbusState.INITIALISING),
                 HotplugConnected(TapdiskRef(10, 1)), DiskInfoRead(DISK)],
    "connected": [FrontendStateChanged(XenbusState.INITIALISING),
                  HotplugConnected(TapdiskRef(10, 1)), DiskInfoRead(DISK),
                  FrontendStateChanged(XenbusState.INITIALISED),
                  TransportRead(RingTransport((1,), 2)),
                  RingConnected()],
}


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(PREFIXES)), st.lists(st.sampled_from(EVENTS), max_size=30))
def test_random_events_keep_the_backend_within_the_protocol(
    start: str, events: list[Event]
) -> None:
    vbd = BackendVbd(domid=1, devid=2)
    published = 1
    hotplug_seen = False
    store: set[str] = set()
    for event in PREFIXES[start] + events:
        before = (vbd.state, vbd.published)
        try:
            effects = vbd.handle(event)
        except FsmError as error:
            assert (vbd.state, vbd.published) == before  # untouched
            assert error.state == before[0] and error.event is event
            continue
        hotplug_seen |= isinstance(event, HotplugConnected)
        if isinstance(event, BackendFound):
            # what the store held before us: published, and keys, without a write
            assert effects == ()
            assert vbd.published is not None
            published = vbd.published.value
            store |= {k for k, _ in event.keys}
        published = check_batch(event, effects, published, hotplug_seen,
                                isinstance(event, TransportRead), store)
        assert vbd.published is not None and vbd.published.value == published


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([*XenbusState, "vanish", "garbage", "locked"]), max_size=30))
def test_frontend_events_alone_never_raise(values: list[XenbusState | str]) -> None:
    """A front-end can write anything: the back-end handles or ignores it, never raises."""
    vbd = BackendVbd(domid=1, devid=2)
    answered(vbd, HotplugConnected(TapdiskRef(10, 1)))
    for value in values:
        if vbd.is_final:
            break
        if value == "vanish":
            answered(vbd, FrontendVanished())
        elif value == "garbage":
            answered(vbd, FrontendStateInvalid("9"))
        elif value == "locked":
            answered(vbd, FrontendStateUnreadable())
        else:
            assert isinstance(value, XenbusState)
            answered(vbd, FrontendStateChanged(value))


def answered(vbd: BackendVbd, event: Event) -> None:
    """Feed `event`, then answer every question it raises (a tapdisk that says yes)."""
    pending = [event]
    while pending and not vbd.is_final:
        for effect in vbd.handle(pending.pop(0)):
            match effect:
                case ReadFrontendTransport():
                    pending.append(TransportRead(RingTransport((1,), 2)))
                case SendControl(message=XenblkifConnect()):
                    pending.append(RingConnected())
                case SendControl(message=XenblkifDisconnect()):
                    pending.append(RingDisconnected())
                case SendControl(message=DiskInfoQuery()):
                    pending.append(DiskInfoRead(DISK))


ACTIONS = ["close", "reconnect", "resize", "kill", "vanish", "offline", "bogus"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(ACTIONS), max_size=12))
def test_wired_pair_under_random_actions_stays_within_the_protocol(actions: list[str]) -> None:
    pair = VbdPair()
    pair.create()
    for action in actions:
        if pair.backend.is_final:
            break
        try:
            if action == "close":
                pair.guest(DeviceClose())
            elif action == "reconnect":
                pair.guest(DeviceReconnect())
            elif action == "resize":
                pair.resize(pair.tapdisk.disk.sectors * 2)
            elif action == "kill":
                pair.kill_tapdisk()
            elif action == "vanish":
                pair.remove_frontend()
            elif action == "offline":
                pair.set_offline()
            elif action == "bogus":
                pair.store.write("guest", f"{pair.fe_path}/state", "7")
                pair.store.pump()
        except FsmError:
            pair.store.pending.clear()  # a refused guest action: the guest's own bug
    states = pair.backend_states()
    for before, after in itertools.pairwise(states):
        assert (before, after) in ALLOWED, states
