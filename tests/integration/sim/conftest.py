"""Fixtures: a simulated machine with Debian's real xenstored (C and OCaml) on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap3.sim import xensim
from blktap3.sim.xenstored import Xenstored


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[xensim.Machine]:
    m = xensim.Machine(tmp_path / "run")
    m.init()
    yield m
    m.teardown()


@pytest.fixture(params=["c", "ocaml"])
def xenstored(request: pytest.FixtureRequest, machine: xensim.Machine) -> Iterator[Xenstored]:
    daemon = Xenstored(machine.run_dir, kind=request.param)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
