"""The scripted guest: a domain's blkfront driven step by step as a scenario says.

Unlike `blktap3.sim.frontend.Blkfront` (a well-behaved front-end run by its machine), this
guest does exactly what a step asks, in the order asked, including what no real driver
should do (a hostile scenario): it writes through the domain's own XenStore connection
over its xenstore ring page (for xenstored it is an unprivileged domain, so what xenstored
refuses it refuses), and owns its ring in a guest ring-driver process
(`python -m blktap3.sim.guestdrv` in the domain's xensim environment) whose grants and
event channel the back-end's tapdisk maps.

Every back-end `state` value written while the guest lives is recorded (a dom0 watch),
so that a personality that panics on an unexpected state (NetBSD) is failed even when
that state only flashed by.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from blktap3.abi import SECTOR_SIZE, BlkifProtocol
from blktap3.datapath.lineproc import LineProcess
from blktap3.sim import xensim
from blktap3.sim.guest.child import ring_xenstore
from blktap3.xenbus import (
    Transaction,
    VbdPaths,
    WatchStream,
    XenbusState,
    XenStore,
    XenStoreError,
)

from .coverage import GuestMove
from .scenario import FLUSH_FEATURES, NOT_OFFERED, Personality

PATTERN_SEED = 0x5A


class GuestFault(Exception):
    """A step the guest could not do (one line, said as the driver would fail)."""


def pattern(sector: int, count: int) -> bytes:
    """The bytes a verified write puts at `sector`: different for every sector."""
    return b"".join(bytes([(sector + i + PATTERN_SEED) & 0xFF]) * SECTOR_SIZE for i in range(count))


# The guest's own state writes that are moves of a blkfront (the front-end machine's
# device_close and device_reconnect), for the coverage replay.
MOVES_OF_STATE = {5: "close", 6: "close", 1: "reconnect"}


class BackendStates:
    """Every value the back-end's `state` node took, from a dom0 watch thread; and in
    `timeline`, the same with the guest's own moves in their place among them."""

    def __init__(self, connect: Callable[[], XenStore], path: str) -> None:
        self.path = path
        self.seen: list[str | None] = []
        self.timeline: list[str | GuestMove | None] = []
        self._lock = threading.Lock()
        self._connect = connect
        self._stop = threading.Event()
        self._stream = WatchStream(connect)
        self._stream.watch(path, "conformance")
        self._xs = connect()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="be-states")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._stream.wait(0.1) is None:
                    continue
                value = self._xs.read_optional(self.path)
            except (XenStoreError, OSError):
                with contextlib.suppress(XenStoreError, OSError):
                    self._xs.close()
                    self._xs = self._connect()
                continue
            self._saw(value)

    def _saw(self, value: str | None) -> None:
        with self._lock:
            if not self.seen or self.seen[-1] != value:
                self.seen.append(value)
                self.timeline.append(value)

    def note(self, move: str, now: str | None) -> None:
        """The guest's own `move`, after the back-end's state as it reads `now` (the
        watch thread may not have seen it yet)."""
        self._saw(now)
        with self._lock:
            self.timeline.append(GuestMove(move))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(XenStoreError, OSError):
            self._stream.close()
            self._xs.close()


class ScriptedGuest:
    """One domain with one VBD, as its blkfront; `dom0` reads the back-end."""

    def __init__(self, run_dir: str, domid: int, paths: VbdPaths, personality: Personality,
                 dom0: Callable[[], XenStore], timeout: float, *,
                 xs: XenStore | None = None) -> None:
        self.run_dir = run_dir
        self.domid = domid
        self.paths = paths
        self.personality = personality
        self.timeout = timeout
        # The domain's xenstore port is claimed once: a second blkfront of the same
        # domain (the OS's, after OVMF's) shares the connection.
        self._owns_xs = xs is None
        self.xs = xs if xs is not None else ring_xenstore(run_dir, domid, timeout)()
        self.ring: LineProcess | None = None
        self.ring_info: dict[str, Any] = {}
        # Multi-queue: queues 1..N-1, each its own ring and event channel (queue 0 is
        # `ring`), shared with the same order as queue 0's.
        self.more_rings: list[tuple[LineProcess, dict[str, Any]]] = []
        self._dom0_connect = dom0
        self.dom0 = dom0()
        self.states = BackendStates(dom0, paths.backend_key("state"))
        self.read_values: dict[str, str] = {}

    # -- the back-end, as dom0 sees it --------------------------------------------------
    def backend(self, key: str) -> str | None:
        try:
            return self.dom0.read_optional(self.paths.backend_key(key))
        except (XenStoreError, OSError):
            self.dom0.close()
            self.dom0 = self._dom0_connect()
            return self.dom0.read_optional(self.paths.backend_key(key))

    def backend_state(self) -> int | None:
        raw = self.backend("state")
        return int(raw) if raw is not None and raw.isdigit() else None

    def wait_backend(self, states: list[int], timeout: float | None = None) -> int | None:
        """Wait until the back-end's state is one of `states`; the last state seen."""
        deadline = time.monotonic() + (timeout or self.timeout)
        with WatchStream(self._dom0_connect) as stream:
            stream.watch(self.paths.backend_key("state"), "wait")
            while True:
                state = self.backend_state()
                if state in states or time.monotonic() >= deadline:
                    return state
                stream.wait(min(0.2, max(0.0, deadline - time.monotonic())))

    # -- acting as the front-end --------------------------------------------------------
    def fe(self, key: str) -> str:
        return self.paths.frontend_key(key)

    def _offer(self, key: str) -> int:
        """A number the back-end offers (missing or not a number: 0, as Linux reads)."""
        offered = self.backend(key)
        return int(offered) if offered is not None and offered.isdigit() else 0

    def nr_queues(self, asked: int | None = None) -> int:
        """The queues a multi-queue blkfront uses (negotiate_mq): min(its max_queues,
        the back-end's multi-queue-max-queues, the online CPUs), at least 1; `asked`
        (a lying guest) overrides it."""
        if asked is not None:
            return asked
        online = os.sysconf("SC_NPROCESSORS_ONLN")
        return max(1, min(self.personality.max_queues,
                          self._offer("multi-queue-max-queues"), online))

    def _share_ring(self, order: int) -> tuple[LineProcess, dict[str, Any]]:
        env = xensim.process_env(self.run_dir, self.domid)
        ring = LineProcess([sys.executable, "-m", "blktap3.sim.guestdrv"], env)
        layout = BlkifProtocol.from_xenstore(self.personality.protocol) or BlkifProtocol.NATIVE
        try:
            info: dict[str, Any] = ring.call("open", backend=self.paths.backend_domid,
                                             order=order, protocol=layout, data_slots=8)
        except OSError as e:
            with contextlib.suppress(OSError):
                ring.close()
            raise GuestFault(f"cannot share a ring of {1 << order} page(s): {e}") from None
        info["order"] = order
        return ring, info

    def open_ring(self, order: int | None, queues: int | None = None) -> bool:
        """Share the ring (each queue's); False when no ring could be made: then, as
        Linux's xenbus_setup_ring and setup_blkring do through xenbus_dev_fatal, the
        device is given up: state Closing."""
        if order is None:
            order = min(self.personality.max_ring_page_order,
                        self._offer("max-ring-page-order"))
        if self.ring is not None:
            raise GuestFault("a ring is already open")
        try:
            self.ring, self.ring_info = self._share_ring(order)
            for _ in range(1, self.nr_queues(queues)):
                self.more_rings.append(self._share_ring(order))
        except GuestFault:
            self.release_ring()
            self.states.note("ring_offer_failed", self.backend("state"))
            self.xs.write(self.fe("state"), str(int(XenbusState.CLOSING)))
            return False
        return True

    def release_ring(self) -> None:
        for ring in ([self.ring] if self.ring else []) + [r for r, _ in self.more_rings]:
            with contextlib.suppress(OSError):
                ring.close()
        self.ring, self.ring_info, self.more_rings = None, {}, []

    def transport(self, omit: list[str], override: dict[str, str]) -> list[tuple[str, str]]:
        if not self.ring_info:
            raise GuestFault("no ring open to describe")
        order = self.ring_info["order"]
        keys: list[tuple[str, str]] = []
        if order:
            keys.append(("ring-page-order", str(order)))
        infos = [self.ring_info] + [info for _, info in self.more_rings]
        if len(infos) > 1:  # talk_to_blkback: each queue's keys under queue-N/
            keys.append(("multi-queue-num-queues", str(len(infos))))
        for i, info in enumerate(infos):
            where = f"queue-{i}/" if len(infos) > 1 else ""
            if order:
                keys += [(f"{where}ring-ref{n}", str(g)) for n, g in enumerate(info["grefs"])]
            else:
                keys.append((f"{where}ring-ref", str(info["grefs"][0])))
            keys.append((f"{where}event-channel", str(info["port"])))
        if self.personality.protocol is not None:
            keys.append(("protocol", self.personality.protocol))
        keys += list(self.personality.extra_keys.items())
        keys = [(k, override.pop(k, v)) for k, v in keys if k not in omit]
        return keys + sorted(override.items())

    def write_keys(self, keys: list[tuple[str, str]], tx: bool, state: int | None = None
                   ) -> None:
        if state is not None:
            keys = [*keys, ("state", str(state))]
        if tx:
            def body(t: Transaction) -> None:
                for key, value in keys:
                    t.write(self.fe(key), value)

            self.xs.transact(body)
        else:
            for key, value in keys:
                self.xs.write(self.fe(key), value)

    def set_state(self, state: int, tx: bool) -> None:
        move = MOVES_OF_STATE.get(state)
        if move is not None:
            self.states.note(move, self.backend("state"))
        if tx:  # xenbus_switch_state: read, write only a change, in a transaction
            def body(t: Transaction) -> None:
                if t.read_optional(self.fe("state")) != str(state):
                    t.write(self.fe("state"), str(state))

            self.xs.transact(body)
        else:
            self.xs.write(self.fe("state"), str(state))

    def read_backend(self, keys: list[str], optional: Sequence[str] = ()) -> dict[str, str]:
        """The keys a driver reads on Connected, through the guest's own connection: a
        missing or non-decimal one fails as the driver fails; an `optional` one the
        driver does without (FreeBSD's physical-sector-size) is only recorded."""
        values: dict[str, str] = {}
        for key in optional:
            value = self.xs.read_optional(self.paths.backend_key(key))
            if value is not None and value.isdigit():
                values[key] = value
        for key in keys:
            value = self.xs.read_optional(self.paths.backend_key(key))
            if value is None or not value.isdigit():
                self.states.note("info_invalid", self.backend("state"))
                raise GuestFault(f"{self.personality.driver} cannot read back-end {key} "
                                 f"({'missing' if value is None else repr(value)})")
            values[key] = value
        self.read_values.update(values)
        return values

    def io(self, op: str, sector: int, count: int) -> tuple[int | str | None, bool | None]:
        """(status, verified): a write puts `pattern`, a read checks it; with several
        queues, through every queue in turn (the first status that is not 0 wins)."""
        answers = [self._io(ring, op, sector, count)
                   for ring in [self._ring()] + [r for r, _ in self.more_rings]]
        status = next((s for s, _ in answers if s != 0), 0)
        verdicts = [v for _, v in answers]
        return status, None if verdicts[0] is None else all(verdicts)

    def _io(self, ring: LineProcess, op: str, sector: int, count: int
            ) -> tuple[int | str | None, bool | None]:
        if op == "write":
            status = ring.call("write", sector=sector, data=pattern(sector, count).hex())
            return status, None
        if op == "read":
            reply = ring.call("read", sector=sector, count=count)
            data = bytes.fromhex(reply["data"])
            ok = reply["status"] == 0 and data == pattern(sector, count)
            return reply["status"], ok
        return self._flush(ring), None

    def _flush(self, ring: LineProcess) -> int | str | None:
        """A flush as the driver sends it: a request without segments for the feature
        it prefers among those the back-end offers (each of them, for Mini-OS); none
        when the back-end offers neither (NOT_OFFERED: the guest cannot flush)."""
        status: int | str | None = NOT_OFFERED
        for feature in self.personality.flush:
            key, op = FLUSH_FEATURES[feature]
            if self.xs.read_optional(self.paths.backend_key(key)) != "1":
                continue
            ring.call("submit", reqs=[{"op": int(op)}])
            got: int | None = ring.call("collect", n=1, timeout=self.timeout)[0]
            status = got if status in (NOT_OFFERED, 0) else status
            if not self.personality.flush_each:
                break
        return status

    def raw_request(self, spec: dict[str, Any]) -> int | None:
        ring = self._ring()
        spec = dict(spec)
        gref = spec.pop("gref", "data")
        if "segs" not in spec and spec.get("op") in (0, 1):
            first = ring.call("data_grefs", pages=1)[0] if gref == "data" else int(gref, 0)
            spec["segs"] = [[first, 0, 7]]
        ring.call("submit", reqs=[spec])
        status: int | None = ring.call("collect", n=1, timeout=self.timeout)[0]
        return status

    def overflow(self) -> None:
        self._ring().call("overflow", extra=5)

    def _ring(self) -> LineProcess:
        if self.ring is None:
            raise GuestFault("no ring open")
        return self.ring

    def close(self) -> None:
        self.release_ring()
        self.states.close()
        for xs in ((self.xs, self.dom0) if self._owns_xs else (self.dom0,)):
            with contextlib.suppress(Exception):
                xs.close()
