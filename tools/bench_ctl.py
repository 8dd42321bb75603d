"""The control path's figures: start-up and memory, and `tap-ctl list` with many tapdisks.

First, with nothing running: the interpreter's floor (`python -c pass`), `tap-ctl list`,
`tap-ctl create` and `destroy` of a `null:` image, `tap-ctl spawn` (a tapdisk's start-up)
and the RSS of an idle tapdisk with one VBD, medians of `--startup-runs` with their spread
(min-max: these machines are shared), beside issue 18's targets. Then (xcp-ng/sm#169:
listing must be fast) it starts N real tapdisk processes (default 100) in a private
runtime root, gives each one VBD (a `null:` image), then times `tap-ctl list` as a command
(Python start-up included) and `blktap3.ctl.ops.list_all()` in-process. Prints the
figures; asserts only that every VBD was listed. Everything it started is stopped at the
end.

`--peer PREFIX` measures blktap's own tap-ctl and tapdisk (an install prefix holding
`sbin/tap-ctl` and `libexec/tapdisk`, built from source beside ours, never committed) in
the same run, and prints each start-up figure's ratio ours/blktap. blktap's paths are
fixed (`/run/blktap-control`), so its commands run in a private mount namespace
(`unshare -m`) with a tmpfs there; its tapdisk asks for unlimited locked memory, which
root here may not grant, so it runs with the simulated host's libxensim preloaded (it
clamps that request to the hard limit). Both sides create a VBD of the same raw file.

    python -m blktap3.tools.bench_ctl [-n 100] [--runs 5] [--startup-runs 10]
        [--peer /path/to/blktap/prefix]
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from typing import Any

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


# The start-up figures: (key, label, target or "").
FIGURES = (("list", "tap-ctl list (nothing running)", "target <= 30 ms"),
           ("spawn", "tap-ctl spawn (tapdisk start-up)", ""),
           ("create", "tap-ctl create -a aio:FILE", "target <= 100 ms"),
           ("destroy", "tap-ctl destroy", ""))


def _listed(out: str) -> tuple[int, int]:
    """The pid and minor of the one VBD `tap-ctl list` printed (ours and blktap's alike)."""
    (line,) = [ln for ln in out.splitlines() if "minor=" in ln and "minor=-1" not in ln]
    words = dict(w.split("=", 1) for w in line.split() if "=" in w)
    return int(words["pid"]), int(words["minor"])


def _measure(tap_ctl: str, env: dict[str, str], image: Path, runs: int) -> dict[str, Any]:
    """Each start-up figure of one tap-ctl (seconds, one per run), and an idle tapdisk's
    RSS (KiB, one per run)."""

    def run(*words: str) -> str:
        return subprocess.run(words, env=env, capture_output=True, text=True,
                              check=True).stdout

    times: dict[str, list[float]] = {key: [] for key, _, _ in FIGURES}
    times["list"] = _time(lambda: run(tap_ctl, "list"), runs)
    rss: list[int] = []
    pids: list[int] = []
    try:
        for _ in range(runs):
            start = time.perf_counter()
            pid = int(run(tap_ctl, "spawn").split()[-1])
            times["spawn"].append(time.perf_counter() - start)
            pids.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            while runtime.process_alive(pid):
                time.sleep(0.01)
            start = time.perf_counter()
            run(tap_ctl, "create", "-a", f"aio:{image}")
            times["create"].append(time.perf_counter() - start)
            pid, minor = _listed(run(tap_ctl, "list"))
            pids.append(pid)
            rss.append(_rss_kib(pid))
            start = time.perf_counter()
            run(tap_ctl, "destroy", "-p", str(pid), "-m", str(minor))
            times["destroy"].append(time.perf_counter() - start)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    return {**times, "rss_kib": rss}


def _peer(prefix: Path, image: Path, runs: int) -> dict[str, Any]:
    """blktap's figures, measured by a child of ours in a private mount namespace."""
    from blktap3.sim import xensim

    env = {**os.environ, "LD_PRELOAD": str(xensim.library_path())}
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-m",
         "blktap3.tools.bench_ctl", "--peer-inside", str(prefix), "--image", str(image),
         "--startup-runs", str(runs), "-n", "0"],
        env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"blktap's figures failed: {done.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _peer_inside(prefix: Path, image: Path, runs: int) -> int:
    """In the private mount namespace: a tmpfs over blktap's fixed root, then measure."""
    root = Path("/run/blktap-control")
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "blktap3-bench-ctl", str(root)], check=True)
    print(json.dumps(_measure(str(prefix / "sbin" / "tap-ctl"), dict(os.environ), image,
                              runs)))
    return 0


def startup(runs: int, peer: Path | None = None) -> None:
    """Start-up figures with nothing else running, each beside its target (issue 18)."""
    root = Path(tempfile.mkdtemp(prefix="b3start-", dir="/tmp"))
    env = {**os.environ, runtime.ROOT_ENV: str(root)}
    image = root / "startup.img"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    try:
        floor = _time(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), runs)
        ours = _measure(TAP_CTL, env, image, runs)
        ours["floor"] = floor
        theirs = _peer(peer, image, runs) if peer is not None else None
    finally:
        for entry in ops.list_all(root):
            if entry.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(entry.pid, signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)
    peer_head = f"{'blktap':>11} {'ours/blktap':>11}" if theirs else ""
    print(f"start-up, medians of {runs} (min-max):{'':<7}{'ours':>11} {'':>13} {peer_head}")
    rows = [("floor", "python -c pass (the floor)", "", 1000.0, "ms"),
            *((key, label, target, 1000.0, "ms") for key, label, target in FIGURES),
            ("rss_kib", "idle tapdisk with one VBD, RSS", "target <= 12 MB", 1 / 1024, "MiB")]
    for key, label, target, scale, unit in rows:
        mine = [v * scale for v in ours[key]]
        spread = f"({min(mine):.0f}-{max(mine):.0f})"
        peer_cols = ""
        if theirs and key in theirs:
            peer = statistics.median(theirs[key]) * scale
            peer_cols = f" {peer:7.1f} {unit:<3} {statistics.median(mine) / peer:11.1f}"
        print(f"  {label:<34}{statistics.median(mine):7.1f} {unit:<3} {spread:>13}"
              f"{peer_cols}   {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_ctl", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--tapdisks", type=cmdline.int_in(0, 4096), default=100,
                        help="tapdisks to list (default 100; 0: start-up figures only)")
    parser.add_argument("--runs", type=cmdline.int_in(1), default=5,
                        help="runs of each list figure (default 5)")
    parser.add_argument("--startup-runs", type=cmdline.int_in(0), default=10,
                        help="runs of each start-up figure (0: leave them out)")
    parser.add_argument("--peer", type=cmdline.existing_dir, default=None, metavar="PREFIX",
                        help="also measure blktap's tap-ctl and tapdisk installed under "
                             "PREFIX (sbin/tap-ctl, libexec/tapdisk) and print ratios")
    # Internal: the child that measures blktap inside its private mount namespace.
    parser.add_argument("--peer-inside", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer is not None and not (args.peer / "sbin" / "tap-ctl").is_file():
        parser.error(f"argument --peer: no sbin/tap-ctl under {args.peer}")
    if args.peer_inside is not None:
        return _peer_inside(args.peer_inside, args.image, args.startup_runs)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.startup_runs > 0:
        startup(args.startup_runs, args.peer)
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
