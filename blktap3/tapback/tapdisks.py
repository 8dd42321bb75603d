"""How tapback finds the tapdisk of a VBD, and learns at once when one dies.

The hotplug step (Xen's `block-tap` script, `blktap3.sim.hotplug` on the simulated host)
runs `tap-ctl create` and writes `physical-device-path` in the back-end directory. As in
blktap3, its last component is `nbd<pid>.<minor>`; tapback reads the pid and minor from
it and asks that tapdisk, on its control socket in tapback's runtime root, for the disk
geometry (DISK_INFO).

Tapdisks are daemons (not our children), so their deaths are watched with pidfds
(`pidfd_open`, Linux 5.3): one thread sleeps in `select` on all of them and calls back
once per death. No polling, and a death is reported exactly once.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from blktap3.ctl import runtime

log = structlog.get_logger(__name__)

_DEVICE_RE = re.compile(r"\Anbd([1-9][0-9]{0,9})\.(0|[1-9][0-9]{0,4})\Z")


@dataclass(frozen=True)
class TapdiskLocation:
    """A VBD's tapdisk as `physical-device-path` names it."""

    pid: int
    minor: int


def device_name(pid: int, minor: int) -> str:
    """blktap3's device name for a VBD: `nbd<pid>.<minor>`."""
    return f"nbd{pid}.{minor}"


def device_path(root: Path, pid: int, minor: int) -> str:
    """The `physical-device-path` value for a VBD (`<root>/nbd<pid>.<minor>`)."""
    return str(root / device_name(pid, minor))


def parse_device_path(value: str) -> TapdiskLocation:
    """pid and minor from a `physical-device-path`; ValueError says what is wrong."""
    name = value.rsplit("/", 1)[-1]
    match = _DEVICE_RE.match(name)
    if match is None:
        raise ValueError(f"physical-device-path {value[:120]!r} is not .../nbd<pid>.<minor>")
    minor = int(match.group(2))
    if minor >= runtime.MAX_MINOR:
        raise ValueError(f"physical-device-path {value!r}: minor {minor} out of range")
    return TapdiskLocation(int(match.group(1)), minor)


DeathCallback = Callable[[int], None]


class TapdiskMonitor:
    """Calls `on_death(pid)` once when a watched tapdisk process exits."""

    def __init__(self, on_death: DeathCallback) -> None:
        self._on_death = on_death
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}  # pidfd -> pid
        self._pids: dict[int, int] = {}  # pid -> pidfd
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tapdisk-monitor", daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        """Watch `pid` (idempotent); a pid already gone is reported at once."""
        with self._lock:
            if pid in self._pids:
                return
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                fd = -1
            if fd >= 0:
                self._fds[fd] = pid
                self._pids[pid] = fd
        if fd < 0:
            self._report(pid)
            return
        self._wake()

    def watching(self, pid: int) -> bool:
        with self._lock:
            return pid in self._pids

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _report(self, pid: int) -> None:
        try:
            self._on_death(pid)
        except Exception:  # a callback bug must not stop the monitor
            log.exception("tapdisk death callback failed", pid=pid)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                fds = list(self._fds)
            ready, _, _ = select.select([self._wake_r, *fds], [], [])
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            dead: list[int] = []
            with self._lock:
                for fd in ready:
                    pid = self._fds.pop(fd, None)
                    if pid is None:
                        continue
                    del self._pids[pid]
                    os.close(fd)
                    dead.append(pid)
            for pid in dead:
                self._report(pid)

    def close(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(timeout=5)
        with self._lock:
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
            self._pids.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)
