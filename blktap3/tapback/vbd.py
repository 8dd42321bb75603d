"""One VBD in tapback: its machine, its own thread, and the execution of its effects.

Each `VbdWorker` owns one `blktap3.fsm.BackendVbd` and a thread that handles this VBD's
prompts in order. A prompt says only "something may have changed" (a watch fired, a
tapdisk died, the image was reopened): the worker re-reads what it watches in XenStore,
turns the differences into machine events, and executes the effects the machine returns.
A tapdisk that hangs blocks only this thread (every control call has a timeout).

Differences from blktap's tapback, on purpose:
- all XenStore writes of one step go in ONE transaction that first checks that the
  back-end directory still exists, so a VBD the toolstack removed is never re-created by
  a late write (the original's writes resurrected half directories);
- a restarted tapback adopts a Connected VBD: it tells the machine what the directory
  holds (`BackendFound`), the machine replays the connect (the tapdisk answers EALREADY)
  and rewrites nothing the front-end watches (no InitWait flash, no redundant keys);
- every failure goes to the log and to the `error` node, including a guest that takes
  away our read access to its own nodes (a driver domain is not privileged);
- prompts are coalesced: a message already waiting is not queued again, so a guest
  flooding its `state` node while this VBD is busy costs a bounded queue, not memory.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from blktap3.abi import VdiskInfo
from blktap3.ctl import runtime
from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.ctl.protocol import DEFAULT_MAX_INDIRECT_SEGMENTS
from blktap3.fsm import (
    BackendFeatures,
    BackendFound,
    BackendRemoved,
    BackendVbd,
    DiskInfo,
    DiskResized,
    Effect,
    Event,
    FrontendStateChanged,
    FrontendStateInvalid,
    FrontendVanished,
    FsmError,
    HotplugConnected,
    HotplugFailed,
    OnlineChanged,
    PublishState,
    ReadFrontendTransport,
    RemoveDirectory,
    RingConnected,
    RingConnectFailed,
    RingDisconnected,
    RingDisconnectFailed,
    RingTransport,
    SendControl,
    SetError,
    TapdiskDied,
    TapdiskRef,
    TransportInvalid,
    TransportRead,
    Unregister,
    WriteKeys,
    XenblkifConnect,
    XenblkifDisconnect,
    XenbusState,
    parse_xenbus_state,
)
from blktap3.xenbus import (
    BackendKey,
    Transaction,
    VbdPaths,
    XenbusValueError,
    XenStore,
    XenStoreError,
    XenStorePermissionError,
    parse_frontend_transport,
    reader_for,
)

from .store import SharedStore
from .tapdisks import TapdiskLocation, parse_device_path

log = structlog.get_logger(__name__)

HOTPLUG_ERROR = "hotplug-error"
_ABSENT = object()  # "never read" marker for the last front-end state seen
# What a front-end `state` we may not read counts as: not a xenbus state, so the VBD
# fails with an error node like any other garbage the guest puts there.
UNREADABLE_STATE = "<unreadable: permission denied>"


class Prompt(enum.Enum):
    REFRESH = "refresh"  # a back-end watch fired: re-read everything we watch
    FRONTEND = "frontend"  # the front-end's state node fired: re-read only that
    RESIZE = "resize"  # the image may have changed size: ask the tapdisk
    STOP = "stop"  # tapback is stopping: leave everything as it is


@dataclass(frozen=True)
class Died:
    """The tapdisk with this pid exited."""

    pid: int


Message = Prompt | Died


@dataclass(frozen=True)
class VbdConfig:
    """What every worker shares: where tapdisks live, timeouts, offered features."""

    control_root: Path
    tapdisk_timeout: float = 30.0
    max_ring_page_order: int = 3


@dataclass(frozen=True)
class Snapshot:
    """What one refresh read from XenStore (None: node absent)."""

    backend_exists: bool
    frontend_state: str | None = None
    hotplug_status: str | None = None
    device_path: str | None = None
    online: str | None = None


class VbdWorker:
    """The machine and thread of `backend/<kind>/<domid>/<devid>`."""

    def __init__(
        self,
        paths: VbdPaths,
        frontend: str,
        store: SharedStore,
        config: VbdConfig,
        *,
        on_final: Callable[[VbdWorker], None],
        on_tapdisk: Callable[[VbdWorker, int], None],
    ) -> None:
        self.paths = paths
        self.frontend = frontend
        self.store = store
        self.config = config
        self._on_final = on_final
        self._on_tapdisk = on_tapdisk
        self.machine = BackendVbd(paths.domid, paths.devid, paths.backend_domid)
        self.log = log.bind(domid=paths.domid, devid=paths.devid)
        self.location: TapdiskLocation | None = None
        self.image_path: str | None = None
        self._info_bits = 0
        self._last_frontend: object = _ABSENT
        self._last_online: bool | None = None
        self._hotplug_seen = False
        self._inherited_perms: list[str] | None = None
        self._queue: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._queued: set[Message] = set()  # what _queue holds, to post each once
        self._queued_lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"vbd-{paths.domid}-{paths.devid}", daemon=True)

    @property
    def key(self) -> tuple[int, int]:
        return (self.paths.domid, self.paths.devid)

    @property
    def frontend_state_path(self) -> str:
        return f"{self.frontend}/state"

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        """How many prompts wait for the thread."""
        return self._queue.qsize()

    def post(self, message: Message) -> None:
        if self._done.is_set():
            return
        with self._queued_lock:
            if message in self._queued:
                return  # the thread has not taken it yet: one re-read answers both
            self._queued.add(message)
        self._queue.put(message)

    def _take(self, message: Message) -> Message:
        with self._queued_lock:
            self._queued.discard(message)
        return message

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._setup()
        except XenStoreError as exc:
            self.log.warning("vbd setup failed, defaults used", error=str(exc))
        except Exception:  # never let one VBD take the daemon down
            self.log.exception("vbd setup crashed, defaults used")
        while not self._done.is_set():
            first = self._take(self._queue.get())
            batch = [first]
            # Several watch events usually arrive together: one re-read answers them all.
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._take(self._queue.get_nowait()))
            if Prompt.STOP in batch:
                return
            try:
                self._handle_batch(batch)
            except XenStoreError as exc:
                # xenstored went away mid-step: the stream's Reconnected prompts us again.
                self.log.warning("xenstore failed during a step", error=str(exc))
            except Exception:  # never let one VBD take the daemon down
                self.log.exception("vbd step crashed")
            if self.machine.is_final:
                self._finish()

    def _finish(self) -> None:
        self._done.set()
        self.log.info("vbd released", state=self.machine.state)
        self._on_final(self)

    def _handle_batch(self, batch: Sequence[Message]) -> None:
        messages = dict.fromkeys(batch)  # each distinct message once, in order
        if Prompt.REFRESH in messages:
            messages.pop(Prompt.FRONTEND, None)  # a full refresh reads the front-end too
        for message in messages:
            if self.machine.is_final:
                return
            if isinstance(message, Died):
                self._tapdisk_died(message.pid)
            elif message is Prompt.RESIZE:
                self._check_size()
            elif message is Prompt.REFRESH:
                self._refresh()
            elif message is Prompt.FRONTEND:
                self._frontend_changed(self.store.call(self._read_frontend_state))

    # -- reading XenStore ----------------------------------------------------------------

    def _setup(self) -> None:
        """Read the toolstack's keys once: they fix the offered features and info bits."""

        def read(xs: XenStore) -> tuple[str | None, ...]:
            b = self.paths.backend_key
            return tuple(xs.read_optional(b(k)) for k in (
                BackendKey.MODE, BackendKey.DEVICE_TYPE, "removable", BackendKey.PARAMS,
                BackendKey.STATE))

        mode, device_type, removable, params, state = self.store.call(read)
        # New nodes inherit their parent's permissions: when the toolstack gave our
        # directory the ones the machine asks for, writes need no SET_PERMS each.
        perms = self.store.call(lambda xs: xs.get_perms(self.paths.backend))
        self._inherited_perms = [str(p) for p in perms]
        readonly = mode is not None and mode.startswith("r")
        cdrom = device_type == "cdrom"
        info = VdiskInfo(0)
        if readonly:
            info |= VdiskInfo.READONLY
        if cdrom:
            info |= VdiskInfo.CDROM
        if cdrom or removable == "1":
            info |= VdiskInfo.REMOVABLE
        self._info_bits = int(info)
        if params is not None and ":" in params:
            self.image_path = params.split(":", 1)[1]
        # Discard is offered; the machine announces it only when the tapdisk says the
        # image can punch holes (DISK_INFO) and the disk is writable.
        self.machine.features = BackendFeatures(
            max_ring_page_order=self.config.max_ring_page_order,
            discard=True,
            discard_granularity=512,
            discard_secure=True,
            # Indirect descriptors (issue 13): advertised at probe; the same value goes to
            # the tapdisk in XENBLKIF_CONNECT (_control), which enforces it.
            max_indirect_segments=DEFAULT_MAX_INDIRECT_SEGMENTS,
        )
        found = parse_xenbus_state(state) if state is not None else None
        keys: tuple[tuple[str, str], ...] = ()
        if found not in (None, XenbusState.INITIALISING):
            # A tapback before us worked here: tell the machine what it left, so that it
            # adopts a Connected VBD and writes nothing the store already holds.
            keys = self.store.call(self._read_directory)
        self.feed(BackendFound(found, keys))
        self.log.info("vbd found", frontend=self.frontend, mode=mode, device_type=device_type,
                      image=params, backend_state=found.name.lower() if found else state,
                      adopting=self.machine.state == "adopting")

    def _read_directory(self, xs: XenStore) -> tuple[tuple[str, str], ...]:
        keys = []
        for name in xs.ls(self.paths.backend):
            if name == BackendKey.STATE:
                continue
            value = xs.read_optional(self.paths.backend_key(name))
            if value is not None:
                keys.append((name, value))
        return tuple(keys)

    def _read_frontend_state(self, xs: XenStore | Transaction) -> str | None:
        try:
            return xs.read_optional(self.frontend_state_path)
        except XenStorePermissionError:
            return UNREADABLE_STATE

    def _snapshot(self) -> Snapshot:
        def read(xs: XenStore) -> Snapshot:
            b = self.paths.backend_key
            hotplug = xs.read_optional(b(BackendKey.HOTPLUG_STATUS))
            online = xs.read_optional(b(BackendKey.ONLINE))
            if hotplug is None and online is None and not xs.exists(self.paths.backend):
                return Snapshot(backend_exists=False)
            device = xs.read_optional(b(BackendKey.PHYSICAL_DEVICE_PATH)) if (
                hotplug == "connected" and not self._hotplug_seen) else None
            return Snapshot(
                backend_exists=True,
                frontend_state=self._read_frontend_state(xs),
                hotplug_status=hotplug,
                device_path=device,
                online=online,
            )

        return self.store.call(read)

    def _refresh(self) -> None:
        snap = self._snapshot()
        if not snap.backend_exists:
            self.feed(BackendRemoved())
            return
        self._frontend_changed(snap.frontend_state)
        if not self._hotplug_seen and snap.hotplug_status is not None:
            self._hotplug(snap)
        online = snap.online != "0"
        if online != self._last_online:
            first = self._last_online is None
            self._last_online = online
            if not (first and online):  # online=1 at start is the default: nothing to say
                self.feed(OnlineChanged(online))

    def _frontend_changed(self, raw: str | None) -> None:
        if raw != self._last_frontend:
            self._last_frontend = raw
            self.feed(_frontend_event(raw))

    def _hotplug(self, snap: Snapshot) -> None:
        if snap.hotplug_status != "connected":
            self._hotplug_seen = True
            # Xen's hotplug scripts say why in `hotplug-error`: pass it on.
            why = self.store.call(lambda xs: xs.read_optional(
                self.paths.backend_key(HOTPLUG_ERROR)))
            status = (snap.hotplug_status or "")[:64]
            self.feed(HotplugFailed(f"{why[:200]}" if why else f"hotplug-status is {status!r}"))
            return
        self._hotplug_seen = True
        try:
            if snap.device_path is None:
                raise ValueError("physical-device-path missing")
            location = parse_device_path(snap.device_path)
            disk = self._disk_info(location)
        except (ValueError, CtlError) as exc:
            self.feed(HotplugFailed(str(exc)))
            return
        self.location = location
        self.log = self.log.bind(pid=location.pid, minor=location.minor)
        self._on_tapdisk(self, location.pid)
        self.feed(HotplugConnected(TapdiskRef(location.pid, location.minor), disk))

    # -- tapdisk -----------------------------------------------------------------------

    def _client(self, pid: int) -> TapdiskClient:
        return TapdiskClient(pid, root=self.config.control_root,
                             timeout=self.config.tapdisk_timeout)

    def _disk_info(self, location: TapdiskLocation) -> DiskInfo:
        image = self._client(location.pid).disk_info(location.minor)
        # `physical` and `discard` are our extension of the reply: a blktap tapdisk
        # leaves them zero, read as "the logical sector size" and "no discard".
        return DiskInfo(image.sectors, image.sector_size, image.info | self._info_bits,
                        image.physical, image.discard)

    def _tapdisk_died(self, pid: int) -> None:
        if self.location is None or self.location.pid != pid:
            return
        # blktap leaves a dead tapdisk's socket behind; we do not.
        runtime.remove_stale_socket(self.config.control_root, pid)
        self.feed(TapdiskDied(pid))

    def _check_size(self) -> None:
        if self.location is None or self.machine.disk is None:
            return
        try:
            disk = self._disk_info(self.location)
        except CtlError as exc:
            self.log.debug("disk info after an image event failed", error=str(exc))
            return
        if disk != self.machine.disk:
            self.log.info("image size changed", sectors=disk.sectors,
                          old_sectors=self.machine.disk.sectors)
            self.feed(DiskResized(disk))

    def _control(self, effect: SendControl) -> Event:
        message = effect.message
        if isinstance(message, XenblkifConnect):
            client = self._client(message.pid)
            t = message.transport
            try:
                client.connect_xenblkif(
                    message.minor, domid=message.domid, devid=message.devid,
                    grefs=t.ring_refs, order=len(t.ring_refs).bit_length() - 1,
                    port=t.event_channel, proto=t.protocol,
                    # Issue 13: what _setup advertised as feature-max-indirect-segments.
                    max_indirect_segments=self.machine.features.max_indirect_segments)
            except CtlError as exc:
                if exc.errno == errno.EALREADY:
                    self.log.info("ring already connected (adopted)", state=self.machine.state)
                else:
                    self.log.error("ring connect failed", error=str(exc))
                return RingConnectFailed(exc.errno or errno.EIO, exc.detail)
            return RingConnected()
        if isinstance(message, XenblkifDisconnect):
            try:
                self._client(message.pid).disconnect_xenblkif(message.minor, domid=message.domid,
                                           devid=message.devid)
            except CtlError as exc:
                # ENODEV or a dead tapdisk: the ring is down either way (logged, not fatal).
                self.log.warning("ring disconnect failed", error=str(exc))
                return RingDisconnectFailed(exc.errno or errno.EIO, exc.detail)
            return RingDisconnected()
        raise TypeError(f"unknown control message {message!r}")

    # -- the machine ----------------------------------------------------------------------

    def feed(self, event: Event) -> None:
        """Hand one event to the machine, execute its effects, feed back the answers."""
        pending: list[Event] = [event]
        while pending and not self.machine.is_final:
            current = pending.pop(0)
            before = self.machine.state
            try:
                effects = self.machine.handle(current)
            except FsmError as exc:
                self.log.error("event refused", trigger=current.trigger, state=before,
                               blame=exc.blame.value, detail=exc.detail)
                continue
            after = self.machine.state
            if after != before:
                self.log.info("step", trigger=current.trigger, source=before, dest=after)
            else:
                self.log.debug("no step", trigger=current.trigger, state=before)
            pending.extend(self._execute(effects))

    def _execute(self, effects: Sequence[Effect]) -> list[Event]:
        answers: list[Event] = []
        writes: list[Effect] = []
        for effect in effects:
            if isinstance(effect, WriteKeys | PublishState | SetError):
                writes.append(effect)
                continue
            self._write(writes)
            writes = []
            if isinstance(effect, ReadFrontendTransport):
                answers.append(self._read_transport(effect))
            elif isinstance(effect, SendControl):
                answers.append(self._control(effect))
            elif isinstance(effect, RemoveDirectory):
                self._remove_directory()
            elif isinstance(effect, Unregister):
                self.log.info("unregistered")
            else:
                self.log.error("unknown effect", effect=repr(effect))
        self._write(writes)
        return answers

    def _read_transport(self, effect: ReadFrontendTransport) -> Event:
        def read(tx: Transaction) -> RingTransport:
            transport = parse_frontend_transport(
                reader_for(tx, self.frontend), max_ring_page_order=effect.max_ring_page_order)
            queue0 = transport.queues[0]
            return RingTransport(queue0.ring_refs, queue0.event_channel,
                                 transport.protocol, transport.feature_persistent)

        try:
            return TransportRead(self.store.call(lambda xs: xs.transact(read)))
        except XenbusValueError as exc:
            self.log.error("front-end transport refused", error=str(exc))
            return TransportInvalid(str(exc))
        except XenStorePermissionError as exc:
            # The guest owns these nodes and may lock us out of them: its fault, and
            # final for this VBD (retrying would wait forever).
            self.log.error("front-end transport unreadable", error=str(exc))
            return TransportInvalid(f"cannot read {exc.path or 'a key'}: permission denied")

    def _write(self, effects: Sequence[Effect]) -> None:
        """Execute consecutive write effects in ONE transaction, only if our dir exists."""
        if not effects:
            return
        keys: dict[str, str] = {}
        key_perms: dict[str, list[str]] = {}
        for effect in effects:
            if isinstance(effect, WriteKeys):
                for key, value in effect.keys:
                    keys[key] = value
                    key_perms[key] = list(effect.perms.as_strings())
            elif isinstance(effect, PublishState):
                keys[BackendKey.STATE] = str(int(effect.state))
            elif isinstance(effect, SetError):
                self.log.error("vbd failed", reason=effect.text)
                keys[BackendKey.ERROR] = effect.text
        if not keys:
            return
        backend = self.paths.backend
        inherited = self._inherited_perms

        def body(tx: Transaction) -> bool:
            if not tx.exists(backend):
                return False
            for key, value in keys.items():
                path = f"{backend}/{key}"
                wanted = key_perms.get(key)
                tx.write(path, value, None if wanted == inherited else wanted)
            return True

        written = self.store.call(lambda xs: xs.transact(body))
        if written:
            self.log.debug("wrote", keys=sorted(keys))
            if BackendKey.STATE in keys:
                state = XenbusState(int(keys[BackendKey.STATE]))
                self.log.info("published state", state=state.name.lower())
        else:
            # The next refresh sees the directory gone and tells the machine.
            self.log.info("back-end directory gone, writes dropped", keys=sorted(keys))
            self.post(Prompt.REFRESH)

    def _remove_directory(self) -> None:
        backend = self.paths.backend
        parent = backend.rsplit("/", 1)[0]

        def body(tx: Transaction) -> None:
            tx.rm(backend)
            # The original left empty per-domain directories behind; we do not.
            with contextlib.suppress(XenStoreError):
                if not tx.ls(parent):
                    tx.rm(parent)

        self.store.call(lambda xs: xs.transact(body))
        self.log.info("back-end directory removed (front-end state node gone)")


def _frontend_event(raw: str | None) -> Event:
    if raw is None:
        return FrontendVanished()
    state = parse_xenbus_state(raw)
    if state is None:
        return FrontendStateInvalid(raw[:64])
    return FrontendStateChanged(state)
