"""The simulated Xen host: one object that brings the machine up and takes it down.

`Host(run_dir)` owns a simulated machine (xensim state), Debian's real xenstored under it,
optionally tapback (`up(tapback=True)`; the CLI and the demo start it, tests that start
their own pass False) and the toolstack. `up()` may run in one process and `down()` in
another (the `blktap3-sim` CLI does that): what was started is recorded in
`<run_dir>/host.json` and tapback's pid file, and `down()` stops everything by pid (tapback,
every tapdisk of the host's control directory, xenstored) and removes the run directory.
Tests use the same object as a fixture, in one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from blktap3.ctl import ops
from blktap3.ctl.client import CtlError
from blktap3.tapback import service as tapback_service
from blktap3.xenbus import (
    BackendKey,
    Transaction,
    VbdPaths,
    WatchStream,
    XenbusState,
    XenbusValueError,
    XenStore,
    parse_state,
)

from .hotplug import Attached, hotplug_add, hotplug_remove
from .toolstack import Image, Toolstack
from .xensim import Machine
from .xenstored import Kind, Xenstored

log = structlog.get_logger(__name__)

DEFAULT_RUN_DIR = "/run/blktap3-sim"
STATE_FILE = "host.json"
STOP_TIMEOUT = 5.0
DETACH_TIMEOUT = 10.0  # libxl's LIBXL_DESTROY_TIMEOUT


class HostError(Exception):
    """The host cannot do what was asked (said in one line)."""


def default_run_dir() -> Path:
    return Path(os.environ.get("BLKTAP3_SIM_DIR") or DEFAULT_RUN_DIR)


class Host:
    """A simulated Xen host kept in `run_dir`."""

    def __init__(self, run_dir: str | os.PathLike[str] | None = None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
        self.run_dir = self.run_dir.absolute()
        self.machine = Machine(self.run_dir)
        self._xenstored: Xenstored | None = None

    # -- state shared between processes ------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def _state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self._state_path)

    @property
    def is_up(self) -> bool:
        return bool(self._state().get("xenstored"))

    def require_up(self) -> None:
        if not self.is_up:
            raise HostError(f"no simulated host in {self.run_dir} (run: blktap3-sim up)")

    @property
    def xenstored_kind(self) -> Kind:
        kind: Kind = self._state()["xenstored"]["kind"]
        return kind

    @property
    def xenstored_pid(self) -> int | None:
        pid: int | None = self._state().get("xenstored", {}).get("pid")
        return pid

    @property
    def xenstored_path(self) -> Path:
        return Xenstored(self.run_dir, self.xenstored_kind).socket_path

    def env(self) -> dict[str, str]:
        """What a client process needs to reach this host's xenstored."""
        return {"XENSTORED_PATH": str(self.xenstored_path)}

    # -- bring up, take down -----------------------------------------------------

    @property
    def control_dir(self) -> Path:
        """The tapdisks' runtime root (sockets, minors) on this host."""
        return tapback_service.control_dir(self.run_dir)

    @property
    def tapback_pid(self) -> int | None:
        return tapback_service.status(self.run_dir)

    @property
    def tapback_log(self) -> Path:
        return tapback_service.log_path(self.run_dir)

    def up(self, xenstored: Kind = "c", *, tapback: bool = False) -> None:
        if self.is_up:
            raise HostError(f"a simulated host is already up in {self.run_dir}")
        if len(str(self.run_dir / "xenstored" / "socket")) > 100:
            raise HostError(f"run directory {self.run_dir} too long for a unix socket path")
        self.machine.init()
        daemon = Xenstored(self.run_dir, xenstored)
        daemon.start()
        self._xenstored = daemon
        self._save_state({"xenstored": {"kind": xenstored, "pid": daemon.pid}})
        log.info("host up", run_dir=str(self.run_dir), xenstored=xenstored, pid=daemon.pid)
        if tapback:
            self.start_tapback()

    def start_tapback(self) -> int:
        self.require_up()
        pid = tapback_service.start(self.run_dir, xenstored_path=str(self.xenstored_path))
        log.info("tapback up", pid=pid, log=str(self.tapback_log))
        return pid

    def down(self) -> None:
        """Stop everything this host started and remove its state (idempotent)."""
        state = self._state()
        tapback_service.stop(self.run_dir)
        self.stop_tapdisks()
        if self._xenstored is not None:
            self._xenstored.stop()
            self._xenstored = None
        elif state.get("xenstored"):
            tapback_service.terminate(state["xenstored"]["pid"], "xenstored", STOP_TIMEOUT)
        if self.machine.exists:
            self.machine.teardown()
        log.info("host down", run_dir=str(self.run_dir))

    def stop_tapdisks(self) -> None:
        """Destroy every VBD of every tapdisk of this host, then stop what is left."""
        if not self.control_dir.exists():
            return
        entries = ops.list_all(self.control_dir)
        for entry in entries:
            if entry.pid is not None and entry.minor is not None:
                try:
                    ops.destroy(entry.pid, entry.minor, root=self.control_dir, timeout=5.0)
                except (CtlError, OSError) as e:
                    log.warning("tapdisk destroy failed", pid=entry.pid, minor=entry.minor,
                                error=str(e))
        for pid in {e.pid for e in entries if e.pid is not None}:
            tapback_service.terminate(pid, "tapdisk", STOP_TIMEOUT)

    def restart_xenstored(self) -> None:
        """Stop xenstored and start a fresh one (its database is lost, as on a real host)."""
        self.require_up()
        kind = self.xenstored_kind
        if self._xenstored is None:
            tapback_service.terminate(self._state()["xenstored"]["pid"], "xenstored",
                                     STOP_TIMEOUT)
            self._xenstored = Xenstored(self.run_dir, kind)
            self._xenstored.socket_path.unlink(missing_ok=True)
            self._xenstored.start()
        else:
            self._xenstored.restart()
        self._save_state({**self._state(), "xenstored": {"kind": kind,
                                                         "pid": self._xenstored.pid}})

    # -- clients -----------------------------------------------------------------

    def xs(self, timeout: float = 10.0) -> XenStore:
        """A new dom0 XenStore client (close it, or use it as a context manager)."""
        self.require_up()
        return XenStore.open(str(self.xenstored_path), timeout=timeout)

    @contextlib.contextmanager
    def toolstack(self) -> Iterator[Toolstack]:
        with self.xs() as xs:
            yield Toolstack(self.machine, xs)

    # -- disks, as libxl plus the block-tap hotplug script handle them -------------

    def attach_disk(self, domid: int, devid: int, image: Image, *, mode: str = "w",
                    cdrom: bool = False) -> tuple[VbdPaths, Attached]:
        """Write the disk's nodes, then run the hotplug step (tapdisk created)."""
        with self.toolstack() as ts:
            paths = ts.add_vbd(domid, devid, image, mode=mode, cdrom=cdrom)
            attached = hotplug_add(ts.xs, paths, image, mode=mode, run_dir=self.run_dir)
        return paths, attached

    def detach_disk(self, domid: int, devid: int,
                    timeout: float = DETACH_TIMEOUT) -> XenbusState | None:
        """Take a disk away as libxl does; returns the back-end state reached.

        `online=0`, and back-end state Closing if it was Connected, in one transaction
        (the front-end closes, the back-end unregisters); wait up to `timeout` for the
        back-end's Closed; then the hotplug remove step (tap-ctl destroy) and both
        directories removed, whether or not Closed came.
        """
        with self.toolstack() as ts:
            paths = ts.vbd_paths(domid, devid)
            device = ts.xs.read_optional(paths.backend_key(BackendKey.PHYSICAL_DEVICE_PATH))

            def close(tx: Transaction) -> None:
                tx.write(paths.backend_key(BackendKey.ONLINE), "0")
                # A connected front-end is told to close; any other state is left to the
                # back-end, which unregisters on online=0 (Closed must not go back to 5).
                if tx.read_optional(state_key) == XenbusState.CONNECTED.wire():
                    tx.write(state_key, XenbusState.CLOSING.wire())

            if not ts.xs.exists(paths.backend):
                raise HostError(f"domain {domid} has no device {devid}")
            state_key = paths.backend_key(BackendKey.STATE)
            stream = WatchStream.open(str(self.xenstored_path))
            try:
                stream.watch(state_key, "detach")
                ts.xs.transact(close)
                reached = _wait_for_state(ts.xs, stream, state_key, XenbusState.CLOSED,
                                          timeout)
            finally:
                stream.close()
            if reached is not XenbusState.CLOSED:
                log.warning("back-end did not close; removing anyway", domid=domid,
                            devid=devid, state=reached)
            hotplug_remove(ts.xs, paths, run_dir=self.run_dir, device=device)
            ts.remove_vbd(domid, devid)
        return reached

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def _wait_for_state(xs: XenStore, stream: WatchStream, key: str, wanted: XenbusState,
                    timeout: float) -> XenbusState | None:
    """Wait (watch-driven) until `key` holds `wanted`; returns the last state seen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state: XenbusState | None = parse_state(xs.read_optional(key), key)
        except XenbusValueError:
            state = None
        remaining = deadline - time.monotonic()
        if state is wanted or remaining <= 0:
            return state
        stream.wait(remaining)  # any event (or a reconnection): re-read
