"""Fixtures of the xensim unit tests: the C probe, run on the shared `machine` fixture
(a fresh simulated machine per test, tests/support/fixtures.py).

The probe (xensim_probe.c) links Debian's real Xen libraries and runs with
libxensim preloaded, as xenstored and tapdisk do, one operation per run.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from blktap3.sim import xensim

PROBE_SOURCE = Path(__file__).with_name("xensim_probe.c")
# xensim.h: the probe's `poke` writes the shared tables in their own layout.
XENSIM_SOURCES = Path(__file__).parents[3] / "blktap3" / "sim" / "csrc" / "xensim"

Probe = Callable[..., str]


@pytest.fixture(scope="session")
def probe_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "xensim_probe"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(PROBE_SOURCE),
         f"-I{XENSIM_SOURCES}",
         "-lxengnttab", "-lxenevtchn", "-lxenctrl"],
        check=True)
    return out


def probe_env(machine: xensim.Machine, domid: int) -> dict[str, str]:
    return {**os.environ, **xensim.process_env(machine.run_dir, domid)}


@pytest.fixture
def probe(machine: xensim.Machine, probe_binary: Path) -> Probe:
    """Run one probe operation as domain `domid`; returns its stdout, stripped."""

    def run(domid: int, *args: object) -> str:
        result = subprocess.run([str(probe_binary), *map(str, args)],
                                env=probe_env(machine, domid), capture_output=True,
                                text=True, timeout=30, check=True)
        return result.stdout.strip()

    return run
