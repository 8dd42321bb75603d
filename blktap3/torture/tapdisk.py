"""A real tapdisk process serving one VBD to a simulated guest's ring, as tapback would
wire them (``ops.create`` as tap-ctl does, then XENBLKIF_CONNECT), and the guest's
(sector, stamp) pattern read back from dom0."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import time
from pathlib import Path

from blktap3.abi import SECTOR_SIZE, BlkifProtocol
from blktap3.ctl import ops, runtime
from blktap3.ctl.client import TapdiskClient
from blktap3.datapath.lineproc import LineProcess

from .rig import Rig

DEVID = 51712
MAX_INDIRECT = 256
BLOCK = 4096
SECTORS_PER_BLOCK = BLOCK // SECTOR_SIZE


class TapdiskVbd:
    """One tapdisk with ``params`` open; ``attach`` connects a guest's ring to it."""

    def __init__(self, rig: Rig, params: str) -> None:
        self.root = rig.scratch / "ctl"
        self.env = {**os.environ, **rig.env(0)}
        self.pid, self.minor, _ = ops.create(params, root=self.root, env=self.env)
        self.client = TapdiskClient(self.pid, root=self.root)
        self.domid: int | None = None

    def attach(self, guest: LineProcess, domid: int) -> None:
        g = guest.call("open", backend=0, protocol=BlkifProtocol.NATIVE, max_segs=MAX_INDIRECT)
        self.client.connect_xenblkif(
            self.minor, domid=domid, devid=DEVID, grefs=tuple(g["grefs"]), order=0,
            port=g["port"], proto=int(BlkifProtocol.NATIVE),
            max_indirect_segments=MAX_INDIRECT)
        self.domid = domid

    def detach(self) -> None:
        if self.domid is not None:
            self.client.disconnect_xenblkif(self.minor, domid=self.domid, devid=DEVID)
            self.domid = None

    def kill(self) -> None:
        """SIGKILL, reap, and clean what a dead tapdisk leaves (its sockets, its minor),
        as tap-ctl does when it finds them."""
        os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        # Not our child (tap-ctl's spawn detaches it), and its leader can be a zombie while
        # its io_uring workers still finish: the minor's flock goes with the last thread.
        deadline = time.monotonic() + 30
        while True:
            try:
                if not runtime.process_alive(self.pid):
                    runtime.free_minor(self.root, self.minor)
                    break
            except FileNotFoundError:
                break
            except BlockingIOError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"tapdisk {self.pid} held its minor 30 s after SIGKILL")
            time.sleep(0.005)
        runtime.remove_stale_socket(self.root, self.pid)

    def close(self) -> None:
        try:
            self.detach()
            ops.destroy(self.pid, self.minor, root=self.root, timeout=30)
        except OSError:
            # A wedged tapdisk must not outlive the run.
            with contextlib.suppress(ProcessLookupError):
                self.kill()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def block_stamps(disk: Path, blocks: range) -> list[set[int] | None]:
    """For each block, the stamps its sectors carry (the guest writes (sector, stamp)
    pairs); None for a block holding anything else (zeros, garbage)."""
    out: list[set[int] | None] = []
    with disk.open("rb") as f:
        f.seek(blocks.start * BLOCK)
        data = f.read(len(blocks) * BLOCK)
    for i, blk in enumerate(blocks):
        stamps: set[int] | None = set()
        for s in range(SECTORS_PER_BLOCK):
            sector = blk * SECTORS_PER_BLOCK + s
            raw = data[i * BLOCK + s * SECTOR_SIZE:i * BLOCK + (s + 1) * SECTOR_SIZE]
            got_sector, stamp = struct.unpack_from("=QQ", raw)
            if got_sector != sector or raw != raw[:16] * (SECTOR_SIZE // 16):
                stamps = None
                break
            assert stamps is not None
            stamps.add(stamp)
        out.append(stamps)
    return out
