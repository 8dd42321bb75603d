"""No dead rows: every row of specs/backend_vbd.toml fires from tapback's own code path.

Seeded random walks of store contents and tapdisk news (the steps of
test_one_code_path.py) go through the daemon's worker: its readers, the observer, the
machine, its executor.  Every transition and every `[[ignore]]` of the back-end spec must
be taken at least once: a row no walk takes is one the daemon cannot reach (the
`awaits` check of `blktap3-fsm check` finds the static kind; this finds the rest).
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from blktap3.fsm import Toolstack, load_spec
from blktap3.fsm.machine import SpecMachine
from blktap3.fsm.spec import TransitionSpec
from blktap3.sim.memory import FakeTapdisk
from blktap3.tapback.tapdisks import device_path

from .test_one_code_path import (
    CONNECTED,
    HOTPLUG,
    ROOT,
    STEPS,
    TOOLSTACK,
    Both,
    _client_of_fake,
)

__all__ = ["_client_of_fake"]  # autouse here too: the tapdisk answers as FakeTapdisk does
WALKS = 1000
LENGTH = 30
# Where a walk starts: the directory found, the front-end's state, and what differs
# from the usual (the tapdisk serves the ring already or not, the front-end's keys).
NO_HOTPLUG = {k: v for k, v in CONNECTED.items() if k not in HOTPLUG}
OTHER_TAPDISK = {**TOOLSTACK, **HOTPLUG,
                 "physical-device-path": device_path(ROOT, FakeTapdisk().pid + 1, 0)}
STARTS: list[tuple[dict[str, str], str | None, dict[str, Any]]] = [
    (TOOLSTACK, "1", {}),
    (TOOLSTACK, None, {}),
    ({**TOOLSTACK, **HOTPLUG}, "3", {"ring": True, "transport": "good"}),  # EALREADY
    (OTHER_TAPDISK, "1", {}),
    (TOOLSTACK, "6", {"dead": True}),  # closed before a hotplug that names a dead tapdisk
    (OTHER_TAPDISK, "1", {"dead": True}),
    (CONNECTED, "4", {}),
    (CONNECTED, "4", {"ring": False}),
    (CONNECTED, "4", {"transport": "bad"}),
    (CONNECTED, "6", {}),
    (CONNECTED, "6", {"ring": False}),
    (CONNECTED, "1", {}),
    (NO_HOTPLUG, "4", {}),  # adopting until hotplug is said again
    (TOOLSTACK, "1", {"toolstack": Toolstack.LIBXL}),  # InitWait before hotplug
    (TOOLSTACK, None, {"toolstack": Toolstack.LIBXL}),
]


def test_every_row_of_the_backend_spec_fires_from_tapback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fired: set[tuple[str, str]] = set()
    build = SpecMachine._transition_dict

    def recording(self: SpecMachine, t: TransitionSpec) -> dict[str, Any]:
        d = build(self, t)
        d["before"] = [lambda **_: fired.add((t.row, t.trigger)), *d["before"]]
        return d

    monkeypatch.setattr(SpecMachine, "_transition_dict", recording)
    rnd = random.Random(20241205)
    for _ in range(WALKS):
        directory, frontend, how = rnd.choice(STARTS)
        both = Both(directory, frontend, **how)
        for _ in range(LENGTH):
            if both.final:
                break
            both.step(*rnd.choice(STEPS))
    rows = {(t.row, t.trigger) for t in load_spec("backend_vbd").transitions}
    assert sorted(rows - fired) == []
