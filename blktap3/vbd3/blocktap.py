"""Xen's `block-tap` hotplug script for vbd3 disks, step by step, driving the `tap-ctl` command.

What libxl (Xen >= 4.19) runs for a disk written `backendtype=tap` once the back-end said
InitWait, and again on removal once it said Closed: xen-project/xen
`tools/hotplug/Linux/block-tap` (read at c447b730, 2026-08). Its steps, kept here:

add, under the `block` hotplug lock:
  - `tap-ctl list -t TYPE -f FILE` (TYPE:FILE from `params`): a tapdisk already serves the
    file (a stub domain's VBD and the guest's share it, or a rerun after a crash): reuse
    it, unless another domain uses the file writably or this VBD writes it (EBUSY,
    `check_tap_sharing`);
  - otherwise `tap-ctl allocate` (the minor is what follows `<control>/tapdisk/tapdisk-`),
    `tap-ctl spawn` (the pid), `tap-ctl attach -p PID -m MINOR`, `tap-ctl open -p PID -m
    MINOR -a TYPE:FILE`, each undone on failure (`detach`, `free`);
  - write `pid`, `minor`, `physical-device-path=<control>/nbd<pid>.<minor>`, then
    `hotplug-status=connected` (`success`); a failure writes `hotplug-error` and
    `hotplug-status=error` (block-common.sh's `fatal`).
remove, under the same lock: unless another VBD still names the file (`tap_shared`),
  `tap-ctl destroy -p PID -m MINOR` with `pid` and `minor` read from the back-end
  directory.

Differences, on purpose: a `mode=r` disk is opened with `-R` (block-tap opens every disk
writable; the back-end's `info` says read-only, but the tapdisk would take writes); the
control directory is the one tap-ctl is run with (block-tap hard-codes
/run/blktap-control); `remove` takes the pid and minor from the caller when the
directory is gone (the toolstack remembers what it created).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from blktap3.xenbus import BackendKey, Transaction, VbdPaths, XenStore, XenStoreError

log = structlog.get_logger(__name__)

HOTPLUG_ERROR_KEY = "hotplug-error"
PID_KEY = "pid"
MINOR_KEY = "minor"
TIMEOUT = 60.0  # per tap-ctl call (libxl's whole hotplug timeout is 40 s)


class BlockTapError(Exception):
    """A block-tap step failed: `errno` as the script exits, the text for hotplug-error."""

    def __init__(self, text: str, code: int = errno.EIO) -> None:
        super().__init__(text)
        self.errno = code


@dataclass(frozen=True)
class TapCtl:
    """How to run `tap-ctl`: its argv and environment (the control directory in it)."""

    argv: Sequence[str] = ("tap-ctl",)
    env: Mapping[str, str] | None = None
    control_dir: Path = Path("/run/blktap-control")

    def __call__(self, *args: str) -> str:
        command = [*self.argv, *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT,
                                  env=None if self.env is None else dict(self.env),
                                  stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BlockTapError(f"tap-ctl {' '.join(args)}: {exc}") from exc
        if done.returncode != 0:
            why = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            raise BlockTapError(f"tap-ctl {' '.join(args)}: {why[0]}",
                                done.returncode if done.returncode < 256 else errno.EIO)
        return done.stdout


@dataclass
class BlockTap:
    """block-tap's `add` and `remove` for one host (see the module docstring)."""

    xs: XenStore
    tap_ctl: TapCtl = field(default_factory=TapCtl)
    lock_path: Path = Path("/var/run/xen-hotplug/block")  # Xen's claim_lock "block"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- add -------------------------------------------------------------------------

    def add(self, paths: VbdPaths) -> tuple[int, int]:
        """Find or make the tapdisk of the VBD's `params`; (pid, minor)."""
        try:
            with self._locked():
                return self._add(paths)
        except BlockTapError as exc:
            self._write(paths, {HOTPLUG_ERROR_KEY: str(exc),
                                BackendKey.HOTPLUG_STATUS: "error"})
            log.error("block-tap add failed", domid=paths.domid, devid=paths.devid,
                      error=str(exc))
            raise

    def _add(self, paths: VbdPaths) -> tuple[int, int]:
        kind, image = self.target(paths)
        mode = self._read(paths, BackendKey.MODE) or "r"
        found = self.find_device(kind, image)
        if found is not None:
            other = self.sharing_conflict(paths, image, mode)
            if other is not None:
                raise BlockTapError(f"tap {kind} file {image} in use by domain {other}",
                                    errno.EBUSY)
            pid, minor = found
        else:
            pid, minor = self.create(f"{kind}:{image}", readonly=not mode.startswith("w"))
        device = str(self.tap_ctl.control_dir / f"nbd{pid}.{minor}")
        # pid and minor first (remove reads them back), then the path, then success.
        self._write(paths, {PID_KEY: str(pid), MINOR_KEY: str(minor),
                            BackendKey.PHYSICAL_DEVICE_PATH: device})
        self._write(paths, {BackendKey.HOTPLUG_STATUS: "connected"})
        log.info("block-tap add", domid=paths.domid, devid=paths.devid, pid=pid,
                 minor=minor, reused=found is not None)
        return pid, minor

    def target(self, paths: VbdPaths) -> tuple[str, str]:
        params = self._read(paths, BackendKey.PARAMS) or ""
        kind, _, image = params.partition(":")
        if not kind or not image:
            raise BlockTapError(f"cannot parse params {params!r}", errno.EINVAL)
        return kind, image

    def find_device(self, kind: str, image: str) -> tuple[int, int] | None:
        """`tap-ctl list -t TYPE -f FILE`: the (pid, minor) serving it, if any."""
        values: dict[str, str] = {}
        for word in self.tap_ctl("list", "-t", kind, "-f", image).replace(",", " ").split():
            key, sep, value = word.partition("=")
            if sep and key in ("pid", "minor") and key not in values:
                values[key] = value
        if set(values) != {"pid", "minor"}:
            return None
        return int(values["pid"]), int(values["minor"])

    def sharing_conflict(self, paths: VbdPaths, image: str, mode: str) -> int | None:
        """block-tap's check_tap_sharing: the domain of another VBD that forbids sharing
        `image` (written by another domain, or any other use when this one writes)."""
        for domid, _, params, other_mode in self.vbds(paths):
            if params.partition(":")[2] != image or domid == paths.domid:
                continue
            if mode.startswith("w") or other_mode.startswith("w"):
                return domid
        return None

    def vbds(self, paths: VbdPaths) -> Iterator[tuple[int, int, str, str]]:
        """(domid, devid, params, mode) of every VBD beside `paths` (its kind, its
        back-end domain), as block-tap walks `$XENBUS_BASE_PATH/$XENBUS_TYPE`."""
        base = paths.backend.rsplit("/", 2)[0]
        for dom in self._ls(base):
            for dev in self._ls(f"{base}/{dom}"):
                params = self.xs.read_optional(f"{base}/{dom}/{dev}/params") or ""
                mode = self.xs.read_optional(f"{base}/{dom}/{dev}/mode") or ""
                if dom.isdigit() and dev.isdigit():
                    yield int(dom), int(dev), params, mode

    def create(self, target: str, *, readonly: bool) -> tuple[int, int]:
        """allocate, spawn, attach, open; each undone on failure."""
        devname = self.tap_ctl("allocate").strip()
        prefix = f"{self.tap_ctl.control_dir}/tapdisk/tapdisk-"
        minor_text = devname.removeprefix(prefix)
        if not minor_text.isdigit():
            raise BlockTapError(f"tap-ctl allocate printed {devname!r}")
        minor = minor_text
        try:
            pid = self.tap_ctl("spawn").strip()
            if not pid.isdigit():
                raise BlockTapError(f"tap-ctl spawn printed {pid!r}")
            self.tap_ctl("attach", "-p", pid, "-m", minor)
        except BlockTapError:
            with contextlib.suppress(BlockTapError):
                self.tap_ctl("free", "-m", minor)
            raise
        try:
            self.tap_ctl("open", "-p", pid, "-m", minor, "-a", target,
                         *(["-R"] if readonly else []))
        except BlockTapError:
            with contextlib.suppress(BlockTapError):
                self.tap_ctl("detach", "-p", pid, "-m", minor)
            with contextlib.suppress(BlockTapError):
                self.tap_ctl("free", "-m", minor)
            raise
        return int(pid), int(minor)

    # -- remove ----------------------------------------------------------------------

    def remove(self, paths: VbdPaths, *, pid: int | None = None,
               minor: int | None = None, image: str | None = None) -> bool:
        """`tap-ctl destroy` unless the file is still shared; False if nothing was done.

        `pid`, `minor`, `image`: what the caller created, for a directory that is gone.
        """
        with self._locked():
            if self._read(paths, BackendKey.PARAMS) is not None:
                image = self.target(paths)[1]
                pid = _int(self._read(paths, PID_KEY)) if pid is None else pid
                minor = _int(self._read(paths, MINOR_KEY)) if minor is None else minor
            if image is not None and self.users(image, paths) > 0:
                log.info("block-tap remove: tapdisk still shared", domid=paths.domid,
                         devid=paths.devid, image=image)
                return False
            if pid is None or minor is None:
                return False
            self.tap_ctl("destroy", "-p", str(pid), "-m", str(minor))
        log.info("block-tap remove", domid=paths.domid, devid=paths.devid, pid=pid,
                 minor=minor)
        return True

    def users(self, image: str, paths: VbdPaths) -> int:
        """How many VBDs other than `paths` name `image` (block-tap's count_using - 1)."""
        return sum(1 for domid, devid, params, _ in self.vbds(paths)
                   if params.partition(":")[2] == image
                   and (domid, devid) != (paths.domid, paths.devid))

    # -- XenStore --------------------------------------------------------------------

    def _ls(self, path: str) -> list[str]:
        try:
            return list(self.xs.ls(path))
        except XenStoreError as exc:
            if exc.errno == errno.ENOENT:
                return []
            raise

    def _read(self, paths: VbdPaths, key: str) -> str | None:
        return self.xs.read_optional(paths.backend_key(key))

    def _write(self, paths: VbdPaths, keys: Mapping[str, str]) -> bool:
        """Write into the back-end directory, only if it still exists (one transaction);
        the new nodes inherit the directory's permissions, as xenstore-write's do."""
        def body(tx: Transaction) -> bool:
            if not tx.exists(paths.backend):
                return False
            for key, value in keys.items():
                tx.write(paths.backend_key(key), value)
            return True

        return self.xs.transact(body)


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None
