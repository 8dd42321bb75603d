"""Notice that a tapdisk reopened an image (what `tap-ctl resize` does), without polling.

`tap-ctl resize -p PID -m MINOR` pauses the VBD (the tapdisk closes the image) and
resumes it accepting a larger size (the tapdisk opens it again); the control protocol
has no message that tells tapback. An inotify watch on the image file sees that open
(IN_OPEN): the VBD is then prompted to ask its tapdisk for the disk geometry (DISK_INFO,
answered once the resume completed) and announce a new `sectors` if it changed.

Other opens of the file (a tool that grows it) cost one DISK_INFO that finds no change.

Why inotify, and not a mark in XenStore or a message from the tapdisk (judged again
when the tapback work was reviewed):
- It needs nothing from the tool that resizes: blktap's control protocol has no "size
  changed" notification and `tap-ctl` only knows a pid and a minor, not the VBD's
  XenStore directory (libblktapctl does not and must not talk to XenStore), so a mark
  "tapback already watches" would need the toolstack's cooperation, which an operator
  running `tap-ctl resize` by hand does not give.  Asking the tapdisk to push news
  would need a subscription channel blktap's protocol lacks.
- It is exact where it matters: the tapdisk reopens the image inside RESUME, and its
  control messages are serialized, so the DISK_INFO this prompts is answered after the
  resume completed, with the new size.  Tapback and tapdisk always share the host (the
  tapdisk is tapback's own back-end domain's process), so the open is seen even on NFS.
- A resize that happened while no tapback ran is caught at adoption (the machine sees
  `sectors` differ from what the tapdisk reports and announces Connected again).
Known limits: an image swapped under a VBD (`tap-ctl unpause -a NEW`) is opened at a
path not watched here, so a later resize of NEW is noticed only at the next tapback
restart; an image that cannot be watched (ENOSPC: inotify limits) is logged.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import struct
import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

IN_OPEN = 0x00000020
IN_IGNORED = 0x00008000
IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000
VbdKey = tuple[int, int]  # (domid, devid)
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


class ImageWatcher:
    """Calls `on_open(key)` for every key watching an image that was opened."""

    def __init__(self, on_open: Callable[[VbdKey], None]) -> None:
        self._on_open = on_open
        self._fd = _check(_libc.inotify_init1(IN_CLOEXEC | IN_NONBLOCK), "inotify_init1")
        self._lock = threading.Lock()
        self._keys: dict[int, set[VbdKey]] = {}  # watch descriptor -> keys
        self._wd_of: dict[VbdKey, int] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="image-watcher", daemon=True)
        self._thread.start()

    def watch(self, path: str, key: VbdKey) -> bool:
        """Watch `path` for `key` (one image per key); False if it cannot be watched."""
        try:
            wd = _check(_libc.inotify_add_watch(self._fd, os.fsencode(path), IN_OPEN),
                        f"inotify_add_watch {path}")
        except OSError as exc:
            log.warning("image not watched: resizes will not be noticed", image=path,
                        error=str(exc))
            return False
        with self._lock:
            self._keys.setdefault(wd, set()).add(key)
            self._wd_of[key] = wd
        return True

    def forget(self, key: VbdKey) -> None:
        with self._lock:
            wd = self._wd_of.pop(key, None)
            if wd is None:
                return
            keys = self._keys.get(wd, set())
            keys.discard(key)
            if keys:
                return
            del self._keys[wd]
        _libc.inotify_rm_watch(self._fd, wd)

    def _run(self) -> None:
        while not self._stopping:
            ready, _, _ = select.select([self._fd, self._wake_r], [], [])
            if self._fd not in ready:
                continue
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                continue
            opened: set[int] = set()
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & IN_OPEN:
                    opened.add(wd)
                elif mask & IN_IGNORED:  # the file is gone: the kernel dropped the watch
                    with self._lock:
                        for key in self._keys.pop(wd, set()):
                            self._wd_of.pop(key, None)
            for wd in opened:
                with self._lock:
                    keys = list(self._keys.get(wd, ()))
                for key in keys:
                    try:
                        self._on_open(key)
                    except Exception:  # a callback bug must not stop the watcher
                        log.exception("image open callback failed")

    def close(self) -> None:
        self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)
