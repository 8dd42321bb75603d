"""Verdicts without a host: NetBSD's panic rule, expected failures, the table and JSON."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from blktap3.conformance.report import as_json, table
from blktap3.conformance.runner import ScenarioResult, StepVerdict, _Run
from blktap3.conformance.scenario import load_personalities, load_scenarios

PERSONALITIES = load_personalities()
SCENARIOS = {s.name: s for s in load_scenarios(PERSONALITIES)}


def _run_with(personality: str, seen: list[str | None]) -> Any:
    run = _Run.__new__(_Run)
    guest = SimpleNamespace(personality=PERSONALITIES[personality],
                            states=SimpleNamespace(seen=seen))
    run.guests = {personality: guest}  # type: ignore[dict-item]
    return run


def test_netbsd_panics_on_a_state_it_does_not_handle_even_in_passing() -> None:
    panics = _run_with("netbsd", ["1", "3", "2", "4"]).panics()
    assert panics == ["netbsd panics: back-end state '3' (it handles [1, 2, 4, 5, 6])"]
    assert _run_with("netbsd", ["1", "2", "4", "5", "6", None]).panics() == []
    assert _run_with("netbsd", ["2", "garbage"]).panics()


def test_linux_takes_any_state_without_panicking() -> None:
    assert _run_with("linux", ["1", "3", "7", "garbage"]).panics() == []


def _result(name: str, verdicts: list[str], xfail: str | None = None) -> ScenarioResult:
    scenario = SCENARIOS[name]
    if xfail is not None:
        scenario = dataclasses.replace(scenario, xfail=xfail)
    r = ScenarioResult(scenario, "ours", "c")
    r.steps = [StepVerdict(str(i), "step", v, diff=("x: expected 1, observed 2",)
                           if v in ("FAIL", "xfail") else ()) for i, v in enumerate(verdicts)]
    return r


def test_a_scenario_verdict_follows_its_steps_and_its_mark() -> None:
    assert _result("linux-connect-io-detach", ["pass", "pass"]).verdict == "pass"
    failed = _result("linux-connect-io-detach", ["pass", "FAIL", "skip"])
    assert failed.verdict == "FAIL" and not failed.ok
    # No scenario is marked today (linux-multiqueue's mark went with multi-queue): one is
    # marked here, expected to fail as a whole.
    why = "known to fail"
    assert _result("linux-multiqueue", ["pass", "xfail", "skip"], why).verdict == "xfail"
    stale = _result("linux-multiqueue", ["pass", "pass"], why)
    assert stale.verdict == "XPASS" and not stale.ok


def test_the_table_shows_the_difference_and_the_json_the_verdicts() -> None:
    results = [_result("linux-connect-io-detach", ["pass", "FAIL", "skip"]),
               _result("minios-connect", ["pass"])]
    text = table(results)
    assert "x: expected 1, observed 2" in text and "FAIL" in text
    report = as_json(results, [])
    assert [s["verdict"] for s in report["scenarios"]] == ["FAIL", "pass"]
    assert report["ok"] is False
    assert {"name", "personality", "verdict", "steps"} <= set(report["scenarios"][0])


def test_a_walk_is_its_seed_and_ends_with_a_clean_detach() -> None:
    from blktap3.conformance.walks import walk, walks

    assert walk(7) == walk(7) and walk(7) != walk(8)
    for w in walks(20, 1):
        assert w.steps[0].do == "attach" and w.personality == "netbsd"
        assert w.steps[-1].do == "detach"
        assert w.steps[-1].expect == {"backend_dir": False, "tapdisks": 0, "alive": True}
        # a transport is only written with a ring open
        ring = False
        for step in w.steps:
            ring = (ring or step.do == "open_ring") and step.do != "release_ring"
            assert step.do != "write_transport" or ring


def test_the_frontend_machine_rows_follow_the_backend_states_a_guest_saw() -> None:
    from blktap3.conformance.coverage import coverage, frontend_lines

    taken = coverage(frontend_lines(["1", "2", "4", "5", "6"]), "frontend_vbd").taken()
    assert "backend_initwait: initialising -> offering_ring" in taken
    assert "backend_connected: initialised,connected -> reading_info" in taken
    assert not any(t.startswith("backend_invalid") for t in taken)
    garbage = coverage(frontend_lines(["1", "x"]), "frontend_vbd").taken()
    assert "backend_invalid: * -> (internal)" in garbage


def test_the_guests_own_moves_are_replayed_in_their_place() -> None:
    from blktap3.conformance.coverage import GuestMove, coverage, frontend_lines

    # Linux's suspend and resume: Closed on its own, the back-end follows, Initialising.
    resume = ["1", "2", "4", GuestMove("close"), "6", GuestMove("reconnect"), "2"]
    taken = coverage(frontend_lines(resume), "frontend_vbd").taken()
    assert "device_close: initialising,initialised,reading_info,connected -> closing" in taken
    assert "backend_closed: initialised,reading_info,connected,closing -> closed if holds_ring" \
        in taken
    assert "device_reconnect: closed -> initialising if holds_ring" in taken
    # A move the reference blkfront would not make there is left out, not fatal.
    again = coverage(frontend_lines(["1", GuestMove("reconnect"), "2"]), "frontend_vbd").taken()
    assert "backend_initwait: initialising -> offering_ring" in again
    assert not any(t.startswith("device_reconnect") for t in again)
    # What the guest could not use on Connected: it gives the device up.
    bad = coverage(frontend_lines(["1", "2", "4", GuestMove("info_invalid")]),
                   "frontend_vbd").taken()
    assert "backend_info_invalid: reading_info -> closing" in bad
