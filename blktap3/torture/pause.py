"""``blktap3-torture pause``: pause/resume of a real tapdisk under a verifying load.

A guest writes its whole image with (sector, stamp) sectors, then runs a random read and
write load at QD32 that checks every block it reads. Meanwhile the VBD is paused (which
must drain in-flight I/O and close the image) and resumed, over and over; every tenth
resume is onto a copy of the image made while paused (an image swap, as a storage
manager does after a snapshot). Lost: a request never answered, a response for a request
not in flight (doubled), an error, a wrong block read, or a wrong block in the image at
the end.
"""

from __future__ import annotations

import shutil
import statistics
import threading
import time
from typing import Any

from blktap3.ctl.client import TapdiskClient

from .rig import Rig
from .tapdisk import BLOCK, SECTORS_PER_BLOCK, TapdiskVbd, block_stamps
from .verdict import Verdict

GUEST = 10
DISK_BYTES = 16 << 20
STAMP = 0x7061_7573_65     # "pause"
SWAP_EVERY = 10
CHUNK_SECONDS = 2.0
GUEST_COUNTS = ("ios", "reads", "writes", "errors", "mismatches", "lost", "duplicates",
                "bad_ops")


class _Pauser(threading.Thread):
    """Pauses and resumes the VBD until told to stop or ``count`` cycles are done."""

    def __init__(self, client: TapdiskClient, minor: int, images: list[str],
                 count: int | None, deadline: float | None) -> None:
        super().__init__(daemon=True)
        self.client, self.minor, self.images = client, minor, images
        self.count, self.deadline = count, deadline
        self.stop = threading.Event()
        self.pause_s: list[float] = []
        self.paused_s: list[float] = []
        self.swaps = 0
        self.current = 0
        self.error: BaseException | None = None

    def done(self) -> bool:
        if self.count is not None and len(self.pause_s) >= self.count:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def run(self) -> None:
        try:
            while not self.stop.is_set() and not self.done():
                t0 = time.monotonic()
                self.client.pause(self.minor, timeout=30)
                t1 = time.monotonic()
                params = ""
                if (len(self.pause_s) + 1) % SWAP_EVERY == 0:
                    # The image is closed while paused: copy it, resume on the copy.
                    nxt = 1 - self.current
                    shutil.copyfile(self.images[self.current], self.images[nxt])
                    self.current = nxt
                    params = f"aio:{self.images[nxt]}"
                    self.swaps += 1
                self.client.resume(self.minor, params, timeout=30)
                self.pause_s.append(t1 - t0)
                self.paused_s.append(time.monotonic() - t0)
        except BaseException as exc:  # reported by the run, not lost in a thread
            self.error = exc


def run(count: int | None = None, seconds: float | None = None) -> Verdict:
    """``count`` pause/resume cycles (default 1,000), or as many as fit in ``seconds``."""
    if count is None and seconds is None:
        count = 1000
    v = Verdict("pause")
    t0 = time.monotonic()
    with Rig() as rig:
        rig.machine.create_domain(GUEST, 8192)
        images = [rig.scratch / "a.img", rig.scratch / "b.img"]
        with images[0].open("wb") as f:
            f.truncate(DISK_BYTES)
        sectors = DISK_BYTES // 512
        vbd = TapdiskVbd(rig, f"aio:{images[0]}")
        try:
            guest = rig.spawn("blktap3.sim.guestdrv", GUEST)
            vbd.attach(guest, GUEST)
            load: dict[str, Any] = {"bs": BLOCK, "span": sectors, "verify": True,
                                    "stamp": STAMP, "timeout": 60.0}
            pre = guest.call("run", qd=32, read_pct=0, random=False,
                             ios=sectors // SECTORS_PER_BLOCK, **load)
            if pre["errors"] or pre["lost"]:
                v.fail(f"prefill failed: {pre}")
            pauser = _Pauser(vbd.client, vbd.minor, [str(p) for p in images], count,
                             t0 + seconds if seconds is not None else None)
            totals = dict.fromkeys(GUEST_COUNTS, 0)
            pauser.start()
            chunk = 0
            while pauser.is_alive() and v.ok:
                chunk += 1
                g = guest.call("run", qd=32, read_pct=50, random=True,
                               duration=CHUNK_SECONDS, seed=chunk, **load)
                for k in totals:
                    totals[k] += g[k]
                if g["timed_out"]:
                    v.fail(f"the guest's load timed out in chunk {chunk}")
                    pauser.stop.set()
            pauser.join()
            if pauser.error is not None:
                v.fail(f"pause/resume failed: {pauser.error!r}")
            vbd.detach()
        finally:
            vbd.close()
        current = images[pauser.current]
        wrong = sum(st != {STAMP} for st in block_stamps(current, range(DISK_BYTES // BLOCK)))
        pauses = pauser.pause_s or [0.0]
        v.figures.update({
            "pause/resume cycles": len(pauser.pause_s),
            "of which resumed on a swapped image": pauser.swaps,
            "guest blocks (QD32, verified)": totals["ios"],
            "reads verified": totals["reads"],
            "longest pause (drain + close), ms": round(max(pauses) * 1e3, 2),
            "median pause, ms": round(statistics.median(pauses) * 1e3, 2),
            "longest paused (pause to resumed), ms": round(max(pauser.paused_s or [0]) * 1e3,
                                                           2),
            "image blocks wrong at the end": wrong,
            "seconds": round(time.monotonic() - t0, 1),
        })
        v.expect_zero(**{
            "lost (never answered)": totals["lost"],
            "doubled (answered when not in flight)": totals["duplicates"],
            "errors": totals["errors"],
            "wrong reads": totals["mismatches"],
            "wrong operation in a response": totals["bad_ops"],
            "image blocks wrong at the end": wrong,
        })
    return v
