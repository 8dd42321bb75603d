"""Fixtures: a simulated host with the real xenstored, tapback and tapdisks, and guests.

- `host` (tests/support/fixtures.py) on the C xenstored here (`xenstored_kind` below; a
  test asks for oxenstored with `@pytest.mark.parametrize("xenstored_kind", ["ocaml"])`),
  with tapback started on it for every test that uses the host (`tapback`).
- `dom0`: a dom0 XenStore client (the shared `xs`).
- `guests`: a factory of `Guest`: a domain created by the toolstack, a vbd3 disk added and
  hotplugged (`blktap3.sim.hotplug`), the guest's own XenStore connection over its ring
  page, and a guest ring-driver process (`blktap3.sim.guestdrv`, the domain's blkfront
  ring under xensim) whose grants and event channel the real tapdisk maps.

The test drives the front-end's half of the handshake itself, as the guest, through
`Guest.publish_transport` / `Guest.set_state`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.datapath.lineproc import LineProcess
from blktap3.sim import xensim
from blktap3.sim.host import Host
from blktap3.sim.hotplug import Attached, hotplug_add, hotplug_remove
from blktap3.sim.toolstack import Image
from blktap3.sim.xenstored import Kind
from blktap3.xenbus import Transaction, VbdPaths, XenbusState, XenStore
from tests.support import wait_until
from tests.support.sim import GuestXenStore, guest_xenstore

MiB = 1 << 20
DEVID = 51712


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
        wait_until(lambda: self.backend_state() == state, timeout,
                   lambda: f"back-end state {state.name} (now {self.backend_state()!r}, "
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


@pytest.fixture
def xenstored_kind() -> Kind:
    return "c"


@pytest.fixture(autouse=True)
def _tapback_on_the_host(request: pytest.FixtureRequest) -> None:
    """Every test here that has a host has tapback running on it."""
    if "host" in request.fixturenames:
        request.getfixturevalue("tapback")


@pytest.fixture
def dom0(xs: XenStore) -> XenStore:
    return xs


GuestFactory = Callable[..., Guest]


@pytest.fixture
def guests(host: Host, dom0: XenStore) -> Iterator[GuestFactory]:
    """`guests(domid, devid, size=, mode=, cdrom=)`: a disk of domain `domid` (created
    on first use), hotplugged; disks of one domain share its XenStore ring connection."""
    made: list[Guest] = []
    domains: dict[int, GuestXenStore] = {}

    def domain(domid: int) -> GuestXenStore:
        if domid not in domains:
            with host.toolstack() as ts:
                ts.create_domain(domid)
            port = host.machine.domain(domid).xenstore_port
            domains[domid] = guest_xenstore(host.run_dir, domid, port)
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
        dom.close()


def remove(host: Host, guest: Guest) -> None:
    """The toolstack's end of a disk: directories removed, then the hotplug remove."""
    with host.toolstack() as ts:
        ts.remove_vbd(guest.domid, guest.paths.devid)
    hotplug_remove(host, guest.paths, device=guest.attached.device_path)
