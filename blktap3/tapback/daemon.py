"""The tapback daemon: one watch stream, dispatched to one worker per VBD.

The main thread owns the `WatchStream` (one connection): a watch on the back-end root
(`/local/domain/<backend-domid>/backend/vbd3`) and one on each known VBD's front-end
`state` node. It never talks to a tapdisk: an event only becomes a prompt in the queue
of the VBD it concerns (see `worker.py`), so a slow tapdisk delays only its own VBD.

- The root watch fires once when registered: that is the start-up scan, which finds
  every existing VBD (a restarted tapback adopts connected ones through EALREADY).
- After a xenstored restart the stream reconnects and says `Reconnected`: every VBD
  re-reads everything, and the root is scanned again.
- A VBD whose machine reached a final state is forgotten (its front-end watch removed);
  one unregistered by `online=0` while its directory still exists is remembered as
  retired, so that the toolstack's later writes there do not bring it back.
- Every VBD's machine state is kept in a status file for other tools (`status.py`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from blktap3.abi import MAX_RING_PAGE_ORDER
from blktap3.ctl import runtime
from blktap3.fsm import BackendState, Toolstack
from blktap3.xenbus import (
    Reconnected,
    VbdPaths,
    WatchEvent,
    WatchStream,
    XenStore,
    XenStoreError,
    XenStoreNotFound,
    backend_root,
    parse_backend_path,
)

from .executor import DEFAULT_PERSISTENT_GRANTS, VbdConfig, default_max_queues
from .images import ImageWatcher
from .reads import WATCHED_KEYS
from .status import StatusFile, VbdStatus, default_path
from .store import SharedStore
from .tapdisks import TapdiskMonitor
from .worker import Died, Prompt, VbdWorker

log = structlog.get_logger(__name__)

BACKEND_TOKEN = "backend"
FRONTEND_TOKEN_PREFIX = "frontend:"
WAIT_SLICE = 0.25  # how often the main loop looks at its stop flag and retirements
# Back-end keys a worker reacts to ("" is the directory itself: created or removed):
# what its snapshot reads.
WATCHED_BACKEND_KEYS = frozenset({"", *WATCHED_KEYS})


@dataclass(frozen=True)
class TapbackConfig:
    """Where to find xenstored and tapdisks, and what to serve."""

    control_root: Path
    xenstored_path: str | None = None  # None: blktap3.xenbus.default_socket_path()
    backend_domid: int = 0
    backend_kind: str = "vbd3"
    xenstore_timeout: float = 10.0
    tapdisk_timeout: float = 30.0
    max_ring_page_order: int = MAX_RING_PAGE_ORDER
    barrier: bool = True  # offer feature-barrier (blktap's tapback -b: no)
    persistent: bool = DEFAULT_PERSISTENT_GRANTS  # advertise feature-persistent
    toolstack: Toolstack = Toolstack.XAPI  # whose hotplug/InitWait order is served
    max_queues: int = field(default_factory=default_max_queues)  # multi-queue-max-queues
    frontend_domid: int | None = None  # serve only this guest's VBDs (tapback -x)
    status_file: Path | None = None  # None: <control_root>/tapback.<kind>.status.json
    vbd: VbdConfig = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vbd", VbdConfig(
            self.control_root, self.tapdisk_timeout, self.max_ring_page_order, self.barrier,
            self.toolstack, persistent=self.persistent, max_queues=self.max_queues))
        if self.status_file is None:
            object.__setattr__(self, "status_file",
                               default_path(self.control_root, self.backend_kind))

    @property
    def root(self) -> str:
        return backend_root(self.backend_domid, self.backend_kind)


def frontend_token(key: tuple[int, int]) -> str:
    return f"{FRONTEND_TOKEN_PREFIX}{key[0]}/{key[1]}"


class Tapback:
    """The daemon. `run()` until `stop()`; safe to stop from a signal handler."""

    def __init__(self, config: TapbackConfig) -> None:
        self.config = config
        self._connect: Callable[[], XenStore] = lambda: XenStore.open(
            config.xenstored_path, config.xenstore_timeout)
        self.store = SharedStore(self._connect)
        self.workers: dict[tuple[int, int], VbdWorker] = {}
        self._lock = threading.Lock()  # workers and retired, shared with worker callbacks
        self._retired: set[tuple[int, int]] = set()
        self._finished: queue.SimpleQueue[VbdWorker] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._tapdisk_users: dict[int, set[tuple[int, int]]] = {}
        self.monitor = TapdiskMonitor(self._tapdisk_died)
        self.images = ImageWatcher(self._image_opened)
        assert config.status_file is not None  # set by TapbackConfig
        self.status = StatusFile(config.status_file)
        self.ready = threading.Event()  # set once the root watch is registered

    def stop(self) -> None:
        self._stop.set()

    # -- main loop ------------------------------------------------------------------------

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until `stop()`; `on_ready` is called once the root watch is registered."""
        root = self.config.root
        stream = WatchStream(self._connect)
        try:
            stream.watch(root, BACKEND_TOKEN)
            self.store.get()  # both connections exist once we say we are ready
            self.status.start()
            log.info("tapback watching", root=root, control_root=str(self.config.control_root),
                     status_file=str(self.status.path))
            self.ready.set()
            if on_ready is not None:
                on_ready()
            while not self._stop.is_set():
                event = stream.wait(WAIT_SLICE)
                self._forget_finished(stream)
                if isinstance(event, Reconnected):
                    log.warning("xenstored connection re-made: re-reading everything",
                                attempts=event.attempts)
                    self.store.reset()
                    self._scan(stream)
                    self._prompt_all(Prompt.REFRESH)
                elif isinstance(event, WatchEvent):
                    self._dispatch(stream, event)
        finally:
            self._shutdown(stream)

    def _shutdown(self, stream: WatchStream) -> None:
        """Leave every VBD as it is (a restarted tapback adopts them) and stop threads."""
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.post(Prompt.STOP)
        for worker in workers:
            worker.join(timeout=self.config.tapdisk_timeout + 1)
        self.monitor.close()
        self.images.close()
        stream.close()
        self.store.close()
        self.status.remove()
        log.info("tapback stopped", vbds=len(workers))

    def _dispatch(self, stream: WatchStream, event: WatchEvent) -> None:
        if event.token.startswith(FRONTEND_TOKEN_PREFIX):
            dom, _, dev = event.token[len(FRONTEND_TOKEN_PREFIX):].partition("/")
            with self._lock:
                worker = self.workers.get((int(dom), int(dev)))
            if worker is not None:
                worker.post(Prompt.FRONTEND)
            return
        if event.token != BACKEND_TOKEN:
            return
        parsed = parse_backend_path(event.path, self.config.root)
        if parsed is None:
            # The root or a per-domain directory: (re)created or removed as a whole.
            self._scan(stream)
            self._prompt_under(event.path)
            return
        domid, devid, rest = parsed
        key = (domid, devid)
        with self._lock:
            worker = self.workers.get(key)
        if worker is not None:
            # Our own writes fire this watch too: only what a worker reads prompts it.
            if rest in WATCHED_BACKEND_KEYS:
                worker.post(Prompt.REFRESH)
        else:
            self._discover(stream, key)

    def _prompt_all(self, message: Prompt) -> None:
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.post(message)

    def _prompt_under(self, path: str) -> None:
        prefix = path.rstrip("/") + "/"
        with self._lock:
            workers = [w for w in self.workers.values() if w.paths.backend.startswith(prefix)]
        for worker in workers:
            worker.post(Prompt.REFRESH)

    # -- finding and forgetting VBDs -------------------------------------------------------

    def _scan(self, stream: WatchStream) -> None:
        """Discover every VBD below the root (start-up, reconnection, root events)."""
        xs = self.store.get
        try:
            domids = xs().ls(self.config.root)
        except XenStoreNotFound:
            return
        except XenStoreError as exc:
            log.warning("scan failed", error=str(exc))
            return
        for domid in domids:
            try:
                devids = xs().ls(f"{self.config.root}/{domid}")
            except XenStoreError:
                continue
            for devid in devids:
                parsed = parse_backend_path(f"{self.config.root}/{domid}/{devid}",
                                            self.config.root)
                if parsed is not None:
                    key = (parsed[0], parsed[1])
                    with self._lock:
                        known = key in self.workers
                    if not known:
                        self._discover(stream, key)

    def _discover(self, stream: WatchStream, key: tuple[int, int]) -> None:
        if self.config.frontend_domid not in (None, key[0]):
            return  # another guest's: a tapback started with -x serves one guest
        paths = VbdPaths(key[0], key[1], self.config.backend_domid, self.config.backend_kind)
        try:
            frontend = self.store.call(lambda xs: xs.read_optional(paths.backend_key("frontend")))
            if frontend is None and not self.store.call(lambda xs: xs.exists(paths.backend)):
                with self._lock:
                    self._retired.discard(key)
                return  # a late event of a directory already gone
        except XenStoreError as exc:
            log.warning("cannot read a new VBD", domid=key[0], devid=key[1], error=str(exc))
            return
        with self._lock:
            if key in self.workers or key in self._retired:
                return
        if frontend is None or not frontend.startswith("/local/domain/"):
            # The toolstack's `frontend` key is the guest's device directory; anything
            # else is not ours to watch.
            frontend = paths.frontend
        worker = VbdWorker(paths, frontend, self.store, self.config.vbd,
                           on_final=self._finished.put, on_tapdisk=self._note_tapdisk,
                           on_state=self._note_state)
        with self._lock:
            self.workers[key] = worker
        self._note_state(worker)
        try:
            stream.watch(worker.frontend_state_path, frontend_token(key))
        except XenStoreError as exc:
            log.warning("cannot watch a front-end", domid=key[0], devid=key[1], error=str(exc))
        worker.start()
        worker.post(Prompt.REFRESH)

    def _forget_finished(self, stream: WatchStream) -> None:
        while True:
            try:
                worker = self._finished.get_nowait()
            except queue.Empty:
                return
            stream.unwatch(worker.frontend_state_path, frontend_token(worker.key))
            self.images.forget(worker.key)
            worker.join(timeout=1)
            backend_left = worker.machine.state == BackendState.UNREGISTERED
            with self._lock:
                if self.workers.get(worker.key) is worker:
                    del self.workers[worker.key]
                    self.status.forget(worker.key)
                if backend_left:
                    self._retired.add(worker.key)
                if worker.tapdisk is not None:
                    users = self._tapdisk_users.get(worker.tapdisk.pid)
                    if users is not None:
                        users.discard(worker.key)
            if backend_left:
                # The toolstack removes the directory next; if it went already, un-retire.
                self._discover(stream, worker.key)

    # -- tapdisks ----------------------------------------------------------------------------

    def _note_state(self, worker: VbdWorker) -> None:
        machine = worker.machine
        published = int(machine.published) if machine.published is not None else None
        self.status.update(worker.key, VbdStatus(machine.spec.name, machine.state, published))

    def _note_tapdisk(self, worker: VbdWorker, pid: int) -> None:
        with self._lock:
            self._tapdisk_users.setdefault(pid, set()).add(worker.key)
        self.monitor.watch(pid)
        if worker.image_path is not None:
            self.images.watch(worker.image_path, worker.key)

    def _image_opened(self, key: tuple[int, int]) -> None:
        with self._lock:
            worker = self.workers.get(key)
        if worker is not None:
            worker.post(Prompt.RESIZE)

    def _tapdisk_died(self, pid: int) -> None:
        with self._lock:
            keys = self._tapdisk_users.pop(pid, set())
            workers = [self.workers[k] for k in keys if k in self.workers]
        # A tapdisk that exits in order (its last VBD detached: tap-ctl destroy, as a
        # toolstack's detach ends) removes its control socket; a crashed or killed one
        # leaves it. Only the second is an error.
        orderly = not runtime.socket_path(self.config.control_root, pid).exists()
        if orderly:
            log.info("tapdisk exited", pid=pid, vbds=sorted(keys))
        else:
            log.error("tapdisk died", pid=pid, vbds=sorted(keys))
            # blktap leaves a dead tapdisk's socket and stats files behind; we do not.
            runtime.remove_stale_socket(self.config.control_root, pid)
            runtime.remove_stale_stats(pid, keys)
        for worker in workers:
            worker.post(Died(pid))
