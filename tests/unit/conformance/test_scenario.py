"""Scenarios and personalities as data: the shipped ones load, malformed ones are refused."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from blktap3.conformance.scenario import (
    ScenarioError,
    load_personalities,
    load_scenarios,
    parse_personality,
    parse_scenario,
)

PERSONALITY = tomllib.loads("""
[personality]
name = "p"
driver = "a blkfront"
source = "somewhere/blkfront.c: connect()"
doc = "d"
max_ring_page_order = 0
protocol = "x86_64-abi"
[[routines.handshake]]
do = "wait_backend"
states = [2]
""")

SCENARIO = tomllib.loads("""
[scenario]
name = "s"
personality = "p"
kind = "handshake"
doc = "d"
[[steps]]
do = "attach"
expect = { backend_state = 2 }
[[steps]]
do = "handshake"
[[steps]]
do = "io"
op = "read"
expect = { status = "okay", keys = { sectors = "*", info = false } }
""")



def test_shipped_files_load_and_cite_their_driver() -> None:
    personalities = load_personalities()
    assert {"linux", "linux-multipage", "windows", "freebsd", "netbsd", "minios",
            "ovmf"} <= set(personalities)
    for p in personalities.values():
        assert ".c" in p.source, f"{p.name} cites the driver's source file"
    scenarios = load_scenarios(personalities)
    kinds = {s.kind for s in scenarios}
    assert kinds == {"handshake", "lifecycle", "hostile"}
    assert all(s.steps[0].do == "attach" for s in scenarios)
    # every expected failure says why
    assert all(s.xfail.strip() for s in scenarios if s.xfail is not None)


def test_the_netbsd_personality_lists_the_states_it_survives() -> None:
    netbsd = load_personalities()["netbsd"]
    assert 3 not in netbsd.allowed_backend_states and 4 in netbsd.allowed_backend_states


def test_a_well_formed_scenario_parses() -> None:
    p = parse_personality(PERSONALITY, "p")
    s = parse_scenario(SCENARIO, "s", {"p": p})
    assert [st.do for st in s.steps] == ["attach", "handshake", "io"]
    assert s.steps[2].expect["keys"] == {"sectors": "*", "info": False}


@pytest.mark.parametrize(("step", "message"), [
    ({"do": "teleport"}, "unknown action"),
    ({"do": "io", "op": "scribble"}, "io op"),
    ({"do": "io", "bogus": 1}, "unknown key 'bogus'"),
    ({"do": "io", "sector": "zero"}, "sector must be int"),
    ({"do": "io", "expect": {"status": "fine"}}, "status is one of"),
    ({"do": "io", "expect": {"colour": 1}}, "unknown key 'colour'"),
    ({"do": "io", "expect": {"keys": {"sectors": 1}}}, "string or false"),
    ({"do": "write_key", "dir": "elsewhere", "key": "k", "value": "v"}, "dir is one of"),
    ({"do": "close"}, "has no close routine"),
])
def test_a_malformed_step_is_refused_naming_it(step: dict[str, Any], message: str) -> None:
    p = parse_personality(PERSONALITY, "p")
    data = {"scenario": dict(SCENARIO["scenario"]), "steps": [SCENARIO["steps"][0], step]}
    with pytest.raises(ScenarioError, match=message) as info:
        parse_scenario(data, "s", {"p": p})
    assert "step 2" in str(info.value)


def test_a_scenario_starts_by_attaching_and_names_a_known_personality() -> None:
    p = parse_personality(PERSONALITY, "p")
    with pytest.raises(ScenarioError, match="first step attaches"):
        parse_scenario({"scenario": SCENARIO["scenario"], "steps": SCENARIO["steps"][1:]},
                       "s", {"p": p})
    with pytest.raises(ScenarioError, match="unknown personality"):
        parse_scenario(SCENARIO, "s", {})
    with pytest.raises(ScenarioError, match="names itself"):
        parse_scenario(SCENARIO, "t", {"p": p})


def test_a_personality_without_a_source_or_handshake_is_refused() -> None:
    data = {"personality": {**PERSONALITY["personality"], "source": " "},
            "routines": PERSONALITY["routines"]}
    with pytest.raises(ScenarioError, match="cite"):
        parse_personality(data, "p")
    with pytest.raises(ScenarioError, match="no handshake"):
        parse_personality({"personality": PERSONALITY["personality"],
                           "routines": {"close": []}}, "p")


def test_a_personality_flushes_with_the_features_it_names() -> None:
    minios = load_personalities()["minios"]
    assert (minios.flush, minios.flush_each) == (("barrier", "flush-cache"), True)
    linux = load_personalities()["linux"]
    assert (linux.flush, linux.flush_each) == (("flush-cache", "barrier"), False)
    data = {"personality": {**PERSONALITY["personality"], "flush": ["fua"]},
            "routines": PERSONALITY["routines"]}
    with pytest.raises(ScenarioError, match="flush names some of"):
        parse_personality(data, "p")
