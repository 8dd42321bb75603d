"""Throughput of a VBD's NBD export against qemu-nbd exporting the same kind of file.

Fills an image with random data (default 256 MiB), exports it from a real tapdisk
(`tap-ctl create`, socket `nbd<pid>.<minor>`) and with Debian's qemu-nbd twice (page
cache, and `--cache=none --aio=native`, i.e. O_DIRECT like the tapdisk), then copies
the whole export with real clients, in turn, `--runs` times each:

- read:  `nbdcopy URI null:` and `qemu-img convert -n URI null-co://` (no target file:
  writing one costs more than the export and varies more)
- write: `nbdcopy FILE URI` (into a writable export of a second image)

and prints the median times, MiB/s, and our throughput over qemu-nbd's. `dd` of the
file (O_DIRECT) is the disk's own figure. Needs qemu-utils and libnbd-bin.

    python -m blktap3.tools.bench_nbd [--size-mib 256] [--runs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from blktap3.ctl import ops, runtime

MiB = 1 << 20


def _fill(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())


def _uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


@contextlib.contextmanager
def _qemu_nbd(image: Path, sock: Path, *extra: str) -> Iterator[str]:
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "--persistent", "-k", str(sock),
                             *extra, str(image)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():  # qemu-nbd has no readiness signal but its socket
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-nbd did not start: {proc.stderr.read()!r}"
                                   if proc.stderr else "qemu-nbd did not start")
            time.sleep(0.02)
        yield _uri(sock)
    finally:
        proc.terminate()
        proc.wait(10)


def _time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_nbd", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="b3nbd-", dir="/tmp"))
    root = work / "ctl"
    runtime.ensure_dirs(root)
    ours: list[tuple[int, int]] = []
    try:
        images = {name: work / f"{name}.img" for name in ("read", "ours-w", "qemu-w")}
        for image in images.values():
            _fill(image, size)
        for name in ("read", "ours-w"):
            pid, minor, _ = ops.create(f"aio:{images[name]}", root=root)
            ours.append((pid, minor))
        (pid_r, minor_r), (pid_w, minor_w) = ours
        with contextlib.ExitStack() as stack:
            servers = {
                "tapdisk": (_uri(root / f"nbd{pid_r}.{minor_r}"),
                            _uri(root / f"nbd{pid_w}.{minor_w}")),
                "qemu-nbd": (stack.enter_context(
                    _qemu_nbd(images["read"], work / "q.sock", "-r")),
                    stack.enter_context(_qemu_nbd(images["qemu-w"], work / "qw.sock"))),
                "qemu-nbd O_DIRECT": (stack.enter_context(
                    _qemu_nbd(images["read"], work / "qd.sock", "-r", "--cache=none",
                              "--aio=native")),
                    stack.enter_context(_qemu_nbd(images["qemu-w"], work / "qdw.sock",
                                                  "--cache=none", "--aio=native"))),
            }
            jobs: dict[str, Callable[[str, str], list[str]]] = {
                "nbdcopy read": lambda r, w: ["nbdcopy", r, "null:"],
                "qemu-img convert": lambda r, w: ["qemu-img", "convert", "-n", "-f", "raw",
                                                  "-O", "raw", r, "null-co://"],
                "nbdcopy write": lambda r, w: ["nbdcopy", str(images["read"]), w],
            }
            times: dict[tuple[str, str], list[float]] = {}
            disk: list[float] = []
            for _ in range(args.runs):  # in turn, so a noisy neighbour hits every server
                disk.append(_time(["dd", f"if={images['read']}", "of=/dev/null", "bs=4M",
                                   "iflag=direct", "status=none"]))
                for job, command in jobs.items():
                    for server, (r, w) in servers.items():
                        times.setdefault((job, server), []).append(_time(command(r, w)))
        mib = size / MiB
        d = statistics.median(disk)
        print(f"{args.size_mib} MiB, median of {args.runs} runs")
        print(f"{'dd iflag=direct of the file':<44} {d:6.3f} s {mib / d:8.0f} MiB/s")
        for job in jobs:
            for server in servers:
                t = statistics.median(times[(job, server)])
                ratio = ""
                if server != "tapdisk":
                    ours_t = statistics.median(times[(job, "tapdisk")])
                    ratio = f"   tapdisk/this = {t / ours_t:.2f}"
                print(f"{job + ' via ' + server:<44} {t:6.3f} s {mib / t:8.0f} MiB/s{ratio}")
    finally:
        for pid, minor in ours:
            with contextlib.suppress(OSError):
                ops.destroy(pid, minor, root=root)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
