"""A simulated guest domain as a process: blkfront handshake, verified I/O, detach.

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

For the CLI and tests: `run_guest(host, domid, devid, personality, workload, timeout)`
runs that process to the end and returns a `GuestResult`; `start_guest(...)` returns a
running `GuestProcess` (wait for a timeline step, detach it, collect its result).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from blktap3.abi import SECTOR_SIZE, BlkifProtocol
from blktap3.fsm import FrontendState
from blktap3.xenbus import BoundPort, XenStore, XenStoreError

from . import xenlib, xensim
from .frontend import (
    Blkfront,
    FrontendFailure,
    Personality,
    Ring,
    RingFactory,
    Step,
    Timeline,
    is_readonly,
    load_personality,
    personality_names,
)

if TYPE_CHECKING:
    from .host import Host

WORKLOADS = ("verify", "randrw", "read", "none")
MiB = 1 << 20
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# -- the workloads --------------------------------------------------------------------------


@dataclass(frozen=True)
class IoOptions:
    qd: int = 16
    bs: int = 4096
    seconds: float = 1.0
    span_mib: float = 8.0
    timeout: float = 10.0


PhaseDone = Callable[[dict[str, Any]], None]


def run_workload(ring: Any, workload: str, sectors: int, readonly: bool,
                 opts: IoOptions, on_phase: PhaseDone = lambda _: None) -> list[dict[str, Any]]:
    """Run one workload on a connected ring; its phases' figures, in order.

    Written data carries (sector, stamp) in every 16 bytes with a stamp fresh for this
    run, so a read can only verify what this run wrote, never an older image's content.
    """
    def _phase(ring: Any, name: str, **params: Any) -> dict[str, Any]:
        figures: dict[str, Any] = ring.run(**params)
        figures["phase"] = name
        secs = figures["elapsed_ns"] / 1e9
        figures["mbps"] = figures["bytes"] / secs / 1e6 if secs else 0.0
        on_phase(figures)
        return figures

    if workload == "none":
        return []
    bs_sectors = opts.bs // SECTOR_SIZE
    span = min(int(opts.span_mib * MiB) // SECTOR_SIZE, sectors)
    span -= span % bs_sectors
    if span < bs_sectors:
        raise FrontendFailure(f"disk of {sectors} sectors is smaller than one {opts.bs} B I/O")
    blocks = span // bs_sectors
    common = {"qd": opts.qd, "bs": opts.bs, "start": 0, "span": span,
              "timeout": opts.timeout}
    if workload == "read":
        return [_phase(ring, "random read", read_pct=100, random=True,
                       duration=opts.seconds, **common)]
    if readonly:
        raise FrontendFailure(f"workload {workload} writes, but the disk is read-only")
    stamp = int.from_bytes(os.urandom(8), "little") or 1
    verified = {**common, "verify": True, "stamp": stamp}
    phases = [_phase(ring, "write", read_pct=0, ios=blocks, **verified)]
    if workload == "randrw":
        phases.append(_phase(ring, "random read/write", read_pct=50, random=True,
                             duration=opts.seconds, seed=stamp, **verified))
    phases.append(_phase(ring, "read back", read_pct=100, ios=blocks, **verified))
    return phases


def check_phases(phases: Sequence[dict[str, Any]]) -> str | None:
    """Why the I/O failed, or None when every request succeeded and every byte matched."""
    for p in phases:
        bad = {k: p[k] for k in ("errors", "lost", "duplicates", "mismatches") if p[k]}
        if bad or p["timed_out"]:
            what = ", ".join(f"{v} {k}" for k, v in bad.items()) or "timed out"
            return f"{p['phase']}: {what}"
    return None


def io_totals(phases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {k: sum(p[k] for p in phases)
                             for k in ("ios", "reads", "writes", "bytes", "errors", "mismatches",
                                       "lost", "elapsed_ns")}
    secs = total["elapsed_ns"] / 1e9
    total["iops"] = round(total["ios"] / secs, 1) if secs else 0.0
    total["mbps"] = round(total["bytes"] / secs / 1e6, 2) if secs else 0.0
    return total


# -- the guest's XenStore connection --------------------------------------------------------


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


# -- the guest process ----------------------------------------------------------------------


@dataclass
class GuestRun:
    """Everything one guest process did, turned into its report."""

    domid: int
    devid: int
    personality: str
    workload: str
    timeline: Timeline
    blkfront: Blkfront | None = None
    cycles: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    stopped: bool = False

    def report(self) -> dict[str, Any]:
        bf = self.blkfront
        disk = bf.disk if bf is not None else None
        phases = [p for c in self.cycles for p in c["phases"]]
        return {
            "ok": self.error is None,
            "error": self.error,
            "domid": self.domid,
            "devid": self.devid,
            "personality": self.personality,
            "workload": self.workload,
            "backend": bf.backend if bf is not None else None,
            "disk": None if disk is None else {
                "sectors": disk.sectors, "sector_size": disk.sector_size, "info": disk.info,
                "physical_sector_size": disk.physical_sector_size},
            "features": bf.features if bf is not None else {},
            "handshakes": ([h.figures().as_dict() for h in bf.handshakes] if bf is not None
                           else []),
            "resizes": bf.resizes if bf is not None else [],
            "backend_error": bf.backend_error if bf is not None else None,
            "cycles": self.cycles,
            "io": io_totals(phases),
            "final_state": bf.state if bf is not None else None,
            "timeline": [s.as_dict() for s in self.timeline.steps],
        }


def _guest_ring_factory(backend: int, qd: int) -> RingFactory:
    from .guestdrv import GuestRing  # the C driver loads only in the guest process

    def make(order: int, protocol: BlkifProtocol) -> Ring:
        return GuestRing(backend, order=order, protocol=protocol, data_slots=qd)

    return make


def run(args: argparse.Namespace, personality: Personality, emit: Callable[[Step], None],
        stop: threading.Event) -> GuestRun:
    """The guest's life: handshake, workload, hold, detach, for each cycle."""
    timeline = Timeline(on_step=emit)
    result = GuestRun(args.domid, args.devid, personality.name, args.workload, timeline)
    opts = IoOptions(qd=args.qd, bs=args.bs, seconds=args.seconds, span_mib=args.span_mib,
                     timeout=args.timeout)
    bf: Blkfront | None = None
    try:
        connect_xs = ring_xenstore(args.run_dir, args.domid, timeout=min(args.timeout, 10.0))
        backend = _read_backend_id(connect_xs, args.domid, args.devid)
        bf = Blkfront(connect_xs, args.domid, args.devid, personality,
                      _guest_ring_factory(backend, args.qd), timeline=timeline,
                      should_stop=stop.is_set)
        result.blkfront = bf
        for cycle in range(args.cycles):
            if cycle:
                bf.reconnect()
            disk = bf.connect(args.timeout)
            def phase_done(p: dict[str, Any]) -> None:
                timeline.add("fe", f"I/O {p['phase']}: {p['ios']} x {opts.bs} B, "
                                   f"{p['iops']:.0f} IOPS, {p['mbps']:.1f} MB/s")

            phases = run_workload(bf.ring, args.workload, disk.sectors, is_readonly(disk), opts,
                                  phase_done)
            result.cycles.append({"sectors": disk.sectors, "phases": phases})
            failure = check_phases(phases)
            if failure is not None:
                raise FrontendFailure(f"I/O failed: {failure}")
            if args.hold and cycle == args.cycles - 1:
                timeline.add("fe", "holding the device (SIGTERM detaches)")
                bf.wait(float("inf"),
                        until=lambda: bf is not None and bf.state == FrontendState.CLOSED)
            if bf.state == FrontendState.CLOSED:
                timeline.add("fe", "closed by the back-end")
                bf.release_ring(args.timeout)
                break
            bf.detach(args.timeout)
            timeline.add("fe", "detached")
    except (FrontendFailure, XenStoreError, OSError) as e:
        result.error = str(e)
        timeline.add("fe", f"FAILED: {e}")
        if bf is not None and bf.state not in (FrontendState.CLOSED,
                                               FrontendState.INITIALISING):
            with contextlib.suppress(FrontendFailure, XenStoreError, OSError):
                bf.detach(min(args.timeout, 5.0))
    finally:
        if bf is not None:
            with contextlib.suppress(XenStoreError, OSError):
                bf.close()
    result.stopped = stop.is_set()
    return result


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


# -- output ---------------------------------------------------------------------------------


def format_step(step: dict[str, Any]) -> str:
    return f"  {step['t_ms']:9.1f} ms  {step['who']}  {step['what']}"


def format_report(report: dict[str, Any]) -> str:
    """The human summary of a guest's report (also `GuestResult.summary()`)."""
    lines = [f"guest {report['domid']} device {report['devid']} ({report['personality']}, "
             f"workload {report['workload']}), back-end {report['backend']}"]
    disk = report.get("disk")
    if disk:
        size = disk["sectors"] * SECTOR_SIZE / MiB
        lines.append(f"  sectors {disk['sectors']} ({size:.1f} MiB), sector-size "
                     f"{disk['sector_size']}, info {disk['info']}")
    if report.get("features"):
        lines.append("  features " + " ".join(f"{k}={v}" for k, v in report["features"].items()))
    for i, hs in enumerate(report.get("handshakes", [])):
        a, b = hs["initialising_to_connected_ms"], hs["initialised_to_backend_connected_ms"]
        lines.append(f"  handshake {i + 1}: Initialising -> both Connected "
                     f"{_ms(a)}, Initialised -> back-end Connected {_ms(b)}")
    for cycle in report.get("cycles", []):
        for p in cycle["phases"]:
            lines.append(f"  {p['phase']:<18} {p['ios']:7d} I/Os {p['iops']:9.0f} IOPS "
                         f"{p['mbps']:8.1f} MB/s  p50 {p['p50_ns'] / 1e3:.0f} us "
                         f"p99 {p['p99_ns'] / 1e3:.0f} us  errors {p['errors']} "
                         f"mismatches {p['mismatches']} lost {p['lost']}")
    io = report.get("io")
    if io and io["ios"]:
        lines.append(f"  total {io['ios']} I/Os, {io['bytes'] / MiB:.1f} MiB: "
                     f"{io['iops']:.0f} IOPS, {io['mbps']:.1f} MB/s")
    if report["ok"]:
        verdict = ("every byte written read back identically" if io and io["writes"]
                   else "handshake completed")
        lines.append(f"  OK: {verdict}")
    else:
        lines.append(f"  FAILED: {report['error']}")
    if report.get("backend_error"):
        lines.append(f"  back-end error node: {report['backend_error']}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


# -- entry point ----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m blktap3.sim.guest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="the simulated host's run directory")
    ap.add_argument("--domid", type=int, required=True)
    ap.add_argument("--devid", type=int, required=True, help="virtual-device number")
    ap.add_argument("--personality", default="linux", choices=personality_names())
    ap.add_argument("--workload", default="verify", choices=WORKLOADS)
    ap.add_argument("--qd", type=int, default=16, help="queue depth")
    ap.add_argument("--bs", type=int, default=4096, help="bytes per request (512..45056)")
    ap.add_argument("--seconds", type=float, default=1.0, help="timed phases (randrw, read)")
    ap.add_argument("--span-mib", type=float, default=8.0,
                    help="region of the disk the workload covers (from sector 0)")
    ap.add_argument("--cycles", type=int, default=1, help="connect/detach this many times")
    ap.add_argument("--hold", action="store_true",
                    help="stay connected after the workload until SIGTERM or back-end Closing")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per wait")
    ap.add_argument("--json", action="store_true", help="JSON lines on stdout")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not (1 <= args.qd <= 256 and args.bs % SECTOR_SIZE == 0 and 0 < args.bs <= 11 * 4096
            and args.cycles >= 1):
        print("guest: --qd 1..256, --bs a multiple of 512 up to 45056, --cycles >= 1",
              file=sys.stderr)
        return EXIT_USAGE
    # Logs go to stderr: stdout carries the timeline and the result.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    personality = load_personality(args.personality)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def emit(step: Step) -> None:
        if args.json:
            print(json.dumps({"step": step.as_dict()}), flush=True)
        else:
            print(format_step(step.as_dict()), flush=True)

    report = run(args, personality, emit, stop).report()
    if args.json:
        print(json.dumps({"result": report}), flush=True)
    else:
        print(format_report(report), flush=True)
    return EXIT_OK if report["ok"] else EXIT_FAILED


# -- API for the CLI and tests: the guest as a child process ----------------------------------


@dataclass(frozen=True)
class GuestResult:
    """What a finished guest process reported (its `--json` result) and its exit code."""

    returncode: int
    report: dict[str, Any]
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == EXIT_OK and bool(self.report.get("ok"))

    @property
    def error(self) -> str | None:
        err = self.report.get("error")
        return str(err) if err is not None else None

    @property
    def sectors(self) -> int | None:
        disk = self.report.get("disk")
        return int(disk["sectors"]) if disk else None

    @property
    def iops(self) -> float:
        return float(self.report.get("io", {}).get("iops", 0.0))

    @property
    def mbps(self) -> float:
        return float(self.report.get("io", {}).get("mbps", 0.0))

    @property
    def timeline(self) -> list[dict[str, Any]]:
        return list(self.report.get("timeline", []))

    @property
    def handshakes(self) -> list[dict[str, float | None]]:
        return list(self.report.get("handshakes", []))

    def summary(self) -> str:
        text = format_report(self.report) if "domid" in self.report else str(self.error)
        if not self.ok and self.stderr.strip():
            text += "\n  stderr: " + self.stderr.strip().splitlines()[-1]
        return text

    def timeline_text(self) -> str:
        return "\n".join(format_step(s) for s in self.timeline)


def guest_command(run_dir: str | os.PathLike[str], domid: int, devid: int, personality: str,
                  workload: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "blktap3.sim.guest", "--run-dir", str(run_dir),
            "--domid", str(domid), "--devid", str(devid), "--personality", personality,
            "--workload", workload, "--json", *extra]


def guest_env(run_dir: str | os.PathLike[str], domid: int) -> dict[str, str]:
    """This process's environment plus the xensim variables that make a child `domid`."""
    return {**os.environ, **xensim.process_env(run_dir, domid)}


class GuestProcess:
    """A running guest process; its timeline steps are collected as they come."""

    def __init__(self, run_dir: str | os.PathLike[str], domid: int, devid: int,
                 personality: str = "linux", workload: str = "verify", *extra: str) -> None:
        self.domid = domid
        self.devid = devid
        self.proc = subprocess.Popen(
            guest_command(run_dir, domid, devid, personality, workload, *extra),
            env=guest_env(run_dir, domid), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.steps: list[dict[str, Any]] = []
        self._report: dict[str, Any] | None = None
        self._changed = threading.Condition()
        self._stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"guest{domid}-stdout")
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_stderr, daemon=True,
                                            name=f"guest{domid}-stderr")
        self._err_reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._changed:
                if "step" in item:
                    self.steps.append(item["step"])
                elif "result" in item:
                    self._report = item["result"]
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def wait_for_step(self, text: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first timeline step containing `text` (TimeoutError if none comes)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for step in self.steps:
                    if text in step["what"]:
                        return step
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not
                                      self._reader.is_alive()):
                    raise TimeoutError(f"guest {self.domid}: no step {text!r}; last steps: "
                                       f"{[s['what'] for s in self.steps[-5:]]}")
                self._changed.wait(min(remaining, 0.5))

    def detach(self) -> None:
        """Ask the guest to let the device go (it closes, then exits)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def result(self, timeout: float = 60.0) -> GuestResult:
        """Wait for the guest to exit (killed after `timeout`) and return its result."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
            self._reader.join(5)
            return GuestResult(code, {"ok": False, "error": f"guest still running after "
                                      f"{timeout:g} s (killed)", "timeline": self.steps},
                               "".join(self._stderr))
        self._reader.join(5)
        self._err_reader.join(5)
        report = self._report or {"ok": False, "error": f"guest exited {code} without a "
                                  "result", "timeline": self.steps}
        return GuestResult(code, report, "".join(self._stderr))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.proc.wait()


def start_guest(host: Host | str | os.PathLike[str], domid: int, devid: int,
                personality: str = "linux", workload: str = "verify", *,
                hold: bool = False, cycles: int = 1, extra: Sequence[str] = ()) -> GuestProcess:
    """Start a guest process on `host` (a `Host` or its run directory)."""
    run_dir = host.run_dir if not isinstance(host, (str, os.PathLike)) else Path(host)
    args = [*(["--hold"] if hold else []), "--cycles", str(cycles), *extra]
    return GuestProcess(run_dir, domid, devid, personality, workload, *args)


def run_guest(host: Host | str | os.PathLike[str], domid: int, devid: int,
              personality: str = "linux", workload: str = "verify",
              timeout: float = 60.0, *, extra: Sequence[str] = ()) -> GuestResult:
    """Run a guest against a VBD to the end: handshake, workload, detach."""
    with start_guest(host, domid, devid, personality, workload,
                     extra=["--timeout", str(min(timeout, 30.0)), *extra]) as guest:
        return guest.result(timeout)


if __name__ == "__main__":
    sys.exit(main())
