"""Our side of ``blktap3-bench``: a simulated machine, the data path as dom0, a guest."""

from __future__ import annotations

import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from blktap3.datapath.lineproc import LineProcess
from blktap3.sim import xensim

GUEST = 9


class RingRig:
    """xensim machine + ring host process (dom0) + a guest driver process per run."""

    def __init__(self, run_dir: Path, disk: Path, poll_us: int = 0) -> None:
        self.run_dir = run_dir
        self.poll_us = poll_us
        self.disk = disk
        self.machine = xensim.Machine(run_dir)
        self.host: LineProcess | None = None

    def __enter__(self) -> RingRig:
        self.machine.init()
        self.machine.create_domain(GUEST, 8192)
        self.host = LineProcess([sys.executable, "-m", "blktap3.datapath.host"],
                                xensim.process_env(self.run_dir, 0))
        self.host.call("open", name="disk", driver="aio", path=str(self.disk))
        self.host.call("open", name="null", driver="null", path="")
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.host:
            self.host.close()
        self.machine.teardown()

    def _ring(self, image: str, order: int, run: dict[str, Any]) -> tuple[dict[str, Any], float]:
        assert self.host is not None
        guest = LineProcess([sys.executable, "-m", "blktap3.sim.guestdrv"],
                            xensim.process_env(self.run_dir, GUEST))
        try:
            g = guest.call("open", backend=0, order=order, protocol="native")
            self.host.call("connect", name="r", image=image, domid=GUEST, devid=1,
                           grefs=g["grefs"], order=order, port=g["port"], protocol="native",
                           poll_us=self.poll_us)
            try:
                cpu0 = self.host.call("cpu")
                res: dict[str, Any] = guest.call("run", poll_us=self.poll_us, **run)
                cpu1 = self.host.call("cpu")
            finally:
                self.host.call("disconnect", name="r")
        finally:
            guest.close()
        cpu = (cpu1["user"] + cpu1["system"]) - (cpu0["user"] + cpu0["system"])
        if res["errors"] or res["lost"]:
            raise RuntimeError(f"ring errors: {res}")
        return res, cpu

    @staticmethod
    def _figures(res: dict[str, Any], cpu: float) -> dict[str, Any]:
        secs = res["elapsed_ns"] / 1e9
        return {
            "ours_iops": res["iops"],
            "ours_mbps": res["bytes"] / secs / 1e6 if secs else 0.0,
            "ours_p50_us": res["p50_ns"] / 1e3,
            "ours_p99_us": res["p99_ns"] / 1e3,
            "cpu_us_per_req": cpu * 1e6 / res["ios"] if res["ios"] else None,
        }

    def run(self, rw: str, bs: int, qd: int, runtime: float) -> dict[str, Any]:
        sectors = self.disk.stat().st_size // 512
        return self._figures(*self._ring("disk", 0, {
            "qd": qd, "bs": bs, "read_pct": 100 if "read" in rw else 0,
            "random": rw.startswith("rand"), "span": sectors, "duration": runtime,
            "seed": 12345, "timeout": 30.0,
        }))

    def run_null(self, runtime: float) -> dict[str, Any]:
        """The ring's own ceiling: 8-page ring, QD256, no storage and no data copy."""
        figures = self._figures(*self._ring("null", 3, {
            "qd": 256, "bs": 4096, "read_pct": 100, "random": False, "span": 1 << 30,
            "duration": runtime, "timeout": 30.0,
        }))
        figures.pop("ours_mbps")
        return figures
