"""The real-Xen rig's marker, and the fio table of the pair of runs (blkback's and ours)
printed at the end of the session, where the CI log shows it."""

from __future__ import annotations

import json

import pytest

from tests.realxen import debs, rig

# mode -> the run's summary (rig.Run.summary), filled by test_realxen as each run ends.
SUMMARIES: dict[str, dict[str, object]] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "realxen: boots a real Xen host under QEMU (set BLKTAP3_REALXEN=1)"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if "control" not in SUMMARIES or "blktap3" not in SUMMARIES:
        return
    control, ours = SUMMARIES["control"], SUMMARIES["blktap3"]
    pair = rig.fio_pair(control, ours)
    out = debs.cache_dir() / "work" / "fio-pair.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(pair, indent=1))
    terminalreporter.section("real-Xen rig: fio in the guest, ours / blkback (same run)")
    terminalreporter.write_line(rig.fio_table(control, ours))
    terminalreporter.write_line(f"JSON: {out}")
    terminalreporter.write_line(json.dumps(pair["ratio_ours_over_blkback"]))
