"""The fio side of ``blktap3-bench``: one job, io_uring, O_DIRECT, JSON output parsed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def run(path: Path, rw: str, bs: int, qd: int, runtime: float) -> dict[str, Any]:
    cmd = [
        "fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={qd}", "--ioengine=io_uring", "--direct=1", "--time_based",
        f"--runtime={runtime:g}", "--randrepeat=0", "--norandommap", "--output-format=json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["read" if "read" in rw else "write"]
    pct = side["clat_ns"].get("percentile", {})
    # fio's own CPU (user + system, percent of its run time) per I/O: the kernel's share
    # of the cost that our tapdisk pays too.
    ios = int(side["total_ios"])
    cpu_pct = float(job["usr_cpu"]) + float(job["sys_cpu"])
    cpu_s = cpu_pct / 100 * float(job["job_runtime"]) / 1e3
    return {
        "fio_cpu_us_per_req": cpu_s * 1e6 / ios if ios else None,
        "fio_iops": float(side["iops"]),
        "fio_mbps": float(side["bw_bytes"]) / 1e6,
        "fio_p50_us": float(pct.get("50.000000", 0)) / 1e3,
        "fio_p99_us": float(pct.get("99.000000", 0)) / 1e3,
    }
