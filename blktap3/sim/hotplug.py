"""The hotplug step of a vbd3 disk, as Xen's `block-tap` script does it for blktap3.

Add: `tap-ctl create -a <params>` (allocate a minor, spawn a tapdisk, attach, open) under
the simulated machine's environment (the tapdisk is dom0 of the machine: xensim
preloaded), then, in ONE transaction that first checks the back-end directory still
exists, `physical-device-path=<control dir>/nbd<pid>.<minor>` (blktap3's form, which
tapback parses) and `hotplug-status=connected`. A failure writes `hotplug-status=error`
and `hotplug-error` (as Xen's scripts do) so that tapback closes the device with the
reason in its `error` node, and raises `HotplugError`.

Remove: `tap-ctl destroy` (close, detach, free the minor). It is idempotent and also
cleans up after a tapdisk that died: its stale socket and its minor are removed.

The tapdisk's runtime root is `blktap3.tapback.service.control_dir(run_dir)`, the one the
host's tapback is started with. `tap-ctl create` is called through libblktapctl
(`blktap3.ctl.ops.create`), the library the `tap-ctl` command is built on.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from blktap3.ctl import ops, runtime
from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.ctl.protocol import OpenFlags
from blktap3.tapback.service import control_dir
from blktap3.tapback.tapdisks import device_path, parse_device_path
from blktap3.xenbus import BackendKey, Permission, Transaction, VbdPaths, XenStore, owned_by

from . import xensim
from .toolstack import Image

log = structlog.get_logger(__name__)

HOTPLUG_CONNECTED = "connected"
HOTPLUG_ERROR = "error"
HOTPLUG_ERROR_KEY = "hotplug-error"


class HotplugError(Exception):
    """The hotplug step failed (said in one line; also written to `hotplug-error`)."""


class _HostLike(Protocol):
    run_dir: Path

    def xs(self, timeout: float = ...) -> XenStore: ...


@dataclass(frozen=True)
class Attached:
    """What `hotplug_add` set up for a VBD."""

    pid: int
    minor: int
    device_path: str


def tapdisk_env(run_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The environment of a tapdisk on the simulated machine (dom0, xensim preloaded)."""
    root = control_dir(run_dir)
    return {**os.environ, **xensim.process_env(run_dir, 0), runtime.ROOT_ENV: str(root),
            runtime.SHM_ENV: str(runtime.shm_dir(run_dir))}


def _target(host_or_xs: _HostLike | XenStore,
            run_dir: str | os.PathLike[str] | None) -> tuple[XenStore, bool, Path]:
    """(client, whether we opened it, run dir) from a Host or a XenStore plus run_dir."""
    if isinstance(host_or_xs, XenStore):
        if run_dir is None:
            raise ValueError("hotplug with a XenStore client needs run_dir")
        return host_or_xs, False, Path(run_dir)
    return host_or_xs.xs(), True, Path(run_dir or host_or_xs.run_dir)


def hotplug_add(
    host_or_xs: _HostLike | XenStore,
    paths: VbdPaths,
    image: Image,
    *,
    mode: str = "w",
    run_dir: str | os.PathLike[str] | None = None,
    tapdisk: int | None = None,
) -> Attached:
    """Create the VBD's tapdisk and tell the back-end it is there (see module doc).

    `tapdisk`: the pid of a running tapdisk to add this VBD to (tap-ctl allocate,
    attach, open) instead of spawning one per VBD (how a benchmark brings up hundreds).
    """
    xs, owned, rundir = _target(host_or_xs, run_dir)
    root = control_dir(rundir)
    perms = owned_by(paths.backend_domid, readers=[paths.domid])
    try:
        flags = int(OpenFlags.RDONLY) if mode.startswith("r") else 0
        try:
            if tapdisk is None:
                pid, minor, _ = ops.create(image.params, root=root, flags=flags,
                                           env=tapdisk_env(rundir))
            else:
                pid, minor = tapdisk, _attach_to(root, tapdisk, image.params, flags)
        except (CtlError, OSError) as exc:
            reason = f"tap-ctl create {image.params}: {exc}"
            _write_keys(xs, paths, {BackendKey.HOTPLUG_STATUS: HOTPLUG_ERROR,
                                    HOTPLUG_ERROR_KEY: reason}, perms)
            log.error("hotplug failed", domid=paths.domid, devid=paths.devid, reason=reason)
            raise HotplugError(reason) from exc
        dev = device_path(root, pid, minor)
        written = _write_keys(xs, paths, {BackendKey.PHYSICAL_DEVICE_PATH: dev,
                                          BackendKey.HOTPLUG_STATUS: HOTPLUG_CONNECTED}, perms)
        if not written:
            # The toolstack removed the device meanwhile: do not leave a tapdisk behind.
            _destroy(root, pid, minor)
            raise HotplugError(f"back-end directory {paths.backend} vanished during hotplug")
        log.info("hotplug connected", domid=paths.domid, devid=paths.devid, pid=pid,
                 minor=minor, image=image.params)
        return Attached(pid, minor, dev)
    finally:
        if owned:
            xs.close()


def hotplug_remove(
    host_or_xs: _HostLike | XenStore,
    paths: VbdPaths,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
) -> bool:
    """`tap-ctl destroy` the VBD's tapdisk; False when there was nothing to destroy.

    `device` is the `physical-device-path` (read from the back-end directory when not
    given: pass it when the directory may already be gone).
    """
    xs, owned, rundir = _target(host_or_xs, run_dir)
    try:
        if device is None:
            device = xs.read_optional(paths.backend_key(BackendKey.PHYSICAL_DEVICE_PATH))
    finally:
        if owned:
            xs.close()
    if device is None:
        return False
    location = parse_device_path(device)
    _destroy(control_dir(rundir), location.pid, location.minor)
    log.info("hotplug removed", domid=paths.domid, devid=paths.devid, pid=location.pid,
             minor=location.minor)
    return True


def spawn_tapdisk(run_dir: str | os.PathLike[str]) -> int:
    """`tap-ctl spawn` on the simulated machine: an idle tapdisk's pid (for `tapdisk=`)."""
    return ops.spawn(control_dir(run_dir), env=tapdisk_env(run_dir))


def _attach_to(root: Path, pid: int, params: str, flags: int) -> int:
    """allocate + attach + open into a running tapdisk; undone on failure. The minor."""
    minor = runtime.minor_of_devname(ops.allocate(root))
    client = TapdiskClient(pid, root=root)
    try:
        client.attach(minor)
        try:
            client.open(minor, params, flags)
        except BaseException:
            with contextlib.suppress(OSError):
                client.detach(minor)
            raise
    except BaseException:
        with contextlib.suppress(OSError):
            runtime.free_minor(root, minor)
        raise
    return minor


def _destroy(root: Path, pid: int, minor: int) -> None:
    """close + detach + free; a dead tapdisk's leftovers (socket, minor) are removed."""
    try:
        ops.destroy(pid, minor, root=root)
        return
    except CtlError as exc:
        if runtime.process_alive(pid) and exc.errno not in (errno.ENODEV, errno.ENOENT,
                                                            errno.EINVAL):
            raise HotplugError(f"tap-ctl destroy -p {pid} -m {minor}: {exc}") from exc
    runtime.remove_stale_socket(root, pid)
    with contextlib.suppress(OSError):
        runtime.free_minor(root, minor)


def _write_keys(xs: XenStore, paths: VbdPaths, keys: dict[str, str],
                perms: list[Permission]) -> bool:
    def body(tx: Transaction) -> bool:
        if not tx.exists(paths.backend):
            return False
        for key, value in keys.items():
            tx.write(paths.backend_key(key), value, perms)
        return True

    return xs.transact(body)
