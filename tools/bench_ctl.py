"""The control path's figures: start-up and memory, and `tap-ctl list` with many tapdisks.

First, with nothing running: the interpreter's floor (`python -c pass`), `tap-ctl list`,
`tap-ctl create` and `destroy` of a `null:` image, `tap-ctl spawn` (a tapdisk's start-up)
and the RSS of an idle tapdisk with one VBD, medians of `--startup-runs`, beside issue 18's
targets. Then (xcp-ng/sm#169: listing must be fast) it starts N real tapdisk processes
(default 100) in a private runtime root, gives each one VBD (a `null:` image), then times
`tap-ctl list` as a command (Python start-up included) and `blktap3.ctl.ops.list_all()`
in-process. Prints the figures; asserts only that every VBD was listed. Everything it
started is stopped at the end.

    python -m blktap3.tools.bench_ctl [-n 100] [--runs 5] [--startup-runs 10]
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

from blktap3 import cmdline
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


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise OSError(f"no VmRSS for {pid}")


def _median_ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1000:8.1f} ms"


def startup(runs: int) -> None:
    """Start-up figures with nothing else running, each beside its target (issue 18)."""
    root = Path(tempfile.mkdtemp(prefix="b3start-", dir="/tmp"))
    env = {**os.environ, runtime.ROOT_ENV: str(root)}

    def run(*words: str) -> str:
        return subprocess.run(words, env=env, capture_output=True, text=True,
                              check=True).stdout

    floor = _time(lambda: run(sys.executable, "-c", "pass"), runs)
    listing = _time(lambda: run(TAP_CTL, "list"), runs)
    spawn, create, destroy, rss = [], [], [], []
    try:
        for _ in range(runs):
            start = time.perf_counter()
            pid = int(run(TAP_CTL, "spawn"))
            spawn.append(time.perf_counter() - start)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            while runtime.process_alive(pid):
                time.sleep(0.01)
            start = time.perf_counter()
            run(TAP_CTL, "create", "-a", "null:startup")
            create.append(time.perf_counter() - start)
            (entry,) = ops.list_all(root)
            assert entry.pid is not None and entry.minor is not None
            rss.append(_rss_kib(entry.pid))
            start = time.perf_counter()
            run(TAP_CTL, "destroy", "-p", str(entry.pid), "-m", str(entry.minor))
            destroy.append(time.perf_counter() - start)
    finally:
        for entry in ops.list_all(root):
            if entry.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(entry.pid, signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)
    print(f"start-up, medians of {runs} (nothing else running):")
    print(f"  python -c pass (the floor)       {_median_ms(floor)}")
    print(f"  tap-ctl list (nothing running)   {_median_ms(listing)}   target <= 30 ms")
    print(f"  tap-ctl spawn (tapdisk start-up) {_median_ms(spawn)}")
    print(f"  tap-ctl create -a null:          {_median_ms(create)}   target <= 100 ms")
    print(f"  tap-ctl destroy                  {_median_ms(destroy)}")
    print(f"  idle tapdisk with one VBD, RSS   {statistics.median(rss) / 1024:8.1f} MiB"
          "   target <= 12 MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_ctl", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--tapdisks", type=cmdline.int_in(0, 4096), default=100,
                        help="tapdisks to list (default 100; 0: start-up figures only)")
    parser.add_argument("--runs", type=cmdline.int_in(1), default=5,
                        help="runs of each list figure (default 5)")
    parser.add_argument("--startup-runs", type=cmdline.int_in(0), default=10,
                        help="runs of each start-up figure (0: leave them out)")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.startup_runs > 0:
        startup(args.startup_runs)
    if args.tapdisks <= 0:
        return 0

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
