"""Shared integration fixtures: Debian's real xenstored / oxenstored on the simulated host.

- `xenstored_c`, `xenstored_ocaml`: one daemon of that kind, on a fresh simulated machine
  (`blktap3.sim.xensim.Machine`, dom0 created) in its own run directory; the value is the
  `blktap3.sim.xenstored.Xenstored` launcher (`.socket_path`, `.run_dir`, `.restart()`).
  `XENSTORED_PATH` points at it for the test, so `XenStore.open()`, `WatchStream.open()`
  and the xenstore-* tools reach it without arguments.
- `xenstored`: the same, parametrized over both kinds (tests run once per daemon).
- `xs`: a connected dom0 `blktap3.xenbus.XenStore` on that daemon.

Everything is stopped and removed when the test ends, failed or not.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest

from blktap3.sim import xensim
from blktap3.sim.xenstored import Kind, Xenstored
from blktap3.xenbus import XenStore


def _run_xenstored(kind: Kind, monkeypatch: pytest.MonkeyPatch) -> Iterator[Xenstored]:
    # A short directory under /tmp: the socket path must fit AF_UNIX's 108 bytes.
    run_dir = tempfile.mkdtemp(prefix=f"b3xs-{kind}-", dir="/tmp")
    machine = xensim.Machine(run_dir)
    daemon = Xenstored(run_dir, kind)
    try:
        machine.init()
        daemon.start()
        monkeypatch.setenv("XENSTORED_PATH", str(daemon.socket_path))
        monkeypatch.delenv("XENSTORED_RUNDIR", raising=False)
        yield daemon
    finally:
        daemon.stop()
        machine.teardown()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def xenstored_c(monkeypatch: pytest.MonkeyPatch) -> Iterator[Xenstored]:
    yield from _run_xenstored("c", monkeypatch)


@pytest.fixture
def xenstored_ocaml(monkeypatch: pytest.MonkeyPatch) -> Iterator[Xenstored]:
    yield from _run_xenstored("ocaml", monkeypatch)


@pytest.fixture(params=["c", "ocaml"])
def xenstored(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Xenstored]:
    yield from _run_xenstored(request.param, monkeypatch)


@pytest.fixture
def xs(xenstored: Xenstored) -> Iterator[XenStore]:
    with XenStore.open(str(xenstored.socket_path), timeout=5.0) as client:
        yield client
