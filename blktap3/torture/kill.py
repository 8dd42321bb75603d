"""``blktap3-torture kill``: SIGKILL of the tapdisk under a flushed write load.

Each cycle: a tapdisk on a raw image and a fresh guest; the guest writes a random run of
blocks, each sector holding (sector, stamp), and flushes; once the FLUSH is answered,
that run joins the shadow of what is acknowledged and flushed. Then a second run of
writes starts and the tapdisk is SIGKILLed at a random moment in it. The image is then
checked, every block of the shadow: each sector must hold its flushed stamp or the stamp
of a later write to that block (acknowledged or not: SIGKILL keeps the page cache). The
next cycle reattaches a new tapdisk to the same image.

Lost: a shadow block with anything else (zeros, an older stamp, garbage); torn: a block
whose sectors carry different stamps (counted, allowed only for a block being rewritten
when the kill came).
"""

from __future__ import annotations

import random
import time

from blktap3.abi import SECTOR_SIZE, BlkifOp, BlkifStatus

from .rig import Rig
from .tapdisk import BLOCK, SECTORS_PER_BLOCK, TapdiskVbd, block_stamps
from .verdict import Budget, Verdict

GUEST = 9
DISK_BYTES = 32 << 20
FLUSH = BlkifOp.FLUSH_DISKCACHE
OKAY = BlkifStatus.OKAY


def run(count: int | None = None, seconds: float | None = None, *, seed: int = 1) -> Verdict:
    """``count`` kill cycles (default 100), or as many as fit in ``seconds``."""
    budget = Budget.of(count, seconds, 100)
    rnd = random.Random(seed)
    v = Verdict("kill")
    blocks = DISK_BYTES // BLOCK
    flushed: dict[int, int] = {}          # block -> stamp acknowledged and flushed
    later: dict[int, set[int]] = {}       # block -> stamps written after its flush
    cycles = checked = lost = torn = writes_acked = cut = 0
    with Rig() as rig:
        rig.machine.create_domain(GUEST, 8192)
        disk = rig.scratch / "disk.img"
        with disk.open("wb") as f:
            f.truncate(DISK_BYTES)
        stamp = 0
        while v.ok and not budget.spent(cycles):
            vbd = TapdiskVbd(rig, f"aio:{disk}")
            guest = rig.spawn("blktap3.sim.guestdrv", GUEST)
            try:
                vbd.attach(guest, GUEST)
                # A run of blocks, acknowledged, then flushed.
                stamp += 1
                n = rnd.randrange(64, 2048)
                first = rnd.randrange(0, blocks - n)
                res = guest.call("run", qd=16, bs=BLOCK, read_pct=0, random=False,
                                 start=first * SECTORS_PER_BLOCK, span=n * SECTORS_PER_BLOCK,
                                 ios=n, verify=True, stamp=stamp, timeout=30.0)
                if res["errors"] or res["lost"] or res["ios"] != n:
                    v.fail(f"cycle {cycles}: the flushed run failed: {res}")
                    break
                writes_acked += n
                guest.call("submit", reqs=[{"op": FLUSH}])
                if guest.call("collect", n=1, timeout=30.0) != [OKAY]:
                    v.fail(f"cycle {cycles}: FLUSH failed")
                    break
                for blk in range(first, first + n):
                    flushed[blk] = stamp
                    later.pop(blk, None)
                # A second run, cut by SIGKILL at a random moment.
                stamp += 1
                m = rnd.randrange(64, 4096)
                start = rnd.randrange(0, blocks - m)
                for blk in range(start, start + m):
                    later.setdefault(blk, set()).add(stamp)
                guest.send("run", qd=32, bs=BLOCK, read_pct=0, random=False,
                           start=start * SECTORS_PER_BLOCK, span=m * SECTORS_PER_BLOCK,
                           ios=m, verify=True, stamp=stamp, timeout=2.0)
                time.sleep(rnd.uniform(0.0, 0.05))  # the random point of the kill
                vbd.kill()
            finally:
                guest.close(timeout=1.0)
                rig.procs.remove(guest)
            cycles += 1
            second = block_stamps(disk, range(start, start + m))
            cut += any(st is None or stamp not in st for st in second)
            # Every acknowledged-and-flushed block, from dom0.
            shadow = sorted(flushed)
            lo, hi = shadow[0], shadow[-1] + 1
            found = block_stamps(disk, range(lo, hi))
            for blk in shadow:
                stamps = found[blk - lo]
                allowed = {flushed[blk]} | later.get(blk, set())
                checked += 1
                if stamps is None or not stamps <= allowed:
                    lost += 1
                    if lost <= 5:
                        v.fail(f"cycle {cycles}: block {blk} holds {stamps}, "
                               f"flushed {flushed[blk]}, later {later.get(blk)}")
                elif len(stamps) > 1:
                    torn += 1
        ctl = rig.scratch / "ctl"
        # What a dead tapdisk may leave: sockets, minors (its log directory is kept).
        leftovers = sorted(p.name for p in ctl.glob("*") if p.name not in ("tapdisk", "log"))
        minors = sorted(p.name for p in (ctl / "tapdisk").glob("*"))
    v.figures.update({
        "tapdisk SIGKILLs": cycles,
        "of which cut a write run short": cut,
        "blocks written and acknowledged before a flush": writes_acked,
        "flushed blocks checked": checked,
        "lost": lost,
        "torn (being rewritten at the kill)": torn,
        "bytes per block": BLOCK,
        "sector": SECTOR_SIZE,
        "seconds": round(budget.elapsed(), 1),
    })
    v.expect_zero(lost=lost)
    if leftovers or minors:
        v.fail(f"left in the control dir: {leftovers + minors}")
    return v
