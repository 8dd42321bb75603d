"""physical-device-path parsing and the pidfd monitor of tapdisk deaths."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blktap3.tapback.tapdisks import (
    TapdiskLocation,
    TapdiskMonitor,
    device_path,
    parse_device_path,
)


@given(st.integers(1, 2**31 - 1), st.integers(0, 16383))
def test_device_path_round_trips(pid: int, minor: int) -> None:
    assert parse_device_path(device_path(Path("/run/blktap-control"), pid, minor)) == \
        TapdiskLocation(pid, minor)


@pytest.mark.parametrize("value", [
    "", "/run/blktap-control/tapdisk/tapdisk-0", "nbd0.1", "nbd12.", "nbd12.01",
    "nbd-1.2", "nbd12.16384", "/x/nbd12.3/", "nbd12.3 ", "nbd\uff11\uff12.3",
])
def test_bad_device_paths_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        parse_device_path(value)


def test_monitor_reports_a_death_once() -> None:
    died: list[int] = []
    seen = threading.Event()

    def on_death(pid: int) -> None:
        died.append(pid)
        seen.set()

    monitor = TapdiskMonitor(on_death)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        monitor.watch(proc.pid)
        monitor.watch(proc.pid)  # idempotent
        assert monitor.watching(proc.pid)
        proc.kill()
        proc.wait()
        assert seen.wait(5)
        assert died == [proc.pid]
        assert not monitor.watching(proc.pid)
    finally:
        monitor.close()


def test_monitor_reports_a_pid_already_gone_at_once() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    died: list[int] = []
    monitor = TapdiskMonitor(died.append)
    try:
        monitor.watch(proc.pid)
        assert died == [proc.pid]
    finally:
        monitor.close()
