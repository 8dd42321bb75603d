"""`tap-ctl`: blktap's command-line tool, with its subcommands, flags, output and exit status.

Scripts (XCP-ng's storage manager, Xen's hotplug scripts, OpenStack's driver probe) parse
what tap-ctl prints and its exit status, so those are blktap v4.0.8's
(control/tap-ctl.c and the tap-ctl-*.c it calls), bugs included where a script could
notice:
- options are parsed as getopt(3) does (`-m0`, options after operands, the last of a
  repeated option wins); a bad option or a missing required one prints getopt's line,
  the usage and `strerror(EINVAL)` on stderr, exit 22; `-h` prints the usage on stdout
  (attach: on stderr) and exits 0;
- no command, or an unknown one, prints the list of commands on stdout and exits 0;
- a failing command prints `strerror(errno)` alone on stderr and exits with that errno;
  an ERROR answer to ATTACH or DETACH is EINVAL (22), DETACH's also saying
  `got unexpected result 'error' from <pid>` on stdout; `stats` of a minor the tapdisk
  does not have prints two empty lines and exits 0;
- `--debug` (anywhere) prints `sending '<message>' message (uuid = <minor>)` and
  `received ...` lines on stdout.

Deliberately different (the README lists them with the reasons): `--precise` (anywhere)
keeps the tapdisk's own errno and prints its detail after `strerror`, and makes `stats`
of an unknown minor fail with ENODEV; numbers are checked (blktap's atoi(3) reads
`-m abc` as minor 0); `pause -t` waits that long (blktap's treats it as a usage error);
`--debug` is also taken before the command; the usage texts are ours. Beyond blktap
4.0.8: `check` and `major` (as blktap 3.x answers them), `list --json`, `allocate -d`,
and `resize -p -m` (the image grew: pause, then resume with `ResumeFlags.RESIZE`, after
which DISK_INFO reports the new size for tapback to publish).
"""

from __future__ import annotations

import errno
import getopt
import os
import sys
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from blktap3 import cmdline, lazylog
from blktap3.abi import VbdStateBits

from . import ops, runtime
from .runtime import MAX_MINOR

if TYPE_CHECKING:
    from .client import TapdiskClient

# The control client and the message codec (`.client`, `.protocol`) are imported by the
# commands that speak to a tapdisk, where they are used: `tap-ctl list` with no tapdisk
# running, `allocate`, `free` and the usage texts start without them (and without
# dataclasses, which the codec's records need).

DEBUG_FLAG = "--debug"
PRECISE_FLAG = "--precise"
MAX_SECONDS = 1e6
KEY_READ = 1024  # open -E reads the key with one read of at most this many bytes
KEY_SIZES = (32, 64)  # AES-XTS 256 or 512 bits, the sizes blktap's tap-ctl sends
PROC_DEVICES = Path("/proc/devices")
NULL_TYPE = "null"  # the image type that names no file


class Usage(Exception):
    """Bad usage: the line saying what is wrong ("" for none) precedes the usage."""


class Options:
    """A command's parsed options: the last value of each (getopt's rule), operands."""

    def __init__(self, command: str, values: dict[str, str] | None = None,
                 operands: list[str] | None = None, precise: bool = False) -> None:
        self.command = command
        self.values = {} if values is None else values
        self.operands = [] if operands is None else operands
        self.precise = precise

    def flag(self, name: str) -> bool:
        return name in self.values

    def text(self, name: str) -> str | None:
        return self.values.get(name)

    def number(self, name: str, what: str, low: int, high: int,
               *, extra: tuple[int, ...] = ()) -> int | None:
        """An integer option in [low, high] (or one of `extra`); None when absent."""
        text = self.values.get(name)
        if text is None:
            return None
        try:
            value = int(text, 10)
        except ValueError:
            raise Usage(f"{self.command}: invalid {what} '{text}'") from None
        if not low <= value <= high and value not in extra:
            raise Usage(f"{self.command}: {what} {value} is not in {low}..{high}")
        return value

    def required(self, name: str, what: str, low: int, high: int,
                 *, extra: tuple[int, ...] = ()) -> int:
        value = self.number(name, what, low, high, extra=extra)
        if value is None:
            raise Usage("")
        return value

    def seconds(self, name: str) -> float | None:
        text = self.values.get(name)
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError:
            raise Usage(f"{self.command}: invalid seconds '{text}'") from None
        if not 0 < value <= MAX_SECONDS:  # also false for nan
            raise Usage(f"{self.command}: seconds {text} is not in (0, {MAX_SECONDS:g}]")
        return value

    def path(self, name: str, *, required: bool = False, log: bool = False) -> str | None:
        """A `type:/path` (or path; `log`: a plain file path) that fits the message's
        NUL-terminated char[256], its path absolute."""
        text = self.values.get(name)
        if text is None:
            if required:
                raise Usage("")
            return None
        from .protocol import STRING_MAX

        size = len(text.encode(errors="surrogateescape"))
        if size >= STRING_MAX or "\0" in text:
            raise Usage(f"{self.command}: -{name} is {size} bytes: at most "
                        f"{STRING_MAX - 1} fit in a control message")
        # The tapdisk works from /: a relative path would name another file than the one
        # meant (blktap's tap-ctl sends it as it is). `null:` names no file; no type, or
        # no path, is the tapdisk's to refuse, with blktap's errno.
        kind, sep, rest = text.partition(":")
        file = rest if sep and not log else text
        # `-2 nbd:NAME`: no file but a socket handed over on nbdclient<pid> by that name.
        passed = name == "2" and kind == "nbd" and "/" not in rest
        if (file and not file.startswith("/") and not passed
                and (log or (sep and kind != NULL_TYPE))):
            raise Usage(f"{self.command}: -{name} {text}: the path must be absolute")
        return text


Handler = Callable[[Options], int]


class Command(NamedTuple):
    name: str
    shortopts: str
    synopsis: str
    run: Handler
    longopts: tuple[str, ...] = ()
    help_to_stderr: bool = False  # blktap's `attach -h` prints its usage on stderr


def _pid(opts: Options) -> int:
    return opts.required("p", "pid", 1, (1 << 31) - 1)


def _minor(opts: Options, *, extra: tuple[int, ...] = ()) -> int:
    return opts.required("m", "minor", 0, MAX_MINOR - 1, extra=extra)


def _refusal(exc: OSError, opts: Options, pid: int) -> int:
    """The exit status blktap's tap-ctl gives a failure: its library turns an ERROR
    answer to ATTACH (control/tap-ctl-attach.c) or DETACH (tap-ctl-detach.c, which also
    prints a line on stdout) into EINVAL; other failures keep their errno."""
    from .client import CtlError
    from .protocol import MessageType, message_name

    code = exc.errno or errno.EIO
    if opts.precise or not isinstance(exc, CtlError):
        return code
    if exc.refused is MessageType.DETACH:
        print(f"got unexpected result '{message_name(MessageType.ERROR)}' from {pid}")
        return errno.EINVAL
    if exc.refused is MessageType.ATTACH:
        return errno.EINVAL
    return code


def _report(exc: OSError, opts: Options, code: int | None = None) -> int:
    """Print `strerror` (with the tapdisk's detail under --precise); the exit status."""
    from .client import CtlError

    code = code if code is not None else exc.errno or errno.EIO
    text = os.strerror(code)
    if opts.precise:
        detail = exc.detail if isinstance(exc, CtlError) else exc.strerror
        if detail and detail != text:
            text = f"{text}: {detail}"
    print(text, file=sys.stderr)
    return code


class Failed(Exception):
    """A command failed with `code`; its message was printed already."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _client(pid: int) -> TapdiskClient:
    from .client import TapdiskClient

    return TapdiskClient(pid)


def _guard(opts: Options, pid: int, call: Callable[[], object]) -> None:
    """Run one control call; a failure is reported as blktap's tap-ctl does."""
    try:
        call()
    except OSError as exc:
        raise Failed(_report(exc, opts, _refusal(exc, opts, pid))) from None


# -- list -------------------------------------------------------------------------------


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


def cmd_list(opts: Options) -> int:
    minor = opts.number("m", "minor", 0, MAX_MINOR - 1)
    pid = opts.number("p", "pid", 1, (1 << 31) - 1)
    kind, path = opts.text("t"), opts.text("f")
    # `-p`: that tapdisk's rows only, no orphan minors (control/tap-ctl-list.c).
    found = ops.list_pid(pid) if pid is not None else ops.list_all()
    entries = [
        e for e in found
        if (minor is None or e.minor == minor) and (pid is None or e.pid == pid)
        and (kind is None or e.type == kind) and (path is None or e.path == path)
    ]
    if opts.flag("json"):
        import json

        rows = [e.as_dict() | {"state_bits": _bit_names(e.state)} for e in entries]
        print(json.dumps(rows))
        return 0
    render = format_row if sys.stdout.isatty() else format_dict
    for entry in entries:
        print(render(entry))
    return 0


# -- minors and tapdisks ----------------------------------------------------------------


def cmd_allocate(opts: Options) -> int:
    print(ops.allocate(devname=opts.text("d")))
    return 0


def cmd_free(opts: Options) -> int:
    ops.free(_minor(opts))
    return 0


def cmd_spawn(opts: Options) -> int:
    pid = ops.spawn()
    # control/tap-ctl.c: a sentence on a terminal, the bare pid for scripts.
    print(f"tapdisk spawned with pid {pid}" if sys.stdout.isatty() else pid)
    return 0


def cmd_attach(opts: Options) -> int:
    pid, minor = _pid(opts), _minor(opts)
    _guard(opts, pid, lambda: _client(pid).attach(minor))
    return 0


def cmd_detach(opts: Options) -> int:
    pid, minor = _pid(opts), _minor(opts)
    _guard(opts, pid, lambda: _client(pid).detach(minor))
    return 0


# -- images -------------------------------------------------------------------------------


class OpenArgs(NamedTuple):
    """What create and open send with OPEN."""

    flags: int
    prt_minor: int
    req_timeout: int
    secondary: str
    logpath: str | None


def _open_args(opts: Options) -> OpenArgs:
    from .protocol import NO_PARENT, OpenFlags

    flags = OpenFlags(0)
    for name, flag in (("R", OpenFlags.RDONLY), ("D", OpenFlags.NO_O_DIRECT),
                       ("r", OpenFlags.ADD_LCACHE), ("s", OpenFlags.STANDBY)):
        if opts.flag(name):
            flags |= flag
    prt = opts.number("e", "minor", 0, MAX_MINOR - 1)
    if prt is not None:
        flags |= OpenFlags.REUSE_PRT
    secondary = opts.path("2")
    if secondary is not None:
        flags |= OpenFlags.SECONDARY
    logpath = opts.path("C", log=True)
    timeout = opts.number("t", "timeout", 0, 0xFFFF)  # params.req_timeout is a u16
    return OpenArgs(int(flags), NO_PARENT if prt is None else prt, timeout or 0,
                    secondary or "", logpath)


def _read_key() -> bytes:
    """`open -E`: one read of the key from stdin; blktap's tap-ctl takes 32 or 64 bytes
    and otherwise stops with exit status 1 (control/tap-ctl.c, tap_cli_open)."""
    key = os.read(sys.stdin.fileno(), KEY_READ)
    if len(key) not in KEY_SIZES:
        print(f"tap-ctl: the key read from stdin is {len(key)} bytes, not "
              f"{' or '.join(map(str, KEY_SIZES))}", file=sys.stderr)
        raise Failed(1)
    from .protocol import MAX_KEY

    assert len(key) <= MAX_KEY
    return key


def cmd_create(opts: Options) -> int:
    params = opts.path("a", required=True)
    assert params is not None
    args = _open_args(opts)
    try:
        # `-d` is taken and not used: blktap 4.0.8's tap_ctl_create allocates the lowest
        # free minor whatever -d said (control/tap-ctl-allocate.c overwrites the name).
        _, _, devname = ops.create(
            params, flags=args.flags, prt_minor=args.prt_minor,
            req_timeout=args.req_timeout, secondary=args.secondary, logpath=args.logpath)
    except OSError as exc:
        from .client import CtlError
        from .protocol import MessageType

        # tap_ctl_create: an ATTACH refused is EINVAL, as `attach` (no stdout line).
        code = exc.errno or errno.EIO
        if (not opts.precise and isinstance(exc, CtlError)
                and exc.refused is MessageType.ATTACH):
            code = errno.EINVAL
        raise Failed(_report(exc, opts, code)) from None
    print(devname)
    return 0


def cmd_destroy(opts: Options) -> int:
    pid, minor = _pid(opts), _minor(opts)
    timeout = opts.seconds("t")
    client = _client(pid)
    # control/tap-ctl-destroy.c: close, detach, free; the first failure ends it.
    _guard(opts, pid, lambda: client.close(minor, timeout=timeout))
    _guard(opts, pid, lambda: client.detach(minor))
    _guard(opts, pid, lambda: ops.free(minor))
    return 0


def cmd_open(opts: Options) -> int:
    pid, minor = _pid(opts), _minor(opts)
    params = opts.path("a", required=True)
    assert params is not None
    args = _open_args(opts)
    key = _read_key() if opts.flag("E") else None
    _guard(opts, pid, lambda: _client(pid).open(
        minor, params, args.flags, prt_minor=args.prt_minor, req_timeout=args.req_timeout,
        secondary=args.secondary, logpath=args.logpath, key=key))
    return 0


def cmd_close(opts: Options) -> int:
    pid, minor = _pid(opts), _minor(opts)
    timeout = opts.seconds("t")
    _guard(opts, pid, lambda: _client(pid).close(
        minor, force=opts.flag("f"), timeout=timeout))
    return 0


def cmd_pause(opts: Options) -> int:
    pid, minor = _pid(opts), _minor(opts)
    timeout = opts.seconds("t")
    _guard(opts, pid, lambda: _client(pid).pause(minor, timeout=timeout))
    return 0


def cmd_unpause(opts: Options) -> int:
    pid, minor = _pid(opts), _minor(opts)
    from .protocol import OpenFlags

    params, secondary, logpath = opts.path("a"), opts.path("2"), opts.path("c", log=True)
    flags = OpenFlags.SECONDARY if secondary is not None else OpenFlags(0)
    _guard(opts, pid, lambda: _client(pid).resume(
        minor, params or "", int(flags), secondary or "", logpath=logpath))
    return 0


def cmd_stats(opts: Options) -> int:
    from .client import CtlError
    from .protocol import ALL_VBDS

    pid = _pid(opts)
    minor = _minor(opts, extra=(ALL_VBDS,))  # blktap's -m 65535 asks for every VBD
    try:
        text = _client(pid).stats(minor)
    except CtlError as exc:
        if exc.refused is None or opts.precise:
            raise Failed(_report(exc, opts)) from None
        # blktap's tap-ctl does not look at the reply's type: an ERROR reads as an empty
        # body (control/tap-ctl-stats.c, tap_ctl_stats_fwrite).
        text = ""
    # The body, then a newline from the library and one from the command.
    sys.stdout.write(text + "\n\n")
    return 0


def cmd_resize(opts: Options) -> int:
    from .protocol import ResumeFlags

    pid, minor = _pid(opts), _minor(opts)
    timeout = opts.seconds("t")
    client = _client(pid)

    def resize() -> None:
        paused = any(vbd.minor == minor and vbd.state & VbdStateBits.PAUSED
                     for vbd in client.list())
        if not paused:
            client.pause(minor, timeout=timeout)
        client.resume(minor, flags=int(ResumeFlags.RESIZE))

    _guard(opts, pid, resize)
    return 0


# -- blktap 3.x's environment commands ----------------------------------------------------


def check_environment() -> tuple[int, str] | None:
    """Why a tapdisk could not run here, as (errno, reason), or None: the runtime root
    must be (or be creatable as) a directory we can use, and the tapdisk command must
    exist."""
    root = runtime.root_dir()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return errno.ENOTDIR, f"{existing} is not a directory"
    if not os.access(existing, os.R_OK | os.W_OK | os.X_OK):
        return errno.EACCES, f"{existing} is not writable"
    import shutil

    program = ops.tapdisk_command()[0]
    if shutil.which(program) is None:
        return errno.ENOENT, f"tapdisk not found: {program}"
    return None


def cmd_check(opts: Options) -> int:
    # blktap 3.x (control/tap-ctl-check.c, tap-ctl.c's tap_cli_check): "ok" or why not
    # on stdout, the errno as the exit status (and strerror on stderr, as for every
    # failing command).
    if opts.operands:
        raise Usage("")
    problem = check_environment()
    if problem is None:
        print("ok")
        return 0
    code, reason = problem
    print(reason)
    print(os.strerror(code), file=sys.stderr)
    return code


def blk_major(devices: Path | None = None) -> int | None:
    """The block major of blktap's kernel driver (`tapdev` in /proc/devices), if any."""
    try:
        lines = (devices or PROC_DEVICES).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        number, _, name = line.strip().partition(" ")
        if name == "tapdev" and number.isdigit():
            return int(number)
    return None


def cmd_major(opts: Options) -> int:
    # blktap 3.x (control/tap-ctl-major.c): the major, else ENODEV; -c (a character
    # major) is EINVAL. blktap3 has no kernel driver, so this finds one only where
    # blktap2's module is loaded.
    if opts.flag("c") and not opts.flag("b"):
        print(os.strerror(errno.EINVAL), file=sys.stderr)
        return errno.EINVAL
    major = blk_major()
    if major is None:
        print(os.strerror(errno.ENODEV), file=sys.stderr)
        return errno.ENODEV
    print(major)
    return 0


PID_MINOR = "-p <pid> -m <minor>"
OPEN_OPTIONS = ("[-R] [-D] [-e <parent minor>] [-r] [-2 <type:/path>] [-s] "
                "[-t <request timeout, s>] [-C <log path>]")

COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("list", "m:p:t:f:h", "list [-p <pid>] [-m <minor>] [-t <type>] [-f <path>] "
            "[--json]\n  columns on a terminal: pid minor state type file", cmd_list,
            longopts=("json",)),
    Command("allocate", "d:h", "allocate [-d <device name>]", cmd_allocate),
    Command("free", "m:h", "free -m <minor>", cmd_free),
    Command("create", "a:RDd:e:r2:st:C:h",
            f"create -a <type:/path> [-d <device name>] {OPEN_OPTIONS}", cmd_create),
    Command("destroy", "p:m:t:h", f"destroy {PID_MINOR} [-t <seconds>]", cmd_destroy),
    Command("spawn", "h", "spawn", cmd_spawn),
    Command("attach", "p:m:h", f"attach {PID_MINOR}", cmd_attach, help_to_stderr=True),
    Command("detach", "p:m:h", f"detach {PID_MINOR}", cmd_detach),
    Command("open", "a:RDm:p:e:r2:st:C:Eh",
            f"open {PID_MINOR} -a <type:/path> {OPEN_OPTIONS} [-E (key on stdin)]",
            cmd_open),
    Command("close", "p:m:ft:h", f"close {PID_MINOR} [-f (force)] [-t <seconds>]",
            cmd_close),
    Command("pause", "p:m:t:h", f"pause {PID_MINOR} [-t <seconds>]", cmd_pause),
    Command("unpause", "p:m:a:2:c:h",
            f"unpause {PID_MINOR} [-a <type:/path>] [-2 <type:/path>] [-c <log path>]",
            cmd_unpause),
    Command("stats", "p:m:h", f"stats {PID_MINOR}\n  the VBD's statistics as JSON",
            cmd_stats),
    Command("major", "bch", "major [-b | -c]", cmd_major),
    Command("check", "h", "check\n  whether a tapdisk can run here", cmd_check),
    Command("resize", "p:m:t:h", f"resize {PID_MINOR} [-t <seconds>]\n  the image grew: "
            "reopen it at its new size", cmd_resize),
)}


def _usage(command: Command) -> str:
    return f"usage: tap-ctl {command.synopsis}\n"


def _help() -> int:
    """No command or an unknown one: the commands, on stdout, exit 0 (blktap's help())."""
    sys.stdout.write("usage: tap-ctl <command> [options] [--debug] [--precise]\n"
                     f"commands: {' '.join(COMMANDS)}\n")
    return 0


def _getopt_line(command: str, exc: getopt.GetoptError) -> str:
    """glibc getopt's complaint, which blktap's tap-ctl prints before its usage."""
    opt = exc.opt
    if "requires argument" in exc.msg:
        return (f"{command}: option requires an argument -- '{opt}'" if len(opt) == 1
                else f"{command}: option '--{opt}' requires an argument")
    if len(opt) == 1:
        return f"{command}: invalid option -- '{opt}'"
    return f"{command}: unrecognized option '--{opt}'"


def parse(command: Command, words: Sequence[str], precise: bool) -> Options:
    try:
        pairs, operands = getopt.gnu_getopt(list(words), command.shortopts,
                                            list(command.longopts))
    except getopt.GetoptError as exc:
        raise Usage(_getopt_line(command.name, exc)) from None
    opts = Options(command.name, operands=operands, precise=precise)
    for name, value in pairs:
        opts.values[name.lstrip("-")] = value
    return opts


def _configure_logging(debug: bool) -> None:
    """--debug: blktap's lines for each message sent and received, on stdout; anything
    else the library logs at debug level, on stderr. Without it, lines below warning are
    dropped before structlog is even imported (`tap-ctl list` stays fast); structlog is
    configured at the first line that passes."""
    lazylog.set_threshold(lazylog.DEBUG if debug else lazylog.WARNING,
                          lambda: _configure_structlog(debug))


def _configure_structlog(debug: bool) -> None:
    import structlog

    from .protocol import MessageType, message_name

    def blktap_lines(_: Any, __: str, event: MutableMapping[str, Any]
                     ) -> MutableMapping[str, Any]:
        verb = {"send": "sending", "receive": "received"}.get(event.get("event", ""))
        if verb is not None and "type" in event:
            name = message_name(MessageType[event["type"]])
            print(f"{verb} '{name}' message (uuid = {event.get('cookie', 0)})", flush=True)
            raise structlog.DropEvent
        return event

    structlog.configure(
        processors=[blktap_lines, structlog.processors.add_log_level,
                    structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(
            lazylog.DEBUG if debug else lazylog.WARNING),
        # Looked up per call, not bound now: whatever sys.stderr is when a line is logged.
        logger_factory=lambda *_: structlog.WriteLogger(sys.stderr),
    )


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM and SIGHUP unwind as ^C does: a create stopped half-way undoes what it did
    # (ctl.ops.create), then tap-ctl ends as the signal would have ended it.
    cmdline.terminate_as_interrupt()
    try:
        return _main(argv)
    except KeyboardInterrupt as stopped:
        cmdline.die_like(stopped)


def _main(argv: Sequence[str] | None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    debug, precise = DEBUG_FLAG in words, PRECISE_FLAG in words
    words = [w for w in words if w not in (DEBUG_FLAG, PRECISE_FLAG)]
    _configure_logging(debug)
    command = COMMANDS.get(words[0]) if words else None
    if command is None:
        return _help()
    try:
        opts = parse(command, words[1:], precise)
        if opts.flag("h"):
            stream = sys.stderr if command.help_to_stderr else sys.stdout
            stream.write(_usage(command))
            return 0
        return command.run(opts)
    except Usage as exc:
        line = str(exc)
        sys.stderr.write((f"{line}\n" if line else "") + _usage(command)
                         + os.strerror(errno.EINVAL) + "\n")
        return errno.EINVAL
    except Failed as failed:
        return failed.code
    except BrokenPipeError:
        return 0  # `tap-ctl list | head`: the reader left, not an error
    except ValueError as exc:
        from .protocol import ProtocolError

        if not isinstance(exc, ProtocolError):
            raise
        # A value the control message cannot carry that the parser did not catch.
        text = os.strerror(errno.EINVAL)
        print(f"{text}: {exc}" if precise else text, file=sys.stderr)
        return errno.EINVAL
    except OSError as exc:
        return _report(exc, Options(command.name, precise=precise))


if __name__ == "__main__":
    sys.exit(main())
