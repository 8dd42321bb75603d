"""tap-ctl's output, usage errors and exit status, as blktap's (no tapdisk needed).

Line numbers cite blktap v4.0.8 (control/tap-ctl.c unless said otherwise), or v3.55.5
for `check` and `major`, the commands 4.0.8 dropped.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from blktap3 import lazylog
from blktap3.ctl import cli, ops, runtime
from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.ctl.ops import TapEntry
from blktap3.ctl.protocol import MessageType, ProtocolError

Capture = pytest.CaptureFixture[str]


@pytest.fixture(autouse=True)
def root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    monkeypatch.setenv(runtime.ROOT_ENV, str(tmp_path))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    yield tmp_path
    for sig, handler in handlers.items():  # main() makes them raise KeyboardInterrupt
        signal.signal(sig, handler)
    structlog.reset_defaults()  # main() configures logging for the whole process
    lazylog.set_threshold(0)


def run(capsys: Capture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("entry", "text"),
    [
        (TapEntry(pid=18672), "pid=18672"),
        (TapEntry(minor=0), "minor=0"),
        (TapEntry(pid=18672, minor=0, state=0), "pid=18672 minor=0 state=0"),
        (TapEntry(18672, 0, 0, "aio", "/path"), "pid=18672 minor=0 state=0 args=aio:/path"),
        (TapEntry(18672, 0, 0x2A, "aio", "/path"),
         "pid=18672 minor=0 state=0x2a args=aio:/path"),
        (TapEntry(18672, 0, 0x2), "pid=18672 minor=0 state=0x2"),
    ],
)
def test_list_off_a_terminal_matches_blktap(entry: TapEntry, text: str) -> None:
    # tap_cli_list_dict (line 86): known fields only, state as %#x.
    assert cli.format_dict(entry) == text


def test_list_on_a_terminal_matches_blktap() -> None:
    # tap_cli_list_row (line 65): "%8s %4s %4s %10s %s", unknown fields as "-".
    assert cli.format_row(TapEntry(18672, 0, 0x2A, "aio", "/path")) == (
        "   18672    0 0x2a        aio /path"
    )
    assert cli.format_row(TapEntry(pid=5)) == "       5    -    -          - -"


def test_list_without_a_runtime_directory_prints_nothing(capsys: Capture) -> None:
    assert run(capsys, "list") == (0, "", "")


def test_orphan_minors_are_listed_in_marker_name_order(capsys: Capture) -> None:
    # control/tap-ctl-list.c:136 globs tapdisk-*, which sorts names as text: 10 before 2.
    for _ in range(11):
        assert cli.main(["allocate"]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "list")
    assert code == 0
    assert out.split() == [f"minor={m}" for m in (0, 1, 10, 2, 3, 4, 5, 6, 7, 8, 9)]


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["-h"]])
def test_no_or_an_unknown_command_lists_the_commands_on_stdout_and_exits_0(
    argv: list[str], capsys: Capture
) -> None:
    # main() calls help() (lines 895-901, 948, 954): stdout, exit(0).
    code, out, err = run(capsys, *argv)
    assert (code, err) == (0, "")
    assert out.startswith("usage: tap-ctl") and "destroy" in out and "unpause" in out


@pytest.mark.parametrize("command", sorted(set(cli.COMMANDS) - {"attach"}))
def test_help_of_a_command_is_its_usage_on_stdout(command: str, capsys: Capture) -> None:
    # Every tap_cli_* answers -h with its usage on stdout and returns 0 (e.g. line 143).
    code, out, err = run(capsys, command, "-h")
    assert (code, err) == (0, "")
    assert out.startswith(f"usage: tap-ctl {command}")


def test_attach_help_goes_to_stderr(capsys: Capture) -> None:
    # Line 486: tap_cli_attach prints its -h usage on stderr (and returns 0).
    code, out, err = run(capsys, "attach", "-h")
    assert (code, out) == (0, "")
    assert err.startswith("usage: tap-ctl attach")


def test_a_missing_option_is_usage_then_strerror_on_stderr(capsys: Capture) -> None:
    # tap_cli_free: no -m -> usage on stderr, EINVAL; main prints strerror (line 981).
    code, out, err = run(capsys, "free")
    assert (code, out) == (errno.EINVAL, "")
    lines = err.splitlines()
    assert lines[0].startswith("usage: tap-ctl free") and lines[-1] == "Invalid argument"


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["list", "-x"], "list: invalid option -- 'x'"),
        (["free", "-m"], "free: option requires an argument -- 'm'"),
        (["stats", "--frob"], "stats: unrecognized option '--frob'"),
    ],
)
def test_a_bad_option_is_getopts_line_the_usage_and_einval(
    argv: list[str], complaint: str, capsys: Capture
) -> None:
    # getopt(3) prints its complaint with argv[0] = the command's name (main builds
    # cargv with cmd->name first, line 962), then the usage, then strerror.
    code, out, err = run(capsys, *argv)
    assert (code, out) == (errno.EINVAL, "")
    lines = err.splitlines()
    assert lines[0] == complaint
    assert lines[1].startswith(f"usage: tap-ctl {argv[0]}")
    assert lines[-1] == "Invalid argument"


def test_options_take_getopts_forms(capsys: Capture) -> None:
    # getopt: "-m7" is "-m 7", options may follow operands, the last repeat wins.
    assert run(capsys, "free", "-m7")[0] == errno.ENOENT
    assert run(capsys, "free", "operand", "-m", "1", "-m", "7")[0] == errno.ENOENT


def test_a_failure_prints_strerror_alone_and_exits_with_the_errno(capsys: Capture) -> None:
    # Line 981: fprintf(stderr, "%s\n", strerror(abs(ret))); the exit status is the errno.
    assert run(capsys, "free", "-m", "7") == (errno.ENOENT, "", "No such file or directory\n")


def test_precise_adds_the_detail(capsys: Capture) -> None:
    code, _, err = run(capsys, "--precise", "free", "-m", "7")
    assert code == errno.ENOENT
    assert err == "No such file or directory: minor 7 is not allocated\n"


def test_unknown_pid_is_enoent(capsys: Capture) -> None:
    assert run(capsys, "pause", "-p", "999999", "-m", "0") == (
        errno.ENOENT, "", "No such file or directory\n")


@pytest.mark.parametrize("request_type", [MessageType.ATTACH, MessageType.DETACH])
def test_attach_and_detach_refusals_are_einval(
    request_type: MessageType, monkeypatch: pytest.MonkeyPatch, capsys: Capture
) -> None:
    # control/tap-ctl-attach.c:64 and tap-ctl-detach.c:62: an ERROR reply is not the
    # expected type, so EINVAL; detach also says so on stdout.
    def refuse(*_: object) -> None:
        raise CtlError(errno.EEXIST, "minor 3 is already attached", refused=request_type)

    name = request_type.name.lower()
    monkeypatch.setattr(TapdiskClient, name, refuse)
    code, out, err = run(capsys, name, "-p", "42", "-m", "3")
    assert (code, err) == (errno.EINVAL, "Invalid argument\n")
    assert out == ("got unexpected result 'error' from 42\n"
                   if request_type is MessageType.DETACH else "")
    assert run(capsys, "--precise", name, "-p", "42", "-m", "3") == (
        errno.EEXIST, "", "File exists: minor 3 is already attached\n")


def test_stats_of_a_minor_the_tapdisk_refuses_is_two_empty_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: Capture
) -> None:
    # control/tap-ctl-stats.c:131 reads the reply's length whatever its type: an ERROR
    # carries 0 there, so the body is empty; then its "\n" (line 161) and tap-ctl.c:857's.
    def refuse(*_: object) -> str:
        raise CtlError(errno.ENODEV, "no VBD with minor 9", refused=MessageType.STATS)

    monkeypatch.setattr(TapdiskClient, "stats", refuse)
    assert run(capsys, "stats", "-p", "42", "-m", "9") == (0, "\n\n", "")
    assert run(capsys, "--precise", "stats", "-p", "42", "-m", "9") == (
        errno.ENODEV, "", "No such device: no VBD with minor 9\n")


def test_stats_body_is_followed_by_two_newlines(
    monkeypatch: pytest.MonkeyPatch, capsys: Capture
) -> None:
    monkeypatch.setattr(TapdiskClient, "stats", lambda *_: '{ "name": "aio:/p" }')
    assert run(capsys, "stats", "-p", "42", "-m", "0") == (0, '{ "name": "aio:/p" }\n\n', "")


def test_spawn_prints_a_sentence_on_a_terminal_and_the_pid_elsewhere(
    monkeypatch: pytest.MonkeyPatch, capsys: Capture
) -> None:
    # Lines 447-451.
    monkeypatch.setattr(ops, "spawn", lambda: 4242)
    assert run(capsys, "spawn") == (0, "4242\n", "")
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert run(capsys, "spawn") == (0, "tapdisk spawned with pid 4242\n", "")


@pytest.mark.parametrize(("size", "code"), [(5, 1), (33, 1), (32, errno.ENOENT)])
def test_open_e_takes_a_32_or_64_byte_key_from_stdin(
    size: int, code: int, monkeypatch: pytest.MonkeyPatch, capsys: Capture
) -> None:
    # Lines 782-787: any other size stops tap-ctl with exit(1) before anything is sent.
    read_end, write_end = os.pipe()
    os.write(write_end, b"k" * size)
    os.close(write_end)
    monkeypatch.setattr("sys.stdin", os.fdopen(read_end))
    got, out, err = run(capsys, "open", "-p", "999999", "-m", "0", "-E", "-a", "aio:/x")
    assert (got, out) == (code, "")
    assert err.count("\n") == 1  # one line: the key's size, or strerror(ENOENT)


def test_debug_lines_name_each_message_on_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: Capture
) -> None:
    # control/tap-ctl-ipc.c:123 and 108 (DBG is printf): "sending '<name>' message (uuid = N)".
    from blktap3.ctl import client as client_module

    def fake_stats(self: TapdiskClient, minor: int) -> str:
        client_module.log.debug("send", type="STATS", cookie=minor)
        client_module.log.debug("receive", type="STATS_RSP", cookie=minor)
        return "{ }"

    monkeypatch.setattr(TapdiskClient, "stats", fake_stats)
    code, out, _ = run(capsys, "stats", "-p", "42", "-m", "3", "--debug")
    assert code == 0
    assert out == ("sending 'stats' message (uuid = 3)\n"
                   "received 'stats response' message (uuid = 3)\n{ }\n\n")


# -- check and major: blktap 3.x's answers --------------------------------------------------


def test_check_says_ok(capsys: Capture) -> None:
    # v3.55.5 control/tap-ctl.c tap_cli_check: the message on stdout, "ok" when fine.
    assert run(capsys, "check") == (0, "ok\n", "")


def test_check_says_why_not_and_exits_with_the_errno(root: Path, capsys: Capture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = root / "file"
    blocker.touch()
    monkeypatch.setenv(runtime.ROOT_ENV, str(blocker / "root"))
    assert run(capsys, "check") == (errno.ENOTDIR, f"{blocker} is not a directory\n",
                                    "Not a directory\n")
    monkeypatch.setenv(runtime.ROOT_ENV, str(root))
    monkeypatch.setenv(ops.TAPDISK_ENV, "/no/such/tapdisk")
    assert run(capsys, "check") == (errno.ENOENT, "tapdisk not found: /no/such/tapdisk\n",
                                    "No such file or directory\n")


def test_major_reads_tapdev_from_proc_devices(tmp_path: Path, capsys: Capture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # v3.55.5 control/tap-ctl-major.c: "%d tapdev" in /proc/devices, else ENODEV;
    # tap-ctl.c tap_cli_major: -c (a character major) is EINVAL.
    devices = tmp_path / "devices"
    devices.write_text("Character devices:\n  1 mem\n\nBlock devices:\n254 tapdev\n")
    monkeypatch.setattr(cli, "PROC_DEVICES", devices)
    assert run(capsys, "major") == (0, "254\n", "")
    assert run(capsys, "major", "-c") == (errno.EINVAL, "", "Invalid argument\n")
    devices.write_text("Block devices:\n  8 sd\n")
    assert run(capsys, "major") == (errno.ENODEV, "", "No such device\n")


# -- numbers and paths: checked (a deliberate difference: blktap's atoi takes anything) --


@pytest.mark.parametrize(
    "argv",
    [
        ["attach", "-p", "1", "-m", "-1"],
        ["attach", "-p", "1", "-m", "65536"],
        ["stats", "-p", "1", "-m", "99999999999999999999"],
        ["free", "-m", "-1"],
        ["free", "-m", "abc"],
        ["list", "-m", "-5"],
        ["attach", "-p", "-5", "-m", "0"],
        ["attach", "-p", "0", "-m", "0"],
        ["detach", "-p", "99999999999999999999", "-m", "0"],
        ["pause", "-p", "1", "-m", "0", "-t", "-1"],
        ["pause", "-p", "1", "-m", "0", "-t", "nan"],
        ["close", "-p", "1", "-m", "0", "-t", "inf"],
        ["destroy", "-p", "1", "-m", "0", "-t", "1e400"],
        ["resize", "-p", "1", "-m", "0", "-t", "0"],
        ["open", "-p", "1", "-m", "0", "-a", "aio:/x", "-t=-1"],
        ["open", "-p", "1", "-m", "0", "-a", "aio:/x", "-t", "99999999999999"],
        ["open", "-p", "1", "-m", "0", "-a", "aio:/x", "-e=-1"],
        ["create", "-a", "aio:/x", "-e", "70000"],
        ["create", "-t", "-5", "-a", "null:x"],  # issue 17: -5 is -t's value, refused
        ["attach", "-p", "0x", "-m", "0"],
    ],
)
def test_numbers_out_of_range_are_usage_errors(argv: list[str], capsys: Capture) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, out) == (errno.EINVAL, "")
    assert "usage: tap-ctl" in err and err.splitlines()[-1] == "Invalid argument"
    assert "Traceback" not in err
    assert err.splitlines()[0].startswith(f"{argv[0]}: ")  # first, what is wrong


@pytest.mark.parametrize(
    "argv",
    [
        ["create", "-a", "aio:disk.img"],
        ["create", "-a", "raw:../disk.img"],
        ["create", "-a", "null:x", "-C", "cbt.log"],
        ["create", "-a", "aio:/x", "-2", "aio:secondary.img"],
        ["create", "-a", "aio:/x", "-2", "nbd:run/target.sock"],   # a path, not a name
        ["open", "-p", "1", "-m", "0", "-a", "aio:./disk.img"],
        ["unpause", "-p", "1", "-m", "0", "-a", "aio:disk.img"],
        ["unpause", "-p", "1", "-m", "0", "-c", "log"],
    ],
)
def test_a_relative_path_is_a_usage_error(argv: list[str], root: Path, capsys: Capture) -> None:
    """A tapdisk works from /: `aio:disk.img` would open /disk.img, not the file meant."""
    code, out, err = run(capsys, *argv)
    assert (code, out) == (errno.EINVAL, "")
    assert err.splitlines()[0].endswith("the path must be absolute")
    assert "usage: tap-ctl" in err and err.splitlines()[-1] == "Invalid argument"
    assert ops.list_all(root) == []  # nothing was spawned or allocated


@pytest.mark.parametrize(
    "argv",
    [
        ["open", "-p", "1", "-m", "0", "-a", "aio:/" + "x" * 300],
        ["unpause", "-p", "1", "-m", "0", "-a", "aio:/" + "x" * 300],
        ["create", "-a", "aio:/" + "x" * 300],
        ["open", "-p", "1", "-m", "0", "-a", "aio:/x", "-2", "y" * 300],
    ],
)
def test_a_path_too_long_for_the_message_is_a_usage_error(
    argv: list[str], root: Path, capsys: Capture
) -> None:
    runtime.ensure_dirs(root)
    code, _, err = run(capsys, *argv)
    assert code == errno.EINVAL
    assert "usage: tap-ctl" in err and "at most 255" in err
    assert runtime.allocated_minors(root) == []  # refused before create allocates


def test_a_protocol_error_past_the_parser_is_einval(
    monkeypatch: pytest.MonkeyPatch, capsys: Capture
) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise ProtocolError("path is 300 bytes, at most 255 fit")

    monkeypatch.setattr(TapdiskClient, "attach", refuse)
    assert run(capsys, "attach", "-p", "1", "-m", "0") == (
        errno.EINVAL, "", "Invalid argument\n")
    assert run(capsys, "--precise", "attach", "-p", "1", "-m", "0") == (
        errno.EINVAL, "", "Invalid argument: path is 300 bytes, at most 255 fit\n")
