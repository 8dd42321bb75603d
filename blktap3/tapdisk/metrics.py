"""blktap's stats files, kept from the data path's counters by a thread of their own.

What other tools read of a tapdisk, with blktap's names and layouts (xapi-project/blktap,
facts in reference/peers.md):

- `<shm>/td3-<pid>/` (drivers/tapdisk-metrics.c, `td_metrics_start`, mode 0700), holding
  `vbd-<domid>-<devid>` per connected ring and `vdi-<minor>` per open image: one page
  each, `struct stats` (drivers/tapdisk-metrics-stats.h) with version 1.  Xen's
  libxenstat (xentop, since Xen 4.19) reads `vbd-<domid>-<devid>` of the tapdisk whose
  pid is the back-end's `kthread-pid` (tools/libs/stat/xenstat_linux.c,
  `read_attributes_vbd3`); xcp-rrdd's tapdisk plugin reads both.
- `td3-<pid>/nbd-<minor>` and `nbd-old-<minor>`: the same `struct stats` of the VBD's
  NBD server, newstyle and old-style clients (drivers/tapdisk-metrics.c,
  `td_metrics_nbd_start_new`/`_old`), from the export's own counters (`nbd.server`).
  blktap never sets their `version` (its page is zero-filled); we write 1 as in the
  others, so that one reader serves all.
- `<shm>/vbd3-<domid>-<devid>/statistics`: one page, `struct blkback_stats`
  (include/blktap3.h, 14 x u64), and `io_ring`: a crc32 (an `uLong`, 8 bytes here) of
  the text `nr_ents %u\\nreq prod %u cons %d event %u\\nrsp prod %u pvt %d event %u\\n`
  that follows, written as `io_ring~` then renamed (drivers/td-blkif.c), for
  xen-ringwatch.

blktap's data path adds to these counters in place, per request.  Ours counts in C as it
always does (`Ring.stats`, `Ring.io_stats`: plain integers, no file in the hot path) and
this thread copies them into the files every `interval` seconds (and once when a file is
made).  The files go when their object goes: a ring's when it disconnects, an image's
when it closes, the directory when the tapdisk exits (a stale one of a dead tapdisk with
our pid is emptied first, as blktap does).  The shm root is `$BLKTAP3_SHM_DIR`, else
/dev/shm: the simulated host gives each host its own.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from blktap3.ctl.runtime import SHM_ENV

from .stats import _get

log = structlog.get_logger(__name__)

INTERVAL_ENV = "BLKTAP3_STATS_INTERVAL"
DEFAULT_INTERVAL = 1.0
PAGE = 4096
STATS_VERSION = 1  # VBD_STATS_VERSION, drivers/tapdisk-metrics.c
# struct stats: u32 version, u32 pad, then 11 x u64.
STATS = struct.Struct("<II11Q")
STATS_FIELDS = ("oo_reqs", "read_reqs_submitted", "read_reqs_completed", "read_sectors",
                "read_total_ticks", "write_reqs_submitted", "write_reqs_completed",
                "write_sectors", "write_total_ticks", "io_errors", "flags")
# struct blkback_stats: 14 x (unsigned) long long.
BLKBACK = struct.Struct("<14Q")
BLKBACK_FIELDS = ("st_ds_req", "st_f_req", "st_oo_req", "st_rd_req", "st_rd_cnt",
                  "st_rd_sect", "st_rd_sum_usecs", "st_rd_max_usecs", "st_wr_req",
                  "st_wr_cnt", "st_wr_sect", "st_wr_sum_usecs", "st_wr_max_usecs", "flags")
CRC = struct.Struct("<Q")  # uLong on x86-64

RingCounters = Callable[[], tuple[Mapping[str, Any], Mapping[str, Any]] | None]
NbdCounters = Callable[[], Mapping[str, Mapping[str, int]]]
NBD_FILES = {"new": "nbd-{minor}", "old": "nbd-old-{minor}"}


def shm_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    return Path(explicit or os.environ.get(SHM_ENV) or "/dev/shm")


def _interval() -> float:
    try:
        value = float(os.environ.get(INTERVAL_ENV, "") or DEFAULT_INTERVAL)
    except ValueError:
        return DEFAULT_INTERVAL
    return value if 0 < value <= 60 else DEFAULT_INTERVAL


def stats_record(ring: Mapping[str, Any], io: Mapping[str, Any]) -> bytes:
    """`struct stats` of a ring (td3-<pid>/vbd-* and vdi-*), from its counters."""
    io_errors = _get(ring, "errors", "io")
    values = {
        "oo_reqs": 0,  # a request never waits for a descriptor here: one per ring slot
        "read_reqs_submitted": _get(io, "read", "submitted"),
        "read_reqs_completed": _get(io, "read", "completed"),
        "read_sectors": _get(ring, "sectors", "read"),
        "read_total_ticks": _get(io, "read", "usecs"),
        "write_reqs_submitted": _get(io, "write", "submitted"),
        "write_reqs_completed": _get(io, "write", "completed"),
        "write_sectors": _get(ring, "sectors", "written"),
        "write_total_ticks": _get(io, "write", "usecs"),
        "io_errors": io_errors,
        "flags": 0,
    }
    return STATS.pack(STATS_VERSION, 0, *(values[f] for f in STATS_FIELDS))


def nbd_record(counters: Mapping[str, int]) -> bytes:
    """`struct stats` of an NBD server (td3-<pid>/nbd-<minor>)."""
    values = {"oo_reqs": 0, "flags": 0, **counters}
    return STATS.pack(STATS_VERSION, 0, *(int(values[f]) for f in STATS_FIELDS))


def blkback_record(ring: Mapping[str, Any], io: Mapping[str, Any]) -> bytes:
    """`struct blkback_stats` of a ring (vbd3-<domid>-<devid>/statistics)."""
    values = {
        "st_ds_req": _get(ring, "reqs", "discard"),
        "st_f_req": _get(ring, "reqs", "flush"),
        "st_oo_req": 0,
        "st_rd_req": _get(io, "read", "submitted"),
        "st_rd_cnt": _get(io, "read", "completed"),
        "st_rd_sect": _get(ring, "sectors", "read"),
        "st_rd_sum_usecs": _get(io, "read", "usecs"),
        "st_rd_max_usecs": _get(io, "read", "max_usecs"),
        "st_wr_req": _get(io, "write", "submitted"),
        "st_wr_cnt": _get(io, "write", "completed"),
        "st_wr_sect": _get(ring, "sectors", "written"),
        "st_wr_sum_usecs": _get(io, "write", "usecs"),
        "st_wr_max_usecs": _get(io, "write", "max_usecs"),
        "flags": 0,
    }
    return BLKBACK.pack(*(values[f] for f in BLKBACK_FIELDS))


def io_ring_text(io: Mapping[str, Any]) -> bytes:
    """The io_ring file: crc32 of the text, then the text (drivers/td-blkif.c)."""
    r = io.get("ring", {})

    def u(key: str) -> int:
        return int(r.get(key, 0)) & 0xFFFFFFFF

    def d(key: str) -> int:  # printed %d in blktap: a RING_IDX seen as int
        value = u(key)
        return value - (1 << 32) if value >= 1 << 31 else value

    text = (f"nr_ents {u('nr_ents')}\n"
            f"req prod {u('req_prod')} cons {d('req_cons')} event {u('req_event')}\n"
            f"rsp prod {u('rsp_prod')} pvt {d('rsp_prod_pvt')} event {u('rsp_event')}\n"
            ).encode()
    return CRC.pack(zlib.crc32(text)) + text


def _page_of(data: bytes, path: Path) -> None:
    _write_page(path, data)


def _write_page(path: Path, data: bytes) -> None:
    """One page holding `data` at its start, as blktap's shm_create + stores."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        if os.fstat(fd).st_size != PAGE:
            os.ftruncate(fd, PAGE)
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def _write_renamed(path: Path, data: bytes) -> None:
    """`path` replaced at once: written as `path~`, then renamed (io_ring)."""
    tmp = path.with_name(path.name + "~")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)


class Metrics:
    """The stats files of one tapdisk process."""

    def __init__(self, root: Path | None = None, *, pid: int | None = None,
                 interval: float | None = None) -> None:
        self.root = shm_root(root)
        self.pid = os.getpid() if pid is None else pid
        self.dir = self.root / f"td3-{self.pid}"
        self.interval = _interval() if interval is None else interval
        self._lock = threading.Lock()
        self._rings: dict[tuple[int, int], RingCounters] = {}
        self._vdis: dict[int, RingCounters] = {}
        self._nbds: dict[int, NbdCounters] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._active = False  # td3-<pid> was made: the files are kept

    # -- the process -------------------------------------------------------------------

    def start(self) -> None:
        """Make td3-<pid> (emptied when a dead tapdisk with our pid left it) and start
        refreshing. A shm root that cannot be written costs the files, not the tapdisk."""
        try:
            if self.dir.is_dir() and not self.dir.is_symlink():
                shutil.rmtree(self.dir)
            self.root.mkdir(parents=True, exist_ok=True)
            self.dir.mkdir(mode=0o700)
        except OSError as exc:
            log.warning("no stats files", path=str(self.dir), errno=exc.errno,
                        reason=exc.strerror)
            return
        self._active = True
        self._thread = threading.Thread(target=self._run, name="stats-files", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing; remove every file and td3-<pid>."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if not self._active:
                return
            self._active = False
            for ids in list(self._rings):
                self._remove_ring(ids)
            self._rings.clear()
            self._vdis.clear()
            self._nbds.clear()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)

    # -- what the tapdisk tells ----------------------------------------------------------

    def ring_connected(self, domid: int, devid: int, minor: int,
                       counters: RingCounters) -> None:
        """A ring is served: its files appear, filled at once; the image's file follows
        its counters."""
        with self._lock:
            if not self._active:
                return
            self._rings[(domid, devid)] = counters
            self._vdis[minor] = counters
            self._refresh_ring((domid, devid), counters)
            self._refresh_vdi(minor, counters)

    def ring_disconnected(self, domid: int, devid: int, minor: int) -> None:
        """The ring's files go; the image's keeps the last figures while it is open."""
        with self._lock:
            if not self._active:
                return
            self._rings.pop((domid, devid), None)
            self._remove_ring((domid, devid))
            counters = self._vdis.pop(minor, None)
            if counters is not None:
                self._refresh_vdi(minor, counters)

    def image_open(self, minor: int, counters: RingCounters | None = None) -> None:
        """An image is open (OPEN, RESUME): its vdi-<minor> file, following the ring's
        counters when one is served (zeros until then)."""
        with self._lock:
            if not self._active:
                return
            if counters is not None:
                self._vdis[minor] = counters
                self._refresh_vdi(minor, counters)
                return
            self._write(self.dir / f"vdi-{minor}", lambda p: _write_page(
                p, STATS.pack(STATS_VERSION, 0, *([0] * len(STATS_FIELDS)))))

    def image_closed(self, minor: int) -> None:
        """The image is closed (PAUSE, CLOSE): its file goes, as blktap's close_vdi."""
        with self._lock:
            if not self._active:
                return
            self._vdis.pop(minor, None)
            self._remove_vdi(minor)

    def nbd_started(self, minor: int, counters: NbdCounters) -> None:
        """The VBD's NBD server runs: its files appear, following its counters."""
        with self._lock:
            if not self._active:
                return
            self._nbds[minor] = counters
            self._refresh_nbd(minor, counters)

    def nbd_stopped(self, minor: int) -> None:
        """The NBD server is gone (CLOSE): its files go."""
        with self._lock:
            if not self._active:
                return
            self._nbds.pop(minor, None)
            for name in NBD_FILES.values():
                with contextlib.suppress(OSError):
                    (self.dir / name.format(minor=minor)).unlink()

    # -- files ---------------------------------------------------------------------------

    def _refresh_nbd(self, minor: int, counters: NbdCounters) -> None:
        for style, values in counters().items():
            self._write(self.dir / NBD_FILES[style].format(minor=minor),
                        functools.partial(_page_of, nbd_record(values)))

    def ring_dir(self, domid: int, devid: int) -> Path:
        return self.root / f"vbd3-{domid}-{devid}"

    def _write(self, path: Path, write: Callable[[Path], None]) -> None:
        if not self.dir.is_dir():
            return
        try:
            write(path)
        except OSError as exc:
            log.warning("stats file not written", path=str(path), errno=exc.errno,
                        reason=exc.strerror)

    def _refresh_ring(self, ids: tuple[int, int], counters: RingCounters) -> None:
        got = counters()
        if got is None:
            return
        ring, io = got
        self._write(self.dir / f"vbd-{ids[0]}-{ids[1]}",
                    lambda p: _write_page(p, stats_record(ring, io)))
        top = self.ring_dir(*ids)

        def both(_: Path) -> None:
            top.mkdir(mode=0o700, exist_ok=True)
            _write_page(top / "statistics", blkback_record(ring, io))
            _write_renamed(top / "io_ring", io_ring_text(io))

        self._write(top, both)

    def _refresh_vdi(self, minor: int, counters: RingCounters) -> None:
        got = counters()
        if got is not None:
            self._write(self.dir / f"vdi-{minor}",
                        lambda p: _write_page(p, stats_record(*got)))

    def _remove_ring(self, ids: tuple[int, int]) -> None:
        top = self.ring_dir(*ids)
        for path in (self.dir / f"vbd-{ids[0]}-{ids[1]}", top / "statistics",
                     top / "io_ring", top / "io_ring~"):
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            top.rmdir()

    def _remove_vdi(self, minor: int) -> None:
        with contextlib.suppress(OSError):
            (self.dir / f"vdi-{minor}").unlink()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                for ids, counters in list(self._rings.items()):
                    self._refresh_ring(ids, counters)
                for minor, counters in list(self._vdis.items()):
                    self._refresh_vdi(minor, counters)
                for minor, nbd_counters in list(self._nbds.items()):
                    self._refresh_nbd(minor, nbd_counters)
