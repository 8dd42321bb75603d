"""The `tapback` command: run the daemon for one back-end domain.

    tapback [-d] [-v] [-n NAME] [-p PIDFILE] [-x DOMID] [-b]
            [--backend-domid 0] [--xenstored PATH] [--control-dir DIR]
            [--log-format json|console] [--log-file FILE] [--status-file FILE] ...

blktap's options keep blktap's meanings (tapback/tapback.c): without `-d|--debug` the
command daemonizes and returns once the daemon watches XenStore (and wrote `-p`'s pid
file), as blktap's `Type=forking` unit expects; `-d` stays in the foreground (systemd's
`Type=simple`, `service.start`). `-v|--verbose` logs debug lines, `-n|--name` is the
back-end name (backend/<name>), `-p|--pidfile` the pid file, `-x|--domain` serves only
that guest's VBDs, `-b|--nobarrier` does not offer feature-barrier. A daemon without
`--log-file` logs to syslog, as blktap's does. An unknown option is a one-line error.

It logs one line per lifecycle step, and stops on SIGTERM/SIGINT leaving every VBD as it
is: a tapback started again adopts them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import signal
import sys
import syslog
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import structlog

from blktap3 import cmdline
from blktap3.abi import MAX_QUEUES, MAX_RING_PAGE_ORDER
from blktap3.ctl import runtime
from blktap3.fsm import Toolstack
from blktap3.xenbus import XenStoreConnectionError, XenStoreError, default_socket_path

from . import logs
from .daemon import Tapback, TapbackConfig
from .executor import DEFAULT_PERSISTENT_GRANTS, default_max_queues

log = structlog.get_logger(__name__)

DOMID_FIRST_RESERVED = 0x7FF0  # Xen's DOMID_FIRST_RESERVED: ids above are not domains
MAX_TIMEOUT = 1e6
_KIND = re.compile(r"[A-Za-z0-9_-]+")


# A timeout: a socket timeout refuses 0, negatives and nan in every VBD's worker, long
# after start-up, so they are refused here.
_seconds = cmdline.float_in(0, MAX_TIMEOUT, above_low=True)


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


def _frontend_domid(text: str) -> int | None:
    """`-x`: a guest's domid, in strtoul(3)'s forms as blktap reads it (12, 0x0c, 014);
    0 means every guest, as in blktap (tapback.c: a domid of 0 is the master's)."""
    digits = text.strip()
    base = 16 if digits[:2].lower() == "0x" else 8 if digits[:1] == "0" and digits[1:] else 10
    try:
        value = int(digits, base)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid domain ID {text!r}") from None
    if not 0 <= value < DOMID_FIRST_RESERVED:
        raise argparse.ArgumentTypeError(
            f"domain ID {value} is not in 0..{DOMID_FIRST_RESERVED - 1}")
    return value or None


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (blktap's tapback prints its usage; ours says what is
    wrong and where to look), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tapback",
        description="The blktap3 back-end daemon: runs the xenbus handshake of every "
                    "vbd3 device of this domain and connects its tapdisk to the guest's ring.",
    )
    parser.add_argument("--backend-kind", "-n", "--name", default="vbd3", metavar="NAME",
                        type=_kind, help="back-end name watched under backend/ "
                        "(default: vbd3)")
    parser.add_argument("-d", "--debug", action="store_true",
                        help="stay in the foreground (else daemonize once watching)")
    parser.add_argument("-x", "--domain", dest="frontend_domid", type=_frontend_domid,
                        metavar="DOMID", help="serve only this guest domain's VBDs")
    parser.add_argument("-b", "--nobarrier", dest="barrier", action="store_false",
                        help="do not offer feature-barrier to front-ends")
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
    parser.add_argument("--log-file", metavar="FILE",
                        help="append logs here (default: stderr with -d, else syslog)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug lines too")
    parser.add_argument("--pid-file", "-p", "--pidfile", metavar="FILE",
                        help="write the pid here once the daemon is watching")
    parser.add_argument("--status-file", metavar="FILE", type=Path,
                        help="every VBD's machine state, as JSON, kept up to date (default: "
                             "<control-dir>/tapback.<backend-kind>.status.json)")
    parser.add_argument("--tapdisk-timeout", type=_seconds, default=30.0, metavar="SECS",
                        help="timeout of each control request to a tapdisk (default: 30)")
    parser.add_argument("--toolstack", type=Toolstack, choices=list(Toolstack),
                        default=Toolstack.XAPI,
                        help="whose order to serve: xapi (default, as blktap's tapback: "
                             "InitWait once hotplug-status is connected) or libxl (Xen >= "
                             "4.19's xl and its block-tap script: InitWait as soon as the "
                             "back-end directory appears; libxl runs block-tap after it)")
    parser.add_argument("--max-ring-page-order", type=int, default=MAX_RING_PAGE_ORDER,
                        choices=range(0, MAX_RING_PAGE_ORDER + 1),
                        help="largest ring the front-end may use, 2^N pages "
                             f"(default: {MAX_RING_PAGE_ORDER})")
    parser.add_argument("--persistent-grants", choices=("on", "off"),
                        default="on" if DEFAULT_PERSISTENT_GRANTS else "off",
                        help="advertise feature-persistent: with a front-end that asks too, "
                             "data grants are mapped once and kept (default: "
                             f"{'on' if DEFAULT_PERSISTENT_GRANTS else 'off'})")
    parser.add_argument("--max-queues", type=int, default=default_max_queues(),
                        choices=range(1, MAX_QUEUES + 1), metavar=f"1..{MAX_QUEUES}",
                        help="multi-queue-max-queues: the most queues (rings, each served "
                             "by its own thread) a front-end may use (default: the online "
                             "CPUs, as blkback)")
    return parser


class _Syslog:
    """A text stream whose lines go to syslog (a daemon without --log-file)."""

    def __init__(self) -> None:
        syslog.openlog("tapback", syslog.LOG_PID, syslog.LOG_DAEMON)

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line:
                syslog.syslog(syslog.LOG_INFO, line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _daemonize() -> int | None:
    """Fork; the parent waits until the daemon says it is ready (the descriptor returned
    to the child) and exits 0, or 1 when it failed (printing the daemon's one-line reason
    when it sent one). As daemon(3): a new session, / as the working directory, standard
    streams on /dev/null."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork():
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            word = ready.read()
        if word.startswith(b"error "):
            print(word[6:].decode(errors="replace"), file=sys.stderr, flush=True)
        elif word != b"ok":
            print("tapback: the daemon stopped before it watched XenStore (see its log: "
                  "--log-file, else syslog)", file=sys.stderr, flush=True)
        os._exit(0 if word == b"ok" else 1)
    os.close(ready_r)
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return ready_w


def _errno_words(code: int | None) -> str:
    """`No such file or directory (ENOENT)`."""
    if not code:
        return "unknown error"
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


def startup_error(exc: BaseException, xenstored: str) -> str:
    """The one line a start-up failure is told in: what failed, the errno, what to do."""
    if isinstance(exc, XenStoreConnectionError):
        hint = {
            errno.ENOENT: "is xenstored running? (the socket is --xenstored, "
                          "$XENSTORED_PATH, else /var/run/xenstored/socket)",
            errno.ECONNREFUSED: "is xenstored running? (a socket is there, nobody listens)",
            errno.EACCES: "run tapback as root",
        }.get(exc.errno, "check that xenstored runs and answers")
        return f"tapback: cannot connect to XenStore at {xenstored}: " \
               f"{_errno_words(exc.errno)}; {hint}"
    if isinstance(exc, XenStoreError):
        return f"tapback: XenStore refused a start-up request: {exc}; is this dom0 " \
               f"(or a driver domain allowed under backend/)?"
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"tapback: cannot start:{where}: {_errno_words(exc.errno)}"
    return f"tapback: cannot start: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Its pid file, status file and logs are root's alone.
    os.umask(0o077)
    # Paths are taken from where the command runs: the daemon works from /.
    pid_file = Path(args.pid_file).absolute() if args.pid_file else None
    log_file = Path(args.log_file).absolute() if args.log_file else None
    config = TapbackConfig(
        control_root=runtime.root_dir(args.control_dir).absolute(),
        xenstored_path=args.xenstored,
        backend_domid=args.backend_domid,
        backend_kind=args.backend_kind,
        tapdisk_timeout=args.tapdisk_timeout,
        max_ring_page_order=args.max_ring_page_order,
        max_queues=args.max_queues,
        barrier=args.barrier,
        persistent=args.persistent_grants == "on",
        toolstack=args.toolstack,
        frontend_domid=args.frontend_domid,
        status_file=args.status_file.absolute() if args.status_file else None,
    )
    stream: Any = None
    if log_file:
        try:  # before daemonizing: a bad path is told on the command's stderr
            stream = open(log_file, "a", buffering=1)  # noqa: SIM115
        except OSError as exc:
            print(f"tapback: cannot open the log file {log_file}: {_errno_words(exc.errno)}",
                  file=sys.stderr)
            return 1
    ready_fd = None if args.debug else _daemonize()  # before any thread starts
    if stream is None:
        stream = sys.stderr if args.debug else _Syslog()
    logs.configure(args.log_format, verbose=args.verbose, stream=stream)
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
        if pid_file:
            tmp = Path(f"{pid_file}.tmp")
            tmp.write_text(f"{os.getpid()}\n")
            tmp.replace(pid_file)
        if ready_fd is not None:  # the command that daemonized us may return now
            with contextlib.suppress(OSError):
                os.write(ready_fd, b"ok")
            os.close(ready_fd)

    log.info("tapback starting", pid=os.getpid(), backend_kind=config.backend_kind,
             backend_domid=config.backend_domid, frontend_domid=config.frontend_domid)
    try:
        daemon.run(on_ready)
        if stopped_by:
            log.info("stopped", signal=stopped_by[0])
    except Exception as exc:
        if daemon.ready.is_set():  # it served: a failure of ours, with its traceback
            log.exception("tapback failed")
            return 1
        line = startup_error(exc, config.xenstored_path or default_socket_path())
        if stream is not sys.stderr:  # the log keeps it too (syslog, --log-file)
            log.error("tapback could not start", reason=line, errno=getattr(exc, "errno", None))
        if ready_fd is not None:  # the command that daemonized us prints it
            with contextlib.suppress(OSError):
                os.write(ready_fd, b"error " + line.encode())
            os.close(ready_fd)
        else:
            print(line, file=sys.stderr)
        return 1
    finally:
        if pid_file:
            pid_file.unlink(missing_ok=True)
    return 0
