"""The guest seen from outside: start a guest process, follow its timeline, read its report.

What `blktap3-sim guest run`, the demo and the tests call. `run_guest(host, domid, devid,
personality, workload, timeout)` runs a guest process to the end and returns a
`GuestResult`; `start_guest(...)` returns a running `GuestProcess` (wait for a timeline
step, detach it, collect its result). The process is `python -m blktap3.sim.guest
... --json` (`child.py`) in the xensim environment of its domain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import xensim
from ..frontend import HandshakeFigures, Step
from .report import EXIT_OK, GuestReport, format_report, format_step

if TYPE_CHECKING:
    from ..host import Host


@dataclass(frozen=True)
class GuestResult:
    """What a finished guest process reported (its `--json` result) and its exit code."""

    returncode: int
    report: GuestReport
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == EXIT_OK and self.report.ok

    @property
    def error(self) -> str | None:
        return self.report.error

    @property
    def sectors(self) -> int | None:
        return self.report.disk.sectors if self.report.disk is not None else None

    @property
    def iops(self) -> float:
        return self.report.io.iops

    @property
    def mbps(self) -> float:
        return self.report.io.mbps

    @property
    def timeline(self) -> list[Step]:
        return list(self.report.timeline)

    @property
    def handshakes(self) -> list[HandshakeFigures]:
        return list(self.report.handshakes)

    def summary(self) -> str:
        report = self.report
        text = format_report(report) if report.domid is not None else str(self.error)
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
        self.steps: list[Step] = []
        self._report: GuestReport | None = None
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
                    self.steps.append(Step.from_dict(item["step"]))
                elif "result" in item:
                    self._report = GuestReport.from_json(item["result"])
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def wait_for_step(self, text: str, timeout: float = 30.0) -> Step:
        """The first timeline step containing `text` (TimeoutError if none comes)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for step in self.steps:
                    if text in step.what:
                        return step
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not
                                      self._reader.is_alive()):
                    raise TimeoutError(f"guest {self.domid}: no step {text!r}; last steps: "
                                       f"{[s.what for s in self.steps[-5:]]}")
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
            return GuestResult(code, GuestReport.failed(
                f"guest still running after {timeout:g} s (killed)", self.steps),
                "".join(self._stderr))
        self._reader.join(5)
        self._err_reader.join(5)
        report = self._report or GuestReport.failed(f"guest exited {code} without a result",
                                                    self.steps)
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
