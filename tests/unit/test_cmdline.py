"""Every console script refuses a bad argument with argparse's one line, exit 2 (issue 17).

No traceback, no hang (`blktap3-bench --runtime -1`), no directory made where nobody
asked (`tapdisk --root /nonexistent/x`). The commands' `main` is called in-process: each
must stop at its parser, before doing anything.
"""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from blktap3.tools import bench, bench_ctl, diagram

from blktap3 import cmdline
from blktap3.ctl import runtime
from blktap3.tapback import main as tapback
from blktap3.tapdisk import main as tapdisk

Main = Callable[[list[str]], object]
CPUS = sorted(os.sched_getaffinity(0))

BAD: list[tuple[str, Main, list[str], str]] = [
    ("bench", bench.main, ["--runtime", "-1"], "--runtime"),
    ("bench", bench.main, ["--runtime", "nan"], "--runtime"),
    ("bench", bench.main, ["--runtime", "0"], "--runtime"),
    ("bench", bench.main, ["--size-mib", "0"], "--size-mib"),
    ("bench", bench.main, ["--dir", "/nonexistent/x"], "--dir"),
    ("bench", bench.main, ["--dir", "/etc/passwd"], "--dir"),
    ("bench", bench.main, ["--pin", "a"], "--pin"),
    ("bench", bench.main, ["--pin", "0,x"], "--pin"),
    ("bench", bench.main, ["--pin", f"{CPUS[-1] + 1}"], "--pin"),
    ("bench", bench.main, ["--poll-us", "-3"], "--poll-us"),
    ("bench", bench.main, ["--rounds", "0"], "--rounds"),
    ("bench_ctl", bench_ctl.main, ["--runs", "0"], "--runs"),
    ("bench_ctl", bench_ctl.main, ["-n", "-1"], "--tapdisks"),
    ("bench_ctl", bench_ctl.main, ["--peer", "/nonexistent/x"], "--peer"),
    ("bench_ctl", bench_ctl.main, ["--peer", "{tmp}"], "--peer"),
    ("tapdisk", tapdisk.main, ["--root", "{tmp}/missing/x"], "--root"),
    ("tapdisk", tapdisk.main, ["--root", "/etc/passwd"], "--root"),
    ("tapdisk", tapdisk.main, ["--log", "{tmp}/missing/x.log"], "--log"),
    ("tapdisk", tapdisk.main, ["--log", "{tmp}"], "--log"),
    ("tapdisk", tapdisk.main, ["--drain-timeout", "-1"], "--drain-timeout"),
    ("tapdisk", tapdisk.main, ["--client-timeout", "inf"], "--client-timeout"),
    ("tapback", tapback.main, ["-d", "--max-ring-page-order", "9"], "--max-ring-page-order"),
    ("tapback", tapback.main, ["-d", "--tapdisk-timeout", "0"], "--tapdisk-timeout"),
    ("tapback", tapback.main, ["-d", "--tapdisk-timeout", "nan"], "--tapdisk-timeout"),
    ("diagram", diagram.main, ["-o", "/etc/passwd"], "--out"),
    ("diagram", diagram.main, ["-o", "{tmp}/missing/x"], "--out"),
]


@pytest.mark.parametrize(("prog", "main", "argv", "option"), BAD,
                         ids=[f"{b[0]} {' '.join(b[2])}" for b in BAD])
def test_a_bad_argument_is_one_line_and_exit_2(
    prog: str, main: Main, argv: list[str], option: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as stopped:
        main([a.format(tmp=tmp_path) for a in argv])
    assert stopped.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if "argument " in line]
    assert len(errors) == 1 and option in errors[0], err
    assert sorted(tmp_path.rglob("*")) == before  # nothing made on the way


def test_the_runtime_root_is_made_but_never_its_parents(tmp_path: Path) -> None:
    root = tmp_path / "root"
    runtime.ensure_dirs(root)
    assert (root / "tapdisk").is_dir() and root.stat().st_mode & 0o777 == 0o700
    with pytest.raises(OSError) as refused:
        runtime.ensure_dirs(tmp_path / "missing" / "root")
    assert refused.value.errno == errno.ENOENT and "missing" in str(refused.value)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(("text", "value"), [("1", 1.0), ("0.25", 0.25), ("1e3", 1000.0)])
def test_positive_float_takes_finite_positive_numbers(text: str, value: float) -> None:
    assert cmdline.positive_float(text) == value


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "-inf", "x", ""])
def test_positive_float_refuses_the_rest(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cmdline.positive_float(text)


@pytest.mark.parametrize(("low", "high", "above_low", "text", "ok"), [
    (0, 10, False, "0", True), (0, 10, False, "10", True), (0, 10, False, "10.5", False),
    (0, 10, False, "-0.1", False), (0, 10, True, "0", False), (0, 10, True, "1e-9", True),
    (0, 10, False, "nan", False), (0, 10, False, "inf", False), (0, 10, False, "x", False),
])
def test_float_in_keeps_its_interval(
    low: float, high: float, above_low: bool, text: str, ok: bool,
) -> None:
    parse = cmdline.float_in(low, high, above_low=above_low)
    if ok:
        assert parse(text) == float(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
