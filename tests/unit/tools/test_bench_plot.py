"""blktap3-bench --plot: a PNG when matplotlib is there, a one-line error when not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from blktap3.tools import bench, bench_plot


def test_without_matplotlib_the_option_is_refused_before_anything_runs(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as stop:
        bench.main(["--plot", str(tmp_path / "p.png"), "--dir", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: blktap3-bench")
    assert "--plot needs matplotlib" in err and "blktap3[plot]" in err
    assert list(tmp_path.iterdir()) == []


def test_the_plot_is_a_png_of_the_rows_with_a_fio_peer(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [{"workload": "4k randread QD32", "ours_iops": 80.0, "fio_iops": 100.0,
             "ratio": 0.8, "ratio_min": 0.7, "ratio_max": 0.95, "ours_p50_us": 300.0,
             "fio_p50_us": 250.0, "ours_p99_us": 900.0, "fio_p99_us": 700.0},
            {"workload": "null ring QD256", "ours_iops": 3e6}]
    out = tmp_path / "bench.png"
    bench_plot.draw(rows, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no workload"):
        bench_plot.draw(rows[1:], tmp_path / "none.png")
