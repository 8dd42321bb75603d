"""The h11 trick for xenbus: a front-end and a back-end machine wired through a store.

`MemoryStore` is a few-line XenStore (nodes, permissions, one-shot transactions, watches
that fire on every write and removal, and once when registered).  `VbdPair` plays the
toolstack, a tapback that drives a `BackendVbd`, a blkfront that drives a `FrontendVbd`,
and a tapdisk that answers control messages, all in memory, so tests can run whole
handshakes and faults and look at every effect in order.  Test support only: the real
daemons execute the same effects against xenstored.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from blktap3.abi import BlkifProtocol

from .backend import BackendFeatures, BackendVbd
from .effects import (
    Effect,
    OfferRing,
    PublishState,
    ReadBackendInfo,
    ReadFrontendTransport,
    ReleaseRing,
    RemoveDirectory,
    SendControl,
    SetError,
    Unregister,
    WriteKeys,
    XenblkifConnect,
    XenblkifDisconnect,
)
from .events import (
    BackendInfoRead,
    BackendStateChanged,
    DiskInfo,
    DiskResized,
    Event,
    FrontendStateChanged,
    FrontendStateInvalid,
    FrontendVanished,
    HotplugConnected,
    OnlineChanged,
    RingConnected,
    RingConnectFailed,
    RingDisconnected,
    RingDisconnectFailed,
    RingOffered,
    RingTransport,
    TapdiskDied,
    TapdiskRef,
    TransportInvalid,
    TransportRead,
)
from .frontend import FrontendOptions, FrontendTransportConfig, FrontendVbd
from .xenbus_state import parse_xenbus_state

Watch = Callable[[str], None]


@dataclass
class MemoryStore:
    """Path -> value, with a write log and watches (their callbacks run by `pump`)."""

    nodes: dict[str, str] = field(default_factory=dict)
    perms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # who, path, value
    watches: list[tuple[str, Watch]] = field(default_factory=list)
    pending: deque[tuple[Watch, str]] = field(default_factory=deque)

    def read(self, path: str) -> str | None:
        return self.nodes.get(path)

    def write(self, who: str, path: str, value: str, perms: tuple[str, ...] = ()) -> None:
        self.transaction(who, {path: value}, perms)

    def transaction(self, who: str, writes: dict[str, str], perms: tuple[str, ...] = ()) -> None:
        for path, value in writes.items():
            self.nodes[path] = value
            if perms:
                self.perms[path] = perms
            self.log.append((who, path, value))
        for path in writes:
            self._fire(path)

    def rm(self, who: str, path: str) -> None:
        for p in [p for p in self.nodes if p == path or p.startswith(path + "/")]:
            del self.nodes[p]
            self.perms.pop(p, None)
        self.log.append((who, path, None))
        self._fire(path)

    def watch(self, path: str, callback: Watch) -> None:
        self.watches.append((path, callback))
        self.pending.append((callback, path))  # a watch fires once when registered

    def _fire(self, path: str) -> None:
        for prefix, callback in self.watches:
            # xenstored fires a watch for changes at or below it; a removed parent
            # removes the watched node too
            if path == prefix or path.startswith(prefix + "/") or prefix.startswith(path + "/"):
                self.pending.append((callback, prefix))

    def pump(self, limit: int = 1000) -> int:
        """Deliver pending watch events until none is left; returns how many ran."""
        ran = 0
        while self.pending:
            callback, path = self.pending.popleft()
            callback(path)
            ran += 1
            if ran > limit:
                raise RuntimeError("watch storm: the machines keep writing")
        return ran

    def state_writes(self, path: str) -> list[int]:
        """The values written to a `state` node, in order (for no-redundant-write checks)."""
        return [int(v) for _, p, v in self.log if p == path and v is not None and v.isdigit()]


def parse_transport(read: Callable[[str], str | None], max_order: int) -> RingTransport | str:
    """Strict parse of a front-end's transport keys; a reason string when they are bad."""

    def number(key: str) -> int | str:
        raw = read(key)
        if raw is None:
            return f"{key} missing"
        if not raw.isdigit() or len(raw) > 10:
            return f"{key}={raw!r} is not a number"
        return int(raw)

    order = 0 if read("ring-page-order") is None else number("ring-page-order")
    if isinstance(order, str):
        return order
    if order > max_order:
        return f"ring-page-order={order} above max-ring-page-order={max_order}"
    keys = ["ring-ref"] if order == 0 else [f"ring-ref{i}" for i in range(1 << order)]
    refs: list[int] = []
    for key in keys:
        ref = number(key)
        if isinstance(ref, str):
            return ref
        refs.append(ref)
    port = number("event-channel")
    if isinstance(port, str):
        return port
    raw = read("protocol")
    protocol = BlkifProtocol.from_xenstore(raw)  # a missing key means native (blkif.h)
    if protocol is None:
        return f"protocol={raw!r} unknown"
    return RingTransport(tuple(refs), port, protocol, read("feature-persistent") == "1")


@dataclass
class FakeTapdisk:
    """Answers XENBLKIF_CONNECT/DISCONNECT as tapdisk does (EALREADY, ENODEV)."""

    pid: int = 4242
    minor: int = 0
    disk: DiskInfo = field(default_factory=lambda: DiskInfo(sectors=524288))
    alive: bool = True
    rings: set[tuple[int, int]] = field(default_factory=set)

    def answer(self, message: object) -> Event:
        if not self.alive:
            if isinstance(message, XenblkifConnect):
                return RingConnectFailed(errno.ECONNREFUSED, "tapdisk gone")
            return RingDisconnectFailed(errno.ECONNREFUSED, "tapdisk gone")
        if isinstance(message, XenblkifConnect):
            key = (message.domid, message.devid)
            if key in self.rings:
                return RingConnectFailed(errno.EALREADY)
            self.rings.add(key)
            return RingConnected()
        if isinstance(message, XenblkifDisconnect):
            key = (message.domid, message.devid)
            if key not in self.rings:
                return RingDisconnectFailed(errno.ENODEV)
            self.rings.discard(key)
            return RingDisconnected()
        raise TypeError(f"unknown control message {message!r}")


class VbdPair:
    """Toolstack + tapback + blkfront + tapdisk for one VBD, in memory."""

    def __init__(
        self,
        domid: int = 1,
        devid: int = 51712,
        features: BackendFeatures | None = None,
        transport: FrontendTransportConfig | None = None,
    ) -> None:
        self.domid, self.devid = domid, devid
        self.store = MemoryStore()
        self.tapdisk = FakeTapdisk()
        self.backend = BackendVbd(domid, devid, features=features)
        # The ring this blkfront offers, whatever order it is asked for (a test may
        # make it offer more pages than the back-end allows).
        self.frontend_transport = transport or FrontendTransportConfig()
        self.frontend = FrontendVbd(domid, options=FrontendOptions(
            protocol=self.frontend_transport.protocol,
            persistent=self.frontend_transport.persistent))
        self.be_path = f"backend/vbd3/{domid}/{devid}"
        self.fe_path = f"/local/domain/{domid}/device/vbd/{devid}"
        self.trace: list[tuple[str, Effect]] = []  # ("backend" | "frontend", effect)
        self._backend_watching = False
        self._frontend_watching = False

    # --- the toolstack --------------------------------------------------------------------

    def create_backend_dir(self) -> None:
        s, be, fe = self.store, self.be_path, self.fe_path
        keys = {"frontend": fe, "frontend-id": str(self.domid), "online": "1",
                "params": "aio:/dev/null", "mode": "w", "state": "1"}
        s.transaction("toolstack", {f"{be}/{k}": v for k, v in keys.items()},
                      ("n0", f"r{self.domid}"))
        if not self._backend_watching:  # tapback's watches on this VBD
            self._backend_watching = True
            s.watch(f"{fe}/state", self._backend_sees_frontend)
            s.watch(f"{be}/hotplug-status", self._backend_sees_hotplug)
            s.watch(f"{be}/online", self._backend_sees_online)

    def create_frontend_dir(self) -> None:
        s, be, fe = self.store, self.be_path, self.fe_path
        keys = {"backend": be, "backend-id": "0", "virtual-device": str(self.devid),
                "device-type": "disk", "state": "1"}
        s.transaction("toolstack", {f"{fe}/{k}": v for k, v in keys.items()},
                      (f"n{self.domid}", "r0"))
        if not self._frontend_watching:  # blkfront's watch on the back-end's state
            self._frontend_watching = True
            s.watch(f"{be}/state", self._frontend_sees_backend)

    def hotplug(self) -> None:
        path = f"/run/blktap-control/nbd{self.tapdisk.pid}.{self.tapdisk.minor}"
        self.store.write("hotplug", f"{self.be_path}/physical-device-path", path)
        self.store.write("hotplug", f"{self.be_path}/hotplug-status", "connected")

    def create(self) -> None:
        """What xl does: both directories, then the hotplug step; then run the watches."""
        self.create_backend_dir()
        self.create_frontend_dir()
        self.hotplug()
        self.store.pump()

    def set_offline(self) -> None:
        self.store.write("toolstack", f"{self.be_path}/online", "0")
        self.store.pump()

    # --- faults and guest actions ---------------------------------------------------------

    def remove_frontend(self) -> None:
        self.store.rm("guest", self.fe_path)
        self.store.pump()

    def kill_tapdisk(self) -> None:
        self.tapdisk.alive = False
        self.tapdisk.rings.clear()
        self.backend_handle(TapdiskDied(self.tapdisk.pid))
        self.store.pump()

    def resize(self, sectors: int) -> None:
        disk = DiskInfo(sectors=sectors, sector_size=self.tapdisk.disk.sector_size)
        self.tapdisk.disk = disk
        self.backend_handle(DiskResized(disk))
        self.store.pump()

    def guest(self, event: Event) -> None:
        self.frontend_handle(event)
        self.store.pump()

    # --- tapback: watches -> events -> effects --------------------------------------------

    def _backend_sees_frontend(self, _path: str) -> None:
        if self.backend.is_final:
            return
        raw = self.store.read(f"{self.fe_path}/state")  # re-read: never trust the event
        if raw is None:
            self.backend_handle(FrontendVanished())
            return
        state = parse_xenbus_state(raw)
        self.backend_handle(
            FrontendStateChanged(state) if state is not None else FrontendStateInvalid(raw)
        )

    def _backend_sees_hotplug(self, _path: str) -> None:
        if self.backend.is_final or self.backend.tapdisk is not None:
            return  # tapback acts on hotplug-status once
        if self.store.read(f"{self.be_path}/hotplug-status") == "connected":
            ref = TapdiskRef(self.tapdisk.pid, self.tapdisk.minor)
            self.backend_handle(HotplugConnected(ref, self.tapdisk.disk))

    def _backend_sees_online(self, _path: str) -> None:
        raw = self.store.read(f"{self.be_path}/online")
        if raw is not None and not self.backend.is_final:
            self.backend_handle(OnlineChanged(raw == "1"))

    def backend_handle(self, event: Event) -> None:
        for effect in self.backend.handle(event):
            self.trace.append(("backend", effect))
            answer = self._backend_execute(effect)
            # a final machine is forgotten: replies to its last requests are dropped
            if answer is not None and not self.backend.is_final:
                self.backend_handle(answer)

    def _backend_execute(self, effect: Effect) -> Event | None:
        s, be = self.store, self.be_path
        match effect:
            case WriteKeys(keys=keys, perms=perms):
                s.transaction("backend", {f"{be}/{k}": v for k, v in keys}, perms.as_strings())
            case PublishState(state=state):
                s.write("backend", f"{be}/state", str(state.value))
            case SetError(text=text):
                s.write("backend", f"{be}/error", text)
            case RemoveDirectory():
                s.rm("backend", be)
            case Unregister():
                pass
            case ReadFrontendTransport(max_ring_page_order=order):
                parsed = parse_transport(lambda k: s.read(f"{self.fe_path}/{k}"), order)
                if isinstance(parsed, str):
                    return TransportInvalid(parsed)
                return TransportRead(parsed)
            case SendControl(message=message):
                return self.tapdisk.answer(message)
            case _:
                raise TypeError(f"unexpected back-end effect {effect!r}")
        return None

    # --- blkfront -------------------------------------------------------------------------

    def _frontend_sees_backend(self, _path: str) -> None:
        raw = self.store.read(f"{self.be_path}/state")
        state = parse_xenbus_state(raw) if raw is not None else None
        if state is not None and self.store.read(f"{self.fe_path}/state") is not None:
            self.frontend_handle(BackendStateChanged(state))

    def frontend_handle(self, event: Event) -> None:
        s, fe, be = self.store, self.fe_path, self.be_path
        for effect in self.frontend.handle(event):
            self.trace.append(("frontend", effect))
            match effect:
                case WriteKeys(keys=keys, perms=perms):
                    writes = {f"{fe}/{k}": v for k, v in keys}
                    s.transaction("frontend", writes, perms.as_strings())
                case PublishState(state=state):
                    s.write("frontend", f"{fe}/state", str(state.value))
                case OfferRing():
                    t = self.frontend_transport
                    self.frontend_handle(RingOffered(t.ring_refs, t.event_channel))
                case ReleaseRing():
                    pass
                case ReadBackendInfo():
                    disk = DiskInfo(
                        sectors=int(s.read(f"{be}/sectors") or 0),
                        sector_size=int(s.read(f"{be}/sector-size") or 512),
                        info=int(s.read(f"{be}/info") or 0),
                    )
                    self.frontend_handle(BackendInfoRead(disk))
                case _:
                    raise TypeError(f"unexpected front-end effect {effect!r}")

    # --- looking --------------------------------------------------------------------------

    def effects(self, side: str) -> list[Effect]:
        return [e for who, e in self.trace if who == side]

    def backend_states(self) -> list[int]:
        return self.store.state_writes(f"{self.be_path}/state")
