"""blktap3-bench's rounds: ours and fio alternate, a row is the median of its rounds."""

from __future__ import annotations

import pytest
from blktap3.tools import bench_rounds


def test_the_rounds_alternate_ours_then_fio() -> None:
    order: list[str] = []

    def ours() -> dict[str, float]:
        order.append("ours")
        return {"ours_iops": 1.0}

    def fio() -> dict[str, float]:
        order.append("fio")
        return {"fio_iops": 1.0}

    assert len(bench_rounds.alternate(ours, fio, 3)) == 3
    assert order == ["ours", "fio"] * 3


def test_the_ratio_is_the_median_of_the_rounds_ratios_with_their_spread() -> None:
    # Round ratios 0.5, 2.0, 1.25: the median ratio is 1.25, which the medians' ratio
    # (150 / 100 = 1.5) is not.
    rounds = [({"ours_iops": 50.0, "ours_p50_us": 30.0}, {"fio_iops": 100.0, "fio_p50_us": 10.0}),
              ({"ours_iops": 200.0, "ours_p50_us": 12.0}, {"fio_iops": 100.0, "fio_p50_us": 11.0}),
              ({"ours_iops": 150.0, "ours_p50_us": 20.0}, {"fio_iops": 120.0, "fio_p50_us": 16.0})]
    row = bench_rounds.combine("4k randread QD1", rounds, qd1=True)
    assert row["ratio"] == pytest.approx(1.25)
    assert (row["ratio_min"], row["ratio_max"]) == (pytest.approx(0.5), pytest.approx(2.0))
    assert row["ratios"] == pytest.approx([0.5, 2.0, 1.25]) and row["rounds"] == 3
    assert row["ours_iops"] == 150.0 and row["fio_iops"] == 100.0
    assert row["ours_p50_us"] == 20.0 and row["fio_p50_us"] == 11.0
    # Added latency per round: 20, 1, 4 us: the median is 4.
    assert row["qd1_added_us"] == pytest.approx(4.0)


def test_a_row_without_qd1_has_no_added_latency_and_no_rounds_is_an_error() -> None:
    row = bench_rounds.combine("w", [({"ours_iops": 1.0}, {"fio_iops": 0.0})])
    assert "qd1_added_us" not in row and row["ratio"] is None and row["ratios"] == []
    with pytest.raises(ValueError, match="no rounds"):
        bench_rounds.combine("w", [])
