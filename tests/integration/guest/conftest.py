"""Fixtures: a simulated host (real xenstored), a real tapdisk, and a minimal back-end.

`MiniBackend` is a stand-in for tapback, for these tests only: a thread in the test
process acting as dom0 that does what the back-end handshake needs (protocol.md) with
the real tapdisk through libblktapctl: InitWait, connect the ring on the front-end's
Initialised and publish the disk, close on request, reconnect after Closed. It lets
the guest be tested on its own, whatever the state of the real daemon.

Everything started here (xenstored, tapdisks, the back-end thread, guest processes) is
stopped when the test ends, failed or not.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blktap3.ctl import ops
from blktap3.ctl.client import TapdiskClient
from blktap3.sim import xensim
from blktap3.sim.host import Host
from blktap3.sim.toolstack import Image
from blktap3.sim.xenstored import Kind
from blktap3.xenbus import (
    FrontendTransport,
    Transaction,
    VbdPaths,
    WatchStream,
    parse_frontend_transport,
    reader_for,
)

MiB = 1 << 20
DEVID = 51712  # xvda



@pytest.fixture
def xenstored_kind() -> Kind:
    """The shared `host` fixture (tests/support/fixtures.py), on the C xenstored only."""
    return "c"


@pytest.fixture
def image(host: Host) -> Callable[..., Path]:
    def make(size: int = 16 * MiB, name: str = "disk.img") -> Path:
        path = host.run_dir.parent / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    return make


@dataclass
class MiniBackend:
    """One VBD's back-end: tapdisk for the data path, this thread for the handshake."""

    host: Host
    paths: VbdPaths
    image: Path
    readonly: bool = False
    max_ring_page_order: int = 3
    info_override: int | None = None  # publish this `info` instead of the tapdisk's
    pid: int = 0
    minor: int = 0
    connected_transport: list[FrontendTransport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _ring_up: bool = False

    def start(self) -> None:
        env = {**os.environ, **xensim.process_env(self.host.run_dir, 0)}
        flags = 0x2 if self.readonly else 0  # TAPDISK_MESSAGE_FLAG_RDONLY
        self.pid, self.minor, _ = ops.create(f"aio:{self.image}", env=env, flags=flags)
        self.xs = self.host.xs()
        self.tapdisk = TapdiskClient(self.pid)
        self.xs.write(self.paths.backend_key("max-ring-page-order"),
                      str(self.max_ring_page_order))
        self.xs.write(self.paths.backend_key("state"), "2")
        self._thread = threading.Thread(target=self._loop, daemon=True, name="minibackend")
        self._thread.start()

    def state(self) -> str | None:
        return self.xs.read_optional(self.paths.backend_key("state"))

    def frontend_state(self) -> str | None:
        return self.xs.read_optional(self.paths.frontend_key("state"))

    def _loop(self) -> None:
        token = "minibackend"
        with WatchStream(lambda: self.host.xs()) as stream:
            stream.watch(self.paths.frontend_key("state"), token)
            while not self._stop.is_set():
                if stream.wait(0.1) is None:
                    continue
                try:
                    self._step()
                except Exception as e:  # keep serving; the test looks at .errors
                    self.errors.append(repr(e))

    def _step(self) -> None:
        fe = self.frontend_state()
        be = self.state()
        if fe == "3" and be != "4":
            self._connect()
        elif fe == "5" and be == "4":
            self.xs.write(self.paths.backend_key("state"), "5")
        elif fe == "6" and be != "6":
            self._disconnect()
            self.xs.write(self.paths.backend_key("state"), "6")
        elif fe == "1" and be == "6":
            self.xs.write(self.paths.backend_key("state"), "2")

    def _connect(self) -> None:
        transport = parse_frontend_transport(reader_for(self.xs, self.paths.frontend),
                                             max_ring_page_order=self.max_ring_page_order)
        self.connected_transport.append(transport)
        queue = transport.queues[0]
        self.tapdisk.connect_xenblkif(
            self.minor, domid=self.paths.domid, devid=self.paths.devid,
            grefs=queue.ring_refs, order=transport.ring_page_order,
            port=queue.event_channel, proto=transport.protocol)
        self._ring_up = True
        info = self.tapdisk.disk_info(self.minor)
        self.publish_disk(info.sectors,
                          info.info if self.info_override is None else self.info_override)
        self.xs.write(self.paths.backend_key("state"), "4")

    def publish_disk(self, sectors: int, info: int = 0) -> None:
        def body(tx: Transaction) -> None:
            for key, value in (("feature-barrier", "1"), ("feature-flush-cache", "1"),
                               ("sectors", str(sectors)), ("info", str(info)),
                               ("sector-size", "512")):
                tx.write(self.paths.backend_key(key), value)

        self.xs.transact(body)

    def _disconnect(self) -> None:
        if self._ring_up:
            self.tapdisk.disconnect_xenblkif(self.minor, domid=self.paths.domid,
                                             devid=self.paths.devid)
            self._ring_up = False

    def close_device(self) -> None:
        """Back-end initiated close (as after `online=0`): Closing, then wait for Closed."""
        self.xs.write(self.paths.backend_key("state"), "5")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(OSError):
            self._disconnect()
        with contextlib.suppress(OSError):
            ops.destroy(self.pid, self.minor)
        self.xs.close()


@pytest.fixture
def vbd(host: Host, image: Callable[..., Path]) -> Iterator[Callable[..., MiniBackend]]:
    """`vbd(domid, size=..., readonly=..., cdrom=...)`: a domain with one disk, served
    (`shared=path`: the image of another VBD, for two guests on one file)."""
    backends: list[MiniBackend] = []

    def make(domid: int, *, size: int = 16 * MiB, readonly: bool = False,
             cdrom: bool = False, max_ring_page_order: int = 3,
             info_override: int | None = None, shared: Path | None = None) -> MiniBackend:
        disk = shared or image(size, f"disk{domid}.img")
        with host.toolstack() as ts:
            ts.create_domain(domid)
            paths = ts.add_vbd(domid, DEVID, Image.parse(f"aio:{disk}"),
                               mode="r" if readonly else "w", cdrom=cdrom)
        be = MiniBackend(host, paths, disk, readonly=readonly,
                         max_ring_page_order=max_ring_page_order, info_override=info_override)
        backends.append(be)
        be.start()
        return be

    yield make
    for be in backends:
        be.stop()
