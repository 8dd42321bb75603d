"""Man pages of the console scripts, made from their argument parsers.

Every console script of the package gets a page: its synopsis, options and defaults come
from its parser (`build_parser()` beside its `main`; for tap-ctl, blktap's getopt table
`blktap3.ctl.cli.COMMANDS`), so a page cannot drift from the command; what a parser does
not know (the environment, the files, the exit status) is this module's table `PAGES`.
A command without a `build_parser` or without an entry here fails the test that checks
the committed pages (tests/unit/tools/test_manpages.py): add them, then regenerate.

    python -m blktap3.tools.manpages [-o contrib/man]   write <name>.<section>
    python -m blktap3.tools.manpages --check            exit 1 when a page is stale
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blktap3 import __version__

DEFAULT_OUT = Path("contrib/man")

CONTROL_DIR = ("BLKTAP_CONTROL_DIR", "The runtime root of tapdisks: control sockets "
               "ctl<pid>, minors, NBD sockets, logs. Default /run/blktap-control.")
TAPDISK_CMD = ("BLKTAP_TAPDISK", "The command line (shell words) of the tapdisk to spawn. "
               "Default: this Python's `-m blktap3.tapdisk`.")
XENSTORED = ("XENSTORED_PATH", "The xenstored socket or xenbus device. Else "
             "$XENSTORED_RUNDIR/socket, else /var/run/xenstored/socket.")
RUN_DIR = ("/run/blktap-control", "The runtime root (0700, root's): ctl<pid> sockets, "
           "tapdisk/tapdisk-<minor> minor markers, nbd*<pid>.<minor> NBD sockets, "
           "log/tapdisk<pid>.log.")
USAGE_EXIT = ("2", "A bad option or argument: one line saying which, and the usage.")


@dataclass(frozen=True)
class Page:
    """What a parser does not say about a command."""

    section: int
    description: str
    environment: tuple[tuple[str, str], ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    exit_status: tuple[tuple[str, str], ...] = (("0", "Success."), ("1", "Failure."),
                                                USAGE_EXIT)
    see_also: tuple[str, ...] = ("tap-ctl(8)", "tapback(8)", "tapdisk(8)")


PAGES: dict[str, Page] = {
    "tap-ctl": Page(
        8,
        "Controls tapdisk processes and their virtual block devices (VBDs): allocates "
        "minors, spawns tapdisks, attaches, opens, pauses, closes and lists VBDs. A "
        "drop-in for blktap's tap-ctl: same commands, flags, output formats and exit "
        "status (scripts parse them). Options are parsed as getopt(3) does (-m0, options "
        "after operands, the last of a repeated option wins). --debug (anywhere) prints "
        "each control message sent and received; --precise (anywhere) keeps the "
        "tapdisk's own errno and prints its reason after strerror. Unlike blktap's, "
        "numbers are checked (a typo is a usage error, not minor 0) and image and log "
        "paths must be absolute (a tapdisk works from /).",
        environment=(CONTROL_DIR, TAPDISK_CMD),
        files=(RUN_DIR,),
        exit_status=(
            ("0", "Success; also no command or an unknown one (the list of commands is "
                  "printed), and -h."),
            ("errno", "A failing command prints strerror(errno) on stderr and exits with "
                      "that errno (e.g. 2 ENOENT, 16 EBUSY, 19 ENODEV); an ERROR answer "
                      "to attach or detach is 22, as blktap's."),
            ("22", "EINVAL: a bad option, a missing required one, or a bad number or "
                   "path: the reason, the usage and strerror(EINVAL) on stderr."),
            ("1", "open -E: the key read from stdin is not 32 or 64 bytes."),
        ),
        see_also=("tapback(8)", "tapdisk(8)", "getopt(3)"),
    ),
    "tapdisk": Page(
        8,
        "One tapdisk process: serves VBDs on its control socket <root>/ctl<pid>, their "
        "images through the C data path (io_uring), their guests' blkif rings and their "
        "NBD exports. As blktap's, it daemonizes and prints its socket path once the "
        "socket accepts requests; unlike blktap's, one that cannot start says why on "
        "stderr and exits with that errno. It exits when its last VBD is detached, on "
        "EXIT while idle, or on SIGTERM/SIGINT (removing its sockets). Spawned by "
        "tap-ctl spawn/create and by tapback, rarely by hand. Needs root on a real Xen "
        "host: /dev/xen/gntdev and /dev/xen/evtchn are root's.",
        environment=(CONTROL_DIR,
                     ("BLKTAP_TAPDISK_LOG", "The daemon's log file (--log wins)."),
                     ("BLKTAP3_RING_POLL_US", "Microseconds the ring service spins before "
                      "it sleeps (default 0).")),
        files=(RUN_DIR, ("/dev/xen/gntdev, /dev/xen/evtchn", "Grant mapping and event "
                         "channels, through libxengnttab and libxenevtchn.")),
        exit_status=(("0", "The daemon started (the socket path was printed)."),
                     ("errno", "It could not start: the reason on stderr, the errno as "
                      "the exit status (e.g. 2 ENOENT: the root's parent is missing)."),
                     USAGE_EXIT),
    ),
    "tapback": Page(
        8,
        "The blktap3 back-end daemon: watches backend/<kind>/ in XenStore, runs the "
        "xenbus handshake of every VBD of this domain, connects each VBD's tapdisk to its "
        "guest's ring and publishes the disk's size, info and features. Without -d it "
        "daemonizes once watching (blktap's Type=forking unit runs it unchanged); "
        "contrib/systemd/tapback.service runs it with -d. Restarted, it adopts the VBDs "
        "it had connected. SIGTERM and SIGINT stop it; tapdisks keep serving. Needs "
        "root: the xenstored socket is root's.",
        environment=(CONTROL_DIR, XENSTORED, TAPDISK_CMD),
        files=(RUN_DIR,
               ("/run/blktap-control/tapback.vbd3.status.json", "Every VBD's machine state "
                "(--status-file)."),
               ("/var/run/xenstored/socket", "xenstored's socket (or /dev/xen/xenbus).")),
        exit_status=(("0", "Stopped by a signal; or, daemonizing, the daemon is watching."),
                     ("1", "It failed (the reason in its log), or the daemon stopped "
                      "before it watched XenStore."),
                     USAGE_EXIT),
        see_also=("tap-ctl(8)", "tapdisk(8)", "xenstored(8)", "systemd.service(5)"),
    ),
    "blktap3-vbd3": Page(
        8,
        "Attaches and detaches vbd3 disks as Xen's libxl and its block-tap script would, "
        "for hosts whose libxl cannot (Xen 4.17, Debian 12): the back-end and front-end "
        "directories with libxl's keys and permissions in one transaction, then block-tap's "
        "tap-ctl steps, then a wait until tapback took the VBD; detach sets online=0 and "
        "Closing, waits for Closed (10 s, libxl's timeout), runs tap-ctl destroy and removes "
        "both directories. Both are idempotent and safe to run again after a crash. Attach "
        "to a paused guest (xl create -p, then xl unpause); detach before xl destroy.",
        environment=(XENSTORED, CONTROL_DIR),
        files=(RUN_DIR,),
        exit_status=(("0", "Success."), ("1", "A failure, told in one line on stderr."),
                     USAGE_EXIT),
        see_also=("tapback(8)", "tap-ctl(8)", "xl(1)"),
    ),
    "blktap3-conformance": Page(
        1,
        "Runs the conformance scenarios of specs/ (front-end personalities, faults, the "
        "outcome expected at each step) against the real tapback and tapdisk on the "
        "simulated host, and prints a table.",
        exit_status=(("0", "Every scenario behaved as expected."),
                     ("1", "A scenario did not."), USAGE_EXIT)),
    "vhd-util": Page(
        8,
        "blktap's VHD tool, for what storage managers call of it: the same commands, "
        "options, output lines and exit codes as blktap's vhd-util (v4.0.8). Each "
        "command's options are blktap's (its getopt string); run a command with -h for "
        "its usage line.",
        exit_status=(("0", "Success."),
                     ("errno", "A command failed: the absolute value of its negative "
                      "errno."),
                     ("22", "EINVAL: no command, an unknown one, or bad options (the "
                      "usage line on stdout, as blktap's).")),
        see_also=("tap-ctl(8)", "tapdisk(8)")),
    "cbt-util": Page(
        8,
        "blktap's tool for changed-block-tracking logs (the files tap-ctl's -C and "
        "unpause -c name): create a log, set and get its parent and child UUIDs, "
        "consistency flag and disk size, print its bitmap (one bit per 64 KiB), "
        "coalesce a parent's bitmap into a child's; the same options, output and exit "
        "codes as blktap's cbt-util (v4.0.8).",
        exit_status=(("0", "Success; also an unknown command (as blktap's)."),
                     ("errno", "A command failed: the absolute value of its negative "
                      "errno."),
                     ("22", "EINVAL: no command or bad options (the usage on stdout, as "
                      "blktap's).")),
        see_also=("tap-ctl(8)", "tapdisk(8)")),
    "blktap3-sim": Page(
        1,
        "The simulated Xen host: Debian's xenstored under xensim (a preloaded library "
        "standing in for the hypervisor), tapback, a toolstack (domains, vbd3 disks) and "
        "simulated guests, for trying blktap3 on a machine without Xen.",
        environment=(("BLKTAP3_SIM_DIR", "The state directory (default /run/blktap3-sim)."),
                     ("XDG_CACHE_HOME", "Where libxensim is built when the package "
                      "directory is not writable (default ~/.cache).")),
        files=(("/run/blktap3-sim", "The simulated machine, xenstored's socket, "
                "blktap-control/ (the tapdisks' runtime root), logs."),),
    ),
    "blktap3-fsm": Page(1, "Checks the state machines declared in specs/*.toml "
                        "(reachability, ways out, bound callbacks, phases, dead rows) and "
                        "prints their tables.",
                        exit_status=(("0", "Success; check: no problem."),
                                     ("1", "check: a spec has a problem."), USAGE_EXIT)),
    "blktap3-diagram": Page(1, "Draws the state machines of specs/*.toml (DOT, SVG, PNG, "
                            "Mermaid), optionally with a state marked, or the state a "
                            "running tapback reports for a VBD.",
                            environment=(CONTROL_DIR,),
                            files=(("docs/", "The default output directory."),),
                            exit_status=(("0", "Success."),
                                         ("1", "A spec, the status file or an output "
                                          "could not be used."), USAGE_EXIT)),
    "blktap3-torture": Page(
        1,
        "Long hostile, SIGKILL, pause and churn runs against the real tapdisk, data path "
        "and tapback "
        "(ring: a random-hostile guest against the ASan+UBSan build beside a verifying "
        "one; kill: SIGKILL under flushed writes, every flushed block checked; pause: "
        "pause/unpause and image swaps under a verifying load; churn: guests created and "
        "destroyed mid-I/O while tapback and xenstored are SIGKILLed, nothing may leak), "
        "each bounded, printing its figures.",
        exit_status=(("0", "Nothing was lost, wrong, crashed, hung or leaked."),
                     ("1", "Something was (the figures say what)."), USAGE_EXIT)),
    "blktap3-bench": Page(1, "Measures the data path against fio on the same file in the "
                          "same run and prints the ratios. SIGINT, SIGTERM and SIGHUP "
                          "stop it cleanly: its tapdisks and its file are removed.",
                          exit_status=(("0", "Success."), ("130", "Interrupted (after "
                                       "cleaning up)."), USAGE_EXIT),
                          see_also=("fio(1)",)),
}


def scripts() -> dict[str, str]:
    """The package's console scripts: name -> `module:function`."""
    dist = importlib.metadata.distribution("blktap3")
    return {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}


def _roff(text: str) -> str:
    """Text safe in a roff line: backslashes and hyphens escaped, no leading control
    character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def _section(title: str) -> str:
    return f".SH {title}\n"


def _tagged(tag: str, text: str) -> str:
    return f".TP\n{tag}\n{_roff(text)}\n"


def _option_tag(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    return f"{names} \\fI{_roff(str(metavar))}\\fR"


def _help(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    text = (action.help or "").strip()
    if text and "%(" in text:
        text = text % {"default": action.default, "prog": parser.prog}
    if action.choices is not None and not isinstance(action.choices, dict):
        choices = ", ".join(map(str, action.choices))
        text = f"{text} (one of: {choices})" if text else f"One of: {choices}."
    default = action.default
    if (action.option_strings and action.nargs != 0 and default not in (None, argparse.SUPPRESS)
            and "default" not in text):
        text = f"{text} (default: {default})" if text else f"Default: {default}."
    return text or "(no description)"


def _actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:  # argparse's own list; there is no public one
        if action.help != argparse.SUPPRESS:
            yield action


Subcommand = tuple[str, argparse.ArgumentParser, str]


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[Subcommand]:
    """(words, parser, help) of every subcommand, depth first."""
    for action in _actions(parser):
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, sub, helps.get(name, "")
                for words, deeper, text in _subcommands(sub):
                    yield f"{name} {words}", deeper, text


def _arguments(parser: argparse.ArgumentParser) -> str:
    out = ""
    for action in _actions(parser):
        if isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            out += f".TP\n{_option_tag(action)}\n{_roff(_help(action, parser))}\n"
        else:
            metavar = action.metavar or action.dest
            out += _tagged(f"\\fI{_roff(str(metavar))}\\fR", _help(action, parser))
    return out


def _usage(parser: argparse.ArgumentParser) -> str:
    text = " ".join(parser.format_usage().split())
    return text.removeprefix("usage: ")


def _header(name: str, page: Page, summary: str) -> str:
    manual = "System Administration" if page.section == 8 else "User Commands"
    return (f'.TH {name.upper()} {page.section} "" "blktap3 {__version__}" "{manual}"\n'
            + _section("NAME") + f"{_roff(name)} \\- {_roff(summary)}\n")


def _footer(page: Page) -> str:
    out = ""
    for title, rows in (("ENVIRONMENT", page.environment), ("FILES", page.files),
                        ("EXIT STATUS", page.exit_status)):
        if rows:
            out += _section(title) + "".join(_tagged(f"\\fB{_roff(k)}\\fR", v)
                                             for k, v in rows)
    if page.see_also:
        out += _section("SEE ALSO") + ", ".join(
            f"\\fB{_roff(ref.partition('(')[0])}\\fR({ref.partition('(')[2]}"
            for ref in page.see_also) + "\n"
    return out


def argparse_page(name: str, page: Page, parser: argparse.ArgumentParser) -> str:
    summary = (parser.description or "").strip().splitlines()[0].strip("`")
    out = _header(name, page, summary.rstrip("."))
    usage = _usage(parser).removeprefix(parser.prog).strip()
    out += _section("SYNOPSIS") + f".B {_roff(name)}\n{_roff(usage)}\n"
    out += _section("DESCRIPTION") + _roff(page.description) + "\n"
    out += _section("OPTIONS") + _arguments(parser)
    subs = list(_subcommands(parser))
    if subs:
        out += _section("COMMANDS")
        for words, sub, text in subs:
            usage = _usage(sub).removeprefix(parser.prog).strip()
            out += f".SS {_roff(words)}\n.B {_roff(usage)}\n.PP\n{_roff(text or words)}\n"
            out += _arguments(sub)
    return out + _footer(page)


# tap-ctl's options by command (blktap's getopt letters); "*" where a letter means the
# same in every command that takes it.
TAP_CTL_OPTIONS: dict[tuple[str, str], str] = {
    ("*", "p"): "The tapdisk's pid (1..2^31-1).",
    ("*", "m"): "The VBD's minor (0..16383).",
    ("*", "a"): "The image, type:/path (aio, raw, null); the path absolute.",
    ("*", "R"): "Read-only.",
    ("*", "D"): "Without O_DIRECT.",
    ("*", "e"): "The parent's minor (REUSE_PRT).",
    ("*", "r"): "Add a local read cache (refused: EOPNOTSUPP).",
    ("*", "2"): "A secondary image, type:/path (refused: EOPNOTSUPP).",
    ("*", "s"): "Standby (refused: EOPNOTSUPP).",
    ("*", "C"): "The changed-block log's path, absolute (refused: EOPNOTSUPP).",
    ("allocate", "d"): "Allocate this device's minor, <root>/tapdisk/tapdisk-<minor> "
                       "(EEXIST if taken).",
    ("create", "d"): "Taken and not used, as by blktap 4.0.8's: the lowest free minor is "
                     "allocated.",
    ("*", "t"): "Seconds to wait for the tapdisk's answer (default 120).",
    ("create", "t"): "The request timeout of the image, seconds (0..65535; default 0: none).",
    ("open", "t"): "The request timeout of the image, seconds (0..65535; default 0: none).",
    ("list", "t"): "Only VBDs of this image type.",
    ("list", "f"): "Only VBDs of this image path.",
    ("list", "json"): "One JSON array of the rows, with their state bits named.",
    ("close", "f"): "Force: close even with requests in flight.",
    ("open", "E"): "Read the image's key (32 or 64 bytes) from stdin (refused: EOPNOTSUPP).",
    ("unpause", "c"): "The changed-block log's path, absolute.",
    ("major", "b"): "The block major (the default).",
    ("major", "c"): "The character major: EINVAL, there is none.",
}


def tap_ctl_letters() -> Iterator[tuple[str, str]]:
    """(command, option) of every option tap-ctl's parser takes, -h aside."""
    from blktap3.ctl import cli

    for command in cli.COMMANDS.values():
        letters = [c for c in command.shortopts if c not in ":h"]
        for letter in [*letters, *command.longopts]:
            yield command.name, letter


def tap_ctl_option_text(command: str, letter: str) -> str:
    return TAP_CTL_OPTIONS.get((command, letter)) or TAP_CTL_OPTIONS[("*", letter)]


def tap_ctl_page(page: Page) -> str:
    from blktap3.ctl import cli

    out = _header("tap-ctl", page, "control tapdisk processes and their VBDs")
    out += _section("SYNOPSIS") + ".B tap\\-ctl\n\\fICOMMAND\\fR [\\fIoptions\\fR] " \
        "[\\fB\\-\\-debug\\fR] [\\fB\\-\\-precise\\fR]\n"
    out += _section("DESCRIPTION") + _roff(page.description) + "\n"
    out += _section("COMMANDS")
    for command in cli.COMMANDS.values():
        synopsis, _, text = command.synopsis.partition("\n")
        out += f".SS {_roff(command.name)}\n.B tap\\-ctl {_roff(synopsis)}\n"
        if text.strip():
            out += f".PP\n{_roff(text.strip())}\n"
        for name, letter in tap_ctl_letters():
            if name == command.name:
                flag = f"-{letter}" if len(letter) == 1 else f"--{letter}"
                out += _tagged(f"\\fB{_roff(flag)}\\fR", tap_ctl_option_text(name, letter))
        out += _tagged("\\fB\\-h\\fR", "Print the usage and exit 0.")
    return out + _footer(page)


def render(name: str, target: str) -> str:
    """The page of console script `name` (`module:function`)."""
    page = PAGES[name]
    if name == "tap-ctl":
        return tap_ctl_page(page)
    module = importlib.import_module(target.partition(":")[0])
    build = getattr(module, "build_parser", None) or getattr(module, "parser", None)
    if build is None:  # a getopt command with a COMMANDS table (vhd-util, as blktap's)
        return commands_page(name, page, module)
    parser: argparse.ArgumentParser = build()
    return argparse_page(name, page, parser)


def commands_page(name: str, page: Page, module: Any) -> str:
    """The page of a getopt command: its docstring's first line, its commands."""
    summary = (module.__doc__ or name).strip().splitlines()[0].partition(": ")[2] or name
    out = _header(name, page, summary.rstrip("."))
    out += _section("SYNOPSIS") + f".B {_roff(name)}\n\\fICOMMAND\\fR [\\fIoptions\\fR]\n"
    out += _section("DESCRIPTION") + _roff(page.description) + "\n"
    out += _section("COMMANDS") + "".join(
        f".TP\n\\fB{_roff(command)}\\fR\n{_roff(name)} {_roff(command)} \\-h: its usage\n"
        for command in module.COMMANDS)
    return out + _footer(page)


@contextlib.contextmanager
def _documented_environment_unset() -> Iterator[None]:
    """Parsers that show a default read from the environment (a `--run-dir` default of
    $BLKTAP3_SIM_DIR) must show the built-in one: the pages do not depend on who made
    them."""
    names = {name for page in PAGES.values() for name, _ in page.environment}
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def pages() -> dict[str, str]:
    """File name -> text of every console script's page."""
    with _documented_environment_unset():
        return {f"{name}.{PAGES[name].section}": render(name, target)
                for name, target in sorted(scripts().items())}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manpages", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT,
                        help=f"directory of the pages (default: {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a page there differs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stale = []
    for file, text in pages().items():
        path = args.out / file
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    if stale:
        print(f"stale: {' '.join(stale)} (python -m blktap3.tools.manpages)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
