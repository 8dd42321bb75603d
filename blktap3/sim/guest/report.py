"""What a guest process hands its parent: the typed report, its JSON, its exit codes, its text.

The guest process builds a `GuestReport` and prints it either as one `{"result": ...}`
JSON line (after a `{"step": ...}` line per timeline step, `--json`) or as the summary
`format_report` writes; the parent reads the JSON back with `GuestReport.from_json`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from blktap3.abi import SECTOR_SIZE
from blktap3.fsm import DiskInfo

from ..frontend import HandshakeFigures, Step
from .workload import CycleFigures, IoTotals, MiB

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class GuestReport:
    """Everything one guest process did; `ok` when the handshake completed and every
    byte it wrote read back identically. Fields a guest never reached are None/empty."""

    ok: bool
    error: str | None = None
    domid: int | None = None
    devid: int | None = None
    personality: str | None = None
    workload: str | None = None
    backend: str | None = None  # the back-end directory
    disk: DiskInfo | None = None  # as last announced by the back-end
    features: Mapping[str, str] = field(default_factory=dict)
    handshakes: tuple[HandshakeFigures, ...] = ()
    resizes: tuple[tuple[int, int], ...] = ()  # (old sectors, new sectors)
    backend_error: str | None = None  # the back-end's `error` node, if it closed us
    cycles: tuple[CycleFigures, ...] = ()
    io: IoTotals = field(default_factory=IoTotals)
    final_state: str | None = None  # the front-end machine's
    timeline: tuple[Step, ...] = ()

    @classmethod
    def failed(cls, error: str, timeline: Sequence[Step] = ()) -> GuestReport:
        """What the parent knows of a guest that gave no report (killed, crashed)."""
        return cls(ok=False, error=error, timeline=tuple(timeline))

    def as_json(self) -> dict[str, Any]:
        disk = self.disk
        return {
            "ok": self.ok,
            "error": self.error,
            "domid": self.domid,
            "devid": self.devid,
            "personality": self.personality,
            "workload": self.workload,
            "backend": self.backend,
            "disk": None if disk is None else {
                "sectors": disk.sectors, "sector_size": disk.sector_size, "info": disk.info,
                "physical_sector_size": disk.physical_sector_size},
            "features": dict(self.features),
            "handshakes": [h.as_dict() for h in self.handshakes],
            "resizes": [list(r) for r in self.resizes],
            "backend_error": self.backend_error,
            "cycles": [c.as_json() for c in self.cycles],
            "io": self.io.as_json(),
            "final_state": self.final_state,
            "timeline": [s.as_dict() for s in self.timeline],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GuestReport:
        disk = d["disk"]
        return cls(
            ok=bool(d["ok"]), error=d["error"], domid=d["domid"], devid=d["devid"],
            personality=d["personality"], workload=d["workload"], backend=d["backend"],
            disk=None if disk is None else DiskInfo(
                sectors=int(disk["sectors"]), sector_size=int(disk["sector_size"]),
                info=int(disk["info"]),
                physical_sector_size=int(disk["physical_sector_size"])),
            features={str(k): str(v) for k, v in d["features"].items()},
            handshakes=tuple(HandshakeFigures.from_dict(h) for h in d["handshakes"]),
            resizes=tuple((int(a), int(b)) for a, b in d["resizes"]),
            backend_error=d["backend_error"],
            cycles=tuple(CycleFigures.from_json(c) for c in d["cycles"]),
            io=IoTotals.from_json(d["io"]),
            final_state=d["final_state"],
            timeline=tuple(Step.from_dict(s) for s in d["timeline"]),
        )


def format_step(step: Step) -> str:
    return f"  {round(step.t_ms, 3):9.1f} ms  {step.who}  {step.what}"


def format_report(report: GuestReport) -> str:
    """The human summary of a guest's report (also `GuestResult.summary()`)."""
    lines = [f"guest {report.domid} device {report.devid} ({report.personality}, "
             f"workload {report.workload}), back-end {report.backend}"]
    disk = report.disk
    if disk:
        size = disk.sectors * SECTOR_SIZE / MiB
        lines.append(f"  sectors {disk.sectors} ({size:.1f} MiB), sector-size "
                     f"{disk.sector_size}, info {disk.info}")
    if report.features:
        lines.append("  features " + " ".join(f"{k}={v}" for k, v in report.features.items()))
    for i, hs in enumerate(report.handshakes):
        a, b = hs.initialising_to_connected_ms, hs.initialised_to_backend_connected_ms
        lines.append(f"  handshake {i + 1}: Initialising -> both Connected "
                     f"{_ms(a)}, Initialised -> back-end Connected {_ms(b)}")
    for cycle in report.cycles:
        for p in cycle.phases:
            lines.append(f"  {p.phase:<18} {p.ios:7d} I/Os {p.iops:9.0f} IOPS "
                         f"{p.mbps:8.1f} MB/s  p50 {p.p50_ns / 1e3:.0f} us "
                         f"p99 {p.p99_ns / 1e3:.0f} us  errors {p.errors} "
                         f"mismatches {p.mismatches} lost {p.lost}")
            if p.indirect:
                lines.append(f"  {'':<18} {p.indirect} of its requests INDIRECT")
            if len(p.queues) > 1:
                lines.append(f"  {'':<18} requests per queue "
                             f"{' '.join(f'{q}' for q in p.queues)}")
    io = report.io
    if io.ios:
        lines.append(f"  total {io.ios} I/Os, {io.bytes / MiB:.1f} MiB: "
                     f"{io.iops:.0f} IOPS, {io.mbps:.1f} MB/s")
    if report.ok:
        verdict = ("every byte written read back identically" if io.writes
                   else "handshake completed")
        lines.append(f"  OK: {verdict}")
    else:
        lines.append(f"  FAILED: {report.error}")
    if report.backend_error:
        lines.append(f"  back-end error node: {report.backend_error}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"
