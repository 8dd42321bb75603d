"""What a tapdisk does with each control message: its VBDs and their operations.

`Tapdisk.handle` takes a decoded request and returns the reply (one or more messages,
plus STATS' raw bytes). It does no socket I/O (the server in `server.py` does), so the
logic is testable on its own. Messages that change state are serialized by one lock, as
blktap's single-threaded tapdisk serializes them; PID, LIST, LIST_MINORS and STATS only
read and are answered at once even while a PAUSE drains.

A request for a VBD goes through `observer.observe` (message -> event) to the VBD's
machine (`Vbd.machine`, specs/tapdisk_vbd.toml), which answers with effects: open the
image, start or quiesce the ring, reply...  `_step` executes them, feeds their outcomes
back as events, and sends the one `Reply` the machine gave: every protocol rule and
errno is the spec's.  What is refused here is lookup (no VBD with that minor: ENODEV,
OPEN's EINVAL as blktap's; ATTACH of a minor that is not allocated, EINVAL, or that
another tapdisk holds, EBUSY) and the observer's argument checks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from blktap3.ctl import protocol as p
from blktap3.ctl.runtime import marker_path
from blktap3.fsm import effects as fx
from blktap3.fsm import events as ev
from blktap3.fsm.tapdisk import VbdState

from . import images, stats
from .metrics import Metrics, RingCounters
from .nbd import Exports
from .nbd.passed import FdReceiver, PassedSockets
from .observer import BadArgument, ToVbd, observe
from .queues import Queues
from .vbd import Vbd

log = structlog.get_logger(__name__)

T = p.MessageType
UNSERIALIZED = frozenset({T.PID, T.LIST, T.LIST_MINORS, T.STATS})
DRAIN_TIMEOUT = 30.0

OpenImageFn = Callable[[images.ImageSpec, int], images.Image]
ConnectRingFn = Callable[..., images.Ring]


class ControlError(OSError):
    """A request refused with a positive errno, told to the client in an ERROR reply."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)


@dataclass
class Reply:
    """What the server sends back: messages in order, then raw bytes (STATS)."""

    messages: list[p.Message]
    data: bytes = b""

    def encode(self) -> bytes:
        return b"".join(m.encode() for m in self.messages) + self.data


def error_reply(cookie: int, code: int, message: str) -> Reply:
    return Reply([p.Message(T.ERROR, cookie, p.Response(code, message))])


def _disk_info(image: images.Image) -> ev.DiskInfo:
    info = image.info
    return ev.DiskInfo(
        sectors=int(info.sectors),
        sector_size=int(info.sector_size),
        info=int(info.info),
        physical_sector_size=int(info.physical_sector_size),
        discard=bool(info.discard),
    )


def _wire_info(disk: ev.DiskInfo) -> p.ImageInfo:
    """OPEN/DISK_INFO reply: blktap's three fields plus our physical size and flags."""
    flags = p.ImageFlags.DISCARD if disk.discard else p.ImageFlags(0)
    return p.ImageInfo(disk.sectors, disk.sector_size, disk.info,
                       disk.physical_sector_size, int(flags))


class Tapdisk:
    """The VBDs of this tapdisk process and the control operations on them.

    `open_image` and `connect_ring` are the data path's doors (`images`); tests may pass
    stand-ins with the same contract (an OSError with an errno on failure).
    """

    def __init__(
        self, root: Path, *, drain_timeout: float = DRAIN_TIMEOUT,
        open_image: OpenImageFn = images.open_image,
        connect_ring: ConnectRingFn = images.connect_ring,
        metrics: Metrics | None = None,
    ) -> None:
        self.root = root
        # blktap's stats files (td3-<pid>, vbd3-<domid>-<devid>); None: none kept.
        self.metrics = metrics
        self.drain_timeout = drain_timeout
        self.open_image = open_image
        self.connect_ring = connect_ring
        self.vbds: dict[int, Vbd] = {}
        self.lock = threading.Lock()
        # Guards `Vbd.ring` against STATS (unserialized) reading a ring being freed.
        self.ring_lock = threading.Lock()
        self.exiting = False
        self.nbd = Exports(root)  # NBD export hook (issue 15)
        # Sockets handed over on nbdclient<pid> for `-2 nbd:NAME` (main starts the
        # receiver: a Tapdisk made by a test has none).
        self.passed = PassedSockets()
        self.fd_receiver: FdReceiver | None = None
        self._own: dict[T, Callable[[p.Message], Reply]] = {
            T.PID: self._pid,
            T.LIST_MINORS: self._list_minors,
            T.LIST: self._list,
            T.STATS: self._stats,
            T.EXIT: self._exit,
        }

    # -- dispatch ---------------------------------------------------------------------

    def handle(self, request: p.Message, *, logpath: str = "") -> Reply:
        """The reply to one request; refusals become ERROR replies with a positive errno.
        `logpath`: the changed-block log path that followed an OPEN/RESUME (ADD_LOG)."""
        own = self._own.get(request.type)
        observation = None if own else observe(request, logpath)
        if own is None and observation is None:
            return error_reply(request.cookie, errno.EINVAL,
                               f"{request.type.name} is not a request")
        try:
            if request.type in UNSERIALIZED:
                assert own is not None
                return own(request)
            with self.lock:
                if self.exiting:
                    raise ControlError(errno.ESHUTDOWN, "tapdisk is exiting")
                if own is not None:
                    return own(request)
                assert observation is not None
                return self._request(request, observation)
        except OSError as exc:
            code = exc.errno or errno.EIO
            log.info("refused", request=request.type.name, minor=request.cookie,
                     errno=code, reason=exc.strerror)
            return error_reply(request.cookie, code, str(exc.strerror or ""))

    def _vbd(self, minor: int) -> Vbd:
        try:
            return self.vbds[minor]
        except KeyError:
            raise ControlError(errno.ENODEV, f"no VBD with minor {minor}") from None

    def _request(self, request: p.Message, observation: ToVbd | BadArgument) -> Reply:
        """A request for one VBD: lookup, then the machine's answer."""
        minor = observation.minor
        if isinstance(observation, ToVbd) and isinstance(observation.event, ev.Attach):
            vbd = self.vbds.get(minor) or self._new_vbd(minor)
        elif request.type is T.OPEN and minor not in self.vbds:
            # blktap's open_image answers EINVAL here (drivers/tapdisk-control.c:710).
            raise ControlError(errno.EINVAL, f"no VBD with minor {minor}")
        else:
            vbd = self._vbd(minor)
        if isinstance(observation, BadArgument):
            raise ControlError(observation.errno, observation.reason)
        before = vbd.state
        reply = self._step(vbd, observation.event)
        name = request.type.name
        if (request.type is T.OPEN and not reply.error
                and isinstance(request.payload, p.Params)
                and request.payload.req_timeout > 0):
            # blktap's `-t`: kept per VBD (tapdisk-control.c: only a value > 0 counts).
            vbd.req_timeout = request.payload.req_timeout
        if reply.error:
            message = f"minor {minor}: {name}: {reply.message}"
            log.info("refused", request=name, minor=minor, errno=reply.error,
                     state=vbd.state.value, reason=reply.message)
            return error_reply(request.cookie, reply.error, message)
        if vbd.state is not before:  # one line per lifecycle step, none for queries
            log.info(name.lower(), minor=minor, state=vbd.state.value,
                     image=vbd.params or None)
        rsp = p.reply_type(request.type)
        payload: p.Payload = p.Response(0, "")
        if reply.disk is not None:
            payload = _wire_info(reply.disk)
        if not isinstance(payload, p.PAYLOAD_OF[rsp]):
            raise TypeError(f"the machine answered {name} with {reply!r}")  # our bug
        return Reply([p.Message(rsp, request.cookie, payload)])

    def _new_vbd(self, minor: int) -> Vbd:
        """ATTACH of a minor with no VBD: hold its marker file (flock) for the new VBD."""
        marker = marker_path(self.root, minor)
        try:
            fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ControlError(errno.EINVAL, f"minor {minor} is not allocated") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ControlError(errno.EBUSY, f"minor {minor} is held by another tapdisk") from None
        vbd = Vbd(minor, fd)
        self.vbds[minor] = vbd
        return vbd

    # -- the machine's effects --------------------------------------------------------

    def _step(self, vbd: Vbd, event: ev.Event) -> fx.Reply:
        """Feed `event`, execute the effects, feed their outcomes; the machine's reply."""
        replies: list[fx.Reply] = []
        pending: list[ev.Event] = [event]
        while pending:
            for effect in vbd.machine.handle(pending.pop(0)):
                if isinstance(effect, fx.Reply):
                    replies.append(effect)
                    continue
                outcome = self._execute(vbd, effect)
                if outcome is not None:
                    pending.append(outcome)
        if len(replies) != 1:  # the spec answers every request once: our bug otherwise
            raise RuntimeError(f"{event!r} was answered {len(replies)} times: {replies!r}")
        return replies[0]

    def _execute(self, vbd: Vbd, effect: fx.Effect) -> ev.Event | None:
        """Carry out one effect; an effect that asks a question answers with an event."""
        match effect:
            case fx.OpenImage(path=path, flags=flags, logpath=logpath, secondary=secondary):
                return self._open_image(vbd, path, flags, logpath, secondary)
            case fx.AcceptImage():
                assert vbd.image is None and vbd.pending_image is not None
                vbd.image, vbd.image_spec = vbd.pending_image, vbd.pending_spec
                vbd.pending_image, vbd.pending_spec = None, None
                if self.metrics is not None:
                    self.metrics.image_open(
                        vbd.minor, self._counters(vbd) if vbd.ring is not None else None)
                if vbd.image_spec is not None:
                    # NBD export hook (issue 15): the image is open (OPEN) or reopened
                    # (RESUME): start the export, or let its held requests go on.
                    self.nbd.serve(vbd.minor, vbd.image_spec.type, vbd.image_spec.path,
                                   vbd.image)
                    nbd_counters = self.nbd.counters(vbd.minor)
                    if self.metrics is not None and nbd_counters is not None:
                        self.metrics.nbd_started(vbd.minor, nbd_counters)
            case fx.DiscardImage():
                assert vbd.pending_image is not None
                vbd.pending_image.close()
                vbd.pending_image, vbd.pending_spec = None, None
            case fx.CloseImage():
                # NBD export hook (issue 15): drain the export before its image goes;
                # PAUSE holds its requests, CLOSE removes it.
                stop = vbd.state is VbdState.CLOSED
                self.nbd.close_image(vbd.minor, stop=stop, timeout=self.drain_timeout)
                if stop and self.metrics is not None:
                    self.metrics.nbd_stopped(vbd.minor)
                image, vbd.image, vbd.image_spec = vbd.image, None, None
                if image is not None:
                    image.close()
                if self.metrics is not None:
                    self.metrics.image_closed(vbd.minor)
            case fx.StartRing(ring=ring):
                return self._start_ring(vbd, ring)
            case fx.StopRing():
                if vbd.ring is not None:
                    self._drop_ring(vbd)  # the data path drains in-flight requests first
            case fx.QuiesceRing():
                if vbd.ring is not None:
                    try:
                        vbd.ring.pause(timeout=self.drain_timeout)
                    except OSError as exc:
                        return ev.DrainFailed(exc.errno or errno.EIO, str(exc.strerror or exc))
                return ev.Drained()
            case fx.UnquiesceRing():
                if vbd.ring is not None:
                    vbd.ring.resume(image=vbd.image)
            case fx.ReleaseMinor():
                del self.vbds[vbd.minor]
                os.close(vbd.marker_fd)  # releases the flock: the minor may be freed now
                if not self.vbds:
                    # blktap's tapdisk exits once its last VBD is gone (the server sees it).
                    self.exiting = True
            case _:
                raise TypeError(f"the tapdisk does not execute {effect!r}")  # our bug
        return None

    def _open_image(self, vbd: Vbd, params: str, flags: int, logpath: str = "",
                    secondary: str = "") -> ev.Event:
        """OpenImage: the driver's answer as an event (a refusal keeps its reason)."""
        try:
            spec = images.parse_params(params)
            image = self.open_image(spec, flags)
            if logpath or secondary:
                images.add_tracking(image, logpath=logpath, secondary=secondary,
                                    passed=self.passed.take)
        except OSError as exc:
            code = exc.errno or errno.EIO
            # Why, in the tapdisk's own log (the toolstack may print only strerror).
            log.warning("image open failed", minor=vbd.minor, image=params, errno=code,
                        reason=str(exc.strerror or exc))
            return ev.ImageOpenFailed(code, str(exc.strerror or exc))
        vbd.pending_image, vbd.pending_spec = image, spec
        return ev.ImageOpened(_disk_info(image))

    def _start_ring(self, vbd: Vbd, ring: ev.BlkifRing) -> ev.Event:
        """StartRing: map the front-end's ring on the VBD's image and serve it."""
        assert vbd.image is not None  # the machine starts a ring only with an image open
        try:
            served = self.connect_ring(
                vbd.image, domid=ring.domid, devid=ring.devid, grefs=ring.grefs,
                order=ring.order, port=ring.port, protocol=ring.protocol,
                poll_us=ring.poll_us, poll_idle_threshold=ring.poll_idle_threshold,
                max_indirect_segments=ring.max_indirect_segments,
                discard=ring.discard, persistent=ring.persistent,
            )
        except OSError as exc:
            log.warning("ring connect failed", minor=vbd.minor, domid=ring.domid,
                        devid=ring.devid, errno=exc.errno, reason=str(exc.strerror or exc))
            return ev.RingStartFailed(exc.errno or errno.EIO, str(exc.strerror or exc))
        if vbd.req_timeout:
            served.set_req_timeout(vbd.req_timeout)
        if ring.queue:  # the next queue of the VBD's ring (the machine checked the order)
            assert vbd.ring is not None
            with self.ring_lock:
                vbd.ring.add(served)
            return ev.RingStarted()
        with self.ring_lock:
            vbd.ring, vbd.ring_ids = Queues(served), ring.ids
        if self.metrics is not None:
            self.metrics.ring_connected(ring.domid, ring.devid, vbd.minor,
                                        self._counters(vbd))
        return ev.RingStarted()

    def _counters(self, vbd: Vbd) -> RingCounters:
        """What the stats files read of the VBD's ring: None once it is gone."""
        def read() -> tuple[dict[str, Any], dict[str, Any]] | None:
            with self.ring_lock:
                ring = vbd.ring
                if ring is None:
                    return None
                try:
                    return ring.stats(), ring.io_stats()
                except OSError:  # disconnecting
                    return None
        return read

    def _drop_ring(self, vbd: Vbd) -> None:
        """Disconnect and forget the VBD's ring; on failure (still draining) keep it."""
        ring, ids = vbd.ring, vbd.ring_ids
        assert ring is not None
        if self.metrics is not None and ids is not None:
            self.metrics.ring_disconnected(*ids, vbd.minor)
        with self.ring_lock:
            vbd.ring, vbd.ring_ids = None, None
        try:
            ring.disconnect(timeout=self.drain_timeout)
        except OSError:
            with self.ring_lock:
                vbd.ring, vbd.ring_ids = ring, ids
            raise

    # -- read-only messages -----------------------------------------------------------

    def _pid(self, request: p.Message) -> Reply:
        return Reply([p.Message(T.PID_RSP, request.cookie, p.Pid(os.getpid()))])

    def _list(self, request: p.Message) -> Reply:
        vbds = list(self.vbds.values())
        messages = [
            p.Message(T.LIST_RSP, request.cookie,
                      p.ListEntry(len(vbds) - i, vbd.minor, vbd.bits, vbd.params))
            for i, vbd in enumerate(vbds)
        ]
        messages.append(p.Message(T.LIST_RSP, request.cookie, p.ListEntry(0, -1, 0, "")))
        return Reply(messages)

    def _list_minors(self, request: p.Message) -> Reply:
        minors = tuple(sorted(self.vbds))[: p.MAX_MINORS]
        return Reply([p.Message(T.LIST_MINORS_RSP, request.cookie, p.Minors(minors))])

    def _stats(self, request: p.Message) -> Reply:
        if request.cookie == p.ALL_VBDS:  # every VBD's, as a JSON array
            body: Any = [self._vbd_stats(vbd) for vbd in list(self.vbds.values())]
        else:
            body = self._vbd_stats(self._vbd(request.cookie))
        data = stats.render_stats(body).encode()
        header = p.StatInfo(int(T.STATS_RSP), request.cookie, len(data))
        return Reply([p.Message(T.STATS_RSP, request.cookie, header)], data)

    def _vbd_stats(self, vbd: Vbd) -> dict[str, Any]:
        ring_stats: dict[str, Any] | None = None
        ring_ids: tuple[int, int] | None = None
        with self.ring_lock:
            if vbd.ring is not None:
                ring_stats, ring_ids = vbd.ring.stats(), vbd.ring_ids
        spec = vbd.image_spec
        return stats.vbd_stats(
            params=vbd.params,
            image_type=spec.type if spec else None,
            image_path=spec.path if spec else None,
            ring_stats=ring_stats,
            ring_ids=ring_ids,
            mirror=self._mirror_stats(vbd),
        )

    def _mirror_stats(self, vbd: Vbd) -> dict[str, Any] | None:
        """The mirror's counters; STATS runs beside the serialized requests, so the
        image is read under their lock (it may be closing), or not at all when a long
        request (a PAUSE draining) holds it."""
        if not self.lock.acquire(timeout=1.0):
            return None
        try:
            image = vbd.image
            return image.mirror_stats() if image is not None and image.shared else None
        finally:
            self.lock.release()

    # -- the tapdisk's own --------------------------------------------------------------

    def _exit(self, request: p.Message) -> Reply:
        if self.vbds:
            raise ControlError(errno.EBUSY, f"{len(self.vbds)} VBD(s) still attached")
        self.exiting = True
        return Reply([p.Message(T.EXIT, request.cookie)])

    def shutdown(self) -> None:
        """Release every VBD without the machines (SIGTERM: the process is going away)."""
        with self.lock:
            self.exiting = True
            self.nbd.stop_all()  # NBD export hook (issue 15): the sockets go with us
            if self.fd_receiver is not None:
                self.fd_receiver.stop()
            self.passed.close()
            for vbd in list(self.vbds.values()):
                if vbd.ring is not None:
                    with contextlib.suppress(OSError):
                        self._drop_ring(vbd)
                for image in (vbd.image, vbd.pending_image):
                    if image is not None:
                        image.close()
                vbd.image = vbd.pending_image = None
                os.close(vbd.marker_fd)
            self.vbds.clear()
