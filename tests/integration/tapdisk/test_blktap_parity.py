"""tap-ctl against real tapdisks where blktap's output is the contract; and, given a
blktap build, the side-by-side run of `blktap3.tools.parity` in both directions.

Line numbers cite blktap v4.0.8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from blktap3.tools import parity

from blktap3.ctl import runtime

from .conftest import TapCtl, parse_list

pytestmark = pytest.mark.integration
pytest.importorskip("blktap3.datapath", reason="the data path (Image.open) is not built")


def test_a_tapdisks_vbds_are_listed_newest_first(
    tap_ctl: TapCtl, make_image: Callable[..., str], ctl_root: Path
) -> None:
    # control/tap-ctl-list.c:303 puts each VBD the tapdisk reports at the head of the
    # list: the last attached comes first, whatever its minor.
    pid = int(tap_ctl("spawn").out)
    for _ in range(3):
        assert tap_ctl("allocate").code == 0
    for minor in (0, 2, 1):
        assert tap_ctl("attach", "-p", str(pid), "-m", str(minor)).code == 0
    assert [row["minor"] for row in parse_list(tap_ctl("list").out)] == ["1", "2", "0"]
    assert [row["minor"] for row in parse_list(tap_ctl("list", "-p", str(pid)).out)] == [
        "1", "2", "0"]


def test_debug_names_every_message_on_stdout(
    tap_ctl: TapCtl, make_image: Callable[..., str]
) -> None:
    # control/tap-ctl-ipc.c:108, 123: DBG (printf) per message read and written.
    res = tap_ctl("create", "-a", f"aio:{make_image()}")
    minor = runtime.minor_of_devname(res.out.strip())
    pid = int(parse_list(tap_ctl("list").out)[0]["pid"])
    res = tap_ctl("stats", "-p", str(pid), "-m", str(minor), "--debug")
    assert res.code == 0
    lines = res.out.splitlines()
    assert lines[:2] == [f"sending 'stats' message (uuid = {minor})",
                         f"received 'stats response' message (uuid = {minor})"]
    assert json.loads(lines[2])["name"].startswith("aio:")
    assert res.out.endswith("}\n\n")


def test_every_vbds_stats_through_the_library(
    tap_ctl: TapCtl, make_image: Callable[..., str]
) -> None:
    # drivers/tapdisk-control.c:1087 (cookie 0xffff); blktap's tapdisk crashes on it.
    res = tap_ctl("stats", "-p", "1", "-m", "65535")  # no such tapdisk: ENOENT, not usage
    assert res.code == 2
    disk = make_image()
    assert tap_ctl("create", "-a", f"aio:{disk}").code == 0
    pid = parse_list(tap_ctl("list").out)[0]["pid"]
    res = tap_ctl("stats", "-p", pid, "-m", "65535")
    assert res.code == 0
    assert [vbd["name"] for vbd in json.loads(res.out)] == [f"aio:{disk}"]


@pytest.mark.skipif(not os.environ.get("BLKTAP_BUILD"),
                    reason="BLKTAP_BUILD (a blktap install prefix) not given")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private /run")
def test_side_by_side_with_blktap_leaves_no_unexplained_difference(tmp_path: Path) -> None:
    """Our tap-ctl against blktap's tapdisk, blktap's tap-ctl against ours, and ours
    against ours, step by step against blktap with blktap (see tools/parity.py)."""
    rows = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "-m", "blktap3.tools.parity", "--json", str(rows)],
                          capture_output=True, text=True, timeout=1200)
    results = json.loads(rows.read_text())
    assert len(results) == len(parity.COMPARISONS)
    different = [(title, row["step"]) for title, table in results.items() for row in table
                 if row["verdict"] == "DIFFERENT"]
    assert different == [], done.stdout
    assert done.returncode == 0
