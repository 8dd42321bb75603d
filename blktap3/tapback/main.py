"""The `tapback` command: run the daemon for one back-end domain.

    tapback [--backend-kind vbd3] [--backend-domid 0] [--xenstored PATH]
            [--control-dir DIR] [--log-format json|console] [--log-file FILE]
            [--verbose] [--pid-file FILE] [--status-file FILE]

It runs in the foreground (systemd's `Type=simple`; `service.start` backgrounds it),
logs one line per lifecycle step, and stops on SIGTERM/SIGINT leaving every VBD as it
is: a tapback started again adopts them.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from blktap3.ctl import runtime

from . import logs
from .daemon import Tapback, TapbackConfig

log = structlog.get_logger(__name__)

DOMID_FIRST_RESERVED = 0x7FF0  # Xen's DOMID_FIRST_RESERVED: ids above are not domains
MAX_TIMEOUT = 1e6
_KIND = re.compile(r"[A-Za-z0-9_-]+")


def _seconds(text: str) -> float:
    """A timeout: finite and positive (a socket timeout refuses the rest, in every VBD's
    worker, long after start-up)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seconds value: {text!r}") from None
    if not 0 < value <= MAX_TIMEOUT:  # also false for nan
        raise argparse.ArgumentTypeError(f"{text} is not in (0, {MAX_TIMEOUT:g}]")
    return value


def _domid(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid domid: {text!r}") from None
    if not 0 <= value < DOMID_FIRST_RESERVED:
        raise argparse.ArgumentTypeError(f"domid {value} is not in 0..{DOMID_FIRST_RESERVED - 1}")
    return value


def _kind(text: str) -> str:
    """One XenStore path element (it becomes backend/<kind>)."""
    if not _KIND.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid back-end name: {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapback",
        description="The blktap3 back-end daemon: runs the xenbus handshake of every "
                    "vbd3 device of this domain and connects its tapdisk to the guest's ring.",
    )
    parser.add_argument("--backend-kind", "-n", default="vbd3", metavar="NAME", type=_kind,
                        help="back-end name watched under backend/ (default: vbd3)")
    parser.add_argument("--backend-domid", type=_domid, default=0, metavar="DOMID",
                        help="the domain this back-end runs in (default: 0)")
    parser.add_argument("--xenstored", metavar="PATH",
                        help="xenstored socket or xenbus device (default: $XENSTORED_PATH, "
                             "$XENSTORED_RUNDIR/socket, /var/run/xenstored/socket)")
    parser.add_argument("--control-dir", metavar="DIR",
                        help=f"tapdisk runtime root (default: ${runtime.ROOT_ENV} or "
                             f"{runtime.DEFAULT_ROOT})")
    parser.add_argument("--log-format", choices=("json", "console"), default="json",
                        help="JSON lines (default) or a readable console format")
    parser.add_argument("--log-file", metavar="FILE", help="append logs here (default: stderr)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug lines too")
    parser.add_argument("--pid-file", metavar="FILE",
                        help="write the pid here once the daemon is watching")
    parser.add_argument("--status-file", metavar="FILE", type=Path,
                        help="every VBD's machine state, as JSON, kept up to date (default: "
                             "<control-dir>/tapback.<backend-kind>.status.json)")
    parser.add_argument("--tapdisk-timeout", type=_seconds, default=30.0, metavar="SECS",
                        help="timeout of each control request to a tapdisk (default: 30)")
    parser.add_argument("--max-ring-page-order", type=int, default=3, choices=range(0, 4),
                        help="largest ring the front-end may use, 2^N pages (default: 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stream = open(args.log_file, "a", buffering=1) if args.log_file else sys.stderr  # noqa: SIM115
    logs.configure(args.log_format, verbose=args.verbose, stream=stream)
    config = TapbackConfig(
        control_root=runtime.root_dir(args.control_dir).absolute(),
        xenstored_path=args.xenstored,
        backend_domid=args.backend_domid,
        backend_kind=args.backend_kind,
        tapdisk_timeout=args.tapdisk_timeout,
        max_ring_page_order=args.max_ring_page_order,
        status_file=args.status_file.absolute() if args.status_file else None,
    )
    daemon = Tapback(config)

    stopped_by: list[str] = []

    def on_signal(signum: int, _: object) -> None:
        # No logging here: a handler that writes while the interrupted main thread was
        # writing a log line fails ("reentrant call") and would abort the daemon.
        stopped_by.append(signal.Signals(signum).name)
        daemon.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def on_ready() -> None:
        if args.pid_file:
            tmp = Path(f"{args.pid_file}.tmp")
            tmp.write_text(f"{os.getpid()}\n")
            tmp.replace(args.pid_file)

    log.info("tapback starting", pid=os.getpid(), backend_kind=config.backend_kind,
             backend_domid=config.backend_domid)
    try:
        daemon.run(on_ready)
        if stopped_by:
            log.info("stopped", signal=stopped_by[0])
    except Exception:
        log.exception("tapback failed")
        return 1
    finally:
        if args.pid_file:
            Path(args.pid_file).unlink(missing_ok=True)
    return 0
