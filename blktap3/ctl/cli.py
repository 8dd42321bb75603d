"""`tap-ctl`: blktap's command-line tool, same subcommands, flags, output and exit codes.

A failing command prints one line starting with `strerror(errno)` on stderr and exits
with that errno; bad usage prints the usage and exits 22 (EINVAL). `--debug` anywhere on
the line logs every control message on stderr. Beyond blktap: `list --json`, and
`resize -p -m` (the image grew: pause, then resume with `ResumeFlags.RESIZE`, after
which DISK_INFO reports the new size for tapback to publish).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import structlog

from blktap3.abi import VbdStateBits

from . import ops
from .client import CtlError, TapdiskClient
from .protocol import STRING_MAX, OpenFlags, ProtocolError, ResumeFlags
from .runtime import MAX_MINOR


class _Parser(argparse.ArgumentParser):
    """blktap's tap-ctl answers bad usage with its usage and EINVAL, not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(errno.EINVAL)


def _int(text: str) -> int:
    return int(text, 0)


def _ranged(name: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer (C syntax: 0x.., 0..) in [low, high], checked here so
    that a number the control message cannot carry is a usage error, not a traceback."""

    def parse(text: str) -> int:
        value = _int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} {value} is not in {low}..{high}")
        return value

    parse.__name__ = name  # argparse names the type in "invalid <name> value"
    return parse


_pid = _ranged("pid", 1, (1 << 31) - 1)  # pid_t
_minor = _ranged("minor", 0, MAX_MINOR - 1)
_u16 = _ranged("number", 0, 0xFFFF)  # params.req_timeout is a u16 on the wire
MAX_SECONDS = 1e6


def _seconds(text: str) -> float:
    """A timeout: finite and positive (socket.settimeout refuses the rest with a
    ValueError/OverflowError that would otherwise escape as a traceback)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seconds value: {text!r}") from None
    if not 0 < value <= MAX_SECONDS:  # also false for nan
        raise argparse.ArgumentTypeError(f"seconds {text} is not in (0, {MAX_SECONDS:g}]")
    return value


def _wire_string(text: str) -> str:
    """A `type:/path` that fits the message's NUL-terminated char[256]."""
    size = len(text.encode(errors="surrogateescape"))
    if size >= STRING_MAX or "\0" in text:
        raise argparse.ArgumentTypeError(
            f"{size} bytes: at most {STRING_MAX - 1} fit in a control message")
    return text


def _add_pm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", dest="pid", type=_pid, required=True, help="tapdisk pid")
    parser.add_argument("-m", dest="minor", type=_minor, required=True, help="minor")


def _add_open_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-R", dest="readonly", action="store_true", help="read-only")
    parser.add_argument("-D", dest="no_o_direct", action="store_true", help="no O_DIRECT")
    parser.add_argument("-e", dest="prt_minor", type=_minor, help="parent minor to reuse")
    parser.add_argument("-r", dest="lcache", action="store_true", help="local cache")
    parser.add_argument("-2", dest="secondary", type=_wire_string,
                        help="secondary type:/path (mirror)")
    parser.add_argument("-s", dest="standby", action="store_true", help="secondary standby")
    parser.add_argument("-t", dest="req_timeout", type=_u16, default=0,
                        help="request timeout, seconds")
    parser.add_argument("-C", dest="logpath", type=_wire_string, help="changed-block log path")


def _open_flags(args: argparse.Namespace) -> int:
    flags = OpenFlags(0)
    for attr, flag in (
        ("readonly", OpenFlags.RDONLY), ("no_o_direct", OpenFlags.NO_O_DIRECT),
        ("lcache", OpenFlags.ADD_LCACHE), ("standby", OpenFlags.STANDBY),
    ):
        if getattr(args, attr):
            flags |= flag
    if args.prt_minor is not None:
        flags |= OpenFlags.REUSE_PRT
    if args.secondary:
        flags |= OpenFlags.SECONDARY
    if args.logpath:
        flags |= OpenFlags.ADD_LOG
    if getattr(args, "encrypted", False):
        flags |= OpenFlags.OPEN_ENCRYPTED
    return int(flags)


def state_text(state: int) -> str:
    """C's `%#x`: 0 prints as "0", others as 0x2a."""
    return f"{state:#x}" if state else "0"


def format_row(entry: ops.TapEntry) -> str:
    """The terminal format: `%8s %4s %4s %10s %s`, unknown fields as "-"."""
    pid = str(entry.pid) if entry.pid is not None else "-"
    minor = str(entry.minor) if entry.minor is not None else "-"
    state = state_text(entry.state) if entry.state is not None else "-"
    return f"{pid:>8} {minor:>4} {state:>4} {entry.type or '-':>10} {entry.path or '-'}"


def format_dict(entry: ops.TapEntry) -> str:
    """The non-terminal format: `pid=%d minor=%d state=%#x args=%s:%s`, known fields only."""
    fields = []
    if entry.pid is not None:
        fields.append(f"pid={entry.pid}")
    if entry.minor is not None:
        fields.append(f"minor={entry.minor}")
    if entry.state is not None:
        fields.append(f"state={state_text(entry.state)}")
    if entry.type is not None and entry.path is not None:
        fields.append(f"args={entry.type}:{entry.path}")
    return " ".join(fields)


def _bit_names(state: int | None) -> list[str] | None:
    if state is None:
        return None
    return [bit.name for bit in VbdStateBits if bit & state and bit.name]


def cmd_list(args: argparse.Namespace) -> None:
    entries = [
        e for e in ops.list_all()
        if (args.minor is None or e.minor == args.minor)
        and (args.pid is None or e.pid == args.pid)
        and (args.type is None or e.type == args.type)
        and (args.file is None or e.path == args.file)
    ]
    if args.json:
        rows = [e.as_dict() | {"state_bits": _bit_names(e.state)} for e in entries]
        print(json.dumps(rows))
        return
    render = format_row if sys.stdout.isatty() else format_dict
    for entry in entries:
        print(render(entry))


def cmd_allocate(args: argparse.Namespace) -> None:
    print(ops.allocate(devname=args.devname))


def cmd_free(args: argparse.Namespace) -> None:
    ops.free(args.minor)


def cmd_create(args: argparse.Namespace) -> None:
    _, _, devname = ops.create(
        args.args, devname=args.devname, flags=_open_flags(args),
        prt_minor=args.prt_minor or 0, req_timeout=args.req_timeout,
        secondary=args.secondary or "",
    )
    print(devname)


def cmd_destroy(args: argparse.Namespace) -> None:
    ops.destroy(args.pid, args.minor, timeout=args.timeout)


def cmd_spawn(args: argparse.Namespace) -> None:
    print(ops.spawn())


def cmd_attach(args: argparse.Namespace) -> None:
    TapdiskClient(args.pid).attach(args.minor)


def cmd_detach(args: argparse.Namespace) -> None:
    TapdiskClient(args.pid).detach(args.minor)


def cmd_open(args: argparse.Namespace) -> None:
    if args.encrypted:
        sys.stdin.buffer.read()  # blktap reads the key here; the tapdisk refuses encryption
    TapdiskClient(args.pid).open(
        args.minor, args.args, _open_flags(args), prt_minor=args.prt_minor or 0,
        req_timeout=args.req_timeout, secondary=args.secondary or "",
    )


def cmd_close(args: argparse.Namespace) -> None:
    TapdiskClient(args.pid).close(args.minor, force=args.force, timeout=args.timeout)


def cmd_pause(args: argparse.Namespace) -> None:
    TapdiskClient(args.pid).pause(args.minor, timeout=args.timeout)


def cmd_unpause(args: argparse.Namespace) -> None:
    flags = OpenFlags(0)
    if args.secondary:
        flags |= OpenFlags.SECONDARY
    if args.logpath:
        flags |= OpenFlags.ADD_LOG
    TapdiskClient(args.pid).resume(
        args.minor, args.args or "", int(flags), args.secondary or ""
    )


def cmd_stats(args: argparse.Namespace) -> None:
    sys.stdout.write(TapdiskClient(args.pid).stats(args.minor) + "\n")


def cmd_resize(args: argparse.Namespace) -> None:
    client = TapdiskClient(args.pid)
    paused = any(
        vbd.minor == args.minor and vbd.state & VbdStateBits.PAUSED for vbd in client.list()
    )
    if not paused:
        client.pause(args.minor, timeout=args.timeout)
    client.resume(args.minor, flags=int(ResumeFlags.RESIZE))


Command = Callable[[argparse.Namespace], None]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tap-ctl", description="Control tapdisks (blktap compatible).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str, func: Command, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        return p

    p = command("list", cmd_list, "list tapdisks, VBDs and allocated minors")
    p.add_argument("-p", dest="pid", type=_pid)
    p.add_argument("-m", dest="minor", type=_minor)
    p.add_argument("-t", dest="type", help="image type")
    p.add_argument("-f", dest="file", help="image path")
    p.add_argument("--json", action="store_true", help="one JSON array (not in blktap)")

    p = command("allocate", cmd_allocate, "allocate a minor; prints its device name")
    p.add_argument("-d", dest="devname", help="device name to allocate")

    p = command("free", cmd_free, "free a minor")
    p.add_argument("-m", dest="minor", type=_minor, required=True)

    p = command("create", cmd_create, "allocate, spawn, attach and open; prints the device")
    p.add_argument("-a", dest="args", required=True, metavar="type:/path",
                   type=_wire_string)
    p.add_argument("-d", dest="devname", help="device name to use")
    _add_open_flags(p)

    p = command("destroy", cmd_destroy, "close, detach and free")
    _add_pm(p)
    p.add_argument("-t", dest="timeout", type=_seconds, help="seconds to wait")

    command("spawn", cmd_spawn, "start a tapdisk; prints its pid")

    p = command("attach", cmd_attach, "attach a minor to a tapdisk")
    _add_pm(p)
    p = command("detach", cmd_detach, "detach a closed minor from a tapdisk")
    _add_pm(p)

    p = command("open", cmd_open, "open an image on an attached minor")
    _add_pm(p)
    p.add_argument("-a", dest="args", required=True, metavar="type:/path",
                   type=_wire_string)
    _add_open_flags(p)
    p.add_argument("-E", dest="encrypted", action="store_true", help="key on stdin")

    p = command("close", cmd_close, "close the image of a minor")
    _add_pm(p)
    p.add_argument("-f", dest="force", action="store_true", help="force shutdown")
    p.add_argument("-t", dest="timeout", type=_seconds, help="seconds to wait")

    p = command("pause", cmd_pause, "drain and close the image of a minor")
    _add_pm(p)
    p.add_argument("-t", dest="timeout", type=_seconds, help="seconds to wait")

    p = command("unpause", cmd_unpause, "reopen a paused minor, optionally a new image")
    _add_pm(p)
    p.add_argument("-a", dest="args", metavar="type:/path", type=_wire_string,
                   help="new image")
    p.add_argument("-2", dest="secondary", type=_wire_string, help="secondary type:/path")
    p.add_argument("-c", dest="logpath", type=_wire_string, help="changed-block log path")

    p = command("stats", cmd_stats, "print a minor's statistics as JSON")
    _add_pm(p)

    p = command("resize", cmd_resize, "tell a minor its image grew (not in blktap)")
    _add_pm(p)
    p.add_argument("-t", dest="timeout", type=_seconds, help="seconds to wait for the pause")
    return parser


def _configure_logging(debug: bool) -> None:
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer(
            colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if debug else logging.WARNING),
        # Looked up per call, not bound now: whatever sys.stderr is when a line is logged.
        logger_factory=lambda *_: structlog.WriteLogger(sys.stderr),
    )


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in words
    words = [w for w in words if w != "--debug"]
    _configure_logging(debug)
    try:
        args = build_parser().parse_args(words)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else errno.EINVAL
    func: Command = args.func
    try:
        func(args)
    except BrokenPipeError:
        return 0  # `tap-ctl list | head`: the reader left, not an error
    except ProtocolError as exc:
        # A value the control message cannot carry that the parser did not catch.
        print(f"{os.strerror(errno.EINVAL)}: {exc}", file=sys.stderr)
        return errno.EINVAL
    except OSError as exc:
        code = exc.errno or errno.EIO
        detail = exc.detail if isinstance(exc, CtlError) else exc.strerror
        text = os.strerror(code)
        if detail and detail != text:
            text = f"{text}: {detail}"
        print(text, file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
