"""The front-end machine and its observer: what a blkfront sees of its back-end, in events.

The same observer (`observe_backend`) feeds the simulated guest's blkfront; here it is fed
from a dict, and the machine's effects are answered as an owner would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blktap3.fsm import (
    BackendInfoInvalid,
    BackendInfoRead,
    BackendStateChanged,
    BackendStateInvalid,
    BackendVanished,
    DeviceClose,
    DeviceFound,
    DeviceReconnect,
    DiskInfo,
    Effect,
    Event,
    FrontendOptions,
    FrontendState,
    FrontendVbd,
    OfferRing,
    OurBug,
    PublishState,
    ReadBackendInfo,
    ReleaseRing,
    ReportFault,
    RingOffered,
    RingOfferFailed,
    WriteKeys,
    XenbusState,
    backend_event,
    observe_backend,
)

S = XenbusState
F = FrontendState
DISK = DiskInfo(sectors=4096)


# --- the observer ---------------------------------------------------------------------------


def test_an_absent_state_node_is_vanished_and_garbage_is_invalid() -> None:
    assert backend_event(None) == BackendVanished()
    for raw in ("", "9", "04", " 4", "+4", "4\n", "x", "٤"):
        assert backend_event(raw) == BackendStateInvalid(raw)


def test_every_xenbus_state_is_one_event_whatever_came_before() -> None:
    for s in XenbusState:
        assert backend_event(s.wire()) == BackendStateChanged(s)
        assert backend_event(s.wire()) == BackendStateChanged(s)  # no memory: fed again


@pytest.mark.parametrize(("raw", "order"), [("3", 3), ("0", 0), ("12", 12), (None, 0),
                                            ("", 0), ("-1", 0), ("x", 0), ("²", 0)])
def test_initwait_carries_the_backends_ring_limit(raw: str | None, order: int) -> None:
    keys = {"state": "2"} if raw is None else {"state": "2", "max-ring-page-order": raw}
    assert observe_backend(keys.get) == BackendStateChanged(S.INIT_WAIT, order)


def test_the_ring_limit_is_read_only_on_initwait() -> None:
    read: list[str] = []

    def reader(key: str) -> str | None:
        read.append(key)
        return {"state": "4", "max-ring-page-order": "3"}.get(key)

    assert observe_backend(reader) == BackendStateChanged(S.CONNECTED)
    assert read == ["state"]


# --- the machine, step by step ----------------------------------------------------------------


def feed(fe: FrontendVbd, *events: Event) -> list[Effect]:
    out: list[Effect] = []
    for event in events:
        out += fe.handle(event)
    return out


def initialised(options: FrontendOptions | None = None) -> FrontendVbd:
    fe = FrontendVbd(1, options=options)
    assert feed(fe, BackendStateChanged(S.INIT_WAIT, 3)) == [OfferRing(0)]
    effects = feed(fe, RingOffered((8,), 9))
    assert effects[-1] == PublishState(S.INITIALISED)
    return fe


def connected() -> FrontendVbd:
    fe = initialised()
    assert feed(fe, BackendStateChanged(S.CONNECTED)) == [ReadBackendInfo()]
    assert feed(fe, BackendInfoRead(DISK)) == [PublishState(S.CONNECTED)]
    return fe


@pytest.mark.parametrize(("ours", "backend", "order"), [(2, 3, 2), (2, 1, 1), (4, 0, 0),
                                                        (0, 4, 0)])
def test_the_ring_offered_is_capped_by_both_ends(ours: int, backend: int, order: int) -> None:
    fe = FrontendVbd(1, options=FrontendOptions(max_ring_page_order=ours))
    assert feed(fe, BackendStateChanged(S.INIT_WAIT, backend)) == [OfferRing(order)]
    assert fe.state == F.OFFERING_RING


def test_the_offered_ring_is_written_in_one_transaction_then_state_3() -> None:
    fe = FrontendVbd(1, backend_domid=0, options=FrontendOptions(max_ring_page_order=1,
                                                                 persistent=True))
    feed(fe, BackendStateChanged(S.INIT_WAIT, 1))
    keys, state = feed(fe, RingOffered((20, 21), 7))
    assert isinstance(keys, WriteKeys) and state == PublishState(S.INITIALISED)
    assert keys.as_dict() == {"ring-page-order": "1", "ring-ref0": "20", "ring-ref1": "21",
                              "event-channel": "7", "protocol": "x86_64-abi",
                              "feature-persistent": "1"}
    assert keys.perms.as_strings() == ("n1", "r0")
    assert fe.ring == RingOffered((20, 21), 7)


@pytest.mark.parametrize(("raw", "ours", "queues"), [("2", 4, 2), ("16", 4, 4), (None, 4, 1),
                                                     ("0", 4, 1), ("x", 4, 1), ("8", 1, 1)])
def test_the_queues_offered_are_capped_by_both_ends(raw: str | None, ours: int,
                                                    queues: int) -> None:
    # negotiate_mq: min(its own, multi-queue-max-queues), at least 1; a missing or
    # garbage offer reads as 1 (xenbus_read_unsigned's default).
    keys = {"state": "2"} if raw is None else {"state": "2", "multi-queue-max-queues": raw}
    fe = FrontendVbd(1, options=FrontendOptions(max_queues=ours))
    assert feed(fe, observe_backend(keys.get)) == [OfferRing(0, queues)]


def test_several_queues_are_written_under_queue_n_as_talk_to_blkback_does() -> None:
    fe = FrontendVbd(1, options=FrontendOptions(max_ring_page_order=1, max_queues=2))
    assert feed(fe, BackendStateChanged(S.INIT_WAIT, 1, 2)) == [OfferRing(1, 2)]
    keys = feed(fe, RingOffered((20, 21), 7, (((30, 31), 8),)))[0]
    assert isinstance(keys, WriteKeys) and keys.as_dict() == {
        "ring-page-order": "1", "multi-queue-num-queues": "2",
        "queue-0/ring-ref0": "20", "queue-0/ring-ref1": "21", "queue-0/event-channel": "7",
        "queue-1/ring-ref0": "30", "queue-1/ring-ref1": "31", "queue-1/event-channel": "8",
        "protocol": "x86_64-abi", "feature-persistent": "0"}
    assert list(keys.as_dict())[:2] == ["ring-page-order", "multi-queue-num-queues"]


def test_keys_a_personality_leaves_out_are_not_written() -> None:
    fe = initialised(FrontendOptions(protocol=None, persistent=None))
    fe2 = FrontendVbd(1, options=FrontendOptions(protocol=None, persistent=None))
    feed(fe2, BackendStateChanged(S.INIT_WAIT))
    keys = feed(fe2, RingOffered((8,), 9))[0]
    assert isinstance(keys, WriteKeys) and keys.as_dict() == {"ring-ref": "8",
                                                              "event-channel": "9"}
    assert fe.state == F.INITIALISED


@pytest.mark.parametrize(("found", "effects"), [(S.INITIALISING, []),
                                                (S.CLOSED, [PublishState(S.INITIALISING)]),
                                                (S.CONNECTED, [PublishState(S.INITIALISING)]),
                                                (None, [PublishState(S.INITIALISING)])])
def test_a_device_left_by_an_earlier_blkfront_starts_over(found: S | None,
                                                          effects: list[Effect]) -> None:
    fe = FrontendVbd(1)
    assert feed(fe, DeviceFound(found)) == effects
    assert fe.state == F.INITIALISING and fe.published == S.INITIALISING


def test_no_ring_or_no_disk_gives_the_device_up() -> None:
    fe = FrontendVbd(1)
    feed(fe, BackendStateChanged(S.INIT_WAIT))
    assert feed(fe, RingOfferFailed("no grants")) == [PublishState(S.CLOSING)]
    fe = initialised()
    feed(fe, BackendStateChanged(S.CONNECTED))
    assert feed(fe, BackendInfoInvalid("sectors missing")) == [PublishState(S.CLOSING)]
    assert fe.state == F.CLOSING and fe.disk is None


def test_the_ring_is_ungranted_only_once_the_backend_is_closed() -> None:
    fe = connected()
    assert feed(fe, DeviceClose()) == [PublishState(S.CLOSING)]
    assert feed(fe, BackendStateChanged(S.CLOSING)) == [PublishState(S.CLOSED)]
    assert feed(fe, BackendStateChanged(S.CLOSING)) == []  # still mapped over there
    assert fe.ring is not None
    assert feed(fe, BackendStateChanged(S.CLOSED)) == [ReleaseRing()]
    assert fe.ring is None
    assert feed(fe, BackendStateChanged(S.CLOSED), BackendVanished()) == []


def test_a_backend_closed_at_once_is_followed_then_the_ring_released() -> None:
    fe = connected()
    assert feed(fe, BackendStateChanged(S.CLOSED)) == [PublishState(S.CLOSED), ReleaseRing()]


def test_a_device_closed_before_any_ring_has_none_to_release() -> None:
    fe = FrontendVbd(1)
    assert feed(fe, DeviceClose(), BackendStateChanged(S.CLOSED)) == [
        PublishState(S.CLOSING), PublishState(S.CLOSED)]


@pytest.mark.parametrize("gone", [BackendVanished(), BackendStateChanged(S.UNKNOWN)])
def test_a_backend_that_disappears_no_longer_maps_the_ring(gone: Event) -> None:
    fe = connected()
    feed(fe, BackendStateChanged(S.CLOSING))
    assert feed(fe, gone) == [ReleaseRing()]


def test_a_reconnect_ungrants_a_ring_still_held_then_starts_over() -> None:
    fe = connected()
    feed(fe, BackendStateChanged(S.CLOSING))
    assert feed(fe, DeviceReconnect()) == [ReleaseRing(), PublishState(S.INITIALISING)]
    assert feed(fe, BackendStateChanged(S.INIT_WAIT)) == [OfferRing(0)]


def test_a_resize_rereads_the_disk_without_publishing_again() -> None:
    fe = connected()
    bigger = DiskInfo(sectors=8192)
    assert feed(fe, BackendStateChanged(S.CONNECTED), BackendInfoRead(bigger)) == [
        ReadBackendInfo()]
    assert fe.state == F.CONNECTED and fe.disk == bigger


@pytest.mark.parametrize("event", [BackendStateChanged(S.INITIALISED),
                                   BackendStateChanged(S.RECONFIGURING),
                                   BackendStateChanged(S.RECONFIGURED),
                                   BackendStateChanged(S.INIT_WAIT),
                                   BackendStateInvalid("banana")])
def test_a_backend_out_of_protocol_is_reported_and_we_stay(event: Event) -> None:
    fe = connected()
    (fault,) = feed(fe, event)
    assert isinstance(fault, ReportFault) and "out of protocol in connected" in fault.text
    assert fe.state == F.CONNECTED and fe.ring is not None
    if isinstance(event, BackendStateInvalid):
        assert "'banana'" in fault.text


def test_detaching_twice_is_detaching_once() -> None:
    fe = connected()
    assert feed(fe, DeviceClose()) == [PublishState(S.CLOSING)]
    assert feed(fe, DeviceClose()) == []


def test_an_owner_that_does_not_answer_the_offer_is_our_bug() -> None:
    fe = FrontendVbd(1)
    feed(fe, BackendStateChanged(S.INIT_WAIT))
    with pytest.raises(OurBug):
        fe.handle(DeviceClose())
    assert fe.state == F.OFFERING_RING


# --- any back-end, through the observer ---------------------------------------------------

VALID = st.sampled_from([s.wire() for s in XenbusState])
RAW_STATES = st.one_of(
    VALID, VALID, VALID, VALID,  # mostly real states, so that walks go deep
    st.none(),  # the node is absent
    st.sampled_from(["", "9", "-1", "04", "x", "4 "]),
    st.text(max_size=4),
)
LOOK = st.tuples(RAW_STATES, st.one_of(st.none(), st.sampled_from(["0", "1", "3", "9", "x"])))
GUEST = st.sampled_from(["close", "reconnect"])
STEP = st.one_of(LOOK, LOOK, LOOK, GUEST)


@dataclass
class Owner:
    """Answers the machine's questions at once, as `Blkfront` and `VbdPair` do, and checks
    the rules on what it is asked to do."""

    fe: FrontendVbd
    bad_info: bool
    published: list[XenbusState | None] = field(default_factory=list)  # [0]: as found
    ring: int | None = None  # how many pages the granted ring has
    backend_let_go: bool = True  # last seen: Closed, Unknown or absent
    transport_written: bool = False
    info_read: bool = False

    def feed(self, event: Event) -> None:
        for effect in self.fe.handle(event):
            match effect:
                case PublishState(state=state):
                    assert state != self.published[-1], f"{state} twice on {event!r}"
                    if state == S.INITIALISED:
                        assert self.transport_written
                    if state == S.CONNECTED:
                        assert self.info_read and self.ring is not None
                    self.published.append(state)
                case OfferRing(order=order):
                    assert self.ring is None, "a second ring offered while one is held"
                    assert 0 <= order <= self.fe.options.max_ring_page_order
                    self.ring = 1 << order
                    self.transport_written = self.info_read = False
                    self.feed(RingOffered(tuple(range(1 << order)), 5))
                case WriteKeys(keys=keys):
                    assert self.ring is not None
                    refs = [k for k, _ in keys if k.startswith("ring-ref")]
                    assert len(refs) == self.ring
                    self.transport_written = True
                case ReadBackendInfo():
                    self.info_read = not self.bad_info
                    self.feed(BackendInfoInvalid("sectors missing") if self.bad_info
                              else BackendInfoRead(DISK))
                case ReleaseRing():
                    assert self.ring is not None
                    assert self.backend_let_go or isinstance(event, DeviceReconnect)
                    self.ring = None
                case ReportFault():
                    pass
                case _:
                    raise AssertionError(f"unknown effect {effect!r}")


# a look at the back-end (its state and max-ring-page-order), or a guest action
Step = tuple[str | None, str | None] | str


def apply(owner: Owner, step: Step) -> None:
    """One step, as the simulated blkfront takes it: a watch fired (the back-end's keys
    through the observer), or the guest asks to close / start over."""
    fe = owner.fe
    if step == "close":
        owner.feed(DeviceClose())
    elif step == "reconnect":
        if fe.state == F.CLOSED:  # the guest's API: reconnect only after Closed
            owner.feed(DeviceReconnect())
    else:
        assert isinstance(step, tuple)
        keys = {"state": step[0], "max-ring-page-order": step[1]}
        event = observe_backend(keys.get)
        owner.backend_let_go = (isinstance(event, BackendVanished) or (
            isinstance(event, BackendStateChanged) and event.state in (S.CLOSED, S.UNKNOWN)))
        before = fe.state
        owner.feed(event)
        if isinstance(event, BackendStateInvalid):
            assert fe.state == before
    assert fe.state in set(FrontendState)
    assert (fe.ring is None) == (owner.ring is None)
    assert fe.state not in (F.OFFERING_RING, F.READING_INFO)  # questions answered at once


def walk(steps: list[Step], *, bad_info: bool = False, order: int = 2,
         found: XenbusState | None = S.INITIALISING) -> Owner:
    fe = FrontendVbd(1, options=FrontendOptions(max_ring_page_order=order))
    owner = Owner(fe, bad_info, published=[found])
    owner.feed(DeviceFound(found))  # what an earlier blkfront (or the toolstack) left
    for step in steps:
        apply(owner, step)
    return owner


@pytest.mark.parametrize("bad_info", [False, True])
def test_every_reachable_configuration_takes_every_backend_state(bad_info: bool) -> None:
    # Breadth first over what the machine can be in (state, ring held, last published,
    # disk known): each one reached by its shortest walk, then every input tried on it.
    inputs: list[Step] = [(s.wire(), "3") for s in XenbusState]
    inputs += [(None, None), ("banana", None), "close", "reconnect"]

    def key(o: Owner) -> tuple[object, ...]:
        return o.fe.state, o.fe.ring is not None, o.fe.published, o.fe.disk is not None

    walks: dict[tuple[object, ...], list[Step]] = {key(walk([], bad_info=bad_info)): []}
    todo = [[]]
    while todo:
        steps = todo.pop(0)
        for step in inputs:
            owner = walk([*steps, step], bad_info=bad_info)
            if key(owner) not in walks:
                walks[key(owner)] = [*steps, step]
                todo.append([*steps, step])
    reached = {k[0] for k in walks}
    want = set(FrontendState) - {F.OFFERING_RING, F.READING_INFO}
    if bad_info:
        want -= {F.CONNECTED}
    assert reached == want


@settings(max_examples=400)  # long random walks, garbage included; ~1 s
@given(st.lists(STEP, max_size=40), st.booleans(), st.integers(0, 4),
       st.one_of(st.none(), st.sampled_from(XenbusState)))
def test_any_backend_sequence_never_raises_nor_publishes_twice(
        steps: list[Step], bad_info: bool, order: int, found: XenbusState | None) -> None:
    walk(steps, bad_info=bad_info, order=order, found=found)
