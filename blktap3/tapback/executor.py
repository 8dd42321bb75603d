"""The effects of one VBD's back-end machine, executed: XenStore writes, control messages.

`EffectExecutor.execute(effects)` does what a `BackendVbd` asked, in order, and returns
the answers to its questions as events (the worker feeds them back):
- consecutive `WriteKeys` / `PublishState` / `SetError` go in ONE transaction that first
  checks that the back-end directory still exists, so a VBD the toolstack removed is
  never re-created by a late write (blktap's writes resurrected half directories);
- `ReadFrontendTransport` reads the front-end's keys in one transaction and parses them
  strictly (`reads.transport_answer`);
- `SendControl` sends XENBLKIF_CONNECT / XENBLKIF_DISCONNECT / DISK_INFO to the tapdisk
  (every call has a timeout: a hung tapdisk blocks only this VBD's worker);
- `WatchTapdisk` and `Unregister` are passed to the worker.
An effect or control message it does not know is our bug: `TypeError`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from blktap3.abi import MAX_QUEUES, MAX_RING_PAGE_ORDER, SECTOR_SIZE
from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.ctl.protocol import DEFAULT_MAX_INDIRECT_SEGMENTS
from blktap3.fsm import (
    BackendFeatures,
    DiskInfo,
    DiskInfoFailed,
    DiskInfoQuery,
    DiskInfoRead,
    Effect,
    Event,
    PublishState,
    ReadFrontendTransport,
    RingConnected,
    RingConnectFailed,
    RingDisconnected,
    RingDisconnectFailed,
    SendControl,
    SetError,
    TapdiskRef,
    Toolstack,
    TransportInvalid,
    Unregister,
    WatchTapdisk,
    WriteKeys,
    XenblkifConnect,
    XenblkifDisconnect,
    XenbusState,
)
from blktap3.xenbus import BackendKey, Transaction, VbdPaths, reader_for

from .reads import transport_answer
from .store import SharedStore

_WRITES = (WriteKeys, PublishState, SetError)
# feature-persistent advertised unless configured off (tapback --persistent-grants):
# chosen from blktap3-bench's on/off figures (README, issue 13).
DEFAULT_PERSISTENT_GRANTS = True


def default_max_queues() -> int:
    """blkback's `multi-queue-max-queues`: the online CPUs (xenblk_max_queues defaults
    to num_online_cpus()), within what our tapdisk serves (`abi.MAX_QUEUES`)."""
    try:
        online = os.sysconf("SC_NPROCESSORS_ONLN")
    except (OSError, ValueError):
        online = 1
    return max(1, min(online, MAX_QUEUES))


@dataclass(frozen=True)
class VbdConfig:
    """What every VBD shares: where tapdisks live, timeouts, what the back-end offers."""

    control_root: Path
    tapdisk_timeout: float = 30.0
    max_ring_page_order: int = MAX_RING_PAGE_ORDER
    barrier: bool = True  # feature-barrier (blktap's tapback -b: not offered)
    # xapi: InitWait once hotplug is connected (blktap's order); libxl: InitWait first.
    toolstack: Toolstack = Toolstack.XAPI
    persistent: bool = DEFAULT_PERSISTENT_GRANTS  # advertise feature-persistent
    max_queues: int = 1  # multi-queue-max-queues (tapback's default: default_max_queues())

    def features(self) -> BackendFeatures:
        # Discard is offered; the machine announces it only when the tapdisk says the
        # image can punch holes (DISK_INFO) and the disk is writable.
        return BackendFeatures(
            max_ring_page_order=self.max_ring_page_order,
            max_queues=self.max_queues,
            barrier=self.barrier,
            persistent=self.persistent,
            discard=True,
            discard_granularity=SECTOR_SIZE,
            discard_secure=True,
            # Indirect descriptors (issue 13): advertised at probe; the same value goes to
            # the tapdisk in XENBLKIF_CONNECT, which enforces it.
            max_indirect_segments=DEFAULT_MAX_INDIRECT_SEGMENTS,
        )


class EffectExecutor:
    """Executes one VBD's effects (see the module docstring)."""

    def __init__(
        self,
        paths: VbdPaths,
        frontend: str,
        store: SharedStore,
        config: VbdConfig,
        log: structlog.typing.FilteringBoundLogger,
        *,
        on_watch_tapdisk: Callable[[TapdiskRef], None],
        on_writes_dropped: Callable[[], None],
    ) -> None:
        self.paths = paths
        self.frontend = frontend
        self.store = store
        self.config = config
        self.log = log
        self._on_watch_tapdisk = on_watch_tapdisk
        self._on_writes_dropped = on_writes_dropped
        # New nodes inherit their parent's permissions: when the toolstack gave our
        # directory the ones the machine asks for, writes need no SET_PERMS each.
        self.inherited_perms: list[str] | None = None

    def execute(self, effects: Sequence[Effect]) -> list[Event]:
        """Execute `effects` in order; the answers to the questions among them."""
        answers: list[Event] = []
        writes: list[Effect] = []
        for effect in effects:
            if isinstance(effect, _WRITES):
                writes.append(effect)
                continue
            self._write(writes)
            writes = []
            match effect:
                case ReadFrontendTransport(max_ring_page_order=order, max_queues=queues):
                    answers.append(self._read_transport(order, queues))
                case SendControl(message=message):
                    answers.append(self._control(message))
                case WatchTapdisk(tapdisk=tapdisk):
                    self._on_watch_tapdisk(tapdisk)
                case Unregister():
                    self.log.info("unregistered")
                case _:
                    raise TypeError(f"unknown back-end effect {effect!r}")
        self._write(writes)
        return answers

    # -- XenStore ------------------------------------------------------------------------

    def _read_transport(self, max_ring_page_order: int, max_queues: int) -> Event:
        def read(tx: Transaction) -> Event:
            return transport_answer(reader_for(tx, self.frontend), max_ring_page_order,
                                    max_queues)

        answer = self.store.call(lambda xs: xs.transact(read))
        if isinstance(answer, TransportInvalid):
            self.log.error("front-end transport refused", error=answer.reason)
        return answer

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
                keys[BackendKey.STATE] = effect.state.wire()
            elif isinstance(effect, SetError):
                self.log.error("vbd failed", reason=effect.text)
                keys[BackendKey.ERROR] = effect.text
        backend = self.paths.backend
        inherited = self.inherited_perms

        def body(tx: Transaction) -> bool:
            if not tx.exists(backend):
                return False
            for key, value in keys.items():
                wanted = key_perms.get(key)
                tx.write(f"{backend}/{key}", value, None if wanted == inherited else wanted)
            return True

        if self.store.call(lambda xs: xs.transact(body)):
            self.log.debug("wrote", keys=sorted(keys))
            if BackendKey.STATE in keys:
                state = XenbusState(int(keys[BackendKey.STATE]))
                self.log.info("published state", state=state.name.lower())
        else:
            # The next refresh sees the directory gone and tells the machine.
            self.log.info("back-end directory gone, writes dropped", keys=sorted(keys))
            self._on_writes_dropped()

    # -- tapdisk -------------------------------------------------------------------------

    def _client(self, pid: int) -> TapdiskClient:
        return TapdiskClient(pid, root=self.config.control_root,
                             timeout=self.config.tapdisk_timeout)

    def _control(self, message: object) -> Event:
        match message:
            case XenblkifConnect():
                return self._connect(message)
            case XenblkifDisconnect(pid=pid, minor=minor, domid=domid, devid=devid):
                try:
                    self._client(pid).disconnect_xenblkif(minor, domid=domid, devid=devid)
                except CtlError as exc:
                    # ENODEV or a dead tapdisk: the ring is down either way.
                    self.log.warning("ring disconnect failed", error=str(exc))
                    return RingDisconnectFailed(exc.errno or errno.EIO, exc.detail)
                return RingDisconnected()
            case DiskInfoQuery(pid=pid, minor=minor):
                try:
                    image = self._client(pid).disk_info(minor)
                except CtlError as exc:
                    self.log.warning("disk info failed", error=str(exc))
                    return DiskInfoFailed(exc.errno or errno.EIO, exc.detail)
                # `physical` and `discard` are our extension of the reply: a blktap
                # tapdisk leaves them zero, read as "the logical sector size", "no discard".
                return DiskInfoRead(DiskInfo(image.sectors, image.sector_size, image.info,
                                             image.physical, image.discard))
        raise TypeError(f"unknown control message {message!r}")

    def _connect(self, message: XenblkifConnect) -> Event:
        t = message.transport
        try:
            self._client(message.pid).connect_xenblkif(
                message.minor, domid=message.domid, devid=message.devid,
                grefs=t.ring_refs, order=len(t.ring_refs).bit_length() - 1,
                port=t.event_channel, proto=t.protocol,
                max_indirect_segments=message.max_indirect_segments, discard=message.discard,
                poll_duration=message.poll_duration,
                poll_idle_threshold=message.poll_idle_threshold,
                persistent=message.persistent,
                extra_queues=[(q.ring_refs, q.event_channel) for q in t.more_queues])
        except CtlError as exc:
            if exc.errno == errno.EALREADY:
                self.log.info("ring already connected (adopted)")
            else:
                self.log.error("ring connect failed", error=str(exc))
            return RingConnectFailed(exc.errno or errno.EIO, exc.detail)
        return RingConnected()
