"""Fixtures: a simulated host with the real xenstored, tapback and tapdisks, and guests.

- `host`: `blktap3.sim.host.Host` up (C xenstored) in a short run directory under /tmp,
  with tapback started through `blktap3.tapback.service`; everything (tapback, every
  tapdisk of the host's control directory, xenstored, the machine) is stopped when the
  test ends, failed or not.
- `guests`: a factory of `Guest`: a domain created by the toolstack, a vbd3 disk added and
  hotplugged (`blktap3.sim.hotplug`), the guest's own XenStore connection over its ring
  page, and a guest ring-driver process (`blktap3.sim.guestdrv`, the domain's blkfront
  ring under xensim) whose grants and event channel the real tapdisk maps.

The test drives the front-end's half of the handshake itself, as the guest, through
`Guest.publish_transport` / `Guest.set_state`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.ctl import runtime
from blktap3.datapath.lineproc import LineProcess
from blktap3.sim import xenlib, xensim
from blktap3.sim.host import Host
from blktap3.sim.hotplug import Attached, hotplug_add, hotplug_remove
from blktap3.sim.toolstack import Image
from blktap3.tapback import service
from blktap3.xenbus import BoundPort, Transaction, VbdPaths, XenbusState, XenStore

MiB = 1 << 20
DEVID = 51712
T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float = 10.0, what: str = "") -> T:
    """Poll `check` until it returns something truthy (test side only)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.01)


@dataclass
class Guest:
    """One guest domain with one vbd3 disk, driven by the test as its blkfront."""

    host: Host
    _dom0: XenStore
    domid: int
    paths: VbdPaths
    image: Path
    attached: Attached
    xs: XenStore  # the guest's own connection, over its xenstore ring
    ring: LineProcess | None = None
    ring_info: dict[str, Any] = field(default_factory=dict)

    @property
    def dom0(self) -> XenStore:
        """A dom0 client; a new one after xenstored restarted."""
        if not self._dom0.alive:
            self._dom0.close()
            self._dom0 = self.host.xs(timeout=5.0)
        return self._dom0

    # -- reading the back-end -------------------------------------------------------
    def backend(self, key: str) -> str | None:
        return self.dom0.read_optional(self.paths.backend_key(key))

    def backend_state(self) -> XenbusState | None:
        raw = self.backend("state")
        return XenbusState(int(raw)) if raw is not None else None

    def wait_backend(self, state: XenbusState, timeout: float = 10.0) -> None:
        wait_for(lambda: self.backend_state() == state, timeout,
                 f"back-end state {state.name} (now {self.backend_state()!r}, "
                 f"error {self.backend('error')!r})")

    # -- acting as the front-end ----------------------------------------------------
    def set_state(self, state: XenbusState) -> None:
        self.xs.write(self.paths.frontend_key("state"), state.wire())

    def open_ring(self, order: int = 0, protocol: BlkifProtocol = BlkifProtocol.NATIVE,
                  data_slots: int = 0, max_segs: int = 0) -> dict[str, Any]:
        """Share a fresh ring (and data pages) with dom0 in the guest ring process;
        `max_segs` > 11: with indirect pages, requests beyond 11 pages go INDIRECT."""
        if self.ring is None:
            env = xensim.process_env(self.host.run_dir, self.domid)
            self.ring = LineProcess([sys.executable, "-m", "blktap3.sim.guestdrv"], env)
        self.ring_info = self.ring.call("open", backend=0, order=order, protocol=protocol,
                                        data_slots=data_slots, max_segs=max_segs)
        return self.ring_info

    def publish_transport(self, order: int = 0, protocol: str | None = "x86_64-abi",
                          extra: dict[str, str] | None = None, data_slots: int = 0,
                          max_segs: int = 0) -> None:
        """blkfront's ONE transaction: ring refs, event channel, protocol, then state 3.

        `data_slots`: requests in flight the guest ring process has data pages for
        (0: a full ring); a domain's memory is small, so several disks take fewer."""
        layout = BlkifProtocol.from_xenstore(protocol) or BlkifProtocol.NATIVE
        info = self.open_ring(order, layout, data_slots, max_segs)
        fe = self.paths.frontend_key

        def body(tx: Transaction) -> None:
            if order:
                tx.write(fe("ring-page-order"), str(order))
                for i, ref in enumerate(info["grefs"]):
                    tx.write(fe(f"ring-ref{i}"), str(ref))
            else:
                tx.write(fe("ring-ref"), str(info["grefs"][0]))
            tx.write(fe("event-channel"), str(info["port"]))
            if protocol is not None:
                tx.write(fe("protocol"), protocol)
            for key, value in (extra or {}).items():
                tx.write(fe(key), value)
            tx.write(fe("state"), XenbusState.INITIALISED.wire())

        self.xs.transact(body)

    def connect(self, **kwargs: Any) -> None:
        self.wait_backend(XenbusState.INIT_WAIT)
        self.publish_transport(**kwargs)
        self.wait_backend(XenbusState.CONNECTED)
        self.set_state(XenbusState.CONNECTED)

    def close(self) -> None:
        self.set_state(XenbusState.CLOSING)
        self.wait_backend(XenbusState.CLOSING)
        self.set_state(XenbusState.CLOSED)
        self.wait_backend(XenbusState.CLOSED)

    # -- I/O through the ring ---------------------------------------------------------
    def write(self, sector: int, data: bytes) -> int | None:
        assert self.ring is not None
        status: int | None = self.ring.call("write", sector=sector, data=data.hex())
        return status

    def read(self, sector: int, count: int) -> tuple[int | None, bytes]:
        assert self.ring is not None
        reply = self.ring.call("read", sector=sector, count=count)
        return reply["status"], bytes.fromhex(reply["data"])

    def shutdown(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None


def tapdisk_pids(run_dir: Path) -> list[int]:
    root = service.control_dir(run_dir)
    return [pid for pid in runtime.socket_pids(root) if runtime.process_alive(pid)]


def log_lines(run_dir: Path) -> list[dict[str, Any]]:
    """tapback's JSON log lines so far (non-JSON lines, e.g. tracebacks, skipped)."""
    out = []
    for line in service.log_path(run_dir).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def _kill_tapdisks(run_dir: Path) -> None:
    root = service.control_dir(run_dir)
    pids = runtime.socket_pids(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(runtime.process_alive(p) for p in pids), 5, "tapdisks gone")


@pytest.fixture
def host(request: pytest.FixtureRequest) -> Iterator[Host]:
    """The C xenstored; `@pytest.mark.parametrize("host", ["ocaml"], indirect=True)`
    for oxenstored."""
    run_dir = Path(tempfile.mkdtemp(prefix="b3tb-", dir="/tmp"))
    h = Host(run_dir)
    try:
        h.up(getattr(request, "param", "c"))
        service.start(run_dir, xenstored_path=str(h.xenstored_path))
        yield h
    finally:
        service.stop(run_dir)
        _kill_tapdisks(run_dir)
        h.down()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def dom0(host: Host) -> Iterator[XenStore]:
    with host.xs(timeout=5.0) as xs:
        yield xs


GuestFactory = Callable[..., Guest]


@dataclass
class _Domain:
    xs: XenStore
    evtchn: xenlib.EventChannel


@pytest.fixture
def guests(host: Host, dom0: XenStore) -> Iterator[GuestFactory]:
    """`guests(domid, devid, size=, mode=, cdrom=)`: a disk of domain `domid` (created
    on first use), hotplugged; disks of one domain share its XenStore ring connection."""
    made: list[Guest] = []
    domains: dict[int, _Domain] = {}

    def domain(domid: int) -> _Domain:
        if domid not in domains:
            with host.toolstack() as ts:
                ts.create_domain(domid)
            info = host.machine.domain(domid)
            page = xenlib.map_xenstore_page(host.run_dir, domid)
            evtchn = xenlib.EventChannel(host.run_dir, domid)
            evtchn.claim(info.xenstore_port)
            port = BoundPort(evtchn, info.xenstore_port, evtchn.fd)
            xs = XenStore.over_ring(memoryview(page), port, timeout=5.0,
                                    name=f"dom{domid}-xenstore")
            domains[domid] = _Domain(xs, evtchn)
        return domains[domid]

    def make(domid: int = 5, devid: int = DEVID, *, size: int = 8 * MiB, mode: str = "w",
             cdrom: bool = False) -> Guest:
        dom = domain(domid)
        image = host.run_dir / f"disk{domid}.{devid}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        with host.toolstack() as ts:
            paths = ts.add_vbd(domid, devid, Image.parse(f"aio:{image}"), mode=mode,
                               cdrom=cdrom)
        attached = hotplug_add(host, paths, Image.parse(f"aio:{image}"), mode=mode)
        guest = Guest(host, dom0, domid, paths, image, attached, dom.xs)
        made.append(guest)
        return guest

    yield make
    for guest in reversed(made):
        guest.shutdown()
    for dom in domains.values():
        with contextlib.suppress(Exception):
            dom.xs.close()
        dom.evtchn.close()


def remove(host: Host, guest: Guest) -> None:
    """The toolstack's end of a disk: directories removed, then the hotplug remove."""
    with host.toolstack() as ts:
        ts.remove_vbd(guest.domid, guest.paths.devid)
    hotplug_remove(host, guest.paths, device=guest.attached.device_path)
