"""The `tapdisk` command: start one tapdisk process and serve its control socket.

As blktap's tapdisk, it daemonizes and prints its control socket path
(`<root>/ctl<pid>`) on stdout once the socket accepts requests; the command itself then
exits 0. Unlike blktap's, a tapdisk that cannot start says why on stderr and the command
exits with that errno, so `tap-ctl spawn` can report it. The daemon exits when its last
VBD is detached, on EXIT while idle, or on SIGTERM/SIGINT (removing its socket).

The environment passes through untouched: on the simulated Xen host the caller sets
LD_PRELOAD (`blktap3.sim.xensim.process_env`) and the data path finds the hypervisor there.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import traceback
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

from blktap3 import cmdline
from blktap3.ctl.runtime import (
    ROOT_ENV,
    SHM_ENV,
    ensure_dirs,
    nbdclient_path,
    root_dir,
    socket_path,
)

from .control import DRAIN_TIMEOUT, Tapdisk
from .metrics import Metrics
from .nbd.passed import FdReceiver
from .server import CLIENT_TIMEOUT, ControlServer

log = structlog.get_logger(__name__)

LOG_ENV = "BLKTAP_TAPDISK_LOG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapdisk", description="A tapdisk process: serves VBDs on a control socket."
    )
    parser.add_argument("-D", "--foreground", action="store_true",
                        help="do not daemonize; log to stderr")
    parser.add_argument("--root", type=cmdline.dir_to_create,
                        help=f"runtime root (default ${ROOT_ENV} or /run/blktap-control); "
                        "made if missing, its parent never")
    parser.add_argument("--log", type=cmdline.file_to_write,
                        help=f"log file of the daemon (default ${LOG_ENV} or "
                        "<root>/log/tapdisk<pid>.log)")
    parser.add_argument("--client-timeout", type=cmdline.positive_float,
                        default=CLIENT_TIMEOUT,
                        help="seconds a client may take to send its request or read a reply "
                        f"(default {CLIENT_TIMEOUT:g})")
    parser.add_argument("--drain-timeout", type=cmdline.positive_float, default=DRAIN_TIMEOUT,
                        help=f"seconds PAUSE/CLOSE wait for in-flight requests "
                        f"(default {DRAIN_TIMEOUT:g})")
    parser.add_argument("--shm-root", help=f"where blktap's stats files go (td3-<pid>, "
                        f"vbd3-<domid>-<devid>; default ${SHM_ENV} or /dev/shm)")
    return parser


def _add_pid(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["pid"] = os.getpid()  # read per line: the daemon's pid is not the launcher's
    return event


def configure_logging(stream: TextIO, *, json: bool) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer() if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            _add_pid,
            renderer,
        ],
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def _serve(root: Path, args: argparse.Namespace) -> tuple[ControlServer, Tapdisk]:
    """Set up the VBD registry and a bound, listening control socket."""
    ensure_dirs(root)
    metrics = Metrics(args.shm_root)
    tapdisk = Tapdisk(root, drain_timeout=args.drain_timeout, metrics=metrics)
    server = ControlServer(tapdisk, socket_path(root, os.getpid()),
                           client_timeout=args.client_timeout)
    try:
        server.bind()
    except OSError:
        server.close()
        raise
    metrics.start()
    receiver = FdReceiver(nbdclient_path(root, os.getpid()), tapdisk.passed)
    try:
        receiver.start()
        tapdisk.fd_receiver = receiver
    except OSError as exc:  # `-2 nbd:NAME` will not find a socket; nothing else needs it
        log.warning("nbdclient socket not available", errno=exc.errno,
                    reason=str(exc.strerror or exc))
    return server, tapdisk


def _run(server: ControlServer, tapdisk: Tapdisk) -> None:
    def on_stop(signum: int, _: object) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    # SIGHUP/SIGUSR1 are harmless: they interrupt system calls, which are retried.
    signal.signal(signal.SIGHUP, lambda *_: None)
    signal.signal(signal.SIGUSR1, lambda *_: None)
    log.info("tapdisk started", socket=str(server.path))
    try:
        server.serve_forever()
    finally:
        tapdisk.shutdown()
        if tapdisk.metrics is not None:
            tapdisk.metrics.stop()
        # The socket last, just before the exit: tools wait for it to go, and its absence
        # tells tapback the exit was in order.
        server.close()
        log.info("tapdisk exited")


def _redirect_stdio(log_path: Path) -> TextIO:
    """Leave the caller's terminal/pipes: stdin from /dev/null, stdout/err to the log."""
    log_path.parent.mkdir(mode=0o700, exist_ok=True)  # its parent is the root, made already
    stream = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the daemon
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    os.close(devnull)
    return stream


def _daemon(root: Path, args: argparse.Namespace, ready: int) -> int:
    """The daemon side of the fork: set up, report on `ready`, serve."""
    os.setsid()
    os.chdir("/")
    try:
        ensure_dirs(root)  # first: the default log goes into it
        log_path = Path(args.log or os.environ.get(LOG_ENV)
                        or root / "log" / f"tapdisk{os.getpid()}.log")
        stream = _redirect_stdio(log_path)
        configure_logging(stream, json=True)
        server, tapdisk = _serve(root, args)
    except OSError as exc:
        code = exc.errno or errno.EIO
        os.write(ready, f"err {code} {_reason(exc)}\n".encode())
        return code
    os.write(ready, f"ok {server.path}\n".encode())
    os.close(ready)
    _run(server, tapdisk)
    return 0


def _launcher(ready: int, child: int) -> int:
    """The command's side: wait for the daemon's word, print the socket path or why not."""
    chunks = []
    while chunk := os.read(ready, 4096):
        chunks.append(chunk)
    os.close(ready)
    word = b"".join(chunks).decode(errors="replace").strip()
    if word.startswith("ok "):
        print(word[3:], flush=True)
        return 0
    if word.startswith("err "):
        code, _, reason = word[4:].partition(" ")
        print(f"tapdisk: {reason}", file=sys.stderr)
        return int(code)
    _, status = os.waitpid(child, 0)
    print(f"tapdisk: died at start ({_describe(status)})", file=sys.stderr)
    return errno.EIO


def _reason(exc: OSError) -> str:
    """An OSError in one line without Python's `[Errno N]`: what failed, and where."""
    text = exc.strerror or str(exc)
    return f"{text}: {exc.filename}" if exc.filename is not None else text


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Sockets, logs and the minors' markers are root's alone, as blktap's (0700 root).
    os.umask(0o077)
    # A spawner may hold these back while we start (ctl.ops.create); a child inherits
    # the mask, and a tapdisk must always stop on SIGTERM.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    root = root_dir(args.root).absolute()
    if args.foreground:
        configure_logging(sys.stderr, json=False)
        try:
            server, tapdisk = _serve(root, args)
        except OSError as exc:
            print(f"tapdisk: {_reason(exc)}", file=sys.stderr)
            return exc.errno or errno.EIO
        print(server.path, flush=True)
        _run(server, tapdisk)
        return 0
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        os.close(ready_w)
        return _launcher(ready_r, child)
    os.close(ready_r)
    try:
        code = _daemon(root, args, ready_w)
    except BaseException:
        # Never return into the caller's stack from the forked child: report and leave.
        traceback.print_exc()
        code = errno.EIO
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
