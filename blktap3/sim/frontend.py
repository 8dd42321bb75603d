"""The simulated guest's blkfront: the xenbus handshake of one VBD, seen from the guest.

A `Blkfront` runs inside the process that is the guest domain and talks XenStore through
the guest's own xenstore ring (`XenStore.over_ring`): for xenstored it is a real
unprivileged domain, so it can write only its own front-end directory and read the
back-end's. It decides nothing about the protocol: each time its watch on the back-end's
`state` fires it reads the back-end through the front-end observer
(`blktap3.fsm.observe_backend`) and feeds the event to the front-end machine
(`blktap3.fsm.FrontendVbd`, specs/frontend_vbd.toml), which says what to do; this module
executes those effects (offer or release the ring, write keys, publish state, read the
disk, log a back-end fault) the way the chosen *personality* does it.

A personality (`specs/personalities/<name>.toml`) is data: which transport keys a real
front-end writes (its ring order, `protocol`, `feature-persistent`: the machine's
options), and how it writes them (keys in one transaction or not, state in a
transaction or not) and which back-end keys it reads on Connected (this executor's).

The rings themselves (granted pages, unbound event channel), one per queue the machine
settled on (min of the personality's `max_queues`, the online CPUs and the back-end's
`multi-queue-max-queues`, as Linux's negotiate_mq), are made by a `RingFactory` when the
machine asks for them (`OfferRing`, on the back-end's InitWait, as Linux blkfront's
`talk_to_blkback`); the guest process passes one built on the C ring driver
(`blktap3.sim.guestdrv`) and feeds every queue at once (`guest.workload`).

Every step is recorded in a timeline (milliseconds since the Blkfront was made, who did
what) from which the handshake latencies are taken.
"""

from __future__ import annotations

import contextlib
import os
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, Generic, Protocol, TypeVar

import structlog

from blktap3.abi import MAX_INDIRECT_SEGMENTS, MAX_QUEUES, BlkifProtocol, VdiskInfo
from blktap3.fsm import (
    BackendInfoInvalid,
    BackendInfoRead,
    BackendStateChanged,
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
    PublishState,
    ReadBackendInfo,
    ReleaseRing,
    ReportFault,
    RingOffered,
    RingOfferFailed,
    WriteKeys,
    observe_backend,
)
from blktap3.xenbus import (
    Reconnected,
    Transaction,
    VbdPaths,
    WatchStream,
    XenbusState,
    XenbusValueError,
    XenStore,
    XenStoreError,
)
from blktap3.xenbus.states import parse_decimal

log = structlog.get_logger(__name__)

PERSONALITY_PACKAGE = "blktap3.specs"
PERSONALITY_DIR = "personalities"
MAX_RING_PAGE_ORDER = 4  # QEMU's limit, the largest any back-end offers
WATCH_SLICE = 0.1  # seconds: how often a waiting loop checks its deadline and stop flag


class FrontendFailure(Exception):
    """The front-end could not do its part (said in one line, with the state it was in)."""


# -- personalities --------------------------------------------------------------------------


@dataclass(frozen=True)
class Personality:
    """How one kind of guest's blkfront writes and reads its keys."""

    name: str
    doc: str
    ring_page_order: int  # the front-end's own maximum; capped by the back-end's
    max_queues: int  # its own most queues (Linux: xen_blkif_max_queues, 4); capped by the
    # online CPUs (as Linux caps it at load) and by the back-end's multi-queue-max-queues
    max_indirect_segments: int  # Linux: xen_blkif_max_segments, 32; 0: never INDIRECT
    protocol: BlkifProtocol  # native leaves the `protocol` key out
    feature_persistent: bool
    write_feature_persistent: bool
    keys_in_transaction: bool
    state_in_transaction: bool
    mandatory_reads: tuple[str, ...]
    optional_reads: tuple[str, ...]


def personality_names() -> list[str]:
    root = files(PERSONALITY_PACKAGE).joinpath(PERSONALITY_DIR)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_personality(name: str) -> Personality:
    """`specs/personalities/<name>.toml`, checked; `ValueError` naming what is wrong."""
    if name not in personality_names():
        raise ValueError(f"unknown personality {name!r}: one of {', '.join(personality_names())}")
    text = files(PERSONALITY_PACKAGE).joinpath(PERSONALITY_DIR, f"{name}.toml").read_text()
    return parse_personality(tomllib.loads(text), name)


def parse_personality(data: dict[str, Any], name: str) -> Personality:
    """A personality from its TOML tables; every key is required and typed."""
    expected: dict[str, dict[str, type]] = {"personality": {"name": str, "doc": str},
                "transport": {"ring_page_order": int, "max_queues": int,
                              "max_indirect_segments": int, "protocol": str,
                              "feature_persistent": bool, "write_feature_persistent": bool,
                              "keys_in_transaction": bool, "state_in_transaction": bool},
                "read": {"mandatory": list, "optional": list}}
    if set(data) != set(expected):
        raise ValueError(f"personality {name}: tables {sorted(data)}, want {sorted(expected)}")
    for table, keys in expected.items():
        got = data[table]
        if set(got) != set(keys):
            raise ValueError(f"personality {name}: [{table}] has {sorted(got)}, "
                             f"want {sorted(keys)}")
        for key, kind in keys.items():
            # bool is an int in Python: do not let `true` pass as an order.
            if not isinstance(got[key], kind) or (kind is int and isinstance(got[key], bool)):
                raise ValueError(f"personality {name}: {table}.{key} must be {kind.__name__}")
    tr, rd = data["transport"], data["read"]
    if data["personality"]["name"] != name:
        raise ValueError(f"personality {name}: file names itself {data['personality']['name']!r}")
    if not 0 <= tr["ring_page_order"] <= MAX_RING_PAGE_ORDER:
        raise ValueError(f"personality {name}: ring_page_order not in 0..{MAX_RING_PAGE_ORDER}")
    if not 1 <= tr["max_queues"] <= MAX_QUEUES:
        raise ValueError(f"personality {name}: max_queues not in 1..{MAX_QUEUES}")
    if not 0 <= tr["max_indirect_segments"] <= MAX_INDIRECT_SEGMENTS:
        raise ValueError(f"personality {name}: max_indirect_segments not in "
                         f"0..{MAX_INDIRECT_SEGMENTS}")
    protocol = BlkifProtocol.from_xenstore(tr["protocol"] or None)  # "": key left out
    if protocol is None:
        raise ValueError(f"personality {name}: protocol {tr['protocol']!r} is not a Xen "
                         "layout (\"\" leaves the key out)")
    reads = [*rd["mandatory"], *rd["optional"]]
    if not all(isinstance(k, str) and k for k in reads):
        raise ValueError(f"personality {name}: read keys must be non-empty strings")
    return Personality(
        name=name, doc=data["personality"]["doc"], ring_page_order=tr["ring_page_order"],
        max_queues=tr["max_queues"], max_indirect_segments=tr["max_indirect_segments"],
        protocol=protocol, feature_persistent=tr["feature_persistent"],
        write_feature_persistent=tr["write_feature_persistent"],
        keys_in_transaction=tr["keys_in_transaction"],
        state_in_transaction=tr["state_in_transaction"],
        mandatory_reads=tuple(rd["mandatory"]), optional_reads=tuple(rd["optional"]),
    )


# -- the ring the front-end offers ---------------------------------------------------------


class Ring(Protocol):
    """What the handshake needs of a ring: its grant refs and event channel."""

    @property
    def grefs(self) -> list[int]: ...

    @property
    def port(self) -> int: ...

    def close(self) -> None: ...


R = TypeVar("R", bound=Ring)  # the owner's own ring type (the guest's: the C driver's)
# (what the machine settled on: order, queues, indirect segments; layout) -> one queue's ring
RingFactory = Callable[[OfferRing, BlkifProtocol], R]


# -- the timeline ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One thing that happened: `who` is "fe" (us) or "be" (what we saw of the back-end)."""

    t_ms: float
    who: str
    what: str

    def as_dict(self) -> dict[str, Any]:
        return {"t_ms": round(self.t_ms, 3), "who": self.who, "what": self.what}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Step:
        return cls(float(d["t_ms"]), str(d["who"]), str(d["what"]))


@dataclass(frozen=True)
class HandshakeFigures:
    """The latencies of one handshake, in ms (None: that moment never came)."""

    initialising_to_connected_ms: float | None
    initialised_to_backend_connected_ms: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {"initialising_to_connected_ms": self.initialising_to_connected_ms,
                "initialised_to_backend_connected_ms": self.initialised_to_backend_connected_ms}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HandshakeFigures:
        return cls(d["initialising_to_connected_ms"], d["initialised_to_backend_connected_ms"])


@dataclass
class Handshake:
    """Times (ms on the timeline) of the moments the handshake latencies are taken from."""

    started: float
    initialised: float | None = None  # we wrote state 3
    backend_connected: float | None = None  # first back-end Connected seen after that
    connected: float | None = None  # we wrote state 4: both ends Connected

    def figures(self) -> HandshakeFigures:
        def span(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round(b - a, 3)

        return HandshakeFigures(span(self.started, self.connected),
                                span(self.initialised, self.backend_connected))


@dataclass
class Timeline:
    started: float = field(default_factory=time.monotonic)
    steps: list[Step] = field(default_factory=list)
    on_step: Callable[[Step], None] | None = None

    def now_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000.0

    def add(self, who: str, what: str) -> float:
        step = Step(self.now_ms(), who, what)
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)
        return step.t_ms


# -- the blkfront ---------------------------------------------------------------------------


def machine_options(personality: Personality) -> FrontendOptions:
    """What a personality tells the front-end machine: its ring and queue limits (queues
    at most the online CPUs, as Linux's xen_blkif_max_queues is capped at load) and its
    keys."""
    return FrontendOptions(
        max_ring_page_order=personality.ring_page_order,
        max_queues=max(1, min(personality.max_queues, os.sysconf("SC_NPROCESSORS_ONLN"))),
        max_indirect_segments=personality.max_indirect_segments,
        protocol=personality.protocol.xenstore,
        persistent=(personality.feature_persistent if personality.write_feature_persistent
                    else None),
    )


class Blkfront(Generic[R]):
    """One VBD's front-end: feeds `FrontendVbd` what it sees and executes its effects.

    `connect_xs` makes the guest's XenStore connection (over its ring); it is called once
    now, and again only when the connection was lost. Not thread-safe: one thread runs
    `connect`, `wait`, `detach` and `reconnect`.
    """

    def __init__(
        self,
        connect_xs: Callable[[], XenStore],
        domid: int,
        devid: int,
        personality: Personality,
        ring_factory: RingFactory[R],
        *,
        timeline: Timeline | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.domid = domid
        self.devid = devid
        self.personality = personality
        self._ring_factory = ring_factory
        self._connect_xs = connect_xs
        self.should_stop = should_stop
        self.timeline = timeline or Timeline()
        self.log = log.bind(domid=domid, devid=devid, personality=personality.name)
        self.xs: XenStore = connect_xs()
        self.frontend = VbdPaths(domid, devid).frontend
        self.backend = self._read_required(f"{self.frontend}/backend")
        backend_id = self._read_required(f"{self.frontend}/backend-id")
        try:
            self.backend_id = parse_decimal(backend_id, "backend-id", hi=0x7FEF)
        except XenbusValueError as e:
            raise FrontendFailure(str(e)) from None
        self.machine = FrontendVbd(domid, self.backend_id, machine_options(personality))
        self.rings: list[R] = []  # one per queue, queue 0 first; empty: none offered
        self.backend_state: XenbusState | None = None  # last seen; None: absent or not yet
        self.features: dict[str, str] = {}
        self.backend_error: str | None = None
        self.handshakes: list[Handshake] = []
        self.resizes: list[tuple[int, int]] = []  # (old sectors, new sectors)
        self._token = f"blkfront-{domid}-{devid}-{id(self):x}"
        self._watch_started = False
        self._watch = WatchStream(self._reconnect_xs)
        self._watch.watch(f"{self.backend}/state", self._token)

    # -- public steps ----------------------------------------------------------------------

    @property
    def state(self) -> FrontendState:
        return FrontendState(self.machine.state)

    @property
    def disk(self) -> DiskInfo | None:
        return self.machine.disk

    @property
    def ring(self) -> R | None:
        """Queue 0's ring (the only one without multi-queue), None when none is offered."""
        return self.rings[0] if self.rings else None

    def connect(self, timeout: float) -> DiskInfo:
        """Run the handshake until both ends are Connected; the disk the back-end offers."""
        if self.state != FrontendState.INITIALISING:
            raise FrontendFailure(f"connect in state {self.state}")
        self.handshakes.append(Handshake(self.timeline.now_ms()))
        self.timeline.add("fe", f"start ({self.personality.name}), back-end {self.backend}")
        # What an earlier blkfront (or the toolstack) left in our state node: the machine
        # starts a device over from Initialising (the back-end, Closed, takes that as a
        # reconnect).
        own = self.xs.read_optional(f"{self.frontend}/state")
        self._feed(DeviceFound(None if own is None else XenbusState.from_wire(own)))
        self._sync()
        self._wait_for(lambda: self.state == FrontendState.CONNECTED, timeout, "Connected")
        assert self.machine.disk is not None
        return self.machine.disk

    def wait(self, timeout: float, until: Callable[[], bool] = lambda: False) -> None:
        """Follow the back-end for `timeout` seconds, or until `until()` or a stop request."""
        deadline = time.monotonic() + timeout
        while not until() and not self.should_stop() and time.monotonic() < deadline:
            self._pump(min(WATCH_SLICE, max(0.0, deadline - time.monotonic())))

    def detach(self, timeout: float) -> None:
        """Let the device go (Closing, then Closed once the back-end closes); free the ring."""
        self._feed(DeviceClose())
        self._wait_for(lambda: self.state == FrontendState.CLOSED, timeout, "Closed",
                       stoppable=False)
        self.release_ring(timeout)

    def release_ring(self, timeout: float) -> None:
        """Wait until the machine ungranted the ring (the back-end Closed or gone: it unmaps
        first). After `timeout` it is left to `close` or to the next reconnect."""
        self._wait_for(lambda: self.machine.ring is None, timeout, "back-end Closed",
                       stoppable=False, fail=False)

    def reconnect(self) -> None:
        """Start over after Closed (resume, migration): Initialising again."""
        self._feed(DeviceReconnect())

    def close(self) -> None:
        """Drop the watch and the connection (the ring, if still held, is released)."""
        with contextlib.suppress(XenStoreError):
            self._watch.unwatch(f"{self.backend}/state", self._token)
        self._close_rings()
        self._watch.close()

    # -- the event loop --------------------------------------------------------------------

    def _wait_for(self, done: Callable[[], bool], timeout: float, what: str, *,
                  stoppable: bool = True, fail: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if stoppable and self.should_stop():
                raise FrontendFailure(f"stopped while waiting for {what} "
                                      f"(front-end {self.state})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if not fail:
                    self.timeline.add("fe", f"gave up waiting for {what}")
                    return
                raise FrontendFailure(
                    f"timed out after {timeout:g} s waiting for {what}: front-end "
                    f"{self.state}, back-end {_state_name(self.backend_state)}")
            self._pump(min(WATCH_SLICE, remaining))

    def _pump(self, timeout: float) -> None:
        """Take one watch event (or time out) and re-read what it may have changed."""
        event = self._watch.wait(timeout)
        if event is None:
            return
        if isinstance(event, Reconnected):
            self.timeline.add("fe", f"xenstore connection re-made ({event.attempts} tries)")
        # A watch is only a prompt: re-read, whatever it said (it may fire spuriously).
        self._sync()

    def _sync(self) -> None:
        event = observe_backend(lambda key: self.xs.read_optional(f"{self.backend}/{key}"))
        self._note(event)
        self._feed(event)

    def _note(self, event: Event) -> None:
        """The timeline's view of the back-end (changes only) and the handshake's clock."""
        if isinstance(event, BackendVanished):
            if self.backend_state is not None:
                self.timeline.add("be", "state node gone")
            self.backend_state = None
        if not isinstance(event, BackendStateChanged):
            return  # garbage: the machine reports it
        state = event.state
        if state != self.backend_state:
            self.timeline.add("be", f"state={int(state)} ({state.name})")
            if state in (XenbusState.CLOSING, XenbusState.CLOSED):
                self._note_backend_error()
        self.backend_state = state
        hs = self.handshakes[-1] if self.handshakes else None
        if (state == XenbusState.CONNECTED and hs is not None and hs.initialised is not None
                and hs.backend_connected is None):
            hs.backend_connected = self.timeline.now_ms()

    def _feed(self, event: Event) -> None:
        # The machine takes every back-end state in every state (`blktap3-fsm check`):
        # an FsmError here is our own bug, and is not caught.
        self._execute(self.machine.handle(event))

    def _execute(self, effects: Sequence[Effect]) -> None:
        for effect in effects:
            match effect:
                case OfferRing():
                    self._offer_ring(effect)
                case WriteKeys():
                    self._write_keys(effect)
                case PublishState(state=state):
                    self._publish(XenbusState(int(state)))
                case ReadBackendInfo():
                    self._read_backend_info()
                case ReleaseRing():
                    self._release_ring()
                case ReportFault(text=text):
                    self.timeline.add("fe", f"ignored: {text}")
                    self.log.warning("back-end out of protocol", fault=text)
                case _:
                    raise TypeError(f"front-end machine asked for {effect!r}")

    # -- effects ---------------------------------------------------------------------------

    def _offer_ring(self, offer: OfferRing) -> None:
        """Grant a ring of 2**order pages and bind its event channel for each queue; tell
        the machine."""
        if self.rings:
            raise TypeError("front-end machine offered a second ring")  # our bug
        order, queues = offer.order, offer.queues
        try:
            for _ in range(queues):
                self.rings.append(self._ring_factory(offer, self.personality.protocol))
        except OSError as e:
            self._close_rings()
            self._feed(RingOfferFailed(str(e)))
            raise FrontendFailure(f"cannot offer {queues} ring(s) of {1 << order} page(s): "
                                  f"{e}") from None
        ports = ", ".join(str(ring.port) for ring in self.rings)
        indirect = (f", {offer.indirect_segments} segments per indirect request"
                    if offer.indirect_segments else "")
        self.timeline.add("fe", f"{queues} ring(s) of {1 << order} page(s) shared, event "
                                f"channel(s) {ports}{indirect}")
        first, *more = self.rings
        self._feed(RingOffered(tuple(first.grefs), first.port,
                               tuple((tuple(r.grefs), r.port) for r in more)))

    def _release_ring(self) -> None:
        if not self.rings:
            raise TypeError("front-end machine released a ring never offered")  # our bug
        self._close_rings()
        self.timeline.add("fe", "ring released")

    def _close_rings(self) -> None:
        rings, self.rings = self.rings, []
        for ring in rings:
            ring.close()

    def _write_keys(self, effect: WriteKeys) -> None:
        text = " ".join(f"{k}={v}" for k, v in effect.keys)
        if self.personality.keys_in_transaction:
            def body(tx: Transaction) -> None:
                for key, value in effect.keys:
                    tx.write(f"{self.frontend}/{key}", value)

            self.xs.transact(body)
            self.timeline.add("fe", f"[tx] {text}")
        else:
            for key, value in effect.keys:
                self.xs.write(f"{self.frontend}/{key}", value)
            self.timeline.add("fe", text)

    def _publish(self, state: XenbusState) -> None:
        path = f"{self.frontend}/state"
        if self.personality.state_in_transaction:
            # xenbus_switch_state: read the current state and write only a change.
            def body(tx: Transaction) -> None:
                if tx.read_optional(path) != state.wire():
                    tx.write(path, state.wire())

            self.xs.transact(body)
        else:
            self.xs.write(path, state.wire())
        t = self.timeline.add("fe", f"{'[tx] ' if self.personality.state_in_transaction else ''}"
                                    f"state={int(state)} ({state.name})")
        hs = self.handshakes[-1] if self.handshakes else None
        if hs is not None and state == XenbusState.INITIALISED:
            hs.initialised, hs.backend_connected, hs.connected = t, None, None
        if hs is not None and state == XenbusState.CONNECTED and hs.connected is None:
            hs.connected = t

    def _read_backend_info(self) -> None:
        """Read the disk the back-end announces; answer the machine (valid or not)."""
        values: dict[str, int] = {}
        for key in self.personality.mandatory_reads:
            raw = self.xs.read_optional(f"{self.backend}/{key}")
            try:
                values[key] = parse_decimal(raw, key, hi=(1 << 64) - 1)
            except XenbusValueError as e:
                self._feed(BackendInfoInvalid(str(e)))
                raise FrontendFailure(f"reading back-end {key}: {e}") from None
        features = {}
        for key in self.personality.optional_reads:
            raw = self.xs.read_optional(f"{self.backend}/{key}")
            if raw is not None:
                features[key] = raw
        self.features = features
        old = self.machine.disk
        disk = DiskInfo(
            sectors=values.get("sectors", 0),
            sector_size=values.get("sector-size", 512),
            info=values.get("info", 0),
            physical_sector_size=_int_or(features.get("physical-sector-size"),
                                         values.get("sector-size", 512)),
        )
        if old is not None and old.sectors != disk.sectors:
            self.resizes.append((old.sectors, disk.sectors))
            self.timeline.add("fe", f"capacity changed {old.sectors} -> {disk.sectors} sectors")
        elif old is None or old != disk:
            self.timeline.add("fe", f"read sectors={disk.sectors} info={disk.info} "
                                    f"sector-size={disk.sector_size}")
        self._feed(BackendInfoRead(disk))

    # -- helpers ---------------------------------------------------------------------------

    def _note_backend_error(self) -> None:
        """A back-end that closes us may say why in its `error` node: keep it."""
        error = self.xs.read_optional(f"{self.backend}/error")
        if error and error != self.backend_error:
            self.backend_error = error
            self.timeline.add("be", f"error: {error}")

    def _read_required(self, path: str) -> str:
        value = self.xs.read_optional(path)
        if value is None:
            raise FrontendFailure(f"{path} is missing (no such device for this guest?)")
        return value

    def _reconnect_xs(self) -> XenStore:
        # The WatchStream's first call is our own connection; later calls mean it was lost.
        if not self._watch_started:
            self._watch_started = True
            return self.xs
        self.xs.close()
        self.xs = self._connect_xs()
        return self.xs


def _int_or(raw: str | None, default: int) -> int:
    if raw is None:
        return default
    try:
        return parse_decimal(raw, "value")
    except XenbusValueError:
        return default


def _state_name(state: XenbusState | None) -> str:
    return "absent" if state is None else f"{int(state)} ({state.name})"


def is_readonly(disk: DiskInfo) -> bool:
    return bool(disk.info & VdiskInfo.READONLY)
