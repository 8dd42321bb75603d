"""How fast `tap-ctl list` answers with many tapdisks (xcp-ng/sm#169: listing must be fast).

Starts N real tapdisk processes (default 100) in a private runtime root, gives each one
VBD (a `null:` image), then times `tap-ctl list` as a command (Python start-up included)
and `blktap3.ctl.ops.list_all()` in-process. Prints the figures; asserts only that every
VBD was listed. Everything it started is stopped at the end.

    python -m blktap3.tools.bench_ctl [-n 100] [--runs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from blktap3.ctl import ops, runtime
from blktap3.ctl.client import TapdiskClient

TAP_CTL = str(Path(sys.executable).parent / "tap-ctl")


def _start(root: Path, minor: int) -> int:
    pid = ops.spawn(root)
    client = TapdiskClient(pid, root=root)
    client.attach(minor)
    client.open(minor, f"null:bench{minor}")
    return pid


def _time(fn: object, runs: int) -> list[float]:
    assert callable(fn)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _report(name: str, times: list[float]) -> None:
    print(f"{name:<34} median {statistics.median(times) * 1000:8.1f} ms   "
          f"min {min(times) * 1000:8.1f} ms   max {max(times) * 1000:8.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_ctl", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--tapdisks", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    root = Path(tempfile.mkdtemp(prefix="b3bench-", dir="/tmp"))
    env = {**os.environ, runtime.ROOT_ENV: str(root)}
    pids: list[int] = []
    try:
        minors = [runtime.allocate_minor(root) for _ in range(args.tapdisks)]
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            pids = list(pool.map(lambda m: _start(root, m), minors))
        print(f"started {len(pids)} tapdisks with one VBD each in "
              f"{time.perf_counter() - start:.1f} s")

        def command() -> None:
            out = subprocess.run([TAP_CTL, "list"], env=env, capture_output=True, text=True,
                                 check=True).stdout
            assert out.count("args=null:") == args.tapdisks, out

        def library() -> None:
            assert len(ops.list_all(root)) == args.tapdisks

        def one_minor() -> None:
            subprocess.run([TAP_CTL, "list", "-m", str(minors[-1])], env=env,
                           capture_output=True, check=True)

        _report(f"tap-ctl list ({args.tapdisks} tapdisks)", _time(command, args.runs))
        _report("tap-ctl list -m N", _time(one_minor, args.runs))
        _report("ops.list_all() in-process", _time(library, args.runs))
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while any(runtime.process_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
