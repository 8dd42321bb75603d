"""The ring service seen from Python: connect, pause, resume, disconnect, stats.

Python crosses into C only here, to start/stop/pause the service thread (cffi releases
the GIL around each call) and to read counters: never per request.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from blktap3.abi import BlkifProtocol

from ._datapath import ffi, lib
from ._errors import check
from .image import ENGINES, Image

MAX_RING_PAGE_ORDER = int(lib.TD_MAX_RING_ORDER)  # blktap3.abi's, checked by a test
# The most segments an INDIRECT request may carry here (8 indirect pages of 512, Xen's
# protocol limit). What a VBD offers is chosen at connect, up to this.
MAX_INDIRECT_SEGMENTS = int(lib.TD_MAX_INDIRECT_SEGS)
# The process-wide default of ``poll_us`` (blktap's poll_duration): the tapdisk's
# control protocol has no field for it, so its environment carries it.
POLL_ENV = "BLKTAP3_RING_POLL_US"
OPS = ("read", "write", "barrier", "flush", "reserved", "discard", "indirect", "other")
# Index = enum td_err in datapath.h.
ERROR_CAUSES = (
    None, "op", "segments", "sector", "range", "readonly", "grant", "io", "unsupported",
    "overflow", "indirect_op", "indirect_segments", "indirect_grant",
)
ENGINE_NAMES = {v: k for k, v in ENGINES.items()}


def _env_poll_us() -> int:
    """``$BLKTAP3_RING_POLL_US`` as a number; unset or malformed is 0 (never poll)."""
    try:
        return int(os.environ.get(POLL_ENV, "0") or "0")
    except ValueError:
        return 0


class Ring:
    """One connected blkif ring served by a C thread."""

    def __init__(self, handle: Any, image: Image, domid: int, devid: int) -> None:
        self._handle = handle
        self.image = image
        self.domid = domid
        self.devid = devid
        # The C ring is freed by disconnect. Other calls (stats from an unserialized
        # STATS request, a pause) hold a use of the handle; disconnect refuses new uses
        # and waits for the current ones before it frees anything.
        self._uses = 0
        self._closing = False
        self._cv = threading.Condition()

    @classmethod
    def connect(
        cls,
        image: Image,
        *,
        domid: int,
        devid: int,
        grefs: Sequence[int],
        order: int,
        port: int,
        protocol: BlkifProtocol,
        engine: str = "auto",
        poll_us: int | None = None,
        poll_idle_threshold: int = 0,
        max_indirect_segments: int = 0,
        discard: bool = True,
        persistent: bool = False,
    ) -> Ring:
        """Map the ring (2**order pages), bind the event channel, start the service.

        ``engine``: "auto" (io_uring, else the synchronous fallback), "uring", "sync".
        ``poll_us``: spin this long for new requests/completions before sleeping
        (blktap's ``poll_duration``; trades CPU for latency; 0 = always sleep;
        None: ``$BLKTAP3_RING_POLL_US``, else 0).
        ``poll_idle_threshold``: spin only while this percentage of all CPU time was
        idle over the last 100 ms (blktap's ``polling-idle-threshold``; 0: always).
        ``max_indirect_segments``: the ``feature-max-indirect-segments`` the back-end
        offered this front-end, enforced on every INDIRECT request (0: not offered,
        INDIRECT is answered EOPNOTSUPP); at most ``MAX_INDIRECT_SEGMENTS``.
        ``discard``: False when the back-end withheld discard (`discard-enable` = 0):
        DISCARD is then answered EOPNOTSUPP whatever the image can do.
        ``persistent``: persistent grants were negotiated: each data grant is mapped once
        and kept (a bounded cache, unmapped at disconnect) instead of grant-copied.
        """
        if poll_us is None:
            poll_us = _env_poll_us()
        if protocol not in BlkifProtocol:
            raise OSError(22, f"unknown ring protocol {protocol!r}")
        if not 0 <= order <= MAX_RING_PAGE_ORDER or len(grefs) != 1 << order:
            raise OSError(22, f"ring order {order} needs {1 << order} grant refs, got {len(grefs)}")
        if engine not in ENGINES:
            raise OSError(22, f"unknown io engine {engine!r}")
        if not 0 <= poll_us <= 1_000_000:
            raise OSError(22, f"poll_us {poll_us} out of range 0..1000000")
        if not 0 <= poll_idle_threshold <= 100:
            raise OSError(22, f"poll_idle_threshold {poll_idle_threshold} out of range 0..100")
        if not 0 <= max_indirect_segments <= MAX_INDIRECT_SEGMENTS:
            raise OSError(22, f"max_indirect_segments {max_indirect_segments} out of range "
                              f"0..{MAX_INDIRECT_SEGMENTS}")
        refs = ffi.new("uint32_t[]", [int(g) for g in grefs])
        out = ffi.new("struct td_ring **")
        rc = lib.td_ring_connect(
            image.handle,
            domid,
            devid,
            refs,
            order,
            port,
            int(protocol),  # TD_PROTO_* are BlkifProtocol's numbers
            ENGINES[engine],
            poll_us,
            poll_idle_threshold,
            max_indirect_segments,
            int(discard),
            int(persistent),
            out,
        )
        step = ffi.string(lib.td_ring_connect_failure()).decode(errors="replace")
        check(rc, f"connect ring d{domid}/{devid}" + (f": {step}" if step else ""))
        return cls(out[0], image, domid, devid)

    @contextmanager
    def _use(self) -> Iterator[Any]:
        with self._cv:
            if self._handle is None or self._closing:
                raise OSError(errno.ENODEV, f"ring d{self.domid}/{self.devid} is disconnected")
            self._uses += 1
            handle = self._handle
        try:
            yield handle
        finally:
            with self._cv:
                self._uses -= 1
                self._cv.notify_all()

    def pause(self, timeout: float = 30.0) -> None:
        """Stop taking requests and wait until nothing is in flight (quiesced)."""
        with self._use() as handle:
            check(lib.td_ring_pause(handle, int(timeout * 1000)), "pause ring")

    def resume(self, image: Image | None = None) -> None:
        """Take requests again, optionally from a new image (only while paused)."""
        with self._use() as handle:
            check(lib.td_ring_resume(handle, ffi.NULL if image is None else image.handle),
                  "resume ring")
        if image is not None:
            self.image = image

    def disconnect(self, timeout: float = 30.0) -> None:
        """Answer what the guest queued, complete in-flight I/O, stop, unmap, unbind.

        Idempotent; on ETIMEDOUT nothing is freed and the call may be repeated.
        """
        with self._cv:
            if self._handle is None:
                return
            self._closing = True
            while self._uses:
                self._cv.wait()
            handle = self._handle
        try:
            check(lib.td_ring_disconnect(handle, int(timeout * 1000)), "disconnect ring")
        except OSError:
            with self._cv:
                self._closing = False
            raise
        with self._cv:
            self._handle = None
            self._closing = False

    @property
    def connected(self) -> bool:
        return self._handle is not None

    @property
    def halted(self) -> str | None:
        """Why the ring was halted (a broken front-end), or None."""
        halted: str | None = self.stats()["halted"]
        return halted

    def io_stats(self) -> dict[str, Any]:
        """What blktap's stats files hold (`blktap3.tapdisk.metrics`): per direction the
        I/O queued and completed and their times, retries, and the back ring's indices."""
        st = ffi.new("struct td_io_stats *")
        with self._use() as handle:
            lib.td_ring_io_stats(handle, st)
        per_op = {
            name: {
                "submitted": int(st.submitted[i]),
                "completed": int(st.completed[i]),
                "usecs": int(st.usecs[i]),
                "max_usecs": int(st.max_usecs[i]),
            }
            for i, name in enumerate(("read", "write"))
        }
        ring = {name: int(getattr(st, name)) for name in (
            "nr_ents", "req_prod", "req_cons", "req_event", "rsp_prod", "rsp_prod_pvt",
            "rsp_event")}
        return per_op | {"retried": int(st.retried), "timed_out": int(st.timed_out),
                         "ring": ring}

    def set_req_timeout(self, seconds: int) -> None:
        """blktap's ``req_timeout``: an I/O failing with EAGAIN/EBUSY/EINTR is reissued
        until its request is this old, then answered BLKIF_RSP_ERROR (and logged)."""
        if not 0 < seconds <= 0xFFFF:
            raise OSError(errno.EINVAL, f"req_timeout {seconds} out of range 1..65535")
        with self._use() as handle:
            lib.td_ring_set_req_timeout(handle, seconds)

    def inject_eagain(self, count: int) -> None:
        """Tests of the retry branch: the next `count` I/O completions fail EAGAIN."""
        with self._use() as handle:
            lib.td_ring_inject_eagain(handle, count)

    def stats(self) -> dict[str, Any]:
        """Counters, read without locking the service thread."""
        st = ffi.new("struct td_stats *")
        with self._use() as handle:
            lib.td_ring_stats(handle, st)
        halted = ffi.string(st.halted).decode(errors="replace") or None
        return {
            "domid": self.domid,
            "devid": self.devid,
            "reqs": {name: int(st.reqs[i]) for i, name in enumerate(OPS) if name != "reserved"}
            | {"other": int(st.reqs[4]) + int(st.reqs[7])},
            "segments": int(st.segments),
            "indirect": {
                "read": int(st.indirect[0]),
                "write": int(st.indirect[1]),
                "pages": int(st.indirect_pages),
                "max_segments": int(st.max_indirect),
                "buffers": int(st.indirect_bufs),
            },
            "persistent": {
                "negotiated": bool(st.persistent),
                "mapped": int(st.pgrants_mapped),
                "max": int(st.pgrants_max),
                "maps": int(st.pgrant_maps),
                "hits": int(st.pgrant_hits),
                "evictions": int(st.pgrant_evictions),
                "map_failures": int(st.pgrant_map_failures),
                "full": int(st.pgrant_full),
            },
            "sectors": {"read": int(st.sectors_read), "written": int(st.sectors_written)},
            "kicks": {"in": int(st.kicks_in), "out": int(st.kicks_out)},
            "responses": int(st.responses),
            "errors": {c: int(st.errors[i]) for i, c in enumerate(ERROR_CAUSES) if c},
            "in_flight": int(st.in_flight),
            "batches": int(st.batches),
            "polling": {"polls": int(st.polls), "busy": int(st.polls_busy),
                        "idle_threshold": int(st.poll_idle_threshold)},
            "o_direct": bool(st.o_direct),
            "engine": ENGINE_NAMES.get(int(st.engine), "unknown"),
            "paused": bool(st.paused),
            "slots": int(st.slots),
            "halted": halted,
        }
