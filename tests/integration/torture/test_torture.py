"""Short runs of each ``blktap3-torture`` subcommand, and its detectors catching faults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.torture import kill, pause, ring
from blktap3.torture.rig import Rig
from blktap3.torture.tapdisk import BLOCK, block_stamps

pytestmark = pytest.mark.integration


def test_kill_cycles_lose_no_flushed_block() -> None:
    v = kill.run(count=3, seed=5)
    assert v.ok, v.text()
    assert v.figures["tapdisk SIGKILLs"] == 3
    assert v.figures["flushed blocks checked"] > 0


def test_pause_cycles_with_an_image_swap_lose_and_double_nothing() -> None:
    v = pause.run(count=12)
    assert v.ok, v.text()
    assert v.figures["pause/resume cycles"] == 12
    assert v.figures["of which resumed on a swapped image"] == 1
    assert v.figures["reads verified"] > 0


def test_the_command_prints_figures_writes_json_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "ring.json"
    # The ASan+UBSan build is made by the command itself, in its scratch directory.
    done = subprocess.run(
        [sys.executable, "-m", "blktap3.torture", "ring", "--count", "3000", "--json",
         str(out)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ring: ok")
    doc = json.loads(out.read_text())
    assert doc["ok"] and doc["figures"]["sanitized"] is True
    assert doc["figures"]["hostile answered"] == doc["figures"]["hostile requests"] >= 3000


@pytest.mark.parametrize("argv", [["ring", "--count", "0"], ["kill", "--seconds", "x"],
                                  ["churn", "--count", "-1"],
                                  ["pause", "--count", "1", "--seconds", "1"], ["nope"]])
def test_bad_arguments_are_a_usage_error(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "blktap3.torture", *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "usage:" in done.stderr and "Traceback" not in done.stderr


def test_an_unanswered_hostile_request_is_counted_lost() -> None:
    """The detector itself: a ring whose back-end is paused answers nothing."""
    with Rig() as rig:
        rig.machine.create_domain(ring.HOSTILE, 4096)
        disk = rig.scratch / "d.img"
        disk.write_bytes(bytes(1 << 20))
        host = rig.spawn("blktap3.datapath.host", 0)
        guest = rig.spawn("blktap3.sim.guestdrv", ring.HOSTILE)
        host.call("open", name="hostile", driver="aio", path=str(disk))
        ring._connect(host, guest, "hostile", ring.HOSTILE, BlkifProtocol.NATIVE, 256)
        host.call("pause", name="hostile")
        res = guest.call("hostile", requests=5, disk_sectors=2048, scribble_pct=0,
                         stale_per_mille=0, timeout=0.3)
        assert res["lost"] == 5 and res["responses"] == 0
        host.call("resume", name="hostile")


def test_block_stamps_tells_a_lost_block_from_a_written_one(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    good = b"".join((s.to_bytes(8, sys.byteorder) + (7).to_bytes(8, sys.byteorder)) * 32
                    for s in range(8))
    disk.write_bytes(good + bytes(BLOCK))
    assert block_stamps(disk, range(2)) == [{7}, None]
