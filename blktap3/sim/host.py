"""The simulated Xen host: one object that brings the machine up and takes it down.

`Host(run_dir)` owns a simulated machine (xensim state), Debian's real xenstored under it,
optionally tapback (`up(tapback=True)`; the CLI and the demo start it, tests that start
their own pass False) and the toolstack. `up()` may run in one process and `down()` in
another (the `blktap3-sim` CLI does that): what was started is recorded in
`<run_dir>/host.json` and tapback's pid file, and `down()` stops everything by pid (tapback,
every tapdisk of the host's control directory, xenstored) and removes the run directory.
Tests use the same object as a fixture, in one process.

The host serves one toolstack's order (`up(toolstack=...)`, tapback's `--toolstack`):
- "xapi" (the default): the disk's nodes, then the hotplug step at once (`hotplug.py`,
  `tap-ctl create`), as xapi does and blktap's tapback expects;
- "libxl": as Xen >= 4.19's libxl: the nodes (with `script`), a wait of at most 10 s
  (LIBXL_INIT_TIMEOUT) for the back-end's InitWait, then Xen's block-tap script
  (`blocktap.py`: tap-ctl list/allocate/spawn/attach/open, the real `tap-ctl` command).
Either way the host remembers what its hotplug step created (`host.json`), so that
`detach_disk` destroys the tapdisk even when the back-end directory vanished, and
`destroy_domain` detaches every disk of the domain first (no tapdisk left running).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from blktap3.ctl import ops
from blktap3.ctl.client import CtlError
from blktap3.tapback import service as tapback_service
from blktap3.vbd3.blocktap import BlockTap, BlockTapError, TapCtl
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

from .hotplug import Attached, HotplugError, hotplug_add, hotplug_remove, tapdisk_env
from .toolstack import BLOCK_TAP_SCRIPT, TOOLSTACKS, Image, Toolstack
from .xensim import Machine
from .xenstored import Kind, Xenstored

log = structlog.get_logger(__name__)

DEFAULT_RUN_DIR = "/run/blktap3-sim"
STATE_FILE = "host.json"
LOCK_FILE = "host.lock"
INIT_TIMEOUT = 10.0  # libxl's LIBXL_INIT_TIMEOUT: its wait for the back-end's InitWait
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

    @contextlib.contextmanager
    def _state_update(self) -> Iterator[dict[str, Any]]:
        """The state, saved after the block (under a lock: CLI processes may overlap)."""
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = self._state()
            yield state
            self._save_state(state)
        finally:
            os.close(fd)

    @property
    def toolstack_kind(self) -> str:
        """Whose order this host's toolstack and tapback follow: "xapi" or "libxl"."""
        kind: str = self._state().get("toolstack", "xapi")
        return kind

    def use_toolstack(self, kind: str) -> None:
        """Follow `kind`'s order from now on (tapback started after this serves it too)."""
        if kind not in TOOLSTACKS:
            raise HostError(f"bad toolstack {kind!r}: one of {', '.join(TOOLSTACKS)}")
        self.require_up()
        with self._state_update() as state:
            state["toolstack"] = kind

    def _remember(self, domid: int, devid: int, attached: Attached, image: Image) -> None:
        with self._state_update() as state:
            state.setdefault("vbds", {})[f"{domid}/{devid}"] = {
                "pid": attached.pid, "minor": attached.minor,
                "device": attached.device_path, "image": str(image.path)}

    def _forget(self, domid: int, devid: int) -> dict[str, Any] | None:
        with self._state_update() as state:
            record: dict[str, Any] | None = state.get("vbds", {}).pop(f"{domid}/{devid}", None)
        return record

    def remembered_vbds(self, domid: int) -> list[int]:
        """The devids of `domid` whose hotplug step this host ran and did not undo."""
        return sorted(int(key.split("/")[1]) for key in self._state().get("vbds", {})
                      if key.split("/")[0] == str(domid))

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

    def up(self, xenstored: Kind = "c", *, tapback: bool = False,
           toolstack: str = "xapi") -> None:
        if toolstack not in TOOLSTACKS:
            raise HostError(f"bad toolstack {toolstack!r}: one of {', '.join(TOOLSTACKS)}")
        if self.is_up:
            raise HostError(f"a simulated host is already up in {self.run_dir}")
        if len(str(self.run_dir / "xenstored" / "socket")) > 100:
            raise HostError(f"run directory {self.run_dir} too long for a unix socket path")
        self.machine.init()
        daemon = Xenstored(self.run_dir, xenstored)
        daemon.start()
        self._xenstored = daemon
        self._save_state({"xenstored": {"kind": xenstored, "pid": daemon.pid}})
        self.use_toolstack(toolstack)
        log.info("host up", run_dir=str(self.run_dir), xenstored=xenstored, pid=daemon.pid)
        if tapback:
            self.start_tapback()

    def start_tapback(self) -> int:
        self.require_up()
        pid = tapback_service.start(self.run_dir, xenstored_path=str(self.xenstored_path),
                                    toolstack=self.toolstack_kind)
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

    def block_tap(self, xs: XenStore) -> BlockTap:
        """Xen's block-tap script on this host: our `tap-ctl` in the tapdisks' environment."""
        return BlockTap(xs, TapCtl((sys.executable, "-m", "blktap3.ctl.cli"),
                                   tapdisk_env(self.run_dir), self.control_dir),
                        self.run_dir / "xen-hotplug" / "block")

    def attach_disk(self, domid: int, devid: int, image: Image, *, mode: str = "w",
                    cdrom: bool = False) -> tuple[VbdPaths, Attached]:
        """Write the disk's nodes, then run the hotplug step (tapdisk created): at once
        (xapi), or once the back-end said InitWait (libxl, see the module docstring)."""
        libxl = self.toolstack_kind == "libxl"
        with self.toolstack() as ts:
            paths = ts.add_vbd(domid, devid, image, mode=mode, cdrom=cdrom,
                               script=BLOCK_TAP_SCRIPT if libxl else None)
            if not libxl:
                attached = hotplug_add(ts.xs, paths, image, mode=mode, run_dir=self.run_dir)
            else:
                reached = self._wait_backend(ts.xs, paths, XenbusState.INIT_WAIT, INIT_TIMEOUT)
                if reached is not XenbusState.INIT_WAIT:
                    ts.remove_vbd(domid, devid)  # libxl destroys a device it could not add
                    raise HostError(f"unable to add device with path {paths.backend}: the "
                                    f"back-end did not reach InitWait (state {reached}) "
                                    f"within {INIT_TIMEOUT:g} s (is tapback --toolstack "
                                    "libxl running?)")
                try:
                    pid, minor = self.block_tap(ts.xs).add(paths)
                except BlockTapError as exc:
                    raise HotplugError(f"block-tap add: {exc}") from exc
                device = ts.xs.read(paths.backend_key(BackendKey.PHYSICAL_DEVICE_PATH))
                attached = Attached(pid, minor, device)
        self._remember(domid, devid, attached, image)
        return paths, attached

    def detach_disk(self, domid: int, devid: int,
                    timeout: float = DETACH_TIMEOUT) -> XenbusState | None:
        """Take a disk away as libxl does; returns the back-end state reached.

        `online=0`, and back-end state Closing unless it is Closed, in one transaction
        (the front-end closes, the back-end unregisters); wait up to `timeout` for the
        back-end's Closed; then the hotplug remove step (tap-ctl destroy) and both
        directories removed, whether or not Closed came.  A back-end directory that is
        gone already (None is returned) still has its tapdisk destroyed: the host
        remembers what its hotplug step created.
        """
        with self.toolstack() as ts:
            paths = ts.vbd_paths(domid, devid)
            record = self._state().get("vbds", {}).get(f"{domid}/{devid}")
            if not ts.xs.exists(paths.backend):
                if record is None:
                    raise HostError(f"domain {domid} has no device {devid}")
                self._hotplug_remove(ts.xs, paths, record)
                ts.remove_vbd(domid, devid)
                self._forget(domid, devid)
                log.warning("back-end directory was gone; its tapdisk destroyed",
                            domid=domid, devid=devid, pid=record["pid"])
                return None
            device = ts.xs.read_optional(paths.backend_key(BackendKey.PHYSICAL_DEVICE_PATH))
            state_key = paths.backend_key(BackendKey.STATE)

            def close(tx: Transaction) -> None:
                tx.write(paths.backend_key(BackendKey.ONLINE), "0")
                # As libxl: Closing unless the back-end is Closed already (6 -> 5 is not
                # a xenbus step).
                if tx.read_optional(state_key) != XenbusState.CLOSED.wire():
                    tx.write(state_key, XenbusState.CLOSING.wire())

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
            if record is None and device is not None:
                record = {"device": device}
            if record is not None:
                self._hotplug_remove(ts.xs, paths, record)
            ts.remove_vbd(domid, devid)
            self._forget(domid, devid)
        return reached

    def _hotplug_remove(self, xs: XenStore, paths: VbdPaths, record: dict[str, Any]) -> None:
        """The hotplug remove step of this host's toolstack, for what `record` says."""
        if self.toolstack_kind == "libxl":
            try:
                self.block_tap(xs).remove(paths, pid=record.get("pid"),
                                          minor=record.get("minor"), image=record.get("image"))
            except BlockTapError as exc:
                raise HotplugError(f"block-tap remove: {exc}") from exc
        else:
            hotplug_remove(xs, paths, run_dir=self.run_dir, device=record["device"])

    def destroy_domain(self, domid: int) -> None:
        """Destroy a domain as libxl does: the guest is gone (its device directories go
        first, so back-ends close at once), every disk detached (tapdisks destroyed),
        then the domain released and its nodes removed."""
        with self.toolstack() as ts:
            kind_dir = f"/local/domain/0/backend/{ts.backend_kind}/{domid}"
            present = ts.xs.ls(kind_dir) if ts.xs.exists(kind_dir) else []
            devids = sorted({*(int(d) for d in present if d.isdigit()),
                             *self.remembered_vbds(domid)})
            for devid in devids:
                frontend = ts.vbd_paths(domid, devid).frontend
                if ts.xs.exists(frontend):
                    ts.xs.rm(frontend)
        for devid in devids:
            with contextlib.suppress(HostError):
                self.detach_disk(domid, devid)
        with self.toolstack() as ts:
            ts.destroy_domain(domid)

    def _wait_backend(self, xs: XenStore, paths: VbdPaths, wanted: XenbusState,
                      timeout: float) -> XenbusState | None:
        """Wait (watch-driven) for the back-end's `wanted` state; the last state seen."""
        state_key = paths.backend_key(BackendKey.STATE)
        stream = WatchStream.open(str(self.xenstored_path))
        try:
            stream.watch(state_key, "wait")
            return _wait_for_state(xs, stream, state_key, wanted, timeout)
        finally:
            stream.close()

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
