"""``blktap3-bench``: guest driver -> ring -> the real tapdisk against fio, same file, run.

For each workload it runs fio (io_uring, O_DIRECT) on the backing file, then the
simulated guest's ring driver against a real tapdisk process (spawned as tap-ctl does,
ring connected as tapback does) on the same file, and prints IOPS, bandwidth, p50/p99
latency, the tapdisk's CPU microseconds per request (and the guest driver's: on a
small machine the two compete for the same cores) and the ratio ours/fio. A null
image (no I/O) gives the ring's own ceiling. The ring is connected with the indirect
offer tapback advertises, so the 1 MiB workloads travel as one INDIRECT request a block
(256 segments) against fio's 1 MiB blocks.

``--persistent`` on (the default, as tapback's) or off connects the rings with or without
persistent grants; ``both`` adds after each workload a ``copy`` row: the same run by grant
copy, its ratio against fio too.

``--polling US[,IDLE]`` adds after each workload a ``poll`` row: the same run with the
back-end polling (``polling-duration`` US microseconds, ``polling-idle-threshold`` IDLE %
of CPU, default 0: always), passed at connect as tapback passes those keys, the guest not
polling (as Linux blkfront); its ratio is against fio too, so the rows above and below
compare polling off and on in the same rounds' machine. After the table each poll row
says its QD1 latency and tapdisk CPU per request against the row without polling, and
how often the ring spun or skipped a spin (the host was less idle than IDLE) per request.

``--image vhd`` also serves, each from its own tapdisk, VHDs holding the same bytes as the
raw file and prints after each workload a row for each, its ratio against our raw run
of the same workload in the same rounds (VHD then raw, VHD then raw, ...; the median of
the rounds' ratios, their spread):

- ``vhd``: a fully allocated dynamic VHD (every request inside a block is one extent of
  the file: the hot path);
- ``vhd chain3``: a 3-deep chain (base, mid, leaf): the base holds every block, the mid
  a third of them whole, the leaf another third whole and a 4 KiB write at the start of
  each block of the last third (partial bitmaps: a request there is served by the
  driver's synchronous path, sector runs found through the layers).

``--mirror`` adds after each write workload two rows, ``mirror file`` and ``mirror nbd``:
the same primary mirrored (``-2``) to a second file and to qemu-nbd, their ratio against
the unmirrored VBD in alternating rounds (``bench_mirror``).

Each workload runs in ``--rounds`` short rounds, ours then fio, ours then fio, ... (see
``bench_rounds``): a row holds the medians of its rounds, its ``ratio`` the median of the
rounds' ratios, with their spread (``ratio_min``-``ratio_max``). ``--plot FILE.png`` draws
the ratios and the latency percentiles beside fio's (needs matplotlib: the ``plot`` extra).

The ``4k randread QD32 Nq`` rows spread QD32 over N = 1, 2, 4 queues (multi-queue: a
ring and a tapdisk service thread per queue, a guest driver process per queue).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog

from blktap3 import cmdline

from . import bench_fio, bench_mirror, bench_plot, bench_ring, bench_rounds

WORKLOADS: list[dict[str, Any]] = [
    {"workload": "4k randread QD32", "rw": "randread", "bs": 4096, "qd": 32},
    {"workload": "4k randwrite QD32", "rw": "randwrite", "bs": 4096, "qd": 32},
    {"workload": "44k seqread QD8", "rw": "read", "bs": 44 * 1024, "qd": 8},
    {"workload": "4k randread QD1", "rw": "randread", "bs": 4096, "qd": 1},
    {"workload": "1M seqread QD8", "rw": "read", "bs": 1 << 20, "qd": 8},
    {"workload": "1M seqwrite QD8", "rw": "write", "bs": 1 << 20, "qd": 8},
]
# Multi-queue rows: 4k randread QD32 over this many queues (QD32/N each, one guest
# driver per queue), against fio's 4k randread QD32 in the same rounds.
MULTI_QUEUE = (1, 2, 4)
JSON_KEYS = ("workload", "ours_iops", "fio_iops", "ratio", "ratio_min", "ratio_max", "rounds",
             "ours_p50_us", "ours_p99_us", "fio_p50_us", "fio_p99_us", "cpu_us_per_req")
# Only in the QD1 row: the p50 latency the ring path adds to fio's (median of the rounds),
# and of it the ring's own round trip with no I/O (the null image's QD1 p50, median).
QD1_KEY = "qd1_added_us"
QD1_RING_KEY = "qd1_ring_us"


def _prepare(path: Path, size: int) -> None:
    """A fully written file: holes would read back without touching storage."""
    chunk = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _prepare_vhd(raw: Path, path: Path) -> Path:
    """A dynamic VHD holding the raw file's bytes, every block allocated."""
    from blktap3.datapath import Image, vhdformat

    vhdformat.create(path, raw.stat().st_size)
    img = Image.open("vhd", str(path))
    try:
        with raw.open("rb") as f:
            sector = 0
            while chunk := f.read(vhdformat.DEFAULT_BLOCK_SIZE):
                img.write(sector, chunk)
                sector += len(chunk) // 512
    finally:
        img.close()
    return path


def _prepare_chain(raw: Path, base: Path) -> Path:
    """A 3-deep chain over ``base`` (a fully allocated VHD of the raw bytes) whose every
    sector reads as the raw file's: the leaf's path."""
    from blktap3.datapath import Image, vhdformat

    block = vhdformat.DEFAULT_BLOCK_SIZE
    spb = block // 512
    mid, leaf = base.with_name("mid.vhd"), base.with_name("leaf.vhd")
    with raw.open("rb") as f:
        for layer, parent, part in ((mid, base, 1), (leaf, mid, 2)):
            vhdformat.create(layer, 0, parent=parent)
            img = Image.open("vhd", str(layer))
            try:
                for blk in range(raw.stat().st_size // block):
                    if blk % 3 == part or (layer == leaf and blk % 3 == 0):
                        f.seek(blk * block)
                        data = f.read(block if blk % 3 == part else 4096)
                        img.write(blk * spb, data)
            finally:
                img.close()
    return leaf


def _num(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, int | float) else "-"


def _row(r: dict[str, Any]) -> str:
    return (f"{r['workload']:<28} {_num(r.get('ours_iops'), ',.0f'):>11} "
            f"{_num(r.get('fio_iops'), ',.0f'):>11} {_num(r.get('ratio'), '.2f'):>6} "
            f"{_spread(r):>11} "
            f"{_num(r.get('ours_mbps'), '.0f'):>9} {_num(r.get('fio_mbps'), '.0f'):>8} "
            f"{_num(r.get('ours_p50_us'), '.1f'):>8} {_num(r.get('ours_p99_us'), '.1f'):>8} "
            f"{_num(r.get('fio_p50_us'), '.1f'):>8} {_num(r.get('fio_p99_us'), '.1f'):>8} "
            f"{_num(r.get('cpu_us_per_req'), '.2f'):>7} "
            f"{_num(r.get('guest_cpu_us_per_req'), '.2f'):>8} "
            f"{_num(r.get('fio_cpu_us_per_req'), '.2f'):>7} "
            f"{_num(r.get('kicks_in_per_req'), '.2f'):>6} "
            f"{_num(r.get('kicks_out_per_req'), '.2f'):>6} "
            f"{_num(r.get('switches_per_req'), '.2f'):>6} "
            f"{_num(r.get('guest_switches_per_req'), '.2f'):>6}")


def _spread(r: dict[str, Any]) -> str:
    lo, hi = r.get("ratio_min"), r.get("ratio_max")
    return f"{lo:.2f}-{hi:.2f}" if isinstance(lo, float) and isinstance(hi, float) else "-"


HEADER = (f"{'workload':<28} {'ours IOPS':>11} {'fio IOPS':>11} {'ratio':>6} {'min-max':>11} "
          f"{'ours MB/s':>9} {'fio MB/s':>8} {'ours p50':>8} {'ours p99':>8} "
          f"{'fio p50':>8} {'fio p99':>8} {'us/req':>7} {'guest us':>8} {'fio us':>7} "
          f"{'kick>':>6} {'<kick':>6} {'cswtch':>6} {'g csw':>6}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="blktap3-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="FILE", help="write one object per workload here")
    ap.add_argument("--runtime", type=cmdline.positive_float, default=2.0,
                    help="seconds per run, ours or fio, in one round (default 2)")
    ap.add_argument("--rounds", type=cmdline.int_in(1, 1000), default=5,
                    help="rounds per workload, ours then fio in each (default 5: about "
                         "two minutes in all); a row is the median of its rounds")
    ap.add_argument("--plot", metavar="FILE.png", type=Path, default=None,
                    help="also draw the ratios and latency percentiles into this PNG "
                         f"(needs matplotlib: {bench_plot.INSTALL_HINT})")
    ap.add_argument("--size-mib", type=cmdline.int_in(1, 1 << 20), default=512,
                    help="backing file size (MiB, default 512)")
    ap.add_argument("--dir", type=cmdline.existing_dir, default=Path("/var/tmp"),
                    help="an existing directory for the backing file (default /var/tmp)")
    ap.add_argument("--only", default=None, help="only workloads whose name contains this")
    ap.add_argument("--image", choices=("raw", "vhd"), default="raw",
                    help="vhd: also a fully allocated VHD and a 3-deep VHD chain of the same "
                         "bytes, each with its ratio against raw in the same rounds")
    ap.add_argument("--poll-us", type=cmdline.int_in(0, 1_000_000), default=0,
                    help="ring service and guest spin this long before sleeping (default 0)")
    ap.add_argument("--polling", metavar="US[,IDLE]", type=_polling, default=None,
                    help="also run each workload with the back-end polling US microseconds "
                         "(polling-duration) while IDLE percent of CPU is idle "
                         "(polling-idle-threshold, default 0): a 'poll' row after each")
    ap.add_argument("--persistent", choices=("on", "off", "both"), default="on",
                    help="persistent grants negotiated (on, default), grant copy (off), or "
                         "both: a 'copy' row after each workload")
    ap.add_argument("--mirror", action="store_true",
                    help="after each write workload, the same VBD mirrored to a file and to "
                         "qemu-nbd: ratio mirrored/unmirrored (needs qemu-nbd)")
    ap.add_argument("--pin", metavar="T,G", type=_cpus, default=None,
                    help="pin the tapdisk to CPU T and the guest driver to CPU G "
                         "(default: the scheduler places them)")
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot is not None and (problem := bench_plot.unavailable()):
        parser.error(problem)
    if args.mirror and (problem := bench_mirror.unavailable()):
        parser.error(problem)
    cpus = args.pin
    # SIGTERM and SIGHUP unwind as ^C does: the rig stops its tapdisks, the backing file
    # and its directory are removed.
    cmdline.terminate_as_interrupt()
    try:
        return _bench(args, cpus)
    except KeyboardInterrupt:
        print("blktap3-bench: interrupted; everything it started was stopped",
              file=sys.stderr)
        return 130


def _polling(text: str) -> tuple[int, int]:
    us, _, idle = text.partition(",")
    return cmdline.int_in(1, 1_000_000)(us), cmdline.int_in(0, 100)(idle or "0")


def _cpus(text: str) -> tuple[int, int]:
    t, _, g = text.partition(",")
    return cmdline.cpu(t), cmdline.cpu(g or t)


def _bench(args: argparse.Namespace, cpus: tuple[int, int] | None) -> int:
    # The control client logs every message at debug: keep the table readable.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(30),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )

    results: list[dict[str, Any]] = []
    print(f"blktap3-bench on {platform.node()} ({os.cpu_count()} CPUs, {platform.system()} "
          f"{platform.release()}): {args.size_mib} MiB file in {args.dir}, "
          f"{args.rounds} rounds of {args.runtime:g} s per side (ours, fio, ours, ...; "
          f"medians, ratio spread min-max), O_DIRECT, io_uring, poll {args.poll_us} us, "
          f"persistent grants {args.persistent}, "
          f"pinned {cpus or 'no'}; "
          "latencies in us; CPU us per request: us/req tapdisk, guest us the guest "
          "driver, fio us fio itself; per request: event-channel kicks guest to tapdisk "
          "(kick>) and back (<kick), context switches of the tapdisk (cswtch) and of the "
          "guest driver (g csw)",
          flush=True)
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="blktap3-bench-", dir=args.dir) as tmp:
        disk = Path(tmp) / "disk.img"
        _prepare(disk, args.size_mib << 20)
        images: dict[str, str] = {}
        if args.image == "vhd":
            dynamic = _prepare_vhd(disk, Path(tmp) / "disk.vhd")
            base = _prepare_vhd(disk, Path(tmp) / "base.vhd")
            images = {"vhd": f"vhd:{dynamic}", "vhd chain3": f"vhd:{_prepare_chain(disk, base)}"}
        with contextlib.ExitStack() as stack:
            rig = stack.enter_context(bench_ring.RingRig(
                Path(tmp) / "xen", disk, poll_us=args.poll_us, cpus=cpus, images=images))
            if args.mirror:
                stack.enter_context(bench_mirror.secondaries(rig, Path(tmp)))
            for w in WORKLOADS:
                if args.only and args.only not in w["workload"]:
                    continue
                shape = (w["rw"], w["bs"], w["qd"], args.runtime)
                both = args.persistent == "both"
                nulls: list[dict[str, Any]] = []
                for persistent in (True, False) if both else (args.persistent == "on",):
                    ours = functools.partial(rig.run, *shape, persistent=persistent)
                    if w["qd"] == 1 and persistent == (args.persistent != "off"):
                        ours = functools.partial(_with_null_qd1, ours, rig, args, nulls)
                    rounds = bench_rounds.alternate(
                        ours, functools.partial(bench_fio.run, disk, *shape), args.rounds)
                    name = w["workload"] if persistent or args.persistent == "off" else \
                        f"  copy {w['workload']}"
                    row = bench_rounds.combine(name, rounds, qd1=w["qd"] == 1)
                    results.append(row)
                    print(_row(row), flush=True)
                row = results[-2 if both else -1]
                if nulls:
                    results.append(_null_qd1(row, nulls))
                    print(_row(results[-1]), flush=True)
                if args.polling is not None:
                    ours = functools.partial(rig.run, *shape,
                                             persistent=args.persistent != "off",
                                             polling=args.polling)
                    rounds = bench_rounds.alternate(
                        ours, functools.partial(bench_fio.run, disk, *shape), args.rounds)
                    prow = bench_rounds.combine(f"  poll {w['workload']}", rounds,
                                                qd1=w["qd"] == 1)
                    prow["unpolled"] = row
                    results.append(prow)
                    print(_row(prow), flush=True)
                for name in images:
                    vrow = _against_raw(rig, name, shape, args.rounds,
                                        persistent=args.persistent != "off")
                    vrow["workload"] = f"  {name} {w['workload']}"
                    results.append(vrow)
                    print(_row(vrow), flush=True)
                if args.mirror and w["rw"].endswith("write"):
                    for mrow in bench_mirror.rows(rig, w["workload"], shape, args.rounds,
                                                  args.persistent != "off"):
                        results.append(mrow)
                        print(_row(mrow), flush=True)
            for nr_queues in MULTI_QUEUE:  # 4k randread QD32 spread over 1, 2, 4 queues
                name = f"4k randread QD32 {nr_queues}q"
                if args.only and args.only not in name:
                    continue
                shape = ("randread", 4096, 32, args.runtime)
                rounds = bench_rounds.alternate(
                    functools.partial(rig.run_queues, nr_queues, *shape),
                    functools.partial(bench_fio.run, disk, *shape), args.rounds)
                row = bench_rounds.combine(name, rounds)
                results.append(row)
                print(_row(row), flush=True)
            if not args.only or args.only in "null ring":
                row = {"workload": "null ring QD256",
                       **_medians([rig.run_null(args.runtime) for _ in range(args.rounds)])}
                results.append(row)
                print(_row(row), flush=True)
    for r in results:
        if r.get(QD1_KEY) is not None:
            print(f"{r['workload']}: p50 latency added by the ring path {r[QD1_KEY]:.1f} us "
                  f"(median of {r['rounds']} rounds)")
        if r.get(QD1_KEY) is not None and r.get(QD1_RING_KEY) is not None:
            print(f"  of which the ring's round trip without I/O (null image, QD1 p50) "
                  f"{r[QD1_RING_KEY]:.1f} us: guest -> tapdisk -> guest, the two wake-ups a "
                  f"split driver pays on a real host too (blkback as well); the rest "
                  f"{r[QD1_KEY] - r[QD1_RING_KEY]:.1f} us: what the disk path adds to both "
                  f"(the tapdisk's handling of the I/O from its ring thread beyond fio's, "
                  f"wake-ups from CPUs gone idle during the device's time, which the "
                  f"back-to-back null ring never sees), and noise")
    for r in results:
        if "unpolled" in r:
            print(_polling_summary(r, r["unpolled"], args.polling))
    if args.json:
        Path(args.json).write_text(json.dumps([_json(r) for r in results], indent=2) + "\n")
    if args.plot is not None:
        bench_plot.draw(results, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _against_raw(rig: bench_ring.RingRig, image: str, shape: tuple[str, int, int, float],
                 rounds: int, *, persistent: bool) -> dict[str, Any]:
    """``image`` then raw in each round, the same workload: a row of the image's figures,
    its ratio the median of the rounds' image/raw ratios (``raw_iops`` the raw median)."""
    def raw() -> dict[str, Any]:
        return {"raw_iops": rig.run(*shape, persistent=persistent)["ours_iops"]}

    pairs = bench_rounds.alternate(
        functools.partial(rig.run, *shape, image=image, persistent=persistent), raw, rounds)
    return bench_rounds.combine("", pairs, peer="raw_iops")


def _polling_summary(polled: dict[str, Any], unpolled: dict[str, Any],
                     polling: tuple[int, int]) -> str:
    """One line: what polling changed in a workload's latency and CPU (medians)."""
    def change(key: str, unit: str) -> str:
        on, off = polled.get(key), unpolled.get(key)
        if not isinstance(on, int | float) or not isinstance(off, int | float) or not off:
            return f"{key} -"
        return f"{key} {off:.1f} -> {on:.1f} {unit} (x{on / off:.2f})"

    return (f"{polled['workload'].strip()} ({polling[0]} us, idle threshold {polling[1]} %): "
            f"{change('ours_p50_us', 'us')}, {change('cpu_us_per_req', 'us')}, "
            f"IOPS ratio to fio {_num(unpolled.get('ratio'), '.2f')} -> "
            f"{_num(polled.get('ratio'), '.2f')}; per request "
            f"{_num(polled.get('spins_per_req'), '.2f')} spins, "
            f"{_num(polled.get('spins_skipped_per_req'), '.2f')} skipped (host busy)")


def _with_null_qd1(ours: Any, rig: bench_ring.RingRig, args: argparse.Namespace,
                   nulls: list[dict[str, Any]]) -> dict[str, Any]:
    """Our QD1 run, then in the same round the ring's round trip on the null image (the
    machine in the same mood: the split of the added latency is per round)."""
    figures: dict[str, Any] = ours()
    nulls.append(rig.run_null(args.runtime, qd=1))
    return figures


def _null_qd1(row: dict[str, Any], nulls: list[dict[str, Any]]) -> dict[str, Any]:
    """The QD1 row's companion row: the null image's rounds, their median p50 also put
    into ``row`` under QD1_RING_KEY."""
    null = _medians(nulls)
    null.pop("ours_mbps", None)
    row[QD1_RING_KEY] = null.get("ours_p50_us")
    return {"workload": "  null ring QD1", **null}


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Our figures over rounds with no fio beside them (the VHD and null rows)."""
    return {k: v for k, v in bench_rounds.combine("", [(r, {}) for r in runs]).items()
            if k in runs[0]}


def _json(r: dict[str, Any]) -> dict[str, Any]:
    if "fio_iops" not in r and r.get("ratio") is None:
        return {"workload": r["workload"], "ours_iops": r["ours_iops"]}
    out = {k: r.get(k) for k in JSON_KEYS}
    for key in ("raw_iops", "plain_iops", QD1_KEY, QD1_RING_KEY):
        if key in r:  # raw_iops: a VHD row's peer; plain_iops: a mirror row's
            out[key] = r[key]
    return out


if __name__ == "__main__":
    sys.exit(main())
