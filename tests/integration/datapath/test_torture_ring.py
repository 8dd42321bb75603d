"""A short ``blktap3-torture ring``; under sanitize.sh against the ASan+UBSan build."""

from __future__ import annotations

import pytest

from blktap3.torture import ring
from blktap3.torture.rig import in_sanitized_env

pytestmark = pytest.mark.integration


def test_hostile_requests_are_all_answered_and_the_good_guest_is_intact() -> None:
    v = ring.run(count=20_000, sanitize=in_sanitized_env(), seed=3)
    assert v.ok, v.text()
    assert v.figures["hostile answered"] == v.figures["hostile requests"] >= 20_000
    assert v.figures["req_prod overflows (ring halted, reconnected)"] >= 1
    assert v.figures["good guest blocks"] > 0
    assert sum(v.figures["data path error counters"].values()) > 0
