"""Fixtures: a simulated machine, a ring host process (dom0) and guest processes (domU)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.datapath.lineproc import LineProcess
from blktap3.sim import xensim

GUEST_DOMID = 7
DISK_BYTES = 16 << 20
# sanitize.sh: child processes get the ASan/UBSan runtimes (before xensim) so that the
# sanitized data path and guest driver load in them. xensim's own sanitized build is
# not used: preloaded into python it crashes at start (reported to its owner).
SANITIZE = os.environ.get("BLKTAP3_SANITIZE") == "1"
Spawn = Callable[..., LineProcess]


@pytest.fixture
def machine(machine: xensim.Machine) -> xensim.Machine:
    """The shared simulated machine, with two guest domains."""
    # 32 MiB: an order-4 ring's 512 slots of 11 data pages each are granted up front.
    machine.create_domain(GUEST_DOMID, 8192)
    machine.create_domain(GUEST_DOMID + 1, 4096)
    return machine


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with p.open("wb") as f:
        f.truncate(DISK_BYTES)
    return p


@pytest.fixture
def spawn(machine: xensim.Machine) -> Iterator[Spawn]:
    procs: list[LineProcess] = []

    def start(module: str, domid: int, stderr: IO[str] | None = None) -> LineProcess:
        env = xensim.process_env(machine.run_dir, domid)
        if SANITIZE:
            runtimes = " ".join(str(p) for p in xensim.sanitizer_runtime())
            env["LD_PRELOAD"] = f"{runtimes} {env['LD_PRELOAD']}"
        proc = LineProcess([sys.executable, "-m", module], env, stderr=stderr)
        procs.append(proc)
        return proc

    yield start
    for proc in reversed(procs):
        proc.close()


@pytest.fixture
def host(spawn: Spawn) -> LineProcess:
    return spawn("blktap3.datapath.host", 0)


@pytest.fixture
def guest(spawn: Spawn) -> LineProcess:
    return spawn("blktap3.sim.guestdrv", GUEST_DOMID)


def connect(host: LineProcess, guest: LineProcess, disk: Path, *, order: int = 0,
            protocol: BlkifProtocol = BlkifProtocol.NATIVE, readonly: bool = False, name: str = "r",
            domid: int = GUEST_DOMID, driver: str = "aio") -> dict[str, Any]:
    """Open the image in the host, the ring in the guest, and connect them."""
    host.call("open", name=name, driver=driver, path=str(disk), readonly=readonly)
    g: dict[str, Any] = guest.call("open", backend=0, order=order, protocol=protocol)
    host.call("connect", name=name, image=name, domid=domid, devid=51712, grefs=g["grefs"],
              order=order, port=g["port"], protocol=protocol)
    return g
