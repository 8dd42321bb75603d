"""The h11 trick for xenbus: a front-end and a back-end machine wired through a store.

`MemoryStore` is a few-line XenStore (nodes, permissions, one-shot transactions, watches
that fire on every write and removal, and once when registered).  `VbdPair` plays the
toolstack, a tapback that drives a `BackendVbd`, a blkfront that drives a `FrontendVbd`,
and a tapdisk that answers control messages, all in memory, so tests can run whole
handshakes and faults and look at every effect in order.

Its tapback is the daemon's own code where it reads: the directory, the snapshots and
the transport keys through `blktap3.tapback.reads` (and so the strict
`blktap3.xenbus.parse_frontend_transport`), turned into events by the one
`blktap3.fsm.BackendObserver`.  Only the execution of the effects is its own (writes to
this store, answers of `FakeTapdisk`), so a test that passes here runs the rules the
daemon runs.  It lives in `sim` and not in `fsm` because it reads through xenbus and
tapback, which the machines' room may not import.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blktap3.abi import SECTOR_SIZE
from blktap3.fsm import (
    BackendFeatures,
    BackendInfoRead,
    BackendObserver,
    BackendVbd,
    DiskInfo,
    DiskInfoFailed,
    DiskInfoQuery,
    DiskInfoRead,
    Effect,
    Event,
    FrontendOptions,
    FrontendTransportConfig,
    FrontendVbd,
    ImageChanged,
    OfferRing,
    PublishState,
    ReadBackendInfo,
    ReadFrontendTransport,
    ReleaseRing,
    ReportFault,
    RingConnected,
    RingConnectFailed,
    RingDisconnected,
    RingDisconnectFailed,
    RingOffered,
    SendControl,
    SetError,
    TapdiskDied,
    Toolstack,
    Unregister,
    WatchTapdisk,
    WriteKeys,
    XenblkifConnect,
    XenblkifDisconnect,
    observe_backend,
)
from blktap3.tapback.reads import (
    WATCHED_KEYS,
    parse_device,
    read_directory,
    read_frontend_state,
    read_snapshot,
    transport_answer,
)
from blktap3.tapback.tapdisks import device_path
from blktap3.xenbus import VbdPaths, XenStorePermissionError

Watch = Callable[[str], None]


@dataclass
class MemoryStore:
    """Path -> value, with a write log and watches (their callbacks run by `pump`)."""

    nodes: dict[str, str] = field(default_factory=dict)
    perms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # who, path, value
    watches: list[tuple[str, Watch]] = field(default_factory=list)
    pending: deque[tuple[Watch, str]] = field(default_factory=deque)
    # Nodes the back-end may not read (a guest took its permission away on its own node).
    denied: set[str] = field(default_factory=set)

    def read(self, path: str) -> str | None:
        return self.nodes.get(path)

    # -- what `blktap3.tapback.reads` needs of a store ---------------------------------

    def read_optional(self, path: str) -> str | None:
        if path in self.denied:
            raise XenStorePermissionError(errno.EACCES, path=path)
        return self.nodes.get(path)

    def exists(self, path: str) -> bool:
        return any(p == path or p.startswith(path + "/") for p in self.nodes)

    def ls(self, path: str) -> list[str]:
        prefix = path + "/"
        return sorted({p[len(prefix):].split("/")[0] for p in self.nodes if p.startswith(prefix)})

    # -- writing ------------------------------------------------------------------------

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


@dataclass
class FakeTapdisk:
    """Answers XENBLKIF_CONNECT/DISCONNECT and DISK_INFO as tapdisk does (EALREADY,
    ENODEV; a dead one refuses everything)."""

    pid: int = 4242
    minor: int = 0
    root: Path = Path("/run/blktap-control")  # its runtime root (physical-device-path)
    disk: DiskInfo = field(default_factory=lambda: DiskInfo(sectors=524288))
    alive: bool = True
    rings: set[tuple[int, int]] = field(default_factory=set)
    refuse_connect: int = 0  # the errno XENBLKIF_CONNECT answers (0: it connects)

    def answer(self, message: object) -> Event:
        if isinstance(message, DiskInfoQuery):
            if not self.alive:
                return DiskInfoFailed(errno.ECONNREFUSED, "tapdisk gone")
            return DiskInfoRead(self.disk)
        if not self.alive:
            if isinstance(message, XenblkifConnect):
                return RingConnectFailed(errno.ECONNREFUSED, "tapdisk gone")
            return RingDisconnectFailed(errno.ECONNREFUSED, "tapdisk gone")
        if isinstance(message, XenblkifConnect):
            key = (message.domid, message.devid)
            if self.refuse_connect:
                return RingConnectFailed(self.refuse_connect, "refused")
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
        toolstack: Toolstack = Toolstack.XAPI,
    ) -> None:
        self.domid, self.devid = domid, devid
        self.paths = VbdPaths(domid, devid)
        self.store = MemoryStore()
        self.tapdisk = FakeTapdisk()
        self.backend = BackendVbd(domid, devid, features=features, toolstack=toolstack)
        self.observer = BackendObserver(parse_device)
        # The ring this blkfront offers, whatever order it is asked for (a test may
        # make it offer more pages than the back-end allows).
        self.frontend_transport = transport or FrontendTransportConfig()
        self.frontend = FrontendVbd(domid, options=FrontendOptions(
            protocol=self.frontend_transport.protocol,
            persistent=self.frontend_transport.persistent))
        self.be_path = self.paths.backend
        self.fe_path = self.paths.frontend
        self.trace: list[tuple[str, Effect]] = []  # ("backend" | "frontend", effect)
        self.watched_tapdisks: list[int] = []  # pids the back-end asked to watch
        self._backend_watching = False
        self._frontend_watching = False

    # --- the toolstack --------------------------------------------------------------------

    def create_backend_dir(self, mode: str = "w") -> None:
        s, be, fe = self.store, self.be_path, self.fe_path
        keys = {"frontend": fe, "frontend-id": str(self.domid), "online": "1",
                "params": "aio:/dev/null", "mode": mode, "state": "1"}
        s.transaction("toolstack", {f"{be}/{k}": v for k, v in keys.items()},
                      ("n0", f"r{self.domid}"))
        if not self._backend_watching:  # tapback finds the VBD, then watches it
            self._backend_watching = True
            self.backend_found()
            s.watch(f"{fe}/state", self._tapback_sees_frontend)
            for key in WATCHED_KEYS:
                s.watch(f"{be}/{key}", self._tapback_refresh)

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
        path = device_path(self.tapdisk.root, self.tapdisk.pid, self.tapdisk.minor)
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
        """The tapdisk exits; tapback's monitor reports it (the machine knows its pid)."""
        self.tapdisk.alive = False
        self.tapdisk.rings.clear()
        self.tapback_event(TapdiskDied(self.tapdisk.pid))
        self.store.pump()

    def resize(self, sectors: int) -> None:
        """`tap-ctl resize`: the tapdisk reopens the image, tapback sees the open."""
        self.tapdisk.disk = DiskInfo(sectors=sectors, sector_size=self.tapdisk.disk.sector_size)
        self.tapback_event(ImageChanged())
        self.store.pump()

    def guest(self, event: Event) -> None:
        self.frontend_handle(event)
        self.store.pump()

    # --- tapback: store -> snapshot -> observer -> events -> effects ------------------------

    def backend_found(self) -> None:
        """What the daemon does when it finds the VBD: read the directory once."""
        self._tapback_feed(self.observer.found(read_directory(self.store, self.paths)))

    def tapback_refresh(self) -> None:
        """What a back-end watch makes the daemon do: re-read everything it watches."""
        self._tapback_feed(self.observer.observe(
            read_snapshot(self.store, self.paths, self.fe_path)))

    def tapback_event(self, event: Event) -> None:
        """An event that does not come from the store (a tapdisk death, an image open)."""
        self._tapback_feed([event])

    def _tapback_refresh(self, _path: str) -> None:
        self.tapback_refresh()

    def _tapback_sees_frontend(self, _path: str) -> None:
        self._tapback_feed(self.observer.observe_frontend(
            read_frontend_state(self.store, self.fe_path)))

    def _tapback_feed(self, events: Sequence[Event]) -> None:
        for event in events:
            if self.backend.is_final:
                return  # forgotten, as the daemon forgets a finished worker
            self.backend_handle(event)

    def backend_handle(self, event: Event) -> None:
        """Feed one event; execute the effects in order, answers fed before anything else."""
        pending = deque([event])
        # a final machine is forgotten: replies to its last requests are dropped
        while pending and not self.backend.is_final:
            effects = self.backend.handle(pending.popleft())
            for effect in effects:
                self.trace.append(("backend", effect))
                answer = self._backend_execute(effect)
                if answer is not None:
                    pending.append(answer)

    def _backend_execute(self, effect: Effect) -> Event | None:
        s, be = self.store, self.be_path
        match effect:
            case WriteKeys(keys=keys, perms=perms):
                s.transaction("backend", {f"{be}/{k}": v for k, v in keys}, perms.as_strings())
            case PublishState(state=state):
                s.write("backend", f"{be}/state", state.wire())
            case SetError(text=text):
                s.write("backend", f"{be}/error", text)
            case WatchTapdisk(tapdisk=tapdisk):
                self.watched_tapdisks.append(tapdisk.pid)
            case Unregister():
                pass
            case ReadFrontendTransport(max_ring_page_order=order, max_queues=queues):
                return transport_answer(lambda k: s.read(f"{self.fe_path}/{k}"), order, queues)
            case SendControl(message=message):
                return self.tapdisk.answer(message)
            case _:
                raise TypeError(f"unknown back-end effect {effect!r}")
        return None

    # --- blkfront -------------------------------------------------------------------------

    def _frontend_sees_backend(self, _path: str) -> None:
        """blkfront's watch: the same pure observer the simulated guests use."""
        if self.store.read(f"{self.fe_path}/state") is None:
            return  # the front-end is gone (or not made yet): no blkfront to tell
        self.frontend_handle(observe_backend(lambda k: self.store.read(f"{self.be_path}/{k}")))

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
                case ReleaseRing() | ReportFault():
                    pass  # no ring pages to ungrant here; the fault is in the trace
                case ReadBackendInfo():
                    disk = DiskInfo(
                        sectors=int(s.read(f"{be}/sectors") or 0),
                        sector_size=int(s.read(f"{be}/sector-size") or SECTOR_SIZE),
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
