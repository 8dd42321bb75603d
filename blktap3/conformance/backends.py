"""The back-end under test is a plug: how to start it on a simulated host, restart it, stop it.

- `OursBackend`: this project's tapback (and the tapdisks the toolstack's hotplug step
  makes), started as the real daemon; its log's `step` lines feed the machine coverage.
- `BlktapBackend` (`blktap.py`): blktap's own tapback and tapdisk, from a build the
  user names, on the same simulated host.
- `DoubleBackend`: a small back-end written here, in a thread of the harness, that does
  the blkif handshake with the real tapdisk through libblktapctl. Without faults it is a
  plain correct back-end (the self-test checks that it passes); each `fault` breaks one
  rule the way real back-ends have broken it, and the self-test checks that the harness
  catches each one with a readable difference.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.sim.host import Host
from blktap3.tapback import service
from blktap3.vbd3.blocktap import TapCtl
from blktap3.xenbus import (
    Transaction,
    WatchStream,
    XenbusValueError,
    XenStore,
    XenStoreError,
    owned_by,
    parse_frontend_transport,
    reader_for,
)
from blktap3.xenbus.perms import Access, Permission

ROOT = "/local/domain/0/backend/vbd3"
RESTART_TIMEOUT = 10.0
STATUS_POLL = 0.05
# Machine states a VBD is in before tapback knows what it serves (spec backend_vbd).
NOT_SETTLED = {"waiting_hotplug", "adopting", "adopting_disk", "adopting_transport",
               "adopting_ring", "querying_disk"}


def _ls(xs: XenStore, path: str) -> list[str]:
    try:
        return [n for n in xs.ls(path) if n.isdigit()]
    except XenStoreError:
        return []


def _settled_vbds(path: Path, pid: int | None) -> set[tuple[int, int]]:
    """The VBDs tapback `pid`'s status file shows past hotplug and adoption."""
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    if pid is None or status.get("pid") != pid:
        return set()
    return {(int(v["domid"]), int(v["devid"])) for v in status.get("vbds", [])
            if v.get("state") not in NOT_SETTLED}


class Backend(Protocol):
    name: str
    # Where the daemon reaches xenstored when not the host's socket (a relay that
    # injects faults); None: the host's.
    xenstored_via: Path | None

    def start(self, host: Host) -> None: ...

    def restart(self, host: Host) -> None:
        """Stop and start again; return once the back-end serves what it found."""

    def stop(self, host: Host) -> None: ...

    def wait_settled(self, host: Host) -> None:
        """Return once a (re)started back-end serves every VBD it found."""

    def log_path(self, host: Host) -> Path | None: ...

    def handled(self, host: Host, trigger: str, since: int) -> bool | None:
        """Whether the back-end's machine handled `trigger` after log offset `since`, for a
        back-end that logs its machine (None: it does not): the harness's way to wait for
        a step that publishes nothing."""

    def log_offset(self, host: Host) -> int:
        """Where the back-end's log ends now (0 without one)."""

    def alive(self, host: Host) -> bool:
        """The back-end daemon still runs."""

    def tap_ctl(self, host: Host) -> TapCtl | None:
        """The tap-ctl the toolstack's hotplug step runs for this back-end (its tapdisks
        are the back-end's); None: the host's own hotplug step (our tapdisk)."""


class OursBackend:
    """blktap3-py's tapback, run as the daemon (verbose: every step logged)."""

    name = "ours"
    xenstored_via: Path | None = None

    def start(self, host: Host) -> None:
        xenstored = self.xenstored_via or host.xenstored_path
        service.start(host.run_dir, xenstored_path=str(xenstored), verbose=True,
                      toolstack=host.toolstack_kind)

    def restart(self, host: Host, timeout: float = RESTART_TIMEOUT) -> None:
        """Stop and start the daemon; return once it has taken back every VBD it finds
        (its status file lists each, past hotplug and adoption), so that the next step
        meets the new daemon, not a gap (adopting writes nothing to XenStore)."""
        service.stop(host.run_dir)
        self.start(host)
        self.wait_settled(host, timeout)

    def wait_settled(self, host: Host, timeout: float = RESTART_TIMEOUT) -> None:
        with host.xs() as xs:
            expected = {(int(d), int(v)) for d in _ls(xs, ROOT) for v in _ls(xs, f"{ROOT}/{d}")}
        deadline = time.monotonic() + timeout
        while True:
            taken = _settled_vbds(service.status_path(host.run_dir), service.status(host.run_dir))
            if expected <= taken:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"restarted back-end took back {sorted(taken)} of "
                                   f"{sorted(expected)} within {timeout:g} s")
            time.sleep(STATUS_POLL)  # the status file gives no notice: look again soon

    def stop(self, host: Host) -> None:
        service.stop(host.run_dir)

    def log_path(self, host: Host) -> Path | None:
        return host.tapback_log

    def handled(self, host: Host, trigger: str, since: int) -> bool | None:
        """A `step` or `no step` line for `trigger` in the log past `since`."""
        try:
            with open(host.tapback_log, "rb") as f:
                f.seek(since)
                lines = f.read().splitlines()
        except OSError:
            return False
        for line in lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if (isinstance(entry, dict) and entry.get("event") in ("step", "no step")
                        and entry.get("trigger") == trigger):
                    return True
        return False

    def log_offset(self, host: Host) -> int:
        try:
            return host.tapback_log.stat().st_size
        except OSError:
            return 0

    def alive(self, host: Host) -> bool:
        return service.status(host.run_dir) is not None

    def tap_ctl(self, host: Host) -> TapCtl | None:
        return None


FAULTS = {
    "skips-initwait": "never publishes InitWait: connects when the front-end says Initialised",
    "forgets-sectors": "publishes Connected without `sectors`",
    "guest-writable-keys": "writes its keys writable by the guest",
    "no-reconnect": "stays Closed when the front-end starts over at Initialising",
    "publishes-initialised":
        "publishes Initialised (3, a front-end-only state) where InitWait is due",
    "no-error-node": "closes a front-end with bad transport keys without an `error` node",
    "leaks-tapdisk": "removes its directory when the front-end's state node goes, so the "
                     "toolstack skips its hotplug remove and the tapdisk is leaked",
}


@dataclass
class _Vbd:
    path: str
    domid: int
    devid: int
    ring_up: bool = False


class Unlogged:
    """What a back-end that does not log its machine answers: nothing to judge by."""

    def log_path(self, host: Host) -> Path | None:
        return None

    def handled(self, host: Host, trigger: str, since: int) -> bool | None:
        return None

    def log_offset(self, host: Host) -> int:
        return 0


@dataclass
class DoubleBackend(Unlogged):
    """A test double of a back-end; `fault` (one of FAULTS) breaks one rule."""

    fault: str | None = None
    max_ring_page_order: int = 3
    xenstored_via: Path | None = None  # not followed: the double runs in the harness
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}: one of {', '.join(FAULTS)}")
        self.name = f"double:{self.fault}" if self.fault else "double"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._vbds: dict[str, _Vbd] = {}

    def start(self, host: Host) -> None:
        self._stop.clear()
        self._host = host
        self._xs = host.xs()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=self.name)
        self._thread.start()

    def restart(self, host: Host) -> None:
        self.stop(host)
        self.start(host)

    def wait_settled(self, host: Host) -> None:
        """The double keeps no state a restart must take back."""

    def stop(self, host: Host) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with contextlib.suppress(Exception):
            self._xs.close()

    def alive(self, host: Host) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def tap_ctl(self, host: Host) -> TapCtl | None:
        return None

    # -- the loop -------------------------------------------------------------------------
    def _loop(self) -> None:
        with WatchStream(self._host.xs) as stream:
            stream.watch(ROOT, "double")
            while not self._stop.is_set():
                with contextlib.suppress(XenStoreError, OSError):
                    self._scan()
                stream.wait(0.1)

    def _devices(self) -> Iterable[tuple[int, int]]:
        for dom in self._ls(ROOT):
            for dev in self._ls(f"{ROOT}/{dom}"):
                if dom.isdigit() and dev.isdigit():
                    yield int(dom), int(dev)

    def _ls(self, path: str) -> list[str]:
        try:
            return self._xs.ls(path)
        except XenStoreError:
            return []

    def _scan(self) -> None:
        for domid, devid in self._devices():
            path = f"{ROOT}/{domid}/{devid}"
            vbd = self._vbds.setdefault(path, _Vbd(path, domid, devid))
            try:
                self._step(vbd)
            except (CtlError, XenbusValueError, OSError, ValueError) as e:
                self.errors.append(f"{path}: {e}")

    def _read(self, vbd: _Vbd, key: str) -> str | None:
        return self._xs.read_optional(f"{vbd.path}/{key}")

    def _write(self, vbd: _Vbd, keys: dict[str, str]) -> None:
        perms = owned_by(0, readers=[vbd.domid])
        if self.fault == "guest-writable-keys":
            perms = [Permission(0, Access.NONE), Permission(vbd.domid, Access.BOTH)]

        def body(tx: Transaction) -> None:
            if not tx.exists(vbd.path):
                return
            for key, value in keys.items():
                tx.write(f"{vbd.path}/{key}", value, perms)

        self._xs.transact(body)

    def _step(self, vbd: _Vbd) -> None:
        be = self._read(vbd, "state")
        frontend = self._read(vbd, "frontend")
        if be is None or frontend is None:
            return
        fe = self._xs.read_optional(f"{frontend}/state")
        hotplugged = self._read(vbd, "hotplug-status") == "connected"
        if not hotplugged:
            return
        if fe is None and self._xs.exists(frontend) and be == "4":
            # The front-end is gone (Linux blkback reads Unknown): Closed, directory kept.
            self._disconnect(vbd)
            if self.fault == "leaks-tapdisk":
                self._xs.rm(vbd.path)
                return
            self._write(vbd, {"state": "6"})
        elif self._read(vbd, "online") == "0" and be != "6":
            self._disconnect(vbd)
            self._write(vbd, {"state": "6"})
        elif be == "1" and fe in ("1", "3", "4"):
            if self.fault == "publishes-initialised":
                self._write(vbd, {"max-ring-page-order": str(self.max_ring_page_order),
                                  "state": "3"})
                return
            if self.fault == "skips-initwait":
                if fe in ("3", "4"):
                    self._connect(vbd, frontend)
                return
            self._write(vbd, {"max-ring-page-order": str(self.max_ring_page_order),
                              "state": "2"})
        elif be in ("2", "3") and fe in ("3", "4"):
            self._connect(vbd, frontend)
        elif fe == "5" and be == "4":
            self._write(vbd, {"state": "5"})
        elif fe == "6" and be not in ("6",):
            self._disconnect(vbd)
            self._write(vbd, {"state": "6"})
        elif fe == "1" and be == "6" and self.fault != "no-reconnect":
            self._write(vbd, {"state": "2"})

    def _tapdisk(self, vbd: _Vbd) -> tuple[TapdiskClient, int]:
        pid, minor = self._read(vbd, "pid"), self._read(vbd, "minor")
        if pid is None or minor is None:
            device = self._read(vbd, "physical-device-path") or ""
            # .../nbd<pid>.<minor>, as the block-tap hotplug script names it
            pid, _, minor = device.rsplit("/", 1)[-1].removeprefix("nbd").partition(".")
        return TapdiskClient(int(pid), root=self._host.control_dir), int(minor)

    def _connect(self, vbd: _Vbd, frontend: str) -> None:
        try:
            transport = parse_frontend_transport(reader_for(self._xs, frontend),
                                                 max_ring_page_order=self.max_ring_page_order)
        except XenbusValueError as e:
            keys = {"state": "6"} if self.fault == "no-error-node" else {
                "error": f"bad transport: {e}", "state": "6"}
            self._write(vbd, keys)
            return
        client, minor = self._tapdisk(vbd)
        queue = transport.queues[0]
        client.connect_xenblkif(minor, domid=vbd.domid, devid=vbd.devid,
                                grefs=queue.ring_refs, order=transport.ring_page_order,
                                port=queue.event_channel, proto=transport.protocol)
        vbd.ring_up = True
        info = client.disk_info(minor)
        keys = {"feature-barrier": "1", "feature-flush-cache": "1",
                "sectors": str(info.sectors), "info": str(info.info),
                "sector-size": str(info.sector_size)}
        if self.fault == "forgets-sectors":
            del keys["sectors"]
        self._write(vbd, {**keys, "state": "4"})

    def _disconnect(self, vbd: _Vbd) -> None:
        if vbd.ring_up:
            client, minor = self._tapdisk(vbd)
            with contextlib.suppress(CtlError, OSError):
                client.disconnect_xenblkif(minor, domid=vbd.domid, devid=vbd.devid)
            vbd.ring_up = False


def make_backend(spec: str, prefix: str | None = None) -> Backend:
    """`ours`, `double`, `double:<fault>`, or `blktap` (its build's install `prefix`)."""
    if spec == "ours":
        return OursBackend()
    if spec == "double":
        return DoubleBackend()
    if spec.startswith("double:"):
        return DoubleBackend(spec.partition(":")[2])
    if spec == "blktap":
        from .blktap import BlktapBackend

        return BlktapBackend(prefix)
    raise ValueError(f"unknown back-end {spec!r}: ours, blktap, double or double:<fault> "
                     f"({', '.join(FAULTS)})")
