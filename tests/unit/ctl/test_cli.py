"""tap-ctl's output formats, usage errors and exit codes (no tapdisk needed)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from blktap3.ctl import cli, runtime
from blktap3.ctl.ops import TapEntry


@pytest.fixture(autouse=True)
def root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    monkeypatch.setenv(runtime.ROOT_ENV, str(tmp_path))
    yield tmp_path
    structlog.reset_defaults()  # main() configures logging for the whole process


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
    assert cli.format_dict(entry) == text


def test_list_on_a_terminal_matches_blktap() -> None:
    assert cli.format_row(TapEntry(18672, 0, 0x2A, "aio", "/path")) == (
        "   18672    0 0x2a        aio /path"
    )
    assert cli.format_row(TapEntry(pid=5)) == "       5    -    -          - -"


def test_list_without_a_runtime_directory_prints_nothing(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["list"]) == 0
    assert capsys.readouterr().out == ""


def test_list_shows_allocated_minors_newest_first(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["allocate"]) == 0
    assert cli.main(["allocate"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("tapdisk/tapdisk-0") and out[1].endswith("tapdisk/tapdisk-1")
    assert cli.main(["list"]) == 0
    assert capsys.readouterr().out == "minor=1\nminor=0\n"
    assert cli.main(["list", "--json"]) == 0
    assert '"minor": 1' in capsys.readouterr().out


def test_free_without_minor_is_usage_and_einval(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["free"]) == errno.EINVAL
    assert "usage: tap-ctl free" in capsys.readouterr().err


def test_unknown_command_is_einval(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == errno.EINVAL
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    ["list", "allocate", "free", "create", "destroy", "spawn", "attach", "detach", "open",
     "close", "pause", "unpause", "stats", "resize"],
)
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([command, "-h"]) == 0
    assert f"usage: tap-ctl {command}" in capsys.readouterr().out


def test_free_of_an_unknown_minor_prints_strerror_and_exits_errno(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["free", "-m", "7"]) == errno.ENOENT
    err = capsys.readouterr().err
    assert err.startswith("No such file or directory")
    assert err.count("\n") == 1


def test_unknown_pid_is_enoent_and_debug_logs_the_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["--debug", "pause", "-p", "999999", "-m", "0"]) == errno.ENOENT
    err = capsys.readouterr().err
    assert "ctl999999" in err
    assert "No such file or directory" in err.splitlines()[-1]


# -- hostile arguments: every one is a usage error (22), never a traceback ------------


@pytest.mark.parametrize(
    "argv",
    [
        ["attach", "-p", "1", "-m", "-1"],
        ["attach", "-p", "1", "-m", "65536"],
        ["stats", "-p", "1", "-m", "99999999999999999999"],
        ["free", "-m", "-1"],
        ["free", "-m", "99999999999999999999"],
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
        ["attach", "-p", "1", "-m", "0", "extra"],
        ["attach", "-p", "0x", "-m", "0"],
    ],
)
def test_out_of_range_numbers_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == errno.EINVAL
    err = capsys.readouterr().err
    assert "usage: tap-ctl" in err
    assert "Traceback" not in err
    assert err.count("\n") <= 6  # the usage (wrapped) and one line saying what is wrong


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
    argv: list[str], root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime.ensure_dirs(root)
    assert cli.main(argv) == errno.EINVAL
    err = capsys.readouterr().err
    assert "usage: tap-ctl" in err and "at most 255" in err.splitlines()[-1]
    assert "Traceback" not in err
    assert runtime.allocated_minors(root) == []  # refused before create allocates


def test_a_protocol_error_past_the_parser_is_one_line_and_einval(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from blktap3.ctl.client import TapdiskClient
    from blktap3.ctl.protocol import ProtocolError

    def refuse(*_: object, **__: object) -> None:
        raise ProtocolError("path is 300 bytes, at most 255 fit")

    monkeypatch.setattr(TapdiskClient, "attach", refuse)
    assert cli.main(["attach", "-p", "1", "-m", "0"]) == errno.EINVAL
    err = capsys.readouterr().err
    assert err == "Invalid argument: path is 300 bytes, at most 255 fit\n"
