"""What a tapdisk does with each control message: its VBDs and their operations.

`Tapdisk.handle` takes a decoded request and returns the reply (one or more messages,
plus STATS' raw bytes). It does no socket I/O (the server in `server.py` does), so the
logic is testable on its own. Messages that change state are serialized by one lock, as
blktap's single-threaded tapdisk serializes them; PID, LIST, LIST_MINORS and STATS only
read and are answered at once even while a PAUSE drains.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from blktap3.ctl import protocol as p
from blktap3.ctl.runtime import marker_path

from . import images, stats
from .vbd import InvalidTransition, VbdEvent, VbdMachine, VbdState

log = structlog.get_logger(__name__)

T = p.MessageType
UNSERIALIZED = frozenset({T.PID, T.LIST, T.LIST_MINORS, T.STATS})
DRAIN_TIMEOUT = 30.0


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


@dataclass
class Vbd:
    """One VBD: its minor (and the flock on its marker), state, image and ring."""

    minor: int
    marker_fd: int
    machine: VbdMachine = field(default_factory=VbdMachine)
    spec: images.ImageSpec | None = None
    flags: int = 0
    image: images.Image | None = None
    info: p.ImageInfo | None = None
    ring: images.Ring | None = None
    ring_ids: tuple[int, int] | None = None

    @property
    def params(self) -> str:
        """`type:/path` while the VBD has an image (paused included), else empty."""
        if self.spec is None or self.machine.state in (
            VbdState.ATTACHED, VbdState.CLOSED, VbdState.DETACHED
        ):
            return ""
        return str(self.spec)


def _image_info(image: images.Image) -> p.ImageInfo:
    info = image.info
    return p.ImageInfo(int(info.sectors), int(info.sector_size), int(info.info))


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
        except InvalidTransition as exc:
            reason = f"minor {request.cookie}: {exc}"
            log.warning("refused", request=request.type.name, minor=request.cookie,
                        reason=reason)
            return error_reply(request.cookie, errno.EINVAL, reason)
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

    # -- read-only messages -----------------------------------------------------------

    def _pid(self, request: p.Message) -> Reply:
        return Reply([p.Message(T.PID_RSP, request.cookie, p.Pid(os.getpid()))])

    def _list(self, request: p.Message) -> Reply:
        vbds = list(self.vbds.values())
        messages = [
            p.Message(T.LIST_RSP, request.cookie,
                      p.ListEntry(len(vbds) - i, vbd.minor, vbd.machine.bits, vbd.params))
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
        spec = vbd.spec if vbd.machine.has_image else None
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
        if vbd.info is None or vbd.machine.state in (VbdState.ATTACHED, VbdState.CLOSED):
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
        vbd.machine.fire(VbdEvent.ATTACH)
        self.vbds[minor] = vbd
        log.info("attached", minor=minor)
        return self._ok(request)

    def _open(self, request: p.Message) -> Reply:
        assert isinstance(request.payload, p.Params)
        vbd = self._vbd(request.cookie)
        if vbd.machine.state is VbdState.CLOSING:
            raise ControlError(errno.EBUSY, f"minor {vbd.minor} is closing")
        if not vbd.machine.can(VbdEvent.OPEN):
            raise ControlError(errno.EALREADY, f"minor {vbd.minor} is already open")
        spec = images.parse_params(request.payload.path)
        image = images.open_image(spec, request.payload.flags)
        vbd.spec, vbd.flags, vbd.image = spec, request.payload.flags, image
        vbd.info = _image_info(image)
        vbd.machine.fire(VbdEvent.OPEN)
        log.info("opened", minor=vbd.minor, image=str(spec), sectors=vbd.info.sectors)
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
        if vbd.machine.state is not VbdState.OPEN or vbd.image is None:
            raise ControlError(errno.EINVAL, f"minor {vbd.minor} has no open image")
        ring = images.connect_ring(
            vbd.image, domid=blkif.domid, devid=blkif.devid, grefs=blkif.grefs,
            order=blkif.order, port=blkif.port, protocol=blkif.proto,
        )
        with self.ring_lock:
            vbd.ring, vbd.ring_ids = ring, ids
        vbd.machine.fire(VbdEvent.CONNECT)
        log.info("ring connected", minor=vbd.minor, domid=ids[0], devid=ids[1])
        return self._ok(request)

    def _disconnect(self, request: p.Message) -> Reply:
        blkif = request.payload
        assert isinstance(blkif, p.Blkif)
        vbd = self._vbd(request.cookie)
        ids = (blkif.domid, blkif.devid)
        if vbd.ring is None or vbd.ring_ids != ids:
            raise ControlError(errno.ENODEV, f"no ring {ids[0]}/{ids[1]} on minor {vbd.minor}")
        self._drop_ring(vbd)
        vbd.machine.fire(VbdEvent.DISCONNECT)
        log.info("ring disconnected", minor=vbd.minor, domid=ids[0], devid=ids[1])
        return self._ok(request)

    def _pause(self, request: p.Message) -> Reply:
        vbd = self._vbd(request.cookie)
        if vbd.machine.state is VbdState.PAUSED:
            return self._ok(request)  # blktap answers a second PAUSE with success
        if not vbd.machine.can(VbdEvent.PAUSE):
            raise ControlError(errno.EINVAL, f"minor {vbd.minor} is not open")
        vbd.machine.fire(VbdEvent.PAUSE)
        if vbd.ring is not None:
            # Returns once in-flight requests completed; a timeout leaves the request
            # standing (pause requested) for the caller to retry or close.
            vbd.ring.pause(timeout=self.drain_timeout)
        if vbd.image is not None:
            vbd.image.close()
            vbd.image = None
        vbd.machine.fire(VbdEvent.DRAINED)
        log.info("paused", minor=vbd.minor)
        return self._ok(request)

    def _resume(self, request: p.Message) -> Reply:
        resume = request.payload
        assert isinstance(resume, p.Resume)
        vbd = self._vbd(request.cookie)
        if vbd.machine.state is not VbdState.PAUSED:
            raise ControlError(errno.EINVAL, f"minor {vbd.minor} is not paused")
        assert vbd.spec is not None and vbd.info is not None
        images.check_flags(resume.flags)
        try:
            spec = images.parse_params(resume.new_params) if resume.new_params else vbd.spec
            image = images.open_image(spec, vbd.flags)
            info = _image_info(image)
            try:
                self._check_same_medium(vbd.info, info, resume.flags)
                if vbd.ring is not None:
                    vbd.ring.resume(image=image)
            except OSError:
                image.close()
                raise
        except OSError:
            vbd.machine.resume_failed = True
            raise
        resized = info.sectors != vbd.info.sectors
        vbd.spec, vbd.image, vbd.info = spec, image, info
        event = VbdEvent.RESUME if vbd.ring is None else VbdEvent.RESUME_CONNECTED
        vbd.machine.fire(event)
        log.info("resumed", minor=vbd.minor, image=str(spec), resized=resized,
                 sectors=info.sectors)
        return self._ok(request)

    @staticmethod
    def _check_same_medium(old: p.ImageInfo, new: p.ImageInfo, flags: int) -> None:
        """blktap refuses an image that differs (EMEDIUMTYPE); RESIZE lets it grow."""
        if new.sector_size != old.sector_size or new.info != old.info:
            raise ControlError(
                errno.EMEDIUMTYPE,
                f"sector size/info {new.sector_size}/{new.info:#x} differ from "
                f"{old.sector_size}/{old.info:#x}",
            )
        if new.sectors == old.sectors:
            return
        if flags & p.ResumeFlags.RESIZE and new.sectors > old.sectors:
            return
        raise ControlError(
            errno.EMEDIUMTYPE,
            f"size changed from {old.sectors} to {new.sectors} sectors"
            + ("" if flags & p.ResumeFlags.RESIZE else " (resize not requested)"),
        )

    def _close(self, request: p.Message) -> Reply:
        force = request.type is T.FORCE_SHUTDOWN
        vbd = self._vbd(request.cookie)
        if vbd.machine.state in (VbdState.ATTACHED, VbdState.CLOSED):
            return self._ok(request)  # nothing open: blktap's close succeeds too
        if vbd.ring is not None and not force and vbd.machine.state is not VbdState.PAUSED:
            vbd.ring.pause(timeout=self.drain_timeout)  # CLOSE waits for in-flight I/O
        if vbd.ring is not None:
            self._drop_ring(vbd)
        vbd.machine.fire(VbdEvent.CLOSE)
        if vbd.image is not None:
            vbd.image.close()
            vbd.image = None
        vbd.machine.fire(VbdEvent.CLOSED)
        log.info("closed", minor=vbd.minor, force=force)
        return self._ok(request)

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

    def _detach(self, request: p.Message) -> Reply:
        vbd = self._vbd(request.cookie)
        if not vbd.machine.can(VbdEvent.DETACH):
            raise ControlError(errno.EBUSY, f"minor {vbd.minor} is open")
        vbd.machine.fire(VbdEvent.DETACH)
        del self.vbds[vbd.minor]
        os.close(vbd.marker_fd)  # releases the flock: the minor may be freed now
        log.info("detached", minor=vbd.minor, vbds_left=len(self.vbds))
        if not self.vbds:
            # blktap's tapdisk exits once its last VBD is gone (the server sees `exiting`).
            self.exiting = True
        return self._ok(request)

    def _exit(self, request: p.Message) -> Reply:
        if self.vbds:
            raise ControlError(errno.EBUSY, f"{len(self.vbds)} VBD(s) still attached")
        self.exiting = True
        return Reply([p.Message(T.EXIT, request.cookie)])

    def shutdown(self) -> None:
        """Release every VBD without waiting (SIGTERM): rings first, then images."""
        with self.lock:
            self.exiting = True
            for vbd in list(self.vbds.values()):
                if vbd.ring is not None:
                    with contextlib.suppress(OSError):
                        self._drop_ring(vbd)
                if vbd.image is not None:
                    vbd.image.close()
                    vbd.image = None
                os.close(vbd.marker_fd)
            self.vbds.clear()
