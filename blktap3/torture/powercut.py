"""``blktap3-torture powercut``: power cuts under a flushed write load, raw and VHD.

SIGKILL (``kill``) keeps the page cache; a power cut does not. Here the images (a raw
one and a dynamic VHD) are served through the FUSE layer (``faultfs``), which holds every
write not yet covered by a completed fsync in memory, as a disk's volatile cache does.
Each cycle starts a tapdisk and a guest per image; each guest writes batches of blocks
stamped (sector, stamp) and flushes now and then; the last batch is cut short: at a
random moment during it the power goes (``FaultFs.cut``: a random subset of the unsynced
writes reaches the backing file, in order, the rest is lost; every request fails from
then on), and the tapdisks are SIGKILLed as the machine dies with them.

Then the backing files, as they would be found after a reboot, are checked:

- every sector holds what an acknowledged, completed FLUSH made durable, or a stamp
  written after that FLUSH (acknowledged or not): anything else is lost (``shadow``);
- the VHD is valid for our ``vhd-util check``, and qemu-img reads it (converted to raw)
  with the same result, sector for sector, as the rule above demands (``qemu-img check``
  does not check the vpc format). blktap's VHD allocation order (footer at the new end,
  bitmap and data, sync, and only then the BAT entry) is what keeps it valid.

The next cycle reopens the same images with new tapdisks: what the cut left is where the
guest starts again.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from blktap3.abi import SECTOR_SIZE
from blktap3.sim.guestdrv import sector_stamp

from .faultfs import FaultFs, Rule
from .faults import IMAGES, OKAY, SPAN, batch_items, make_backing
from .rig import Rig
from .shadow import Shadow
from .tapdisk import TapdiskVbd
from .verdict import Budget, Verdict

GUEST = {"raw": 21, "vhd": 22}


def run(count: int | None = None, seconds: float | None = None, *, seed: int = 1,
        lying_disk: bool = False) -> Verdict:
    """``count`` power cuts (default 100), or as many as fit in ``seconds``.
    ``lying_disk``: every fsync reports success and syncs nothing (the checker's test)."""
    budget = Budget.of(count, seconds, 100)
    rnd = random.Random(seed)
    v = Verdict("powercut")
    fig: Counter[str] = Counter()
    shadows = {kind: Shadow() for kind in GUEST}
    cuts = 0
    with Rig() as rig:
        backing = make_backing(rig.scratch)
        for domid in GUEST.values():
            rig.machine.create_domain(domid, 8192)
        with FaultFs(backing, rig.scratch / "mnt") as fs:
            if lying_disk:
                fs.rules(Rule("fsync", kind="lie"))
            while v.ok and not budget.spent(cuts):
                _cycle(rig, fs, shadows, rnd, cuts, fig)
                cuts += 1
                for kind in GUEST:
                    _check(backing, kind, shadows[kind], cuts, v, fig)
                    shadows[kind].after_cut()
                fs.power_on()
    v.figures.update({
        "power cuts": cuts,
        **{k: fig[k] for k in sorted(fig)},
        "seconds": round(budget.elapsed(), 1),
    })
    return v


def _cycle(rig: Rig, fs: FaultFs, shadows: dict[str, Shadow], rnd: random.Random,
           n: int, fig: Counter[str]) -> None:
    vbds: dict[str, TapdiskVbd] = {}
    guests = {}
    try:
        for kind, (name, driver) in IMAGES.items():
            vbds[kind] = TapdiskVbd(rig, f"{driver}:{fs.path(name)}")
            guests[kind] = rig.spawn("blktap3.sim.guestdrv", GUEST[kind])
            vbds[kind].attach(guests[kind], GUEST[kind])
        batches = rnd.randrange(1, 6)
        for b in range(batches + 1):
            last = b == batches
            sent: dict[str, list[dict[str, Any]]] = {}
            for kind, guest in guests.items():
                stamp = ((n * 8 + b + 1) << 8) | GUEST[kind]
                items = batch_items(rnd, stamp, ops=("write",))
                if rnd.random() < 0.5:
                    items.append({"op": "flush"})
                sent[kind] = items
                guest.send("batch", items=items, timeout=30.0)
            if last:
                time.sleep(rnd.uniform(0.0, 0.03))  # the random moment of the cut
                lost = fs.cut(keep=rnd.choice((0.0, 0.5, 0.9)))
                fig["unflushed writes kept by the cut"] += lost["kept"]
                fig["unflushed writes lost by the cut"] += lost["lost"]
            for kind, guest in guests.items():
                _account(shadows[kind], sent[kind], guest.reply(), fig)
    finally:
        # The machine dies with the power: no orderly close, no last flush.
        for kind, vbd in vbds.items():
            vbd.kill()
            guests[kind].close(timeout=1.0)
            rig.procs.remove(guests[kind])


def _account(shadow: Shadow, items: list[dict[str, Any]], results: list[dict[str, Any]],
             fig: Counter[str]) -> None:
    flushed = False
    for item, res in zip(items, results, strict=True):
        ok = res["status"] == OKAY
        if item["op"] == "flush":
            flushed = ok
            fig["FLUSHes answered OKAY" if ok else "FLUSHes answered ERROR (cut)"] += 1
            continue
        shadow.write(item["sector"], item["count"], item["stamp"], ok)
        fig["writes answered OKAY" if ok else "writes answered ERROR (cut)"] += 1
    if flushed:     # the FLUSH came last: every write of the batch was done before it
        shadow.flushed()


def _check(backing: Path, kind: str, shadow: Shadow, cut: int, v: Verdict,
           fig: Counter[str]) -> None:
    name = IMAGES[kind][0]
    image = backing / name
    if kind == "vhd":
        done = subprocess.run([sys.executable, "-m", "blktap3.tools.vhd_util", "check",
                               "-n", str(image)], capture_output=True, text=True, timeout=120)
        fig["VHD checks passed (vhd-util check)"] += done.returncode == 0
        if done.returncode:
            v.fail(f"cut {cut}: vhd-util check: {done.stdout.strip()[-300:]}")
            return
        raw = backing.parent / "vhd-as-raw.img"
        subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(image),
                        str(raw)], check=True, capture_output=True, timeout=120)
        image = raw
    data = image.read_bytes()[:SPAN * SECTOR_SIZE]
    lost = 0
    for sector in range(SPAN):
        got = sector_stamp(data[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE], sector)
        allowed = shadow.must_survive(sector)
        fig[f"{kind}: sectors checked"] += 1
        if got not in allowed:
            lost += 1
            if lost <= 3:
                v.fail(f"cut {cut}: {kind} sector {sector} holds {got}, "
                       f"allowed {sorted(allowed)}")
    fig[f"{kind}: sectors lost"] += lost
