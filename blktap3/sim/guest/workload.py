"""The guest's workloads and their typed figures: what a guest does on its connected rings.

`run_workload(rings, workload, sectors, readonly, options)` runs the phases of one of
`WORKLOADS` on the device's rings (the C driver's `GuestRing`, one per queue) and returns
a `PhaseFigures` per phase; `check_phases` says why they failed, `IoTotals.of` sums them.
The figures travel from the guest process to its parent as JSON (`as_json` /
`from_json`, with the keys the guest's `--json` lines have always had, and `queues`).

Multi-queue, as Linux blkfront's blk-mq: each queue is fed by its own CPU, here a thread
per ring, all at once; the queue depth is shared out among them and each works on its
own slice of the region (so that verified writes of two queues never overlap). A phase's
figures are the queues' summed (latencies: the slowest queue's) with each queue's own
request count in `queues`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from blktap3.abi import SECTOR_SIZE

WORKLOADS = ("verify", "randrw", "read", "none")
MiB = 1 << 20


class WorkloadError(Exception):
    """The workload cannot run on this disk (too small, or read-only for a writer)."""


class WorkloadRing(Protocol):
    """What a workload needs of a ring: `GuestRing.run` (figures as the C driver counts)."""

    def run(self, *, qd: int = ..., bs: int = ..., read_pct: int = ..., random: bool = ...,
            start: int = ..., span: int = ..., ios: int = ..., duration: float = ...,
            seed: int = ..., verify: bool = ..., stamp: int = ...,
            timeout: float = ...) -> dict[str, Any]: ...


@dataclass(frozen=True)
class IoOptions:
    qd: int = 16
    bs: int = 4096
    seconds: float = 1.0
    span_mib: float = 8.0
    timeout: float = 10.0


# What the C driver counts for one run, in the order the JSON has them.
_RING_COUNTS = ("ios", "reads", "writes", "bytes", "errors", "duplicates", "mismatches", "lost",
                "kicks_out", "kicks_in", "elapsed_ns", "p50_ns", "p99_ns", "max_ns")
_FAILURES = ("errors", "lost", "duplicates", "mismatches")


@dataclass(frozen=True)
class PhaseFigures:
    """One phase of a workload: the ring's counts, rates and latencies."""

    phase: str
    ios: int
    reads: int
    writes: int
    bytes: int
    errors: int
    duplicates: int
    mismatches: int
    lost: int
    kicks_out: int
    kicks_in: int
    elapsed_ns: int
    p50_ns: int
    p99_ns: int
    max_ns: int
    iops: float
    mbps: float
    timed_out: bool
    queues: tuple[int, ...] = ()  # ring requests each queue sent, queue 0 first
    indirect: int = 0  # of all those requests, the BLKIF_OP_INDIRECT ones
    stall: str = ""  # where a timed-out ring stood (GuestRing.stall), queue by queue

    @classmethod
    def from_ring(cls, phase: str, figures: Mapping[str, Any]) -> PhaseFigures:
        counts = {k: int(figures[k]) for k in _RING_COUNTS}
        secs = counts["elapsed_ns"] / 1e9
        return cls(phase=phase, **counts, iops=float(figures["iops"]),
                   mbps=counts["bytes"] / secs / 1e6 if secs else 0.0,
                   timed_out=bool(figures["timed_out"]),
                   queues=(int(figures.get("requests", counts["ios"])),),
                   indirect=int(figures.get("indirect", 0)),
                   stall=str(figures.get("stall", "")))

    @classmethod
    def from_rings(cls, phase: str, each: Sequence[Mapping[str, Any]]) -> PhaseFigures:
        """One phase run on several queues at once: counts summed, the time and the
        latencies the slowest queue's, each queue's requests kept."""
        parts = [cls.from_ring(phase, figures) for figures in each]
        if len(parts) == 1:
            return parts[0]
        slowest = ("elapsed_ns", "p50_ns", "p99_ns", "max_ns")
        counts = {k: (max if k in slowest else sum)(getattr(p, k) for p in parts)
                  for k in _RING_COUNTS}
        secs = counts["elapsed_ns"] / 1e9
        return cls(phase=phase, **counts, iops=counts["ios"] / secs if secs else 0.0,
                   mbps=counts["bytes"] / secs / 1e6 if secs else 0.0,
                   timed_out=any(p.timed_out for p in parts),
                   queues=tuple(q for p in parts for q in p.queues),
                   indirect=sum(p.indirect for p in parts),
                   stall="; ".join(f"queue {i} {p.stall}" for i, p in enumerate(parts)
                                   if p.stall))

    def failure(self) -> str | None:
        """Why this phase failed (errors, lost, ... or a timeout), or None."""
        bad = {k: getattr(self, k) for k in _FAILURES if getattr(self, k)}
        if not bad and not self.timed_out:
            return None
        why = ", ".join(f"{v} {k}" for k, v in bad.items()) or "timed out"
        return f"{why} ({self.stall})" if self.stall else why

    def as_json(self) -> dict[str, Any]:
        out = {**{k: getattr(self, k) for k in _RING_COUNTS}, "iops": self.iops,
               "timed_out": self.timed_out, "phase": self.phase, "mbps": self.mbps,
               "queues": list(self.queues), "indirect": self.indirect}
        return {**out, "stall": self.stall} if self.stall else out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PhaseFigures:
        return cls(phase=str(d["phase"]), **{k: int(d[k]) for k in _RING_COUNTS},
                   iops=float(d["iops"]), mbps=float(d["mbps"]), timed_out=bool(d["timed_out"]),
                   queues=tuple(int(q) for q in d.get("queues", ())),
                   indirect=int(d.get("indirect", 0)), stall=str(d.get("stall", "")))


@dataclass(frozen=True)
class IoTotals:
    """Every phase of a guest's life added up, with the overall rates."""

    ios: int = 0
    reads: int = 0
    writes: int = 0
    bytes: int = 0
    errors: int = 0
    mismatches: int = 0
    lost: int = 0
    elapsed_ns: int = 0
    iops: float = 0.0
    mbps: float = 0.0

    @classmethod
    def of(cls, phases: Sequence[PhaseFigures]) -> IoTotals:
        def total(key: str) -> int:
            return sum(int(getattr(p, key)) for p in phases)

        elapsed = total("elapsed_ns")
        secs = elapsed / 1e9
        return cls(ios=total("ios"), reads=total("reads"), writes=total("writes"),
                   bytes=total("bytes"), errors=total("errors"),
                   mismatches=total("mismatches"), lost=total("lost"), elapsed_ns=elapsed,
                   iops=round(total("ios") / secs, 1) if secs else 0.0,
                   mbps=round(total("bytes") / secs / 1e6, 2) if secs else 0.0)

    def as_json(self) -> dict[str, Any]:
        return {"ios": self.ios, "reads": self.reads, "writes": self.writes,
                "bytes": self.bytes, "errors": self.errors, "mismatches": self.mismatches,
                "lost": self.lost, "elapsed_ns": self.elapsed_ns, "iops": self.iops,
                "mbps": self.mbps}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> IoTotals:
        ints = ("ios", "reads", "writes", "bytes", "errors", "mismatches", "lost", "elapsed_ns")
        return cls(**{k: int(d[k]) for k in ints}, iops=float(d["iops"]),
                   mbps=float(d["mbps"]))


@dataclass(frozen=True)
class CycleFigures:
    """One connect-workload-detach cycle: the disk size it saw and its phases."""

    sectors: int
    phases: tuple[PhaseFigures, ...]

    def as_json(self) -> dict[str, Any]:
        return {"sectors": self.sectors, "phases": [p.as_json() for p in self.phases]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CycleFigures:
        return cls(int(d["sectors"]), tuple(PhaseFigures.from_json(p) for p in d["phases"]))


PhaseDone = Callable[[PhaseFigures], None]


def run_workload(rings: Sequence[WorkloadRing], workload: str, sectors: int, readonly: bool,
                 opts: IoOptions, on_phase: PhaseDone = lambda _: None) -> list[PhaseFigures]:
    """Run one workload on a device's connected rings (one per queue, queue 0 first); its
    phases' figures, in order.

    Written data carries (sector, stamp) in every 16 bytes with a stamp fresh for this
    run, so a read can only verify what this run wrote, never an older image's content.
    """
    if not rings:
        raise ValueError("run_workload needs a ring")
    nq = len(rings)

    def _phase(name: str, *, read_pct: int, ios: int = 0, duration: float = 0.0,
               random: bool = False, verify: bool = False, stamp: int = 0,
               seed: int = 1) -> PhaseFigures:
        def queue(q: int) -> dict[str, Any]:
            return rings[q].run(
                qd=max(1, opts.qd // nq), bs=opts.bs, start=q * span, span=span,
                timeout=opts.timeout, read_pct=read_pct, ios=ios, duration=duration,
                random=random, verify=verify, stamp=stamp, seed=seed + q)

        if nq == 1:
            each = [queue(0)]
        else:  # each queue from its own "CPU", all at once
            with ThreadPoolExecutor(nq, thread_name_prefix="queue") as cpus:
                each = list(cpus.map(queue, range(nq)))
        figures = PhaseFigures.from_rings(name, each)
        on_phase(figures)
        return figures

    if workload == "none":
        return []
    bs_sectors = opts.bs // SECTOR_SIZE
    region = min(int(opts.span_mib * MiB) // SECTOR_SIZE, sectors)
    span = region // nq  # each queue's slice of the region
    span -= span % bs_sectors
    if span < bs_sectors:
        raise WorkloadError(f"disk of {sectors} sectors is smaller than one {opts.bs} B I/O "
                            f"per queue ({nq})")
    blocks = span // bs_sectors  # per queue
    if workload == "read":
        return [_phase("random read", read_pct=100, random=True, duration=opts.seconds)]
    if readonly:
        raise WorkloadError(f"workload {workload} writes, but the disk is read-only")
    stamp = int.from_bytes(os.urandom(8), "little") or 1
    steps: list[Callable[[], PhaseFigures]] = [
        lambda: _phase("write", read_pct=0, ios=blocks, verify=True, stamp=stamp)]
    if workload == "randrw":
        steps.append(lambda: _phase("random read/write", read_pct=50, random=True,
                                    duration=opts.seconds, seed=stamp, verify=True,
                                    stamp=stamp))
    steps.append(lambda: _phase("read back", read_pct=100, ios=blocks, verify=True,
                                stamp=stamp))
    phases: list[PhaseFigures] = []
    for step in steps:
        phases.append(step())
        if phases[-1].timed_out:
            # Its requests are still on the ring: a next phase could not start (EBUSY),
            # and the timeout is the failure to report.
            break
    return phases


def check_phases(phases: Sequence[PhaseFigures]) -> str | None:
    """Why the I/O failed, or None when every request succeeded and every byte matched."""
    for p in phases:
        failure = p.failure()
        if failure is not None:
            return f"{p.phase}: {failure}"
    return None
