"""Rounds of ``blktap3-bench``: ours and fio alternate, and a row is the median of rounds.

On a shared 2-core machine one pair of runs says little (the same workload measured 0.63,
0.97 and 1.10 of fio in three runs of one afternoon, issue 18): the load of the others
changes between the two runs of a pair. So each workload runs in several short rounds,
ours then fio, ours then fio, ...; each round gives one ratio, measured while the machine
was in one mood, and the row reports the median ratio with its spread (min, max), so a
ratio means something and a regression can be told from noise. Every other figure of the
row is the median of its rounds. No I/O here: the caller runs the rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from typing import Any

Figures = Mapping[str, Any]


def alternate(ours: Callable[[], Figures], fio: Callable[[], Figures],
              rounds: int) -> list[tuple[Figures, Figures]]:
    """Run ``rounds`` rounds, ours then fio in each, and return their figures in order."""
    return [(ours(), fio()) for _ in range(rounds)]


def _ratio(ours: Figures, fio: Figures, peer: str = "fio_iops") -> float | None:
    o, f = ours.get("ours_iops"), fio.get(peer)
    return o / f if isinstance(o, int | float) and isinstance(f, int | float) and f else None


def _median(values: list[Any]) -> Any:
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if numbers:
        return statistics.median(numbers)
    return values[-1] if values else None


def combine(workload: str, rounds: list[tuple[Figures, Figures]],
            qd1: bool = False, peer: str = "fio_iops") -> dict[str, Any]:
    """One row from the rounds of one workload: medians, and the ratio's spread.

    ``ratio`` is the median of the rounds' own ratios (not the ratio of the medians: each
    round's pair ran back to back), ``ratio_min``/``ratio_max`` their spread, ``ratios``
    all of them in order. With ``qd1`` the row also says ``qd1_added_us``: the median of
    the rounds' p50 latency ours minus fio's, the latency the ring path adds. ``peer``
    names the other side's figure the ratio divides by (fio's IOPS unless said).
    """
    if not rounds:
        raise ValueError(f"{workload}: no rounds")
    keys = {k for pair in rounds for side in pair for k in side}
    row: dict[str, Any] = {"workload": workload, "rounds": len(rounds)}
    for key in sorted(keys):
        row[key] = _median([side[key] for pair in rounds for side in pair if key in side])
    ratios = [r for r in (_ratio(o, f, peer) for o, f in rounds) if r is not None]
    row["ratios"] = ratios
    row["ratio"] = statistics.median(ratios) if ratios else None
    row["ratio_min"] = min(ratios) if ratios else None
    row["ratio_max"] = max(ratios) if ratios else None
    if qd1:
        added = [o["ours_p50_us"] - f["fio_p50_us"] for o, f in rounds
                 if "ours_p50_us" in o and "fio_p50_us" in f]
        row["qd1_added_us"] = statistics.median(added) if added else None
    return row
