"""Phases: named groups of states that a source can name as `@phase`.

They change how a spec reads and draws, never the machine: the loader expands them (the
expanded tables are pinned in test_spec_expansion.py), and refuses a phase it does not
know, a state in no phase or in two, with the file and the row.
"""

from __future__ import annotations

import copy
import tomllib
from typing import Any

import pytest

from blktap3.fsm.checks import check_spec, render_table, spelled_out_phases
from blktap3.fsm.errors import SpecError
from blktap3.fsm.spec import load_spec, parse_spec, row_lines

PHASED: dict[str, Any] = {
    "machine": {"name": "m", "initial": "a", "final": ["z"]},
    "states": {"a": {}, "b": {}, "c": {}, "z": {}},
    "phases": {
        "start": {"states": ["a", "b"], "doc": "the first two"},
        "middle": {"states": ["c"]},
        "end": {"states": ["z"]},
    },
    "triggers": {"go": {"blame": "ours"}, "stop": {"blame": "ours"}, "noise": {"blame": "ours"}},
    "transitions": [
        {"trigger": "go", "source": "a", "dest": "b"},
        {"trigger": "go", "source": "b", "dest": "c"},
        {"trigger": "stop", "source": ["@start", "c"], "dest": "z"},
    ],
    "ignore": [{"triggers": ["noise"], "source": "@start", "why": "harmless"}],
}


def phased(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(PHASED)
    for key, value in changes.items():
        data[key] = value
    return data


def test_a_phase_in_a_source_expands_to_its_states() -> None:
    spec = parse_spec(PHASED)
    stop = next(t for t in spec.transitions if t.trigger == "stop")
    assert stop.sources == ("a", "b", "c")
    assert stop.spelled == ("@start", "c")
    noise = next(t for t in spec.transitions if t.ignored)
    assert noise.sources == ("a", "b")


def test_phases_keep_their_order_and_say_which_state_is_where() -> None:
    spec = parse_spec(PHASED)
    assert [p.name for p in spec.phases] == ["start", "middle", "end"]
    assert spec.phase("start").doc == "the first two"
    phase = spec.phase_of("b")
    assert phase is not None and phase.name == "start"
    with pytest.raises(KeyError):
        spec.phase_of("nowhere")


def test_a_machine_without_phases_has_none() -> None:
    spec = load_spec("frontend_vbd")
    assert spec.phases == ()
    assert spec.phase_of("connected") is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (phased(transitions=[{"trigger": "go", "source": ["@strat"], "dest": "z"},
                             {"trigger": "stop", "source": "a", "dest": "z"}]),
         "transitions[0]: unknown phase '@strat'; phases: ['@start', '@middle', '@end']"),
        (phased(ignore=[{"triggers": ["noise"], "source": "@later", "why": "x"}]),
         "ignore[0]: unknown phase '@later'"),
        (phased(phases={"start": {"states": ["a", "b"]}, "rest": {"states": ["b", "c", "z"]}}),
         "[phases.rest]: state 'b' is already in phase 'start'"),
        (phased(phases={"start": {"states": ["a", "b"]}, "end": {"states": ["z"]}}),
         "state(s) ['c'] in no phase"),
        (phased(phases={"start": {"states": ["a", "b", "q"]}}), "undefined state 'q'"),
        (phased(phases={"start": {"states": []}}), "a phase needs at least one state"),
        (phased(phases={"start": {"members": ["a"]}}), "unknown key(s) ['members']"),
        (phased(phases={"Start": {"states": ["a", "b", "c", "z"]}}), "bad phase name 'Start'"),
        (phased(transitions=[{"trigger": "go", "source": ["@start", "a"], "dest": "z"},
                             {"trigger": "stop", "source": "c", "dest": "z"}]),
         "state 'a' named twice in source ['@start', 'a']"),
    ],
)
def test_phase_errors_name_the_file_the_row_and_the_problem(
    data: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(data, "x.toml")
    assert str(info.value).startswith("x.toml")
    assert message in str(info.value)


def test_phases_in_a_machine_without_them_are_unknown() -> None:
    data = phased(transitions=[{"trigger": "go", "source": "@start", "dest": "z"}])
    del data["phases"]
    with pytest.raises(SpecError, match="unknown phase '@start'; phases: none declared"):
        parse_spec(data, "x.toml")


def test_a_nested_machine_refuses_phases() -> None:
    data = phased()
    data["machine"]["nested"] = True
    with pytest.raises(SpecError, match=r"\[phases\] need a flat machine"):
        parse_spec(data, "x.toml")


def test_an_error_in_a_row_names_its_line_in_the_file() -> None:
    text = """
[machine]
name = "m"
initial = "a"
[states.a]
[states.b]
[phases.all]
states = ["a", "b"]
[triggers.go]
blame = "ours"

[[transitions]]
trigger = "go"
source = "a"
dest = "b"

[[transitions]]
trigger = "go"
source = "@everything"
dest = "a"
"""
    assert row_lines(text) == {"transitions": [12, 17], "ignore": []}
    with pytest.raises(SpecError) as info:
        parse_spec(tomllib.loads(text), "m.toml", row_lines(text))
    assert str(info.value).startswith("m.toml:17: transitions[1]: unknown phase '@everything'")


def test_a_row_spelling_out_a_whole_phase_is_a_check_problem() -> None:
    data = phased()
    data["transitions"][2]["source"] = ["a", "b", "c"]
    spec = parse_spec(data, "x.toml")
    assert spelled_out_phases(spec) == [
        "x.toml: transitions[2] names every state of phase 'start' one by one: write @start"]
    assert spelled_out_phases(spec)[0] in check_spec(spec)
    # a one-state phase reads better as its state: naming it is no problem
    assert spelled_out_phases(parse_spec(PHASED)) == []


def test_the_backend_is_partitioned_into_its_phases_in_spec_order() -> None:
    spec = load_spec("backend_vbd")
    assert [p.name for p in spec.phases] == [
        "hotplug", "adopt", "handshake", "up", "down", "failed", "gone"]
    in_phase_order = [s for p in spec.phases for s in p.states]
    assert in_phase_order == [s.name for s in spec.states]  # each exactly once, in order
    assert spec.phase("gone").states == spec.final


def test_the_backend_table_shows_each_state_s_phase() -> None:
    table = render_table(load_spec("backend_vbd"), "frontend_").splitlines()
    assert table[0].split()[-1] == "phase"
    assert (table[1].split()[0], table[1].split()[-1]) == ("waiting_hotplug", "@hotplug")
    assert render_table(load_spec("frontend_vbd"), "backend_").startswith("state")
