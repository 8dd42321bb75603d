"""Personalities as data: every shipped file loads, and a malformed one is refused."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.sim.frontend import load_personality, parse_personality, personality_names

LINUX: dict[str, Any] = tomllib.loads("""
[personality]
name = "x"
doc = "d"
[transport]
ring_page_order = 0
max_queues = 1
max_indirect_segments = 0
protocol = "x86_64-abi"
feature_persistent = true
write_feature_persistent = true
keys_in_transaction = true
state_in_transaction = true
[read]
mandatory = ["sectors"]
optional = []
""")


def test_shipped_personalities_load() -> None:
    names = personality_names()
    assert {"linux", "minios", "linux-multipage"} <= set(names)
    for name in names:
        p = load_personality(name)
        assert p.name == name and "sectors" in p.mandatory_reads
    linux, minios = load_personality("linux"), load_personality("minios")
    assert linux.keys_in_transaction and linux.protocol is BlkifProtocol.X86_64
    assert not minios.keys_in_transaction and minios.protocol is BlkifProtocol.NATIVE
    assert (linux.max_queues, minios.max_queues) == (4, 1)  # xen_blkif_max_queues; none
    assert (linux.max_indirect_segments, minios.max_indirect_segments) == (32, 0)


def test_unknown_personality_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="linux"):
        load_personality("windows-3.1")


@pytest.mark.parametrize(("table", "key", "value", "message"), [
    ("transport", "ring_page_order", 9, "ring_page_order"),
    ("transport", "ring_page_order", True, "must be int"),
    ("transport", "max_queues", 0, "max_queues"),
    ("transport", "max_queues", 17, "max_queues"),
    ("transport", "max_indirect_segments", 4097, "max_indirect_segments"),
    ("transport", "protocol", "arm-abi", "protocol"),
    ("transport", "keys_in_transaction", "yes", "must be bool"),
    ("read", "mandatory", [""], "non-empty"),
    ("personality", "name", "y", "names itself"),
])
def test_malformed_personality_is_refused(table: str, key: str, value: object,
                                          message: str) -> None:
    data = {t: dict(v) for t, v in LINUX.items()}
    data[table][key] = value
    with pytest.raises(ValueError, match=message):
        parse_personality(data, "x")


def test_missing_or_extra_keys_are_refused() -> None:
    data = {t: dict(v) for t, v in LINUX.items()}
    del data["transport"]["protocol"]
    with pytest.raises(ValueError, match="transport"):
        parse_personality(data, "x")
    with pytest.raises(ValueError, match="tables"):
        parse_personality({**LINUX, "extra": {}}, "x")
    assert parse_personality(LINUX, "x").name == "x"
