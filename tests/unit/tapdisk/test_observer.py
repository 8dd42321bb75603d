"""Control requests through the observer into the VBD machines, alone and inside the
control server: whatever the order, every request gets exactly one answer, the machines
never raise, and LIST's state word is the spec's `bits` of the VBD's state.

The images and rings are stand-ins (the tapdisk's `open_image` and `connect_ring`), so
the sequences are fast and need no data path; what runs is the real observer, machine,
effect executor and codec.
"""

from __future__ import annotations

import errno
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blktap3.abi import VbdStateBits
from blktap3.ctl import protocol as p
from blktap3.ctl import runtime
from blktap3.fsm import effects as fx
from blktap3.fsm import events as ev
from blktap3.fsm.tapdisk import TapdiskVbd, VbdState
from blktap3.tapdisk import images
from blktap3.tapdisk.control import Tapdisk
from blktap3.tapdisk.observer import BadArgument, ToVbd, observe

T = p.MessageType

# -- the translation itself -----------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "event"),
    [
        (p.Message(T.ATTACH, 3, p.Params(devnum=3)), ev.Attach()),
        (p.Message(T.OPEN, 3, p.Params(flags=2, path="aio:/i")), ev.Open("aio:/i", 2)),
        (p.Message(T.PAUSE, 3), ev.Pause()),
        (p.Message(T.RESUME, 3, p.Resume()), ev.Resume(None)),
        (p.Message(T.RESUME, 3, p.Resume(p.ResumeFlags.RESIZE, "aio:/j")),
         ev.Resume("aio:/j", resize=True)),
        (p.Message(T.CLOSE, 3), ev.Close()),
        (p.Message(T.FORCE_SHUTDOWN, 3), ev.Close(force=True)),
        (p.Message(T.DETACH, 3), ev.Detach()),
        (p.Message(T.DISK_INFO, 3), ev.GetDiskInfo()),
        (p.Message(T.XENBLKIF_CONNECT, 3, p.Blkif(1, 51712, (8, 9), 1, 2, "", 5, 50)),
         ev.ConnectRing(ev.BlkifRing(1, 51712, (8, 9), order=1, port=5, protocol=2,
                                     poll_us=50))),
        (p.Message(T.XENBLKIF_CONNECT, 3,
                   p.Blkif(1, 51712, (8,), 0, 1, "", 5, max_indirect_segments=256)),
         ev.ConnectRing(ev.BlkifRing(1, 51712, (8,), port=5, protocol=1,
                                     max_indirect_segments=256))),
        # blktap's polling pair, our withheld discard, an order-4 ring's 16 grant refs
        (p.Message(T.XENBLKIF_CONNECT, 3,
                   p.Blkif(1, 51712, tuple(range(16)), 4, 3, "", 5, 300, 40,
                           flags=p.BlkifFlags.NO_DISCARD)),
         ev.ConnectRing(ev.BlkifRing(1, 51712, tuple(range(16)), order=4, port=5, protocol=3,
                                     poll_us=300, poll_idle_threshold=40, discard=False))),
        (p.Message(T.XENBLKIF_DISCONNECT, 3, p.Blkif(1, 51712)), ev.DisconnectRing(1, 51712)),
    ],
)
def test_each_vbd_request_becomes_its_event(message: p.Message, event: ev.Event) -> None:
    assert observe(p.decode(message.encode())) == ToVbd(3, event)


@pytest.mark.parametrize(
    "message",
    [p.Message(T.PID, 0), p.Message(T.LIST, p.LIST_COOKIE), p.Message(T.LIST_MINORS, 0),
     p.Message(T.STATS, 2), p.Message(T.EXIT, 0), p.Message(T.OPEN_RSP, 2, p.ImageInfo(1, 512, 0))],
)
def test_messages_for_no_vbd_are_not_observed(message: p.Message) -> None:
    assert observe(message) is None


def test_flags_we_do_not_implement_are_refused_before_any_machine() -> None:
    params = p.Params(flags=p.OpenFlags.ADD_LCACHE, path="aio:/i")
    refused = observe(p.Message(T.OPEN, 4, params))
    assert isinstance(refused, BadArgument)
    assert (refused.minor, refused.errno) == (4, errno.EOPNOTSUPP)
    resume = p.Resume(p.OpenFlags.STANDBY | p.ResumeFlags.RESIZE)
    assert isinstance(observe(p.Message(T.RESUME, 4, resume)), BadArgument)


# -- stand-ins for the data path ----------------------------------------------------------

SIZES = {"/a": 2048, "/b": 2048, "/big": 4096, "/small": 1024}
PARAMS = ["aio:/a", "aio:/b", "aio:/big", "aio:/small", "aio:/missing", "no-colon"]
STUCK_DEVID = 99  # a ring whose drain never completes


@dataclass(frozen=True)
class FakeInfo:
    sectors: int
    sector_size: int = 512
    info: int = 0
    physical_sector_size: int = 512
    discard: bool = False


@dataclass(eq=False)
class FakeImage:
    info: FakeInfo
    live: set[Any]
    shared: bool = False  # no CBT log, no mirror

    def close(self) -> None:
        assert self in self.live, "closed twice"
        self.live.remove(self)


@dataclass(eq=False)
class FakeRing:
    devid: int
    live: set[Any]
    images: set[Any]
    paused: bool = False

    def pause(self, timeout: float = 30.0) -> None:
        if self.devid == STUCK_DEVID:
            raise OSError(errno.ETIMEDOUT, "in-flight requests did not complete")
        self.paused = True

    def resume(self, image: Any = None) -> None:
        assert self.paused and image in self.images  # an open image, maybe a new one
        self.paused = False

    def disconnect(self, timeout: float = 30.0) -> None:
        self.live.remove(self)

    def stats(self) -> dict[str, Any]:
        return {"reqs": {}, "sectors": {}, "kicks": {}, "errors": {}, "responses": 0,
                "in_flight": 0, "slots": 32, "halted": None}


@dataclass
class DataPath:
    """The images and rings the tapdisk holds right now."""

    images: set[FakeImage] = field(default_factory=set)
    rings: set[FakeRing] = field(default_factory=set)

    def open_image(self, spec: images.ImageSpec, flags: int) -> FakeImage:
        if spec.path not in SIZES:
            raise OSError(errno.EINVAL, f"{spec}: No such file or directory")
        image = FakeImage(FakeInfo(SIZES[spec.path]), self.images)
        self.images.add(image)
        return image

    def connect_ring(self, image: FakeImage, *, domid: int, devid: int, port: int,
                     **_: Any) -> FakeRing:
        assert image in self.images
        if not port:
            raise OSError(errno.EINVAL, f"ring {domid}/{devid}: no event channel")
        ring = FakeRing(devid, self.rings, self.images)
        self.rings.add(ring)
        return ring


# -- random request sequences -------------------------------------------------------------

MINORS = (0, 1, 5)  # 0 and 1 are allocated, 5 is not


def _message(mtype: T, minor: int, payload: p.Payload | None = None) -> p.Message:
    return p.Message(mtype, minor, payload if payload is not None else p.PAYLOAD_OF[mtype]())


# Weighted towards one VBD and requests that succeed, so that sequences get deep.
minors = st.sampled_from([0, 0, 0, 1, 5])
params = st.sampled_from(["aio:/a", "aio:/a", *PARAMS])
blkifs = st.builds(
    lambda devid, port: p.Blkif(1, devid, (8,), 0, 0, "", port),
    st.sampled_from([51712, 51712, 51712, 51728, STUCK_DEVID]), st.sampled_from([3, 3, 0]),
)
lifecycle = st.sampled_from([T.PAUSE, T.PAUSE, T.CLOSE, T.FORCE_SHUTDOWN, T.DETACH,
                             T.DISK_INFO, T.STATS])
requests = st.one_of(
    st.builds(lambda m: _message(T.ATTACH, m, p.Params(devnum=m)), minors),
    st.builds(lambda m, path, flags: _message(T.OPEN, m, p.Params(flags=flags, path=path)),
              minors, params, st.sampled_from([0, 0, p.OpenFlags.RDONLY, p.OpenFlags.ADD_LCACHE])),
    st.builds(lambda m, path, flags: _message(T.RESUME, m, p.Resume(flags, path)),
              minors, st.sampled_from(["", "", *PARAMS]),
              st.sampled_from([0, p.ResumeFlags.RESIZE])),
    st.builds(lambda m, blkif: _message(T.XENBLKIF_CONNECT, m, blkif), minors, blkifs),
    st.builds(lambda m, blkif: _message(T.XENBLKIF_DISCONNECT, m, blkif), minors, blkifs),
    st.builds(_message, lifecycle, minors),
    st.builds(_message, st.just(T.PAUSE), minors),
    st.just(_message(T.RESUME, 0, p.Resume())),
    st.builds(_message, st.sampled_from([T.PID, T.LIST, T.LIST_MINORS]), st.just(0)),
)
# Most sequences start from an open VBD, some from one serving a ring (maybe stuck).
OPENED = [_message(T.ATTACH, 0, p.Params(devnum=0)),
          _message(T.OPEN, 0, p.Params(path="aio:/a"))]
PREAMBLES = [
    [],
    OPENED,
    [*OPENED, _message(T.XENBLKIF_CONNECT, 0, p.Blkif(1, 51712, (8,), 0, 0, "", 3))],
    [*OPENED, _message(T.XENBLKIF_CONNECT, 0, p.Blkif(1, STUCK_DEVID, (8,), 0, 0, "", 3))],
]
sequences = st.builds(lambda pre, rest: pre + rest, st.sampled_from(PREAMBLES),
                      st.lists(requests, min_size=4, max_size=40))

# What a VBD is in after each request blktap answers with success.
AFTER_SUCCESS: dict[T, set[VbdState]] = {
    T.ATTACH: {VbdState.ATTACHED},
    T.OPEN: {VbdState.OPEN_READY},
    T.XENBLKIF_CONNECT: {VbdState.OPEN_CONNECTED},
    T.XENBLKIF_DISCONNECT: {VbdState.OPEN_READY},
    T.PAUSE: {VbdState.OPEN_PAUSED, VbdState.EMPTY_PAUSED},
    T.RESUME: {VbdState.OPEN_READY, VbdState.OPEN_CONNECTED},
    # an empty paused VBD stays paused (the spec: "clears no pause flag")
    T.CLOSE: {VbdState.ATTACHED, VbdState.CLOSED, VbdState.EMPTY_PAUSED},
    T.FORCE_SHUTDOWN: {VbdState.ATTACHED, VbdState.CLOSED, VbdState.EMPTY_PAUSED},
    T.DISK_INFO: {VbdState.OPEN_READY, VbdState.OPEN_CONNECTED, VbdState.OPEN_QUIESCING,
                  VbdState.OPEN_PAUSED},
}
WITH_IMAGE = {VbdState.OPEN_READY, VbdState.OPEN_CONNECTED, VbdState.OPEN_QUIESCING}
WITH_PARAMS = WITH_IMAGE | {VbdState.OPEN_PAUSED}


@pytest.fixture
def root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def _bits_named(word: int) -> set[str]:
    return {bit.name for bit in VbdStateBits if bit & word and bit.name}


@settings(max_examples=150)
@given(sequences)
def test_random_request_sequences_through_the_control_server(
    sequence: list[p.Message],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runtime.ensure_dirs(root)
        assert [runtime.allocate_minor(root) for _ in range(2)] == [0, 1]
        data = DataPath()
        tapdisk = Tapdisk(root, drain_timeout=1.0, open_image=data.open_image,
                          connect_ring=data.connect_ring)
        try:
            for request in sequence:
                _check_one_request(tapdisk, data, request)
        finally:
            tapdisk.shutdown()
        assert not data.images and not data.rings  # SIGTERM released everything


def _check_one_request(tapdisk: Tapdisk, data: DataPath, request: p.Message) -> None:
    vbd = tapdisk.vbds.get(request.cookie)
    before = vbd.state if vbd is not None else None
    reply = tapdisk.handle(p.decode(request.encode()))
    messages = [p.decode(m.encode()) for m in reply.messages]
    if request.type is T.LIST:
        assert [m.payload.count for m in messages] == [  # type: ignore[union-attr]
            *range(len(tapdisk.vbds), 0, -1), 0]
    else:
        assert len(messages) == 1, messages  # exactly one answer
        answer = messages[0]
        if answer.type is T.ERROR:
            assert isinstance(answer.payload, p.Response) and answer.payload.error > 0
            code = answer.payload.error
            after = vbd.state if vbd is not None and request.cookie in tapdisk.vbds else None
            # A refusal changes nothing, but a PAUSE whose drain timed out (quiescing)
            # and an OPEN after CLOSE that failed (the spec's opening -> attached).
            if after != before:
                assert (request.type, after) in {(T.PAUSE, VbdState.OPEN_QUIESCING),
                                                 (T.OPEN, VbdState.ATTACHED)}, (request, code)
        else:
            assert answer.type is p.reply_type(request.type)
            if request.type in AFTER_SUCCESS:
                assert tapdisk.vbds[request.cookie].state in AFTER_SUCCESS[request.type]
            if request.type is T.DETACH:
                assert request.cookie not in tapdisk.vbds
    if tapdisk.exiting:
        return  # the last VBD was detached: blktap's tapdisk leaves
    entries = {m.payload.minor: m.payload for m in tapdisk.handle(  # type: ignore[union-attr]
        p.Message(T.LIST, p.LIST_COOKIE)).messages[:-1]}
    assert set(entries) == set(tapdisk.vbds)
    for minor, vbd in tapdisk.vbds.items():
        state, entry = vbd.state, entries[minor]
        spec_bits = set(vbd.machine.spec.state(state).bits)
        assert _bits_named(entry.state) - {"RESUME_FAILED"} == spec_bits
        if entry.state & VbdStateBits.RESUME_FAILED:
            assert state is VbdState.OPEN_PAUSED
        assert bool(entry.path) is (state in WITH_PARAMS)
        assert (vbd.image is not None) is (state in WITH_IMAGE)
        assert vbd.pending_image is None
        assert (vbd.ring is not None) is (vbd.machine.ring is not None)
    # Nothing leaked: the data path holds exactly what the VBDs hold.
    assert data.images == {v.image for v in tapdisk.vbds.values() if v.image is not None}
    assert data.rings == {r for v in tapdisk.vbds.values() if v.ring is not None
                          for r in v.ring.rings}


# -- the same sequences into bare machines (what a conformance harness would do) ---------


def _answer(effect: fx.Effect, disk_of: dict[str, int]) -> ev.Event | None:
    """A model data path: the outcome each effect asks for."""
    match effect:
        case fx.OpenImage(path=path):
            sectors = disk_of.get(path.partition(":")[2])
            if sectors is None:
                return ev.ImageOpenFailed(errno.EINVAL, "no such image")
            return ev.ImageOpened(ev.DiskInfo(sectors))
        case fx.StartRing(ring=ring):
            return ev.RingStarted() if ring.port else ev.RingStartFailed(errno.EINVAL)
        case fx.QuiesceRing():
            return ev.Drained()
    return None


@settings(max_examples=150)
@given(sequences)
def test_random_request_sequences_into_bare_machines(sequence: list[p.Message]) -> None:
    machines: dict[int, TapdiskVbd] = {}
    for request in sequence:
        observation = observe(p.decode(request.encode()))
        if not isinstance(observation, ToVbd):
            continue
        machine = machines.get(observation.minor)
        if machine is None:
            if not isinstance(observation.event, ev.Attach):
                continue  # no VBD with that minor: the server's lookup answers ENODEV
            machine = machines[observation.minor] = TapdiskVbd(observation.minor)
        replies: list[fx.Reply] = []
        pending: list[ev.Event] = [observation.event]
        while pending:
            for effect in machine.handle(pending.pop(0)):  # never raises
                if isinstance(effect, fx.Reply):
                    replies.append(effect)
                elif (outcome := _answer(effect, SIZES)) is not None:
                    pending.append(outcome)
        assert len(replies) == 1, (request, replies)
        assert replies[0].error >= 0
        word = machine.state_bits & ~VbdStateBits.RESUME_FAILED
        assert _bits_named(word) == set(machine.spec.state(machine.state).bits)
        if machine.is_final:
            del machines[observation.minor]
