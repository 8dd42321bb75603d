"""The xenbus state enum and its strict parser (a guest's `state` node is untrusted)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blktap3.xenbus import XenbusState, XenbusValueError, parse_state


def test_values_match_xenbus_h() -> None:
    header = Path("/usr/include/xen/io/xenbus.h").read_text()
    found = re.findall(r"XenbusState(\w+)\s*=\s*(\d+)", header)
    assert len(found) == 9
    for name, number in found:
        ours = re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()
        assert XenbusState[ours] == int(number)


@pytest.mark.parametrize("state", list(XenbusState))
def test_every_state_round_trips(state: XenbusState) -> None:
    assert parse_state(state.wire()) is state


@pytest.mark.parametrize(
    "value", ["", " 4", "4 ", "4\n", "+4", "-1", "04", "0x4", "4.0", "9", "99999999999",
              "\u0664", "four", "4\0", "1e0"]
)
def test_hostile_values_raise_a_typed_error_naming_the_key(value: str) -> None:
    with pytest.raises(XenbusValueError) as info:
        parse_state(value, key="/local/domain/5/device/vbd/768/state")
    assert info.value.key == "/local/domain/5/device/vbd/768/state"
    assert info.value.value == value
    assert "/local/domain/5/device/vbd/768/state" in str(info.value)


def test_missing_value_is_a_typed_error() -> None:
    with pytest.raises(XenbusValueError, match="missing"):
        parse_state(None)


@given(st.text(max_size=40))
def test_any_text_parses_canonically_or_raises_the_typed_error(text: str) -> None:
    try:
        state = parse_state(text)
    except XenbusValueError:
        return
    assert state.wire() == text
