"""Live storage migration of a VBD on the simulated host, as a toolstack drives it.

What XenServer's storage motion does with blktap, on a VBD whose guest keeps writing:

1. a target of the disk's size is served over NBD: by Debian's ``qemu-nbd`` (a peer none
   of us wrote) or by another tapdisk's export (``tap-ctl create -a aio:TARGET``);
2. the VBD is paused and resumed mirrored to it (``tap-ctl unpause -2 nbd:SOCKET``), with
   a changed-block log (``unpause -c LOG``) beside the mirror; with ``pass_fd`` the
   toolstack connects to the target itself and hands the socket to the tapdisk on
   ``nbdclient<pid>`` (as xapi does), then names it: ``-2 nbd:NAME``;
3. the bulk copy: ``nbdcopy`` from the VBD's own NBD export to the target, while the
   guest's writes reach both sides through the mirror;
4. the VBD is paused (in-flight writes drained, the mirror closed) and the target's
   server stopped; the blocks the log marked since the mirror started are copied again
   from the now quiet source (the bulk copy may have read one of them before a guest
   write that the mirror then put on the target, and written the stale copy after it);
5. source and target are compared byte for byte, then the VBD is resumed on the target
   (``tap-ctl unpause -a aio:TARGET``; without ``-c`` the log goes, as in blktap): the
   guest saw a pause, never an error.

XenServer avoids step 4's catch-up with VHD chains (the mirror writes a new leaf, the
copy goes to its parent); raw files have no chain, so the changed-block log says what to
copy twice. A failure anywhere (the target's server killed mid-mirror: the mirror is
dropped and counted, ``nbd_mirror_failed``) aborts: the VBD goes on from the source
with neither mirror nor log (``unpause -2 null``), and the target file made here is
removed. A VBD that had a changed-block log of its own (``-C``, for backups) has the
migration's in its place from then on: give it its log back with ``unpause -c``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blktap3.abi import SECTOR_SIZE
from blktap3.ctl import ops, passfd
from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.ctl.protocol import OpenFlags
from blktap3.fsm.tapdisk import NO_SECONDARY
from blktap3.tapback.tapdisks import parse_device_path
from blktap3.xenbus import BackendKey, VbdPaths

from .hotplug import tapdisk_env

SERVERS = ("qemu-nbd", "tapdisk")
CHUNK = 1 << 20
COPY_TIMEOUT = 600.0
SERVER_TIMEOUT = 10.0


class MigrationError(Exception):
    """The migration could not start, or was aborted (the VBD stays on its source)."""


@dataclass
class Migration:
    """What one migration did; `ok` once the VBD runs on the target."""

    source: str
    target: Path
    server: str
    size: int = 0
    copied: int = 0                  # bytes of the bulk copy
    marked: int = 0                  # 64 KiB blocks the log marked during the copy
    caught_up: int = 0               # bytes copied again while paused
    mirrored_writes: int = 0         # writes the mirror put on the target
    copy_s: float = 0.0
    paused_s: float = 0.0            # the guest's I/O held for the switch-over
    total_s: float = 0.0
    ok: bool = False
    error: str | None = None
    steps: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.ok:
            return (f"migration of {self.source} to {self.target} ABORTED: {self.error}; "
                    "the VBD goes on from its source")
        return (f"migrated {self.source} -> aio:{self.target} via {self.server}: "
                f"{self.copied} bytes bulk-copied in {self.copy_s:.2f} s, "
                f"{self.mirrored_writes} guest writes mirrored during it, "
                f"{self.marked} blocks marked meanwhile ({self.caught_up} bytes copied "
                f"again), paused {self.paused_s * 1e3:.0f} ms, {self.total_s:.2f} s in all; "
                "target byte-identical to the source at the switch")


@dataclass(frozen=True)
class _Vbd:
    client: TapdiskClient
    pid: int
    minor: int
    params: str


def _find_vbd(host: Any, domid: int, devid: int) -> _Vbd:
    paths = VbdPaths(domid, devid)
    with host.xs() as xs:
        device = xs.read_optional(paths.backend_key(BackendKey.PHYSICAL_DEVICE_PATH))
    if device is None:
        raise MigrationError(f"domain {domid} has no attached device {devid}")
    location = parse_device_path(device)
    rows = [r for r in ops.list_pid(location.pid, host.control_dir)
            if r.minor == location.minor and r.type and r.path]
    if not rows:
        raise MigrationError(f"tapdisk {location.pid} minor {location.minor} has no image")
    return _Vbd(TapdiskClient(location.pid, root=host.control_dir), location.pid,
                location.minor, f"{rows[0].type}:{rows[0].path}")


@contextlib.contextmanager
def _served(server: str, host: Any, target: Path,
            sock: Path) -> Iterator[tuple[int, Callable[[], None]]]:
    """Serve `target` over NBD at `sock`; the block gets the server's pid and a function
    that stops it."""
    if server == "qemu-nbd":
        # -e 8: the mirror and nbdcopy's connections (up to 4) at once.
        proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-e", "8", "-k", str(sock),
                                 str(target)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + SERVER_TIMEOUT
        while not sock.is_socket():  # qemu-nbd has no readiness signal but its socket
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise MigrationError(f"qemu-nbd did not start: {err.strip()}")
            time.sleep(0.02)

        def stop() -> None:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(SERVER_TIMEOUT)

        try:
            yield proc.pid, stop
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(SERVER_TIMEOUT)
        return
    pid, minor, _ = ops.create(f"aio:{target}", root=host.control_dir,
                               env=tapdisk_env(host.run_dir))
    stopped = False

    def stop_tapdisk() -> None:
        nonlocal stopped
        if not stopped:
            ops.destroy(pid, minor, root=host.control_dir, timeout=SERVER_TIMEOUT)
            stopped = True

    # The export's socket; the tapdisk serves it from OPEN on.
    sock.symlink_to(host.control_dir / f"nbd{pid}.{minor}")
    try:
        yield pid, stop_tapdisk
    finally:
        with contextlib.suppress(OSError):
            stop_tapdisk()


def _hand_over(host: Any, vbd: _Vbd, sock: Path, name: str) -> str:
    """Connect to the target and pass the socket to the VBD's tapdisk as `name`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(os.fspath(sock))
        passfd.pass_fd(host.control_dir, vbd.pid, name, conn.fileno())
    return name   # the tapdisk has its own descriptor now; ours closes


def _uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


def _stats(vbd: _Vbd) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(vbd.client.stats(vbd.minor))
    return stats


def _copy_blocks(source: Any, target: Path, blocks: list[int], block: int, size: int) -> int:
    """Copy `blocks` (of `block` bytes) from the open source image to the target file."""
    moved = 0
    with open(target, "r+b") as out:
        for b in blocks:
            start = b * block
            length = min(block, size - start)
            data = source.read(start // SECTOR_SIZE, length // SECTOR_SIZE)
            out.seek(start)
            out.write(data)
            moved += length
        out.flush()
        os.fsync(out.fileno())
    return moved


def _same(source: Any, target: Path, size: int) -> bool:
    with open(target, "rb") as f:
        for start in range(0, size, CHUNK):
            length = min(CHUNK, size - start)
            if source.read(start // SECTOR_SIZE, length // SECTOR_SIZE) != f.read(length):
                return False
    return True


def migrate(host: Any, domid: int, devid: int, target: Path, *, server: str = "qemu-nbd",
            pass_fd: bool = False,
            on_step: Callable[[str], None] = lambda _: None) -> Migration:
    """Move the disk of `domid`'s device `devid` to a new raw file `target` while its
    guest runs (the steps are the module's). Raises MigrationError when it cannot start;
    an abort later is reported in the result (`ok` False, `error`)."""
    from blktap3.datapath import Image, cbtlog  # the data path: only this command needs it

    if server not in SERVERS:
        raise MigrationError(f"unknown NBD server {server!r} (one of {', '.join(SERVERS)})")
    if server == "qemu-nbd" and shutil.which("qemu-nbd") is None:
        raise MigrationError("qemu-nbd is missing (Debian: qemu-utils)")
    if shutil.which("nbdcopy") is None:
        raise MigrationError("nbdcopy is missing (Debian: libnbd-bin)")
    target = Path(target).absolute()
    if target.exists():
        raise MigrationError(f"{target} exists: the target must be a new file")
    vbd = _find_vbd(host, domid, devid)
    result = Migration(vbd.params, target, server)
    t_start = time.monotonic()

    def step(text: str) -> None:
        result.steps.append(text)
        on_step(text)

    size = vbd.client.disk_info(vbd.minor).sectors * SECTOR_SIZE
    result.size = size
    work = host.run_dir / f"migrate-{domid}-{devid}"
    work.mkdir()
    log, sock = work / "changed.cbt", work / "target.sock"
    with open(target, "xb") as f:
        f.truncate(size)
    mirrored = paused = False
    try:
        cbtlog.create(str(log), size)
        with _served(server, host, target, sock) as (server_pid, stop_server):
            step(f"target {target} ({size} bytes) served by {server} (pid {server_pid}) "
                 f"at {sock}")
            vbd.client.pause(vbd.minor)
            paused = True
            secondary = f"nbd:{sock}"
            if pass_fd:
                secondary = f"nbd:{_hand_over(host, vbd, sock, f'migrate-{domid}-{devid}')}"
                step(f"a socket connected to the target handed to tapdisk {vbd.pid} on "
                     f"nbdclient{vbd.pid} as {secondary[4:]}")
            vbd.client.resume(vbd.minor, flags=OpenFlags.SECONDARY, secondary=secondary,
                              logpath=str(log))
            paused, mirrored = False, True
            step(f"VBD {vbd.pid}/{vbd.minor} ({vbd.params}) mirrored to {secondary}, "
                 f"changed blocks logged in {log}")
            t0 = time.monotonic()
            export = host.control_dir / f"nbd{vbd.pid}.{vbd.minor}"
            copy = subprocess.run(["nbdcopy", _uri(export), _uri(sock)], capture_output=True,
                                  text=True, timeout=COPY_TIMEOUT)
            result.copy_s = time.monotonic() - t0
            if copy.returncode != 0:
                raise MigrationError(f"the bulk copy failed: {copy.stderr.strip()}")
            result.copied = size
            step(f"bulk copy done: {size} bytes in {result.copy_s:.2f} s (nbdcopy)")
            stats = _stats(vbd)
            mirror = stats.get("mirror", {})
            if not mirror.get("active") or stats.get("nbd_mirror_failed"):
                raise MigrationError(f"the mirror failed (nbd_mirror_failed "
                                     f"{stats.get('nbd_mirror_failed')}, errno "
                                     f"{mirror.get('last_error')})")
            result.mirrored_writes = int(mirror.get("writes", 0))  # PAUSE closes the mirror
            t_pause = time.monotonic()
            vbd.client.pause(vbd.minor)
            paused = True
            stop_server()
        marked = cbtlog.blocks_set(cbtlog.read_bitmap(str(log)))
        result.marked = len(marked)
        kind, _, path = vbd.params.partition(":")
        source = Image.open(kind, path, readonly=True)
        try:
            result.caught_up = _copy_blocks(source, target, marked, cbtlog.BLOCK_SIZE, size)
            step(f"paused; {len(marked)} blocks marked during the copy copied again "
                 f"({result.caught_up} bytes)")
            if not _same(source, target, size):
                raise MigrationError("the target differs from the source at the switch")
        finally:
            source.close()
        step("source and target byte-identical")
        # No ADD_LOG: the log goes (as blktap's); a swap ends the mirror.
        vbd.client.resume(vbd.minor, params=f"aio:{target}")
        paused = mirrored = False
        result.paused_s = time.monotonic() - t_pause
        step(f"VBD resumed on aio:{target} after {result.paused_s * 1e3:.0f} ms paused")
        result.ok = True
    except (MigrationError, CtlError, OSError, subprocess.TimeoutExpired) as exc:
        result.error = str(exc)
        step(f"aborting: {exc}")
        try:
            _back_to_source(vbd, paused=paused, mirrored=mirrored)
        except (CtlError, OSError) as undo:
            result.error += f"; and the VBD could not go back to its source: {undo}"
        target.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.total_s = time.monotonic() - t_start
    return result


def _back_to_source(vbd: _Vbd, *, paused: bool, mirrored: bool) -> None:
    """After an abort: the VBD serves its source again, with neither mirror nor log."""
    if not paused and not mirrored:
        return
    if not paused:
        vbd.client.pause(vbd.minor)
    vbd.client.resume(vbd.minor, flags=OpenFlags.SECONDARY, secondary=NO_SECONDARY)
