"""One code path: the daemon's worker and the in-memory pair see the same store contents
the same way.

The same random sequence of store contents (what a toolstack, a hotplug script and a
guest may write, in any order) and tapdisk news is played to tapback's `VbdWorker` (its
readers, observer, machine and executor, over a dict store and a tapdisk client that
answers as `FakeTapdisk` does) and to `VbdPair`'s tapback (the same readers and observer
over `MemoryStore`, its own execution).  Both must feed their machines the same events
and get the same effects; and whatever the sequence, the machine refuses nothing and
publishes only the state changes xenbus allows, never one state twice in a row (but the
resize's second Connected, right after a new `sectors`).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.ctl.protocol import ImageFlags, ImageInfo
from blktap3.fsm import (
    BackendVbd,
    DiskInfo,
    DiskInfoQuery,
    DiskInfoRead,
    Effect,
    Event,
    FsmError,
    ImageChanged,
    PublishState,
    QueueRing,
    RingConnectFailed,
    RingDisconnectFailed,
    RingTransport,
    Toolstack,
    WriteKeys,
    XenblkifConnect,
    XenblkifDisconnect,
)
from blktap3.sim.memory import FakeTapdisk, VbdPair
from blktap3.tapback.executor import VbdConfig
from blktap3.tapback.store import SharedStore
from blktap3.tapback.tapdisks import device_path
from blktap3.tapback.worker import Died, Message, Prompt, VbdWorker
from tests.unit.fsm.test_properties import ALLOWED
from tests.unit.tapback.test_worker import PATHS, LockedOut

ROOT = Path("/run/blktap-control")
PID = FakeTapdisk().pid
Record = list[tuple[Event, tuple[Effect, ...] | str]]

STEPS: list[tuple[str, Any]] = [
    # what a guest writes: the usual states often, any value sometimes
    *(("frontend", v) for v in ("1", "3", "4", "5", "6") * 3),
    *(("frontend", v) for v in (None, "0", "2", "7", "8", "+4")),
    ("lock", True),  # the guest takes away our read permission on its state node
    ("lock", False),
    ("transport", "good"),
    ("transport", "good"),
    ("transport", "bad"),
    # what the toolstack and its hotplug script write
    ("hotplug", "connected"),
    ("hotplug", "connected"),
    *(("backend", ("hotplug-status", v)) for v in ("connected", "error", None)),
    ("backend", ("hotplug-error", "tap-ctl create failed")),
    *(("backend", ("physical-device-path", v))
      for v in (device_path(ROOT, PID, 0), device_path(ROOT, PID + 1, 2), "/dev/sda")),
    *(("backend", ("online", v)) for v in ("0", "1")),
    ("remove", None),
    # what tapback hears of the tapdisk
    ("resize", 1 << 20),
    ("resize", 2048),
    ("resize_geometry", 4096),
    ("kill", None),
    ("busy", errno.EBUSY),  # XENBLKIF_CONNECT refused from now on
    ("busy", 0),
    ("lose_ring", None),  # somebody (tap-ctl) disconnected the ring behind our back
]
# What the back-end directory held: the toolstack's keys, or a previous tapback's too.
TOOLSTACK = {"frontend": PATHS.frontend, "frontend-id": "5", "online": "1", "mode": "w",
             "params": "aio:/nonexistent.img", "device-type": "disk", "state": "1"}
DISK = DiskInfo(sectors=2048)
HOTPLUG = {"physical-device-path": device_path(ROOT, PID, 0), "hotplug-status": "connected"}
CONNECTED = {**TOOLSTACK, **HOTPLUG, "state": "4",
             **dict(VbdConfig(ROOT).features().probe_keys()),
             **dict(VbdConfig(ROOT).features().connect_keys(DISK)), "kthread-pid": str(PID)}
TRANSPORT = {"ring-ref": "8", "event-channel": "3", "protocol": "x86_64-abi"}


def record(machine: BackendVbd) -> Record:
    """Every event the machine is fed, with its effects (or the refusal)."""
    seen: Record = []
    handle = machine.handle

    def recorded(event: Event) -> tuple[Effect, ...]:
        try:
            effects = handle(event)
        except FsmError as exc:
            seen.append((event, f"refused: {exc}"))
            raise
        seen.append((event, effects))
        return effects

    machine.handle = recorded  # type: ignore[method-assign]
    return seen


class ClientOfFake:
    """`TapdiskClient`'s control calls, answered by a `FakeTapdisk` (patched in)."""

    fake = FakeTapdisk()

    def disk_info(self: TapdiskClient, minor: int) -> ImageInfo:
        answer = ClientOfFake.fake.answer(DiskInfoQuery(PID, minor))
        if not isinstance(answer, DiskInfoRead):
            raise CtlError(errno.ECONNREFUSED, "tapdisk gone")
        d = answer.disk
        flags = ImageFlags.DISCARD if d.discard else 0
        return ImageInfo(d.sectors, d.sector_size, d.info, d.physical_sector_size, flags)

    def connect_xenblkif(self: TapdiskClient, minor: int, *, domid: int, devid: int,
                         grefs: tuple[int, ...], order: int, port: int, proto: int,
                         max_indirect_segments: int = 0, discard: bool = True,
                         poll_duration: int = 0, poll_idle_threshold: int = 0,
                         persistent: bool = False,
                         extra_queues: Sequence[tuple[tuple[int, ...], int]] = ()) -> None:
        more = tuple(QueueRing(refs, queue_port) for refs, queue_port in extra_queues)
        answer = ClientOfFake.fake.answer(XenblkifConnect(
            PID, minor, domid, devid, RingTransport(grefs, port, more_queues=more),
            max_indirect_segments, discard, poll_duration, poll_idle_threshold, persistent))
        if isinstance(answer, RingConnectFailed):
            raise CtlError(answer.errno, answer.message)

    def disconnect_xenblkif(self: TapdiskClient, minor: int, *, domid: int, devid: int) -> None:
        answer = ClientOfFake.fake.answer(XenblkifDisconnect(PID, minor, domid, devid))
        if isinstance(answer, RingDisconnectFailed):
            raise CtlError(answer.errno, answer.message)


@pytest.fixture(autouse=True)
def _client_of_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("disk_info", "connect_xenblkif", "disconnect_xenblkif"):
        monkeypatch.setattr(TapdiskClient, name, getattr(ClientOfFake, name))


class Both:
    """The same store contents and tapdisk, twice: for the worker, and for the pair."""

    def __init__(self, directory: dict[str, str], frontend: str | None, *,
                 ring: bool | None = None, transport: str | None = None,
                 dead: bool = False, toolstack: Toolstack = Toolstack.XAPI) -> None:
        """`ring`: the tapdisk serves this VBD's ring already (default: when the
        directory says Connected); `transport`: the front-end's keys, "good" or "bad"
        (default: "good" when the directory says Connected); `dead`: the tapdisk is;
        `toolstack`: whose order tapback serves."""
        connected = directory["state"] == "4"
        self.xs = LockedOut()
        self.pair = VbdPair(domid=PATHS.domid, devid=PATHS.devid, toolstack=toolstack)
        ClientOfFake.fake = FakeTapdisk()
        self.fakes = (ClientOfFake.fake, self.pair.tapdisk)
        for fake in self.fakes:
            fake.disk = DISK
            fake.alive = not dead
            if connected if ring is None else ring:
                fake.rings.add((PATHS.domid, PATHS.devid))
        self.worker = VbdWorker(PATHS, PATHS.frontend, SharedStore(lambda: self.xs),  # type: ignore[arg-type,return-value]
                                VbdConfig(ROOT, toolstack=toolstack), on_final=lambda w: None,
                                on_tapdisk=lambda w, pid: None)
        self.pair.backend = BackendVbd(PATHS.domid, PATHS.devid,
                                       features=VbdConfig(ROOT).features(),
                                       toolstack=toolstack)
        self.seen = (record(self.worker.machine), record(self.pair.backend))
        self.write({PATHS.backend_key(k): v for k, v in directory.items()})
        self.write({PATHS.frontend_key("state"): frontend})
        transport = transport or ("good" if connected else None)
        if transport is not None:
            self.step("transport", transport)
        self.worker.step([Prompt.REFRESH])  # finds the VBD, then reads what it watches
        self.pair.backend_found()
        self.pair.tapback_refresh()

    @property
    def final(self) -> bool:
        return self.worker.machine.is_final

    def write(self, nodes: dict[str, str | None]) -> None:
        for store in (self.xs.nodes, self.pair.store.nodes):
            for path, value in nodes.items():
                if value is None:
                    store.pop(path, None)
                else:
                    store[path] = value

    def step(self, kind: str, value: Any) -> None:
        prompt: Message = Prompt.REFRESH
        if kind == "frontend":
            self.write({PATHS.frontend_key("state"): value})
            prompt = Prompt.FRONTEND
        elif kind == "backend":
            key, node = value
            self.write({PATHS.backend_key(key): node})
        elif kind == "hotplug":
            self.write({PATHS.backend_key(k): v for k, v in HOTPLUG.items()})
        elif kind == "transport":
            keys = dict(TRANSPORT, **({"event-channel": "x"} if value == "bad" else {}))
            self.write({PATHS.frontend_key(k): v for k, v in keys.items()})
            return  # written with state 3 or 4 by a guest: no watch of ours fires
        elif kind == "remove":
            self.write({p: None for p in self.xs.nodes if p.startswith(PATHS.backend + "/")})
        elif kind in ("resize", "resize_geometry"):
            for fake in self.fakes:
                fake.disk = (DiskInfo(sectors=value) if kind == "resize"
                             else DiskInfo(sectors=value, sector_size=4096))
            prompt = Prompt.RESIZE
        elif kind == "busy":
            for fake in self.fakes:
                fake.refuse_connect = value
            return  # nothing tapback sees until it connects
        elif kind == "lose_ring":
            for fake in self.fakes:
                fake.rings.clear()
            return  # nothing tapback sees until it disconnects
        elif kind == "lock":
            for denied in (self.xs.denied, self.pair.store.denied):
                (denied.add if value else denied.discard)(PATHS.frontend_key("state"))
            prompt = Prompt.FRONTEND  # SET_PERMS fires the watch on the node
        elif kind == "kill":
            for fake in self.fakes:
                fake.alive = False
                fake.rings.clear()
            prompt = Died(PID)
        self.worker.step([prompt])
        if prompt is Prompt.FRONTEND:
            self.pair._tapback_sees_frontend("")
        elif prompt is Prompt.RESIZE:
            self.pair.tapback_event(ImageChanged())
        elif isinstance(prompt, Died):
            self.pair.kill_tapdisk()
        else:
            self.pair.tapback_refresh()


def check_publications(start: int, seen: Record) -> None:
    """Only xenbus steps; the same state twice only for a resize (after `sectors`)."""
    last = start
    for event, effects in seen:
        assert isinstance(effects, tuple), f"{event!r} refused: {effects}"
        written: set[str] = set()
        for effect in effects:
            if isinstance(effect, WriteKeys):
                written |= set(effect.as_dict())
            elif isinstance(effect, PublishState):
                new = effect.state.value
                assert (last, new) in ALLOWED, f"{last} -> {new} on {event!r}"
                if new == last:
                    assert new == 4 and "sectors" in written, f"{new} twice on {event!r}"
                last = new


STARTS: dict[str, tuple[dict[str, str], str]] = {
    "fresh": (TOOLSTACK, "1"),  # the toolstack just made the directories
    "hotplugged": ({**TOOLSTACK, **HOTPLUG}, "1"),  # tapback (re)started after hotplug
    "connected": (CONNECTED, "4"),  # a tapback before us connected it
}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(STARTS)), st.lists(st.sampled_from(STEPS), max_size=25))
def test_worker_and_pair_feed_and_do_the_same_for_the_same_store(
    start: str, steps: list[tuple[str, Any]]
) -> None:
    both = Both(*STARTS[start])
    for kind, value in steps:
        if both.final:
            break
        both.step(kind, value)
    worker_seen, pair_seen = both.seen
    assert worker_seen == pair_seen
    check_publications(4 if start == "connected" else 1, worker_seen)
