"""``blktap3-torture SUBCOMMAND [--count N | --seconds S] [--json FILE]``.

Prints the run's figures; exit status 0 only when nothing was lost, wrong, crashed, hung
or leaked, 1 when something was, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from blktap3.cmdline import int_in, positive_float

from . import churn, faultfs, faults, kill, pause, powercut, ring, soak
from .verdict import Verdict

DEFAULTS = {"ring": "1,000,000 requests", "kill": "100 cycles", "pause": "1,000 cycles",
            "churn": "200 cycles", "soak": "3,600 seconds",
            "faults": "400 rounds", "powercut": "100 cuts"}


WEEK = 7 * 86400


def _positive_seconds(text: str) -> float:
    """A run's length: finite, above 0 and below a week."""
    seconds = positive_float(text)
    if seconds >= WEEK:
        raise argparse.ArgumentTypeError(f"must be below a week: {text}")
    return seconds


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="blktap3-torture", description=__doc__.split("\n\n")[1])
    sub = ap.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    helps = {
        "ring": "a hostile guest ring against the ASan+UBSan data path, a verifying one "
                "beside it",
        "kill": "SIGKILL of tapdisk under flushed writes; every flushed block checked",
        "pause": "pause/resume (and image swaps) under a verifying QD32 load",
        "churn": "guests created and destroyed mid-I/O, tapback and xenstored SIGKILLed; "
                 "nothing may leak",
        "faults": "EIO, ENOSPC, short writes, slow I/O and failed fsyncs under tapdisk "
                  "(FUSE); every answer judged",
        "powercut": "power cuts (unflushed writes dropped at random under FUSE) under "
                    "flushed writes; raw and VHD checked",
        "soak": "guests x 2 disks connecting, verifying and detaching for a long time, "
                "tap-ctl stats/pause/unpause from outside; memory and descriptors flat",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        bound = p.add_mutually_exclusive_group()
        bound.add_argument("--count", type=int_in(1),
                           help=f"how many (default {DEFAULTS[name]})")
        bound.add_argument("--seconds", type=_positive_seconds, help="run this long instead")
        p.add_argument("--json", type=Path, metavar="FILE", help="write the figures here")
        if name == "ring":
            p.add_argument("--no-sanitize", action="store_true",
                           help="the optimised data path instead of its ASan+UBSan build")
        if name in ("ring", "kill", "churn", "soak", "faults", "powercut"):
            p.add_argument("--seed", type=int_in(1), default=1)
        if name == "soak":
            p.add_argument("--guests", type=int_in(1, 200), default=20,
                           help="guest domains, two disks each (default 20)")
            p.add_argument("--interval", type=_positive_seconds, default=0.0,
                           help="seconds between memory/descriptor samples (default: "
                                "1/40 of the run, 1 to 60)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # SIGTERM unwinds like an exception, so every process and file of the run is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # The control client logs every message at debug: keep the figures readable.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    runs: dict[str, Callable[[], Verdict]] = {
        "ring": lambda: ring.run(args.count, args.seconds, sanitize=not args.no_sanitize,
                                 seed=args.seed),
        "kill": lambda: kill.run(args.count, args.seconds, seed=args.seed),
        "pause": lambda: pause.run(args.count, args.seconds),
        "churn": lambda: churn.run(args.count, args.seconds, seed=args.seed),
        "faults": lambda: faults.run(args.count, args.seconds, seed=args.seed),
        "powercut": lambda: powercut.run(args.count, args.seconds, seed=args.seed),
        "soak": lambda: soak.run(args.count, args.seconds, guests=args.guests,
                                 interval=args.interval, seed=args.seed),
    }
    if args.command in ("faults", "powercut"):
        why = faultfs.missing()
        if why is not None:
            print(f"blktap3-torture {args.command}: the FUSE layer cannot run: {why}",
                  file=sys.stderr)
            return 1
    verdict = runs[args.command]()
    print(verdict.text())
    if args.json is not None:
        verdict.write_json(args.json)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
