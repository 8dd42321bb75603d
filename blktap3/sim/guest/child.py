"""The guest process itself: a simulated guest domain's life, from its command line.

    python -m blktap3.sim.guest --run-dir D --domid N --devid M [--personality linux]
        [--workload verify|randrw|read|none] [--json] [--hold] [--cycles K]

runs with the xensim environment of domain N (`xensim.process_env(D, N)`: LD_PRELOAD,
XENSIM_DIR, XENSIM_DOMID), so that for xenstored and tapdisk it IS that domain: it talks
XenStore through the domain's xenstore ring page, and its C ring driver
(`blktap3.sim.guestdrv`) grants the ring and data pages and binds the event channel.

It exits 0 only when the handshake completed and every byte it wrote read back
identically (no I/O error, no lost request, no mismatch). It prints the back-end's
`sectors`, the I/O figures (IOPS, MB/s) and the handshake timeline; `--json` prints each
timeline step as a JSON line as it happens and then one `{"result": ...}` line.

Detach: after the workload the guest closes the device (Closing, then Closed once the
back-end closes); with `--hold` it stays connected until SIGTERM/SIGINT (then detaches)
or until the back-end closes it (Closed). `--cycles K` reconnects K-1 times (Closed ->
Initialising), as a resumed or migrated guest does.

In code: `parse_options(argv)` gives a checked `GuestOptions`; `run(options, emit, stop)`
is the guest's life for them (handshake, workload, hold, detach per cycle) and returns
the `GuestRun` whose `report()` is printed; `main(argv)` is both, with signals and output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from blktap3.abi import SECTOR_SIZE, BlkifProtocol
from blktap3.fsm import FrontendState, OfferRing
from blktap3.xenbus import BoundPort, XenStore, XenStoreError

from .. import xenlib, xensim
from ..frontend import (
    Blkfront,
    FrontendFailure,
    RingFactory,
    Step,
    Timeline,
    is_readonly,
    load_personality,
    personality_names,
)
from .report import EXIT_FAILED, EXIT_OK, EXIT_USAGE, GuestReport, format_report, format_step
from .workload import (
    WORKLOADS,
    CycleFigures,
    IoOptions,
    IoTotals,
    PhaseFigures,
    WorkloadError,
    check_phases,
    run_workload,
)

if TYPE_CHECKING:
    from ..guestdrv import GuestRing

MAX_BS = 1 << 20  # a block: split into requests of the segments negotiated, as Linux's
# block layer splits a bio at blkfront's max_hw_sectors


@dataclass(frozen=True)
class GuestOptions:
    """What one guest process is asked to do (its command line, parsed)."""

    run_dir: str
    domid: int
    devid: int
    personality: str = "linux"
    workload: str = "verify"
    qd: int = 16  # queue depth
    bs: int = 4096  # bytes per request
    seconds: float = 1.0  # timed phases (randrw, read)
    span_mib: float = 8.0  # region of the disk the workload covers, from sector 0
    cycles: int = 1  # connect/detach this many times
    hold: bool = False  # stay connected after the workload until SIGTERM or Closing
    timeout: float = 30.0  # seconds per wait
    json: bool = False  # JSON lines on stdout

    def usage_error(self) -> str | None:
        """Why these options cannot run (the message `main` prints), or None."""
        if not (1 <= self.qd <= 256 and self.bs % SECTOR_SIZE == 0 and 0 < self.bs <= MAX_BS
                and self.cycles >= 1):
            return "guest: --qd 1..256, --bs a multiple of 512 up to 1048576, --cycles >= 1"
        return None

    def io(self) -> IoOptions:
        return IoOptions(qd=self.qd, bs=self.bs, seconds=self.seconds,
                         span_mib=self.span_mib, timeout=self.timeout)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m blktap3.sim.guest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="the simulated host's run directory")
    ap.add_argument("--domid", type=int, required=True)
    ap.add_argument("--devid", type=int, required=True, help="virtual-device number")
    ap.add_argument("--personality", default="linux", choices=personality_names())
    ap.add_argument("--workload", default="verify", choices=WORKLOADS)
    ap.add_argument("--qd", type=int, default=16, help="queue depth")
    ap.add_argument("--bs", type=int, default=4096,
                    help="bytes per block (512..1048576), in requests of the segments "
                         "negotiated (11, or the indirect segments)")
    ap.add_argument("--seconds", type=float, default=1.0, help="timed phases (randrw, read)")
    ap.add_argument("--span-mib", type=float, default=8.0,
                    help="region of the disk the workload covers (from sector 0)")
    ap.add_argument("--cycles", type=int, default=1, help="connect/detach this many times")
    ap.add_argument("--hold", action="store_true",
                    help="stay connected after the workload until SIGTERM or back-end Closing")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per wait")
    ap.add_argument("--json", action="store_true", help="JSON lines on stdout")
    return ap


def parse_options(argv: Sequence[str] | None = None) -> GuestOptions:
    """The options of a command line (argparse exits 2 on a malformed one)."""
    a = parser().parse_args(argv)
    return GuestOptions(run_dir=a.run_dir, domid=a.domid, devid=a.devid,
                        personality=a.personality, workload=a.workload, qd=a.qd, bs=a.bs,
                        seconds=a.seconds, span_mib=a.span_mib, cycles=a.cycles, hold=a.hold,
                        timeout=a.timeout, json=a.json)


# -- the guest's XenStore connection and ring ------------------------------------------------


def ring_xenstore(run_dir: str | os.PathLike[str], domid: int,
                  timeout: float) -> Callable[[], XenStore]:
    """A maker of the domain's XenStore connection over its xenstore ring page.

    The port is claimed once (in real Xen the guest kernel owns it from boot); every call
    makes a fresh connection on the same page and port (after a loss).
    """
    info = xensim.Machine(run_dir).domain(domid)
    page = xenlib.map_xenstore_page(run_dir, domid)
    evtchn = xenlib.EventChannel(run_dir, domid)
    try:
        evtchn.claim(info.xenstore_port)
    except OSError as e:
        # The domain's xenstore port is bound to one live process at a time (as one
        # guest kernel owns it); it is free again once that process is gone.
        evtchn.close()
        raise FrontendFailure(
            f"cannot claim domain {domid}'s xenstore port {info.xenstore_port} ({e.strerror}): "
            "another guest process of this domain is running"
        ) from None
    port = BoundPort(evtchn, info.xenstore_port, evtchn.fd)

    def connect() -> XenStore:
        return XenStore.over_ring(memoryview(page), port, timeout=timeout,
                                  name=f"dom{domid}-xenstore")

    return connect


def _guest_ring_factory(backend: int, qd: int, bs: int) -> RingFactory[GuestRing]:
    from ..guestdrv import PAGE, SEGS, GuestRing  # the C driver loads only in the guest process

    def make(offer: OfferRing, protocol: BlkifProtocol) -> GuestRing:
        # The queue depth is shared out among the queues (`run_workload`); a block of
        # more than 11 pages gets pages of its own, and travels in requests of the
        # indirect segments negotiated (each ring slot with its indirect pages).
        # Blocks that fit a direct request need no indirect pages: none are granted.
        pages = -(-bs // PAGE)
        return GuestRing(backend, order=offer.order, protocol=protocol,
                         data_slots=max(1, qd // offer.queues),
                         slot_pages=pages if pages > SEGS else 0,
                         max_segs=offer.indirect_segments if pages > SEGS else 0)

    return make


def _read_backend_id(connect_xs: Callable[[], XenStore], domid: int, devid: int) -> int:
    # The data pages are granted to the back-end domain: learn it before the handshake.
    xs = connect_xs()
    try:
        raw = xs.read_optional(f"/local/domain/{domid}/device/vbd/{devid}/backend-id")
    finally:
        xs.close()
    if raw is None or not raw.isdigit():
        raise FrontendFailure(f"domain {domid} has no device {devid} (backend-id {raw!r})")
    return int(raw)


# -- the guest's life -------------------------------------------------------------------------


@dataclass
class GuestRun:
    """Everything one guest process did, turned into its report."""

    options: GuestOptions
    timeline: Timeline
    blkfront: Blkfront[Any] | None = None
    cycles: list[CycleFigures] = field(default_factory=list)
    error: str | None = None
    stopped: bool = False

    def report(self) -> GuestReport:
        bf, o = self.blkfront, self.options
        phases = [p for c in self.cycles for p in c.phases]
        return GuestReport(
            ok=self.error is None, error=self.error, domid=o.domid, devid=o.devid,
            personality=o.personality, workload=o.workload,
            backend=bf.backend if bf is not None else None,
            disk=bf.disk if bf is not None else None,
            features=bf.features if bf is not None else {},
            handshakes=tuple(h.figures() for h in bf.handshakes) if bf is not None else (),
            resizes=tuple(bf.resizes) if bf is not None else (),
            backend_error=bf.backend_error if bf is not None else None,
            cycles=tuple(self.cycles), io=IoTotals.of(phases),
            final_state=bf.state if bf is not None else None,
            timeline=tuple(self.timeline.steps),
        )


def run(options: GuestOptions, emit: Callable[[Step], None], stop: threading.Event) -> GuestRun:
    """The guest's life: handshake, workload, hold, detach, for each cycle."""
    personality = load_personality(options.personality)
    timeline = Timeline(on_step=emit)
    result = GuestRun(options, timeline)
    io = options.io()
    bf: Blkfront[GuestRing] | None = None
    try:
        connect_xs = ring_xenstore(options.run_dir, options.domid,
                                   timeout=min(options.timeout, 10.0))
        backend = _read_backend_id(connect_xs, options.domid, options.devid)
        bf = Blkfront(connect_xs, options.domid, options.devid, personality,
                      _guest_ring_factory(backend, options.qd, options.bs), timeline=timeline,
                      should_stop=stop.is_set)
        result.blkfront = bf
        for cycle in range(options.cycles):
            if cycle:
                bf.reconnect()
            disk = bf.connect(options.timeout)

            def phase_done(p: PhaseFigures) -> None:
                queues = (f", requests per queue {'/'.join(map(str, p.queues))}"
                          if len(p.queues) > 1 else "")
                timeline.add("fe", f"I/O {p.phase}: {p.ios} x {io.bs} B, "
                                   f"{p.iops:.0f} IOPS, {p.mbps:.1f} MB/s{queues}")

            assert bf.rings  # Connected: the rings are up, one per queue
            phases = run_workload(bf.rings, options.workload, disk.sectors, is_readonly(disk),
                                  io, phase_done)
            result.cycles.append(CycleFigures(disk.sectors, tuple(phases)))
            failure = check_phases(phases)
            if failure is not None:
                raise FrontendFailure(f"I/O failed: {failure}")
            if options.hold and cycle == options.cycles - 1:
                timeline.add("fe", "holding the device (SIGTERM detaches)")
                bf.wait(float("inf"),
                        until=lambda: bf is not None and bf.state == FrontendState.CLOSED)
            if bf.state == FrontendState.CLOSED:
                timeline.add("fe", "closed by the back-end")
                bf.release_ring(options.timeout)
                break
            bf.detach(options.timeout)
            timeline.add("fe", "detached")
    except (FrontendFailure, WorkloadError, XenStoreError, OSError) as e:
        result.error = str(e)
        timeline.add("fe", f"FAILED: {e}")
        # A guest that got no further than Initialising just leaves: no back-end answers.
        if bf is not None and bf.state not in (FrontendState.CLOSED,
                                               FrontendState.INITIALISING):
            with contextlib.suppress(FrontendFailure, XenStoreError, OSError):
                bf.detach(min(options.timeout, 5.0))
    finally:
        if bf is not None:
            with contextlib.suppress(XenStoreError, OSError):
                bf.close()
    result.stopped = stop.is_set()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    why = options.usage_error()
    if why is not None:
        print(why, file=sys.stderr)
        return EXIT_USAGE
    # Logs go to stderr: stdout carries the timeline and the result.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        # is_set() reads a flag without the Event's lock: signals after the first return
        # at once (a burst of them, each interrupting the last one's set(), once nested
        # the handler to a RecursionError under load).
        if not stop.is_set():
            stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def emit(step: Step) -> None:
        if options.json:
            print(json.dumps({"step": step.as_dict()}), flush=True)
        else:
            print(format_step(step), flush=True)

    report = run(options, emit, stop).report()
    if options.json:
        print(json.dumps({"result": report.as_json()}), flush=True)
    else:
        print(format_report(report), flush=True)
    return EXIT_OK if report.ok else EXIT_FAILED
