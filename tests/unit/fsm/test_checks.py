"""Spec checks: the shipped specs pass; each kind of defect is found."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

from blktap3.fsm.backend import BackendVbd
from blktap3.fsm.checks import check_spec, reachable, render_table, xenbus_table
from blktap3.fsm.errors import SpecError
from blktap3.fsm.registry import MACHINE_CLASSES
from blktap3.fsm.spec import load_spec, parse_spec, spec_names
from blktap3.fsm.xenbus_state import XenbusState

BASE: dict[str, Any] = {
    "machine": {"name": "m", "initial": "a", "final": ["c"]},
    "states": {"a": {}, "b": {}, "c": {}},
    "triggers": {"go": {"blame": "ours"}, "stop": {"blame": "ours"}},
    "transitions": [
        {"trigger": "go", "source": "a", "dest": "b"},
        {"trigger": "stop", "source": "b", "dest": "c"},
    ],
}


@pytest.mark.parametrize("name", spec_names())
def test_shipped_specs_pass_every_check(name: str) -> None:
    assert check_spec(load_spec(name), MACHINE_CLASSES[name]) == []


def test_every_spec_has_a_machine_class() -> None:
    assert sorted(MACHINE_CLASSES) == spec_names()


def test_a_good_spec_passes() -> None:
    assert check_spec(parse_spec(BASE)) == []


def test_unreachable_state_is_found() -> None:
    data = copy.deepcopy(BASE)
    data["states"]["island"] = {}
    data["transitions"].append({"trigger": "go", "source": "island", "dest": "c"})
    assert "state 'island' is unreachable from 'a'" in check_spec(parse_spec(data))


def test_dead_end_is_found() -> None:
    data = copy.deepcopy(BASE)
    data["transitions"][1] = {"trigger": "stop", "source": "b"}  # internal: stays in b
    data["transitions"].append({"trigger": "go", "source": "a", "dest": "c"})
    assert "non-final state 'b' has no way out" in check_spec(parse_spec(data))


def test_unbound_callback_is_found() -> None:
    data = copy.deepcopy(BASE)
    data["transitions"][0]["after"] = ["nobody_defines_this"]
    problems = check_spec(parse_spec(data), object)
    assert "callback 'nobody_defines_this' is not bound by object" in problems


def test_a_frontend_state_left_unhandled_in_the_backend_is_found() -> None:
    spec = load_spec("backend_vbd")
    # drop every rule for front-end state 5 in `closing` (handled by being ignored there)
    trimmed = tuple(
        t for t in spec.transitions
        if not (t.trigger == "frontend_closing" and "closing" in t.sources)
    )
    problems = check_spec(replace(spec, transitions=trimmed), BackendVbd)
    assert "'frontend_closing' is neither handled nor ignored in 'closing'" in problems


def test_backend_table_covers_every_xenbus_state_in_every_live_state() -> None:
    spec = load_spec("backend_vbd")
    columns, rows = xenbus_table(spec, "frontend_")
    assert columns[:9] == [f"frontend_{s.trigger_suffix}" for s in XenbusState]
    assert columns[9:] == ["frontend_invalid", "frontend_unreadable", "frontend_vanished"]
    # nothing but an answer arrives where one is awaited: those states are not rows
    assert set(rows) == set(spec.leaves()) - set(spec.final) - set(spec.awaiting())
    assert "reading_transport" in spec.awaiting()
    assert all(not cell.missing for row in rows.values() for cell in row.values())
    assert str(rows["init_wait"]["frontend_initialised"]) == "reading_transport"
    assert str(rows["connected"]["frontend_connected"]) == "ignore"


def test_rendered_table_has_a_row_per_state() -> None:
    text = render_table(load_spec("backend_vbd"), "frontend_")
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["state", "unknown", "initialising"]
    assert any(line.startswith("connected ") for line in lines)
    assert len(lines) == 1 + 9 + 1  # header + the non-final states that await nothing,
    assert lines[-1].startswith("not shown (an answer is awaited")  # + those that do


def test_nested_reachability_enters_initial_children() -> None:
    assert reachable(load_spec("tapdisk_process")) == {
        "spawning", "running_idle", "running_serving", "exiting", "dead"
    }


AWAITING: dict[str, Any] = {
    "machine": {"name": "m", "initial": "a", "final": ["c"]},
    "states": {"a": {}, "b": {"awaits": ["yes", "no"]}, "c": {}},
    "triggers": {"ask": {"blame": "ours"}, "yes": {"blame": "ours"}, "no": {"blame": "ours"},
                 "poke": {"blame": "frontend"}},
    "transitions": [
        {"trigger": "ask", "source": "a", "dest": "b"},
        {"trigger": "yes", "source": "b", "dest": "c"},
        {"trigger": "no", "source": "b", "dest": "a"},
        {"trigger": "poke", "source": "*"},  # every state that awaits nothing: `a` only
    ],
}


def test_a_state_awaiting_its_answers_passes() -> None:
    spec = parse_spec(AWAITING)
    assert check_spec(spec) == []
    assert spec.awaiting() == {"b": ("yes", "no")}
    assert [t.sources for t in spec.transitions if t.trigger == "poke"] == [("a",)]


def test_a_row_for_another_trigger_where_an_answer_is_awaited_is_dead() -> None:
    data = copy.deepcopy(AWAITING)
    data["transitions"].append({"trigger": "poke", "source": "b", "dest": "c"})
    data["ignore"] = [{"triggers": ["ask"], "source": "b", "why": "never"}]
    problems = check_spec(parse_spec(data))
    assert "dead row: 'poke' in 'b', which awaits only ['yes', 'no']" in problems
    assert "dead ignore: 'ask' in 'b', which awaits only ['yes', 'no']" in problems


def test_an_awaited_answer_left_unhandled_is_found() -> None:
    data = copy.deepcopy(AWAITING)
    data["transitions"] = [t for t in data["transitions"] if t["trigger"] != "no"]
    data["transitions"].append({"trigger": "no", "source": "a"})
    assert "'b' awaits 'no' but neither handles nor ignores it" in check_spec(parse_spec(data))


def test_an_awaited_trigger_must_be_declared() -> None:
    data = copy.deepcopy(AWAITING)
    data["states"]["b"]["awaits"] = ["maybe"]
    with pytest.raises(SpecError, match="undeclared trigger 'maybe'"):
        parse_spec(data)


def test_an_event_tapback_may_see_at_any_time_left_unhandled_is_found() -> None:
    spec = load_spec("backend_vbd")
    trimmed = tuple(t for t in spec.transitions
                    if not (t.trigger == "hotplug_connected" and "connected" in t.sources))
    problems = check_spec(replace(spec, transitions=trimmed), BackendVbd)
    assert "'hotplug_connected' is neither handled nor ignored in 'connected'" in problems


def test_a_phase_names_its_states_that_await_no_answer() -> None:
    data = copy.deepcopy(AWAITING)
    data["states"]["d"] = {}
    data["phases"] = {"start": {"states": ["a", "b", "d"]}, "end": {"states": ["c"]}}
    data["transitions"].append({"trigger": "poke", "source": "@start", "dest": "d"})
    data["transitions"].append({"trigger": "stop_d", "source": "d", "dest": "c"})
    data["triggers"]["stop_d"] = {"blame": "ours"}
    spec = parse_spec(data)
    assert [t.sources for t in spec.transitions if t.trigger == "poke" and t.dest] == [("a", "d")]
    assert check_spec(spec) == []


def test_a_phase_of_states_that_all_await_cannot_be_a_source() -> None:
    data = copy.deepcopy(AWAITING)
    data["phases"] = {"start": {"states": ["a"]}, "asking": {"states": ["b"]},
                      "end": {"states": ["c"]}}
    data["transitions"].append({"trigger": "poke", "source": "@asking", "dest": "c"})
    with pytest.raises(SpecError, match="every state of phase '@asking' awaits an answer"):
        parse_spec(data)
