"""Fixtures: Debian's real xenstored launcher (C and OCaml) on a simulated machine.

The launcher (`blktap3.sim.xenstored.Xenstored`) is what these tests pin, so they start
it themselves on the shared `machine`, once per `xenstored_kind`; tests of the whole
host use the shared `host` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from blktap3.sim import xensim
from blktap3.sim.host import Host
from blktap3.sim.xenstored import Kind, Xenstored
from blktap3.tapback import service


def serving(host: Host, toolstack: str, domid: int) -> Iterator[Host]:
    """`host` with tapback serving `toolstack`'s order and the guest domain `domid`."""
    host.use_toolstack(toolstack)
    host.start_tapback()
    try:
        with host.toolstack() as ts:
            ts.create_domain(domid)
        yield host
    finally:
        service.stop(host.run_dir)


@pytest.fixture
def xenstored(machine: xensim.Machine, xenstored_kind: Kind) -> Iterator[Xenstored]:
    daemon = Xenstored(machine.run_dir, kind=xenstored_kind)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
