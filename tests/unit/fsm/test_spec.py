"""The spec loader: shipped specs load; malformed specs fail with a clear location."""

from __future__ import annotations

import copy
import errno
import tomllib
from importlib.resources import files
from typing import Any, ClassVar

import pytest

from blktap3.fsm.errors import Blame, SpecError
from blktap3.fsm.machine import SpecMachine
from blktap3.fsm.spec import load_spec, parse_spec, spec_names

GOOD: dict[str, Any] = {
    "machine": {"name": "m", "initial": "a", "final": ["b"]},
    "states": {"a": {}, "b": {"xenbus": 6}},
    "triggers": {"go": {"blame": "frontend"}},
    "transitions": [{"trigger": "go", "source": "a", "dest": "b", "before": ["cb"]}],
}


def broken(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = data
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[leaf] = value
    return data


def test_all_shipped_specs_load_and_are_listed() -> None:
    names = spec_names()
    assert names == ["backend_vbd", "frontend_vbd", "tapdisk_process", "tapdisk_vbd"]
    for name in names:
        assert load_spec(name).name == name


def test_specs_are_found_through_importlib_resources() -> None:
    text = files("blktap3.specs").joinpath("backend_vbd.toml").read_text(encoding="utf-8")
    assert tomllib.loads(text)["machine"]["name"] == "backend_vbd"


def test_a_good_minimal_spec_parses() -> None:
    spec = parse_spec(GOOD)
    assert spec.state("b").xenbus == 6
    assert spec.triggers["go"].blame is Blame.FRONTEND
    assert spec.callback_names() == {"cb"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (broken(machine__colour="red"), "unknown key(s) ['colour']"),
        (broken(states__a={"xenbus": 9}), "xenbus must be an integer 0..8"),
        (broken(states__a={"typo": 1}), "unknown key(s) ['typo']"),
        (broken(transitions__0__dest="nowhere"), "undefined state 'nowhere'"),
        (broken(transitions__0__source=["a", "zz"]), "undefined state 'zz'"),
        (broken(transitions__0__trigger="jump"), "undeclared trigger 'jump'"),
        (broken(triggers__go={"blame": "nobody"}), "blame 'nobody' is not one of"),
        (broken(machine__initial="x"), "undefined state 'x'"),
        (broken(triggers__spare={"blame": "ours"}), "declared but never used: ['spare']"),
        (broken(triggers__go={"blame": "ours", "refused": True}), "marked refused but used"),
        (broken(transitions__0__before=["go"]), "callback names equal to trigger names"),
        (broken(states__a={"children": {"c": {}}, "initial": "c"}), "need `nested = true`"),
        (broken(transitions__0__conditions=3), "expected a name or a list of names"),
        (broken(triggers__go={"blame": "ours", "errno": "ENOPE"}), "'ENOPE' is not a name"),
        (broken(triggers__go={"blame": "ours", "errno": 22}), "errno 22 is not a name"),
        (broken(triggers__go={"blame": "ours", "errno": "errorcode"}), "is not a name"),
        (broken(triggers__spare={"blame": "ours", "refused": True, "errno": "EINVAL"}),
         "a refused trigger has no errno"),
        (broken(transitions__0__errno="EBUSY"), "a row with errno refuses: no dest"),
    ],
)
def test_schema_errors_name_the_problem(data: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(data, "x.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("x.toml")


def test_nested_state_names_may_not_use_the_separator() -> None:
    data = broken(machine__nested=True)
    data["states"]["a"] = {"initial": "in_side", "children": {"in_side": {}}}
    with pytest.raises(SpecError, match="bad state name 'in_side'"):
        parse_spec(data)


def test_nested_states_get_full_names_and_an_initial_child() -> None:
    data = broken(machine__nested=True)
    data["states"]["a"] = {"initial": "x", "children": {"x": {}, "y": {}}}
    spec = parse_spec(data)
    assert spec.leaves() == ["a_x", "a_y", "b"]
    assert spec.state("a").initial == "a_x"


def test_ignore_entries_become_internal_transitions_after_the_others() -> None:
    data = copy.deepcopy(GOOD)
    data["triggers"]["noise"] = {"blame": "frontend"}
    data["ignore"] = [{"triggers": ["noise"], "source": "*", "why": "harmless"}]
    spec = parse_spec(data)
    last = spec.transitions[-1]
    assert (last.trigger, last.sources, last.dest, last.ignored) == ("noise", ("a",), None, True)


def test_errno_names_become_numbers_on_triggers_and_refusing_rows() -> None:
    data = copy.deepcopy(GOOD)
    data["triggers"]["go"]["errno"] = "EALREADY"
    data["transitions"].append(
        {"trigger": "go", "source": "a", "conditions": ["twice"], "errno": "EBUSY"})
    spec = parse_spec(data)
    assert spec.triggers["go"].errno == errno.EALREADY
    assert [t.errno for t in spec.transitions] == [None, errno.EBUSY]
    assert spec.transitions[1].dest is None


def test_unbound_callbacks_are_refused_when_a_machine_is_built() -> None:
    class Incomplete(SpecMachine):
        SPEC: ClassVar[str] = "frontend_vbd"  # names write_transport etc., not defined here

    with pytest.raises(SpecError, match="callbacks not bound by Incomplete"):
        Incomplete()


def test_unknown_spec_name_lists_the_known_ones() -> None:
    with pytest.raises(SpecError, match="known: \\['backend_vbd'"):
        load_spec("nope")
