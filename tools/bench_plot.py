"""``blktap3-bench --plot``: a run's ratios and latency percentiles as one PNG.

Left, each workload's ratio ours/fio (the median of its rounds, a bar from the rounds'
minimum to maximum), with 1.0 (fio) and 0.95 (issue 18's target) marked. Right, the p50
and p99 latencies of ours beside fio's, per workload, on a log scale. matplotlib is an
optional extra (``plot``); nothing imports it until a plot is drawn.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'blktap3[plot]' or apt-get install python3-matplotlib"
TARGET = 0.95


def unavailable() -> str | None:
    """Why no plot can be drawn here, in one line, or None when it can."""
    if importlib.util.find_spec("matplotlib") is None:
        return f"--plot needs matplotlib, which is not installed ({INSTALL_HINT})"
    return None


def draw(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write the PNG of the rows that have a fio peer (rows without one are left out)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    peered = [r for r in rows if isinstance(r.get("fio_iops"), int | float)]
    if not peered:
        raise ValueError("no workload with a fio figure to plot")
    names = [r["workload"] for r in peered]
    ys = list(range(len(peered)))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 1.0 + 0.6 * len(peered)),
                                      gridspec_kw={"width_ratios": [1, 1.4]})
    ratios = [r.get("ratio") or 0.0 for r in peered]
    lo = [max(0.0, q - (r.get("ratio_min") or q)) for q, r in zip(ratios, peered, strict=True)]
    hi = [max(0.0, (r.get("ratio_max") or q) - q) for q, r in zip(ratios, peered, strict=True)]
    left.barh(ys, ratios, xerr=[lo, hi], color="tab:blue", capsize=3)
    left.axvline(1.0, color="black", linewidth=1, label="fio")
    left.axvline(TARGET, color="tab:red", linestyle="--", linewidth=1, label=f"{TARGET}")
    left.set_yticks(ys, names)
    left.set_xlabel("IOPS ratio ours / fio (median of rounds, min-max)")
    left.legend(loc="lower right", fontsize="small")

    height = 0.2
    series = (("ours_p50_us", "ours p50", "tab:blue", 1.5),
              ("fio_p50_us", "fio p50", "tab:gray", 0.5),
              ("ours_p99_us", "ours p99", "tab:cyan", -0.5),
              ("fio_p99_us", "fio p99", "silver", -1.5))
    for key, label, colour, offset in series:
        values = [r.get(key) or 0.0 for r in peered]
        right.barh([y + offset * height for y in ys], values, height=height, label=label,
                   color=colour)
    right.set_xscale("log")
    right.set_yticks(ys, [""] * len(ys))
    right.set_xlabel("completion latency (us, log scale)")
    right.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.suptitle("blktap3-bench: ours against fio on the same file, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
