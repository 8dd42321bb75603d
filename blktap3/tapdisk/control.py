"""What a tapdisk does with each control message: its VBDs and their operations.

`Tapdisk.handle` takes a decoded request and returns the reply (one or more messages,
plus STATS' raw bytes). It does no socket I/O (the server in `server.py` does), so the
logic is testable on its own. Messages that change state are serialized by one lock, as
blktap's single-threaded tapdisk serializes them; PID, LIST, LIST_MINORS and STATS only
read and are answered at once even while a PAUSE drains.

Each VBD's state is the spec'd machine (`Vbd.machine`): a request becomes an event, the
machine answers with effects (open the image, quiesce the ring, reply...), `_step`
executes them and feeds their outcome back as events until the machine replies. Work
that can fail before the machine may move (connecting a ring) is done first, and the
effect installs its result.
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
from blktap3.fsm.errors import FsmError

from . import images, stats
from .nbd import Exports
from .vbd import Vbd, VbdState

log = structlog.get_logger(__name__)

T = p.MessageType
UNSERIALIZED = frozenset({T.PID, T.LIST, T.LIST_MINORS, T.STATS})
DRAIN_TIMEOUT = 30.0

# The errno a refused event gets, by trigger (blktap's answers); EINVAL otherwise.
REFUSAL_ERRNO = {"open": errno.EALREADY, "detach": errno.EBUSY, "close": errno.EBUSY}


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
    """The VBDs of this tapdisk process and the control operations on them."""

    def __init__(self, root: Path, *, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        self.root = root
        self.drain_timeout = drain_timeout
        self.vbds: dict[int, Vbd] = {}
        self.lock = threading.Lock()
        # Guards `Vbd.ring` against STATS (unserialized) reading a ring being freed.
        self.ring_lock = threading.Lock()
        self.exiting = False
        self.nbd = Exports(root)  # NBD export hook (issue 15)
        self._handlers: dict[T, Callable[[p.Message], Reply]] = {
            T.PID: self._pid,
            T.ATTACH: self._attach,
            T.OPEN: self._open,
            T.PAUSE: self._pause,
            T.RESUME: self._resume,
            T.CLOSE: self._close,
            T.FORCE_SHUTDOWN: self._close,
            T.DETACH: self._detach,
            T.LIST_MINORS: self._list_minors,
            T.LIST: self._list,
            T.STATS: self._stats,
            T.XENBLKIF_CONNECT: self._connect,
            T.XENBLKIF_DISCONNECT: self._disconnect,
            T.DISK_INFO: self._disk_info,
            T.EXIT: self._exit,
        }

    # -- dispatch ---------------------------------------------------------------------

    def handle(self, request: p.Message) -> Reply:
        """The reply to one request; refusals become ERROR replies with a positive errno."""
        handler = self._handlers.get(request.type)
        if handler is None:
            return error_reply(request.cookie, errno.EINVAL,
                               f"{request.type.name} is not a request")
        try:
            if request.type in UNSERIALIZED:
                return handler(request)
            with self.lock:
                if self.exiting:
                    raise ControlError(errno.ESHUTDOWN, "tapdisk is exiting")
                return handler(request)
        except FsmError as exc:
            code = REFUSAL_ERRNO.get(getattr(exc.event, "trigger", ""), errno.EINVAL)
            state = exc.state.replace("_", " ")
            reason = f"minor {request.cookie}: {request.type.name} not allowed while {state}"
            log.info("refused", request=request.type.name, minor=request.cookie,
                     errno=code, reason=reason)
            return error_reply(request.cookie, code, reason)
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

    @staticmethod
    def _ok(request: p.Message) -> Reply:
        rsp = p.reply_type(request.type)
        return Reply([p.Message(rsp, request.cookie, p.Response(0, ""))])

    def _answer(self, request: p.Message, vbd: Vbd, reply: fx.Reply) -> Reply:
        if reply.error:
            return error_reply(request.cookie, reply.error, vbd.last_error)
        return self._ok(request)

    # -- the machine's effects --------------------------------------------------------

    def _step(self, vbd: Vbd, event: ev.Event) -> fx.Reply:
        """Feed `event`, execute the effects, feed their outcomes; the machine's reply."""
        reply = fx.Reply(error=errno.EIO)
        pending: list[ev.Event] = [event]
        while pending:
            current = pending.pop(0)
            effects = vbd.machine.handle(current)
            if isinstance(current, ev.ImageOpened) and vbd.state is not VbdState.PAUSED:
                # The machine accepted the image it asked for: it is the VBD's now.
                vbd.image, vbd.pending_image = vbd.pending_image, None
                vbd.spec, vbd.pending_spec = vbd.pending_spec, None
                vbd.info = _wire_info(current.disk)
                if vbd.image is not None and vbd.spec is not None:
                    # NBD export hook (issue 15): the image is open (OPEN) or reopened
                    # (RESUME): start the export, or let its queued requests go on.
                    self.nbd.serve(vbd.minor, vbd.spec.type, vbd.spec.path, vbd.image.info)
            for effect in effects:
                if isinstance(effect, fx.Reply):
                    reply = effect
                    continue
                outcome = self._execute(vbd, effect)
                if outcome is not None:
                    pending.append(outcome)
        return reply

    def _execute(self, vbd: Vbd, effect: fx.Effect) -> ev.Event | None:
        """Carry out one effect; an effect with an outcome answers with an event."""
        if isinstance(effect, fx.OpenImage):
            return self._open_image(vbd, effect.path, effect.flags)
        if isinstance(effect, fx.CloseImage):
            # A refused RESUME closes the image it just opened, else the VBD's own.
            image = vbd.pending_image or vbd.image
            if vbd.pending_image is not None:
                vbd.pending_image, vbd.pending_spec = None, None
            else:
                # NBD export hook (issue 15): drain the export before its image goes;
                # PAUSE queues its requests, CLOSE removes it.
                self.nbd.close_image(vbd.minor, stop=vbd.state is VbdState.CLOSED,
                                     timeout=self.drain_timeout)
                vbd.image = None
            if image is not None:
                image.close()
            return None
        if isinstance(effect, fx.StartRing):
            with self.ring_lock:
                vbd.ring, vbd.prepared_ring = vbd.prepared_ring, None
                vbd.ring_ids = (effect.domid, effect.devid)
            return None
        if isinstance(effect, fx.StopRing):
            if vbd.ring is not None:
                self._drop_ring(vbd)  # the data path drains in-flight requests first
            return None
        if isinstance(effect, fx.QuiesceRing):
            if vbd.ring is not None:
                # Returns once in-flight requests completed; a timeout raises and leaves
                # the VBD quiescing (FORCE_SHUTDOWN still gets it out).
                vbd.ring.pause(timeout=self.drain_timeout)
            return ev.Drained()
        if isinstance(effect, fx.UnquiesceRing):
            if vbd.ring is not None:
                vbd.ring.resume(image=vbd.image)
            return None
        raise TypeError(f"the tapdisk does not execute {effect!r}")

    def _open_image(self, vbd: Vbd, params: str, flags: int) -> ev.Event:
        """OpenImage: the driver's answer as an event (a refusal keeps its reason)."""
        try:
            spec = images.parse_params(params)
            image = images.open_image(spec, flags)
        except OSError as exc:
            vbd.last_error = str(exc.strerror or exc)
            return ev.ImageOpenFailed(exc.errno or errno.EIO, vbd.last_error)
        disk = _disk_info(image)
        vbd.pending_image, vbd.pending_spec = image, spec
        old = vbd.machine.disk
        if old is not None and disk != old:
            vbd.last_error = self._medium_change(old, disk, vbd.resize_requested)
            if not vbd.last_error:
                # A requested resize to a larger disk: the machine forgets the old
                # geometry so it accepts the new one (DISK_INFO then reports it).
                vbd.machine.disk = None
        return ev.ImageOpened(disk)

    @staticmethod
    def _medium_change(old: ev.DiskInfo, new: ev.DiskInfo, resize: bool) -> str:
        """Why a reopened image is refused (EMEDIUMTYPE), or "" for an accepted resize."""
        if (new.sector_size, new.info) != (old.sector_size, old.info):
            return (f"sector size/info {new.sector_size}/{new.info:#x} differ from "
                    f"{old.sector_size}/{old.info:#x}")
        if resize and new.sectors > old.sectors:
            return ""
        why = "" if resize else " (resize not requested)"
        return f"size changed from {old.sectors} to {new.sectors} sectors{why}"

    def _drop_ring(self, vbd: Vbd) -> None:
        """Disconnect and forget the VBD's ring; on failure (still draining) keep it."""
        ring, ids = vbd.ring, vbd.ring_ids
        assert ring is not None
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
        vbd = self._vbd(request.cookie)
        ring_stats: dict[str, Any] | None = None
        ring_ids: tuple[int, int] | None = None
        with self.ring_lock:
            if vbd.ring is not None:
                ring_stats, ring_ids = vbd.ring.stats(), vbd.ring_ids
        spec = vbd.spec if vbd.image is not None else None
        body = stats.vbd_stats(
            params=vbd.params,
            image_type=spec.type if spec else None,
            image_path=spec.path if spec else None,
            ring_stats=ring_stats,
            ring_ids=ring_ids,
        )
        data = stats.render_stats(body).encode()
        header = p.StatInfo(int(T.STATS_RSP), request.cookie, len(data))
        return Reply([p.Message(T.STATS_RSP, request.cookie, header)], data)

    def _disk_info(self, request: p.Message) -> Reply:
        vbd = self._vbd(request.cookie)
        opened = vbd.state in (VbdState.OPEN, VbdState.CONNECTED, VbdState.PAUSE_REQUESTED,
                               VbdState.PAUSED)
        if vbd.info is None or not opened:
            raise ControlError(errno.EINVAL, f"minor {vbd.minor} has no image open")
        return Reply([p.Message(T.DISK_INFO_RSP, request.cookie, vbd.info)])

    # -- serialized messages ----------------------------------------------------------

    def _attach(self, request: p.Message) -> Reply:
        minor = request.cookie
        if minor in self.vbds:
            raise ControlError(errno.EEXIST, f"minor {minor} is already attached")
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
        self._step(vbd, ev.Attach())
        self.vbds[minor] = vbd
        log.info("attached", minor=minor)
        return self._ok(request)

    def _open(self, request: p.Message) -> Reply:
        assert isinstance(request.payload, p.Params)
        vbd = self._vbd(request.cookie)
        images.check_flags(request.payload.flags)
        vbd.flags = request.payload.flags
        reply = self._step(vbd, ev.Open(request.payload.path, request.payload.flags))
        if reply.error or vbd.info is None:
            return error_reply(request.cookie, reply.error or errno.EIO, vbd.last_error)
        log.info("opened", minor=vbd.minor, image=vbd.params, sectors=vbd.info.sectors)
        return Reply([p.Message(T.OPEN_RSP, request.cookie, vbd.info)])

    def _connect(self, request: p.Message) -> Reply:
        blkif = request.payload
        assert isinstance(blkif, p.Blkif)
        vbd = self._vbd(request.cookie)
        ids = (blkif.domid, blkif.devid)
        if vbd.ring is not None:
            if vbd.ring_ids == ids:
                raise ControlError(errno.EALREADY, f"ring {ids[0]}/{ids[1]} is connected")
            raise ControlError(errno.EBUSY, f"minor {vbd.minor} serves another ring")
        if vbd.state is not VbdState.OPEN or vbd.image is None:
            raise ControlError(errno.EINVAL, f"minor {vbd.minor} has no open image")
        vbd.prepared_ring = images.connect_ring(
            vbd.image, domid=blkif.domid, devid=blkif.devid, grefs=blkif.grefs,
            order=blkif.order, port=blkif.port, protocol=blkif.proto,
            poll_us=blkif.poll_duration,
        )
        try:
            reply = self._step(vbd, ev.ConnectRing(blkif.domid, blkif.devid))
        finally:
            if vbd.prepared_ring is not None:  # the machine did not take it
                vbd.prepared_ring.disconnect()
                vbd.prepared_ring = None
        log.info("ring connected", minor=vbd.minor, domid=ids[0], devid=ids[1])
        return self._answer(request, vbd, reply)

    def _disconnect(self, request: p.Message) -> Reply:
        blkif = request.payload
        assert isinstance(blkif, p.Blkif)
        vbd = self._vbd(request.cookie)
        ids = (blkif.domid, blkif.devid)
        if vbd.ring is None or vbd.ring_ids != ids:
            raise ControlError(errno.ENODEV, f"no ring {ids[0]}/{ids[1]} on minor {vbd.minor}")
        reply = self._step(vbd, ev.DisconnectRing())
        log.info("ring disconnected", minor=vbd.minor, domid=ids[0], devid=ids[1])
        return self._answer(request, vbd, reply)

    def _pause(self, request: p.Message) -> Reply:
        vbd = self._vbd(request.cookie)
        if vbd.state is VbdState.PAUSED:
            return self._ok(request)  # blktap answers a second PAUSE with success
        reply = self._step(vbd, ev.Pause())
        log.info("paused", minor=vbd.minor)
        return self._answer(request, vbd, reply)

    def _resume(self, request: p.Message) -> Reply:
        resume = request.payload
        assert isinstance(resume, p.Resume)
        vbd = self._vbd(request.cookie)
        images.check_flags(resume.flags)
        vbd.resize_requested = bool(resume.flags & p.ResumeFlags.RESIZE)
        try:
            reply = self._step(vbd, ev.Resume(resume.new_params or None))
        finally:
            vbd.resize_requested = False
        if not reply.error:
            log.info("resumed", minor=vbd.minor, image=vbd.params,
                     sectors=vbd.info.sectors if vbd.info else None)
        return self._answer(request, vbd, reply)

    def _close(self, request: p.Message) -> Reply:
        force = request.type is T.FORCE_SHUTDOWN
        vbd = self._vbd(request.cookie)
        if vbd.state in (VbdState.ATTACHED, VbdState.CLOSED):
            return self._ok(request)  # nothing open: blktap's close succeeds too
        reply = self._step(vbd, ev.Close(force=force))
        log.info("closed", minor=vbd.minor, force=force)
        return self._answer(request, vbd, reply)

    def _detach(self, request: p.Message) -> Reply:
        vbd = self._vbd(request.cookie)
        reply = self._step(vbd, ev.Detach())
        del self.vbds[vbd.minor]
        os.close(vbd.marker_fd)  # releases the flock: the minor may be freed now
        log.info("detached", minor=vbd.minor, vbds_left=len(self.vbds))
        if not self.vbds:
            # blktap's tapdisk exits once its last VBD is gone (the server sees `exiting`).
            self.exiting = True
        return self._answer(request, vbd, reply)

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
