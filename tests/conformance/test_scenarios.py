"""The conformance scenarios under pytest: every one against our back-end, the broken
doubles caught, the command's exit status and JSON.

Each scenario runs on a host of its own (real xenstored, tapback, tapdisks); a failure
shows the verdict table of that scenario, with the difference at the step that failed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from blktap3.conformance import cli
from blktap3.conformance.backends import FAULTS, DoubleBackend, OursBackend
from blktap3.conformance.blktap import PREFIX_ENV
from blktap3.conformance.coverage import coverage
from blktap3.conformance.report import table
from blktap3.conformance.runner import run_scenario
from blktap3.conformance.scenario import Step, load_personalities, load_scenarios
from blktap3.conformance.walks import walk

pytestmark = pytest.mark.integration

PERSONALITIES = load_personalities()
SCENARIOS = {s.name: s for s in load_scenarios(PERSONALITIES)}


def _expected_to_fail(name: str) -> bool:
    s = SCENARIOS[name]
    return s.xfail is not None or any(step.xfail for step in s.steps)


def _workdir(run_dir: Path, name: str) -> Path:
    (run_dir / name).mkdir()
    return run_dir / name


ON_OCAML = ("linux-connect-io-detach", "minios-connect", "hostile-write-backend-keys")


# What each scenario's run made our back-end's machine do (its log's step lines), for
# the coverage test below.
STEPS_TAKEN: dict[str, list[dict[str, object]]] = {}
# ... and the front-end machine's rows each guest's life made a reference blkfront take.
FRONTEND_TAKEN: dict[str, list[dict[str, object]]] = {}
# The front-end rows no guest of a conforming back-end reaches: a blkfront's answers to
# back-end faults (a back-end's Initialised, Reconfiguring/Reconfigured, garbage, Unknown
# after Closed, Connected before a ring, keys a blkfront cannot use).
FAULT_ANSWERS = {
    "backend_info_invalid: reading_info -> closing",
    "backend_unknown: closed -> (internal) if holds_ring",
    "backend_initialised: * -> (internal)",
    "backend_reconfiguring: * -> (internal)",
    "backend_reconfigured: * -> (internal)",
    "backend_invalid: * -> (internal)",
    "backend_connected: initialising,offering_ring -> (internal)",
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_our_backend_conforms(name: str, run_dir: Path) -> None:
    # A scenario known to fail waits for what will not come: 3 s, not the default 10.
    timeout = 3.0 if _expected_to_fail(name) else 10.0
    result = run_scenario(SCENARIOS[name], PERSONALITIES, OursBackend(), workdir=run_dir,
                          timeout=timeout)
    STEPS_TAKEN[name] = result.coverage_lines
    FRONTEND_TAKEN[name] = result.frontend_lines
    assert result.ok, "\n" + table([result])


def test_the_scenarios_take_every_row_of_the_backend_machine() -> None:
    # Runs after the scenarios above (pytest keeps a module's order); judged only when
    # all of them ran here (not with -k, or across xdist workers).
    if set(STEPS_TAKEN) != set(SCENARIOS):
        pytest.skip("needs every scenario's run in this process")
    cov = coverage(line for lines in STEPS_TAKEN.values() for line in lines)
    assert cov.percent == 100.0, "rows no scenario reached:\n" + "\n".join(cov.missed())


def test_the_guests_take_every_front_end_row_but_the_answers_to_faults() -> None:
    if set(FRONTEND_TAKEN) != set(SCENARIOS):
        pytest.skip("needs every scenario's run in this process")
    cov = coverage((line for lines in FRONTEND_TAKEN.values() for line in lines),
                   "frontend_vbd")
    assert set(cov.missed()) == FAULT_ANSWERS


@pytest.mark.parametrize("name", ON_OCAML)
def test_our_backend_conforms_on_oxenstored(name: str, run_dir: Path) -> None:
    result = run_scenario(SCENARIOS[name], PERSONALITIES, OursBackend(), workdir=run_dir,
                          xenstored="ocaml")
    assert result.ok, "\n" + table([result])


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_broken_double_is_caught_with_a_difference(fault: str, run_dir: Path) -> None:
    # A broken back-end fails by not doing something: 3 s is what it is given to do it.
    results = [run_scenario(SCENARIOS[n], PERSONALITIES, DoubleBackend(fault),
                            workdir=_workdir(run_dir, n), timeout=3.0)
               for n in cli.SELF_TEST[fault]]
    failed = [r for r in results if r.verdict == "FAIL"]  # marks are for ours only
    assert failed, "\n" + table(results)
    step = next(s for s in failed[0].steps if s.verdict == "FAIL")
    assert step.diff and all(d.strip() for d in step.diff)


def test_the_clean_double_passes_what_catches_the_broken_ones(run_dir: Path) -> None:
    names = sorted({n for ns in cli.SELF_TEST.values() for n in ns})
    results = [run_scenario(SCENARIOS[n], PERSONALITIES, DoubleBackend(),
                            workdir=_workdir(run_dir, n)) for n in names]
    assert all(r.verdict == "pass" for r in results), "\n" + table(results)


def test_the_command_exits_0_and_writes_json_when_all_pass(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    assert cli.main(["--only", "linux-connect-io-detach", "--only", "linux-multiqueue",
                     "--json", str(out), "--timeout", "5"]) == cli.EXIT_OK
    report = json.loads(out.read_text())
    verdicts = {s["name"]: s["verdict"] for s in report["scenarios"]}
    assert verdicts == {"linux-connect-io-detach": "pass", "linux-multiqueue": "pass"}
    assert 0 < report["coverage"]["backend_vbd"] < 100
    printed = capsys.readouterr().out
    assert "linux-connect-io-detach" in printed and "coverage of backend_vbd" in printed


def test_the_command_exits_1_when_a_backend_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--backend", "double:forgets-sectors", "--only",
                     "linux-connect-io-detach", "--timeout", "5"]) == cli.EXIT_FAILED
    assert "cannot read back-end sectors (missing)" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--backend", "blktap9"], ["--only", "no-such-scenario"],
                                  ["--backend", "double:lazy"], ["--backend", "ours,ours"],
                                  ["--backend", "ours,blktap", "--prefix", "/nonexistent"]])
def test_the_command_refuses_bad_arguments_with_usage(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("blktap3-conformance: ") and "usage:" in err


def _blktap_build() -> str | None:
    prefix = os.environ.get(PREFIX_ENV)
    return prefix if prefix and Path(prefix, "bin", "tapback").exists() else None


@pytest.mark.skipif(_blktap_build() is None,
                    reason=f"${PREFIX_ENV} names no blktap build with bin/tapback (blktap is "
                           "built by the user from source, never here nor in CI)")
@pytest.mark.skipif(os.geteuid() != 0, reason="blktap runs in a private mount namespace: root")
def test_blktaps_own_backend_is_judged_side_by_side_with_ours(tmp_path: Path) -> None:
    """blktap's tapback and tapdisk on the simulated host: Linux's and Mini-OS's
    handshake, I/O and flush pass on both; xl's order (hotplug only after InitWait) does
    not on blktap's (its tapback waits for hotplug-status before InitWait: backend.c
    hotplug_status_changed), and the table says so."""
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "blktap3.conformance.cli", "--backend", "ours,blktap",
         "--prefix", str(_blktap_build()), "--only", "linux-connect-io-detach", "--only",
         "minios-connect", "--only", "libxl-hotplug-order", "--timeout", "3",
         "--json", str(out)], capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    verdicts = {(s["name"], s["backend"]): s["verdict"] for s in report["scenarios"]}
    assert verdicts == {
        ("linux-connect-io-detach", "ours"): "pass", ("linux-connect-io-detach", "blktap"): "pass",
        ("minios-connect", "ours"): "pass", ("minios-connect", "blktap"): "pass",
        ("libxl-hotplug-order", "ours"): "pass", ("libxl-hotplug-order", "blktap"): "FAIL",
    }, done.stdout + done.stderr
    assert report["backends"]["blktap"]["ok"] is False
    assert done.returncode == cli.EXIT_FAILED
    assert re.search(r"libxl-hotplug-order +\S+ +ok \d+/\d+ +FAIL \d+/\d+ +differs",
                     done.stdout), done.stdout


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_front_end_walks_leave_our_backend_alive_and_nothing_behind(
        seed: int, run_dir: Path) -> None:
    result = run_scenario(walk(seed), PERSONALITIES, OursBackend(), workdir=run_dir,
                          timeout=5.0)
    assert result.ok, "\n" + table([result])


def test_a_walk_fails_a_backend_publishing_a_state_netbsd_panics_on(run_dir: Path) -> None:
    # The guest first waits for the back-end's first answer: the walk's moves would
    # otherwise race the double's (it publishes 3 only to a front-end at Initialising).
    first = walk(1)
    steps = (first.steps[0], Step("wait_backend", {"states": [2, 3]}), *first.steps[1:])
    result = run_scenario(replace(first, steps=steps), PERSONALITIES,
                          DoubleBackend("publishes-initialised"), workdir=run_dir, timeout=3.0)
    assert result.verdict == "FAIL"
    diffs = [d for s in result.steps for d in s.diff]
    assert "netbsd panics: back-end state '3' (it handles [1, 2, 4, 5, 6])" in diffs
