"""One VBD in tapback: its machine and observer, its own thread and queue of prompts.

Each `VbdWorker` owns one `blktap3.fsm.BackendVbd` and a thread that handles this VBD's
prompts in order.  A prompt says only "something may have changed" (a watch fired, a
tapdisk died, the image was reopened): the worker re-reads what it watches
(`reads.read_snapshot`), hands it to its `BackendObserver`, feeds the events it returns
to the machine, and has `EffectExecutor` execute the effects (answers are fed back
before anything else).  It decides nothing itself: every rule is in
specs/backend_vbd.toml.  A tapdisk that hangs blocks only this thread (every control
call has a timeout).

Differences from blktap's tapback, on purpose:
- a restarted tapback adopts a Connected VBD: the machine is told what the directory
  holds (`BackendFound`), replays the connect (the tapdisk answers EALREADY) and
  rewrites nothing the front-end watches (no InitWait flash, no redundant keys);
- every failure goes to the log and to the `error` node, including a guest that takes
  away our read access to its own nodes (a driver domain is not privileged);
- prompts are coalesced: a message already waiting is not queued again, so a guest
  flooding its `state` node while this VBD is busy costs a bounded queue, not memory.
"""

from __future__ import annotations

import contextlib
import enum
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from blktap3.fsm import (
    BackendObserver,
    BackendState,
    BackendVbd,
    Event,
    FsmError,
    ImageChanged,
    TapdiskDied,
    TapdiskRef,
)
from blktap3.xenbus import BackendKey, VbdPaths, XenStoreError

from .executor import EffectExecutor, VbdConfig
from .reads import parse_device, read_directory, read_frontend_state, read_snapshot
from .store import SharedStore

log = structlog.get_logger(__name__)


class Prompt(enum.Enum):
    REFRESH = "refresh"  # a back-end watch fired: re-read everything we watch
    FRONTEND = "frontend"  # the front-end's state node fired: re-read only that
    RESIZE = "resize"  # the image was opened again: the machine asks the tapdisk
    STOP = "stop"  # tapback is stopping: leave everything as it is


@dataclass(frozen=True)
class Died:
    """The tapdisk with this pid exited."""

    pid: int


Message = Prompt | Died


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
        on_state: Callable[[VbdWorker], None] = lambda worker: None,
    ) -> None:
        self.paths = paths
        self.frontend = frontend
        self.store = store
        self._on_final = on_final
        self._on_tapdisk = on_tapdisk
        self._on_state = on_state
        self.machine = BackendVbd(paths.domid, paths.devid, paths.backend_domid,
                                  features=config.features(), toolstack=config.toolstack)
        self.observer = BackendObserver(parse_device)
        self.log = log.bind(domid=paths.domid, devid=paths.devid)
        self.executor = EffectExecutor(paths, frontend, store, config, self.log,
                                       on_watch_tapdisk=self._watch_tapdisk,
                                       on_writes_dropped=lambda: self.post(Prompt.REFRESH))
        self.tapdisk: TapdiskRef | None = None
        self.image_path: str | None = None
        self._found = False
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
                self.step(batch)
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

    def step(self, batch: Sequence[Message]) -> None:
        """Handle a batch of prompts (the thread's body; tests call it directly)."""
        messages = dict.fromkeys(batch)  # each distinct message once, in order
        if Prompt.REFRESH in messages:
            messages.pop(Prompt.FRONTEND, None)  # a full refresh reads the front-end too
        if not self._found:
            self.setup()
        for message in messages:
            if self.machine.is_final:
                return
            match message:
                case Died(pid=pid):
                    self.feed_all([TapdiskDied(pid)])
                case Prompt.RESIZE:
                    self.feed_all([ImageChanged()])
                case Prompt.REFRESH:
                    snapshot = self.store.call(
                        lambda xs: read_snapshot(xs, self.paths, self.frontend))
                    self.feed_all(self.observer.observe(snapshot))
                case Prompt.FRONTEND:
                    value = self.store.call(lambda xs: read_frontend_state(xs, self.frontend))
                    self.feed_all(self.observer.observe_frontend(value))

    def setup(self) -> None:
        """Read our directory once (the toolstack's keys, a previous tapback's) and tell
        the machine; until this succeeded, no other event is fed."""
        directory = self.store.call(lambda xs: read_directory(xs, self.paths))
        perms = self.store.call(lambda xs: xs.get_perms(self.paths.backend))
        self.executor.inherited_perms = [str(p) for p in perms]
        params = directory.get(BackendKey.PARAMS)
        if params is not None and ":" in params:
            self.image_path = params.split(":", 1)[1]
        self._found = True
        self.feed_all(self.observer.found(directory))
        state = directory.get(BackendKey.STATE)
        self.log.info("vbd found", frontend=self.frontend,
                      mode=directory.get(BackendKey.MODE),
                      device_type=directory.get(BackendKey.DEVICE_TYPE), image=params,
                      backend_state=state,
                      adopting=self.machine.state == BackendState.ADOPTING)

    def _watch_tapdisk(self, tapdisk: TapdiskRef) -> None:
        self.tapdisk = tapdisk
        self.log = self.log.bind(pid=tapdisk.pid, minor=tapdisk.minor)
        self.executor.log = self.log
        self._on_tapdisk(self, tapdisk.pid)

    # -- the machine ----------------------------------------------------------------------

    def feed_all(self, events: Sequence[Event]) -> None:
        for event in events:
            if self.machine.is_final:
                return
            self.feed(event)

    def feed(self, event: Event) -> None:
        """Hand one event to the machine, execute its effects, feed back the answers."""
        start = (self.machine.state, self.machine.published)
        pending: deque[Event] = deque([event])
        while pending and not self.machine.is_final:
            current = pending.popleft()
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
            pending.extend(self.executor.execute(effects))
        if (self.machine.state, self.machine.published) != start:
            self._on_state(self)
