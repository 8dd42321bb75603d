"""The tapdisk's NBD server: each VBD with an open image is exported over NBD.

Since blktap dropped its kernel device, dom0 and qemu reach a VDI through the NBD
socket that `physical-device-path` names (`<control dir>/nbd<pid>.<minor>`). `Exports`
is the tapdisk's side of it, driven by the control handlers as blktap's tapdisk drives
its server: `serve` when a VBD's image is opened (OPEN) or reopened (RESUME), then
`close_image` when it is closed (PAUSE: requests queue until RESUME; CLOSE: the
sockets go), `stop_all` when the process leaves.

An export that cannot start is logged and the VBD goes on without it (blktap fails
the OPEN instead): the guest's ring does not depend on it. Modules: `protocol` (the
codec, no I/O), `backend` (the image's descriptor), `server` (sockets and threads).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from blktap3.abi import SECTOR_SIZE, VdiskInfo

from ..images import Image
from .backend import Backend, FileBackend, ImageBackend, NullBackend
from .protocol import ExportInfo
from .server import COUNTERS, Export, Listener, socket_name

__all__ = ["COUNTERS", "Export", "Exports", "Listener", "socket_name"]

log = structlog.get_logger(__name__)


def open_backend(driver: str, path: str, image: Image) -> tuple[Backend, ExportInfo]:
    """What the export serves the VBD's image through, and what the handshake tells.

    A VHD, and an image whose writes are tracked (CBT) or mirrored, are served through
    the data path's own image object (`ImageBackend`): a second reader would not see
    the VHD blocks the ring allocates, and the export's writes must be marked and
    mirrored as the guest's are. A plain raw image gets its own descriptor, opened as
    the data path opened it (O_DIRECT or not: see `backend`)."""
    image_info = image.info
    size = int(image_info.sectors) * SECTOR_SIZE
    readonly = bool(int(image_info.info) & VdiskInfo.READONLY)
    block = max(SECTOR_SIZE, int(image_info.sector_size))
    can_trim = bool(image_info.discard) and not readonly
    info = ExportInfo(size=size, readonly=readonly, can_trim=can_trim, min_block=block)
    backend: Backend
    if driver == "null":
        backend = NullBackend(size)
    elif driver == "vhd":
        backend = ImageBackend(image, size=size, block=block)
    else:
        raw = FileBackend(path, size=size, readonly=readonly,
                          o_direct=bool(image_info.o_direct), can_punch=can_trim,
                          block=block)
        backend = ImageBackend(image, size=size, raw=raw, block=block) if image.shared \
            else raw
    return backend, info


class Exports:
    """The NBD exports of one tapdisk, by minor."""

    def __init__(self, root: Path, **limits: Any) -> None:
        self.root = root
        self.limits = limits
        self._exports: dict[int, Export] = {}
        self._lock = threading.Lock()

    def get(self, minor: int) -> Export | None:
        return self._exports.get(minor)

    def serve(self, minor: int, driver: str, path: str, image: Image) -> None:
        """Export the VBD's image: start the server (OPEN) or resume it on the reopened
        image (RESUME). Never raises: the VBD works without its export."""
        try:
            backend, info = open_backend(driver, path, image)
        except OSError as exc:
            log.error("nbd export not available: cannot open the image", minor=minor,
                      path=path, errno=exc.errno, reason=exc.strerror or str(exc))
            return
        except Exception:
            log.exception("nbd export not available", minor=minor, path=path)
            return
        with self._lock:
            export = self._exports.get(minor)
            if export is not None:
                export.resume(backend, info)
                return
            export = Export(self.root, os.getpid(), minor, backend, info, **self.limits)
            try:
                export.start()
            except OSError as exc:
                backend.close()
                log.error("nbd export not available: cannot listen", minor=minor,
                          socket=str(export.paths[Listener.NEWSTYLE]), errno=exc.errno,
                          reason=exc.strerror or str(exc))
                return
            self._exports[minor] = export

    def counters(self, minor: int) -> Callable[[], dict[str, dict[str, int]]] | None:
        """Reads the counters of the export of `minor` (None when it has none)."""
        export = self._exports.get(minor)
        return None if export is None else export.snapshot

    def close_image(self, minor: int, *, stop: bool, timeout: float) -> None:
        """The VBD's image is being closed: drain the export's I/O and let go of the
        file; with `stop` (CLOSE) remove the export, else (PAUSE) hold its requests."""
        with self._lock:
            export = self._exports.pop(minor, None) if stop else self._exports.get(minor)
        if export is None:
            return
        export.pause(timeout)  # as blktap pauses its servers before it closes the image
        if stop:
            export.stop()

    def stop_all(self) -> None:
        with self._lock:
            exports, self._exports = list(self._exports.values()), {}
        for export in exports:
            export.stop()
