"""The tapback command line, its logging set-up and the service helpers."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from blktap3.tapback import logs, service
from blktap3.tapback.main import build_parser, main


def test_help_exits_0_and_names_the_options() -> None:
    done = subprocess.run([sys.executable, "-m", "blktap3.tapback", "--help"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for option in ("--backend-kind", "--log-format", "--verbose", "--pid-file"):
        assert option in done.stdout


def test_bad_log_format_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        main(["--log-format", "xml"])
    assert info.value.code == 2


def test_defaults() -> None:
    args = build_parser().parse_args([])
    assert (args.backend_kind, args.backend_domid, args.log_format) == ("vbd3", 0, "json")


def test_json_lines_carry_the_bound_vbd_fields() -> None:
    out = io.StringIO()
    logs.configure("json", stream=out)
    try:
        structlog.get_logger("t").bind(domid=5, devid=51712, pid=9, minor=0).info("step")
        structlog.get_logger("t").debug("hidden")
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 1
    assert {"domid": 5, "devid": 51712, "pid": 9, "minor": 0, "event": "step"}.items() \
        <= lines[0].items()


def test_service_without_a_tapback(tmp_path: Path) -> None:
    assert service.status(tmp_path) is None
    service.stop(tmp_path)  # idempotent
    (tmp_path / service.PID_FILE).write_text("1\n")  # init, not a tapback
    assert service.status(tmp_path) is None
    argv = service.command(tmp_path, xenstored_path="/x/socket")
    assert argv[1:3] == ["-m", "blktap3.tapback"]
    assert str(service.control_dir(tmp_path)) in argv and "/x/socket" in argv


@pytest.mark.parametrize(
    "argv",
    [
        ["--tapdisk-timeout", "-1"],
        ["--tapdisk-timeout", "0"],
        ["--tapdisk-timeout", "nan"],
        ["--tapdisk-timeout", "inf"],
        ["--backend-domid", "-1"],
        ["--backend-domid", "99999999999"],
        ["--backend-kind", "vbd3/../x"],
        ["--backend-kind", ""],
    ],
)
def test_values_the_daemon_cannot_use_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused at start, not by every VBD's worker later (settimeout(-1) raises there)."""
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tapback: ") and err.count("\n") == 1  # one line


def _tapback(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blktap3.tapback", "--control-dir", str(tmp_path / "ctl"),
         *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("foreground", [True, False])
def test_an_unreachable_xenstored_is_one_line_with_enoent_and_what_to_do(
        tmp_path: Path, foreground: bool) -> None:
    # Was a traceback labelled ECONNRESET (issue 15); the daemon tells its parent.
    done = _tapback(tmp_path, *(["-d"] if foreground else []), "--log-file",
                    str(tmp_path / "tapback.log"), "--xenstored", str(tmp_path / "nosock"))
    assert done.returncode == 1
    assert done.stderr == (f"tapback: cannot connect to XenStore at {tmp_path}/nosock: No "
                           "such file or directory (ENOENT); is xenstored running? (the "
                           "socket is --xenstored, $XENSTORED_PATH, else "
                           "/var/run/xenstored/socket)\n")
    logged = [json.loads(line) for line in (tmp_path / "tapback.log").read_text().splitlines()]
    assert logged[-1]["event"] == "tapback could not start" and logged[-1]["errno"] == 2
    assert logged[-1]["level"] == "error"


def test_nobody_listening_is_econnrefused(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))  # bound, never listening
        done = _tapback(tmp_path, "-d", "--xenstored", str(tmp_path / "sock"))
    assert done.returncode == 1
    # -d logs to stderr ("tapback starting"); the error is the one plain last line.
    last = done.stderr.splitlines()[-1]
    assert last.startswith("tapback: cannot connect to XenStore at ")
    assert "Connection refused (ECONNREFUSED)" in last and "Traceback" not in done.stderr


def test_a_bad_log_file_is_one_line(tmp_path: Path) -> None:
    done = _tapback(tmp_path, "--log-file", str(tmp_path / "no" / "such" / "file"))
    assert (done.returncode, done.stderr) == (
        1, f"tapback: cannot open the log file {tmp_path}/no/such/file: No such file or "
           "directory (ENOENT)\n")
