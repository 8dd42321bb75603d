"""Model walks (hypothesis, both machines wired in memory): every rule holds over many
sequences, the rows they take are recorded, and a broken rule is reported shrunk."""

from __future__ import annotations

import pytest

from blktap3.conformance import model
from blktap3.conformance.model import model_walks


def test_model_walks_hold_every_rule_and_record_both_machines() -> None:
    report = model_walks(200, 1)
    assert report.failure is None
    assert report.walks == 200
    cov = report.coverage()
    assert set(cov) == {"backend_vbd", "frontend_vbd"}
    assert all(c.covered for c in cov.values())


def test_a_broken_rule_is_reported_with_its_shortest_sequence(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend InitWait were a state a front-end cannot expect: the shortest walk that
    # makes the back-end publish it is the hotplug step alone.
    monkeypatch.setattr(model, "ALLOWED_BACKEND_STATES", {1, 4, 5, 6})
    report = model_walks(200, 1)
    assert report.failure == ("create directories -> hotplug: "
                              "back-end published state 2")
