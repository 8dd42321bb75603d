"""``blktap3-torture soak``: a short run, and its flatness judge."""

from __future__ import annotations

import os

import pytest

from blktap3.torture import soak


@pytest.mark.integration
def test_a_short_soak_runs_verified_guests_and_stays_flat() -> None:
    v = soak.run(seconds=5, guests=1, interval=0.5, seed=2)
    assert v.ok, v.text()
    assert v.figures["guest processes run (each 2 connect/detach cycles, verified I/O)"] >= 1
    assert v.figures["errors"] == 0
    assert v.figures["samples"] >= 5
    assert "tapback" in v.figures["over time"]
    assert v.figures["flat"].startswith("not judged")


def test_a_rising_floor_is_growth_and_noise_is_not() -> None:
    noisy = [(float(t), 100 + (7 if t % 2 else 0)) for t in range(100)]
    assert soak.flat(noisy, 100.0, 0) == (True, -7)
    leaking = [(float(t), 100 + t // 10) for t in range(100)]
    ok, growth = soak.flat(leaking, 100.0, 0)
    assert not ok and growth == 3     # 107 at the end of the first half, 110 from 75 s
    assert soak.flat(leaking, 100.0, 3) == (True, 3)


def test_usage_of_a_process_and_of_none() -> None:
    rss, fds = soak.proc_usage(os.getpid()) or (0, 0)
    assert rss > 1000 and fds >= 3
    assert soak.proc_usage(2**22 + 12345) is None
