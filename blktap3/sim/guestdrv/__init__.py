"""The simulated guest's blkfront ring driver (C, cffi) and its Python facade.

``GuestRing`` runs inside a process that is the guest domain (``xensim.process_env``);
``python -m blktap3.sim.guestdrv`` is that process, driven by JSON lines (see
``blktap3.datapath.lineproc``). Besides workloads at a queue depth it sends raw
requests, sane or not, so tests can make the front-end misbehave. With ``max_segs`` > 11
it uses indirect requests (BLKIF_OP_INDIRECT) for anything longer than 11 pages.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from blktap3.abi import SECTOR_SIZE, BlkifOp, BlkifProtocol

from ._guestdrv import ffi, lib

PAGE = 4096
SEGS = 11
INDIRECT = BlkifOp.INDIRECT
# What a sector read back held, besides a stamp: zeros, or anything else.
ZEROS = -2
GARBAGE = -1
MAX_INDIRECT_GREFS = 8
ETIMEDOUT = 110
Seg = tuple[int, int, int]  # (gref, first_sect, last_sect)


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, what)
    return rc


def stamp_sector(sector: int, stamp: int) -> bytes:
    """A sector as the workloads write it: (sector, stamp) pairs, native order."""
    return struct.pack("=QQ", sector, stamp) * (SECTOR_SIZE // 16)


def sector_stamp(raw: bytes, sector: int) -> int:
    """The stamp of a sector written by ``stamp_sector`` for ``sector``; ZEROS or
    GARBAGE for anything else."""
    if raw == bytes(len(raw)):
        return ZEROS
    got, stamp = struct.unpack_from("=QQ", raw)
    if got != sector or raw != raw[:16] * (len(raw) // 16):
        return GARBAGE
    return int(stamp)


class GuestRing:
    """One front-end ring with its data pages, shared with the ``backend`` domain."""

    def __init__(
        self,
        backend: int,
        *,
        order: int = 0,
        protocol: BlkifProtocol = BlkifProtocol.NATIVE,
        data_slots: int = 0,
        slot_pages: int = 0,
        max_segs: int = 0,
        writable: bool = True,
    ) -> None:
        """``data_slots`` blocks (0: one per ring slot) of ``slot_pages`` data pages (0:
        11); ``max_segs`` (0: 11) segments at most per request, INDIRECT beyond 11."""
        out = ffi.new("struct gd **")
        rc = lib.gd_open(backend, order, int(protocol), data_slots, slot_pages, max_segs,
                         int(writable), out)
        _check(rc, "guest ring open")
        self._g = out[0]
        self.order = order
        self.protocol = protocol
        self.max_segs = max_segs or SEGS

    @property
    def grefs(self) -> list[int]:
        return [int(lib.gd_ring_gref(self._g, i)) for i in range(1 << self.order)]

    @property
    def port(self) -> int:
        return int(lib.gd_port(self._g))

    @property
    def slots(self) -> int:
        return int(lib.gd_slots(self._g))

    @property
    def data_pages(self) -> int:
        return int(lib.gd_data_pages(self._g))

    def data_gref(self, page: int) -> int:
        return int(lib.gd_data_gref(self._g, page))

    def indirect_gref(self, slot: int, page: int) -> int:
        """Grant ref of indirect page ``page`` of ring request slot ``slot`` (0: none)."""
        return int(lib.gd_indirect_gref(self._g, slot, page))

    def _page(self, page: int) -> Any:
        return ffi.buffer(lib.gd_data(self._g, page), PAGE)

    def submit(self, reqs: Sequence[dict[str, Any]]) -> None:
        """Put raw requests on the ring (ids 0..n-1), push, notify; no waiting.

        A spec: ``op``, ``segs`` [(gref, first, last)], ``nr_segments`` (default: the
        number of segs), ``sector``, ``flag``, ``handle``, ``nr_sectors`` (discard). With
        ``op`` INDIRECT: ``indirect_op``, and ``segs`` go to request i's own indirect
        pages, named in the request unless ``indirect_grefs`` (up to 8) says otherwise.
        """
        raw = ffi.new("struct gd_raw[]", len(reqs))
        keep = []  # the indirect segment arrays must live until gd_submit_raw returns
        for r, spec in zip(raw, reqs, strict=True):
            r.operation = spec["op"]
            segs: list[Sequence[int]] = spec.get("segs", [])
            r.nr_segments = spec.get("nr_segments", len(segs))
            r.flag = spec.get("flag", 0)
            r.handle = spec.get("handle", 0)
            r.sector_number = spec.get("sector", 0)
            r.nr_sectors = spec.get("nr_sectors", 0)
            if spec["op"] == INDIRECT:
                r.indirect_op = spec.get("indirect_op", 0)
                isegs = ffi.new("struct gd_seg[]", max(len(segs), 1))
                for i, (gref, first, last) in enumerate(segs):
                    isegs[i].gref, isegs[i].first_sect, isegs[i].last_sect = gref, first, last
                keep.append(isegs)
                r.isegs, r.nr_isegs = isegs, len(segs)
                lies: list[int] | None = spec.get("indirect_grefs")
                if lies is not None:
                    r.lie_grefs = 1
                    for i, gref in enumerate(lies[:MAX_INDIRECT_GREFS]):
                        r.indirect_grefs[i] = gref
                continue
            for i, (gref, first, last) in enumerate(segs[:SEGS]):
                r.seg[i].gref = gref
                r.seg[i].first_sect = first
                r.seg[i].last_sect = last
        _check(lib.gd_submit_raw(self._g, raw, len(reqs)), "submit")

    def collect(self, n: int, timeout: float = 10.0) -> list[int | None]:
        """Statuses of raw requests 0..n-1; None for those never answered."""
        st = ffi.new("int16_t[]", max(n, 1))
        lib.gd_collect(self._g, n, st, int(timeout * 1000))
        return [None if st[i] == 1 else int(st[i]) for i in range(n)]

    def raw_ops(self, n: int) -> list[int | None]:
        """The operation field of the responses to raw requests 0..n-1 (None: none)."""
        ops = ffi.new("uint8_t[]", max(n, 1))
        lib.gd_raw_ops(self._g, n, ops)
        return [None if ops[i] == 0xFF else int(ops[i]) for i in range(n)]

    def request(self, spec: dict[str, Any], timeout: float = 10.0) -> int | None:
        self.submit([spec])
        return self.collect(1, timeout)[0]

    def _segs_for(self, nbytes: int) -> list[Seg]:
        sectors = nbytes // SECTOR_SIZE
        segs: list[Seg] = []
        page = 0
        while sectors:
            n = min(sectors, 8)
            segs.append((self.data_gref(page), 0, n - 1))
            sectors -= n
            page += 1
        return segs

    def _rw_spec(self, op: int, sector: int, nbytes: int) -> dict[str, Any]:
        """One request over the data pages from 0: direct up to 11 pages, else INDIRECT."""
        pages = (nbytes + PAGE - 1) // PAGE
        most = min(self.max_segs, self.data_pages)
        if nbytes <= 0 or nbytes % SECTOR_SIZE or pages > most:
            raise ValueError(f"1..{most * 8} whole sectors in one request")
        segs = self._segs_for(nbytes)
        if pages <= SEGS:
            return {"op": op, "sector": sector, "segs": segs}
        return {"op": INDIRECT, "indirect_op": op, "sector": sector, "segs": segs}

    def write(self, sector: int, data: bytes, timeout: float = 10.0) -> int | None:
        """Write whole sectors with one request (INDIRECT beyond 11 pages, up to
        ``max_segs``); returns the blkif status."""
        spec = self._rw_spec(1, sector, len(data))
        for page in range((len(data) + PAGE - 1) // PAGE):
            chunk = data[page * PAGE : (page + 1) * PAGE]
            self._page(page)[: len(chunk)] = chunk
        return self.request(spec, timeout)

    def read(self, sector: int, count: int, timeout: float = 10.0) -> tuple[int | None, bytes]:
        """Read ``count`` sectors with one request (INDIRECT beyond 11 pages): (status,
        data)."""
        nbytes = count * SECTOR_SIZE
        spec = self._rw_spec(0, sector, nbytes)
        status = self.request(spec, timeout)
        data = b"".join(bytes(self._page(p)) for p in range((nbytes + PAGE - 1) // PAGE))
        return status, data[:nbytes]

    def batch(self, items: Sequence[dict[str, Any]],
              timeout: float = 10.0) -> list[dict[str, Any]]:
        """Submit requests together and wait for all: each item is ``op`` (read, write,
        flush), ``sector`` and ``count`` (up to 11 pages; none for a flush) and, for a
        write, ``stamp``: sector s is written as (s, stamp) pairs (``stamp_sector``).
        Returns per item its ``status`` (None: no answer) and, for a read, ``stamps``:
        each sector's stamp, ZEROS or GARBAGE."""
        if len(items) * SEGS > self.data_pages:
            raise ValueError(f"at most {self.data_pages // SEGS} requests in a batch")
        specs: list[dict[str, Any]] = []
        for i, item in enumerate(items):
            if item["op"] == "flush":
                specs.append({"op": BlkifOp.FLUSH_DISKCACHE})
                continue
            sector, count = item["sector"], item["count"]
            if not 0 < count <= SEGS * PAGE // SECTOR_SIZE:
                raise ValueError("1..88 sectors a request")
            first = i * SEGS
            op = BlkifOp.WRITE if item["op"] == "write" else BlkifOp.READ
            if op == BlkifOp.WRITE:
                data = b"".join(stamp_sector(sector + k, item["stamp"]) for k in range(count))
                for p in range((len(data) + PAGE - 1) // PAGE):
                    chunk = data[p * PAGE:(p + 1) * PAGE]
                    self._page(first + p)[:len(chunk)] = chunk
            segs: list[Seg] = []
            left = count
            while left:
                n = min(left, PAGE // SECTOR_SIZE)
                segs.append((self.data_gref(first + len(segs)), 0, n - 1))
                left -= n
            specs.append({"op": op, "sector": sector, "segs": segs})
        self.submit(specs)
        statuses = self.collect(len(specs), timeout)
        out: list[dict[str, Any]] = []
        for i, (item, status) in enumerate(zip(items, statuses, strict=True)):
            res: dict[str, Any] = {"status": status}
            if item["op"] == "read" and status == 0:
                raw = b"".join(bytes(self._page(i * SEGS + p))
                               for p in range((item["count"] + 7) // 8))
                res["stamps"] = [sector_stamp(raw[k * SECTOR_SIZE:(k + 1) * SECTOR_SIZE],
                                              item["sector"] + k)
                                 for k in range(item["count"])]
            out.append(res)
        return out

    def run(
        self,
        *,
        qd: int = 1,
        bs: int = 4096,
        max_segs: int = 0,
        read_pct: int = 100,
        random: bool = False,
        start: int = 0,
        span: int = 0,
        ios: int = 0,
        duration: float = 0.0,
        seed: int = 1,
        verify: bool = False,
        stamp: int = 0,
        timeout: float = 10.0,
        poll_us: int = 0,
    ) -> dict[str, Any]:
        """A workload of ``qd`` blocks of ``bs`` bytes in flight; returns counts (``ios``:
        blocks), elapsed time, IOPS and latency percentiles.

        ``max_segs``: split each block into requests of this many pages (0: the
        ``max_segs`` the ring was opened with, at most that), INDIRECT beyond 11, as
        Linux blkfront does at the back-end's offer. ``poll_us``: spin for responses this long
        before sleeping on the event channel.
        """
        p = ffi.new("struct gd_params *")
        p.qd, p.bs_sectors, p.read_pct, p.random = qd, bs // SECTOR_SIZE, read_pct, int(random)
        p.max_segs = max_segs
        p.start, p.span, p.max_ios = start, span, ios
        p.duration_ns = int(duration * 1e9)
        p.seed, p.verify, p.stamp = seed, int(verify), stamp
        p.timeout_ms = int(timeout * 1000)
        p.poll_us = poll_us
        res = ffi.new("struct gd_result *")
        rc = lib.gd_run(self._g, p, res)
        if rc < 0 and rc != -ETIMEDOUT:  # a timeout still reports what was lost
            _check(rc, "run")
        fields = ("ios", "requests", "indirect", "bad_ops", "reads", "writes", "bytes",
                  "errors", "duplicates", "mismatches", "lost", "kicks_out", "kicks_in",
                  "elapsed_ns", "p50_ns", "p99_ns", "max_ns")
        out: dict[str, Any] = {k: int(getattr(res, k)) for k in fields}
        secs = out["elapsed_ns"] / 1e9
        out["iops"] = out["ios"] / secs if secs else 0.0
        out["timed_out"] = rc == -ETIMEDOUT
        if out["timed_out"]:
            out["stall"] = self.stall()
        return out

    def stall(self) -> str:
        """Where a stalled ring stands: who owes whom a response or a kick."""
        i = ffi.new("uint32_t[6]")
        lib.gd_ring_indices(self._g, i)
        pvt, req_prod, req_event, rsp_prod, rsp_event, rsp_cons = (int(x) for x in i)
        return (f"ring: req_prod {req_prod} (private {pvt}) req_event {req_event}, "
                f"rsp_prod {rsp_prod} rsp_event {rsp_event} rsp_cons {rsp_cons}")

    def hostile(self, *, requests: int, disk_sectors: int, seed: int = 1,
                scribble_pct: int = 10, stale_per_mille: int = 15,
                timeout: float = 30.0) -> dict[str, Any]:
        """Misbehave at random (see ``gd_hostile``): ``requests`` hostile requests, each
        of which must be answered once; returns the counts."""
        h = ffi.new("struct gd_hostile *")
        h.seed, h.requests, h.disk_sectors = seed, requests, disk_sectors
        h.scribble_pct, h.stale_per_mille = scribble_pct, stale_per_mille
        h.timeout_ms = int(timeout * 1000)
        res = ffi.new("struct gd_hostile_result *")
        rc = lib.gd_hostile(self._g, h, res)
        if rc < 0 and rc != -ETIMEDOUT:  # a timeout still reports what was lost
            _check(rc, "hostile")
        fields = ("requests", "responses", "okay", "errors", "eopnotsupp", "bad_status",
                  "bad_ids", "lost", "extra", "scribbles", "stale")
        return {k: int(getattr(res, k)) for k in fields}

    def overflow(self, extra: int = 0) -> None:
        """Misbehave: publish req_prod more than a ring ahead of the responses."""
        lib.gd_overflow(self._g, extra)

    def revoke(self, page: int) -> int:
        """Misbehave: end access to data page ``page``'s grant (a revoked persistent
        grant); 0, or -errno (-EBUSY: the back-end maps it, Xen refuses)."""
        return int(lib.gd_revoke(self._g, page))

    def revoke_indirect(self, slot: int, page: int) -> int:
        """Misbehave: end access to indirect page ``page`` of request slot ``slot`` (as
        ``revoke``; -EINVAL when the slot has no such page)."""
        return int(lib.gd_revoke_indirect(self._g, slot, page))

    def close(self) -> None:
        if self._g is not None:
            lib.gd_close(self._g)
            self._g = None
