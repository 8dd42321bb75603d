"""The package's layout: every room of DESIGN.md imports, tools/ and specs/ install."""

import importlib

import pytest

ROOMS = ["fsm", "xenbus", "datapath", "ctl", "tapdisk", "tapback", "sim", "tools", "specs",
         "conformance"]


@pytest.mark.parametrize("room", ROOMS)
def test_room_imports_as_part_of_blktap3(room: str) -> None:
    module = importlib.import_module(f"blktap3.{room}")
    assert module.__doc__, f"blktap3.{room} says what it is for"
