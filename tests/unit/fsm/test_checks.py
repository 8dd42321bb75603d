"""Spec checks: the shipped specs pass; each kind of defect is found."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

from blktap3.fsm.backend import BackendVbd
from blktap3.fsm.checks import check_spec, reachable, render_table, xenbus_table
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
    assert columns[9:] == ["frontend_invalid", "frontend_vanished"]
    assert set(rows) == set(spec.leaves()) - set(spec.final)
    assert all(not cell.missing for row in rows.values() for cell in row.values())
    assert str(rows["init_wait"]["frontend_initialised"]) == "reading_transport"
    assert str(rows["connected"]["frontend_connected"]) == "ignore"


def test_rendered_table_has_a_row_per_state() -> None:
    text = render_table(load_spec("backend_vbd"), "frontend_")
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["state", "unknown", "initialising"]
    assert any(line.startswith("connected ") for line in lines)
    assert len(lines) == 1 + 13  # header + the thirteen non-final states


def test_nested_reachability_enters_initial_children() -> None:
    assert reachable(load_spec("tapdisk_process")) == {
        "spawning", "running_idle", "running_serving", "exiting", "dead"
    }
