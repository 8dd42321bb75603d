"""``blktap3-torture faults``: I/O errors, short writes, slow I/O and failed syncs under
tapdisk, and what the guest is told.

Two VBDs, each in its own real tapdisk, serve images through the FUSE layer
(``faultfs``): a raw image and a dynamic VHD. A third VBD on an ordinary file runs a
verifying load beside them all along (the bystander). Each round, for one of the two
images, one fault is armed (EIO or ENOSPC on writes or reads of a random byte range,
short writes, slow I/O, a failed fsync, or errors at random on every request with some
probability); the guest submits a batch of reads and writes (no two overlapping), then
often a FLUSH, and every answer is judged:

- raw (the image's bytes are the disk's): a read or write is answered ERROR exactly when
  an injected error hit its bytes (a short write: ERROR, or OKAY with all of it there);
- VHD (metadata between the guest and the bytes): never ERROR in a round that injected
  nothing;
- a FLUSH is ERROR when its sync failed, and stays ERROR after any failed sync of that
  image (also the one inside a VHD allocation) until the image is opened again (pause and
  resume): a sync that failed may have lost acknowledged writes, so a later one that
  succeeds proves nothing (fsyncgate). One OKAY there is a failure of the run;
- every read answered OKAY returns what the shadow (``shadow``) allows: the last write
  answered OKAY, or, for sectors of failed writes or writes a failed sync may have lost,
  one of the candidates; never garbage;
- no request goes unanswered, tapdisk never dies, the bystander sees no error, and the
  ERROR responses of each VBD are what its ``tap-ctl stats`` counts (``errors.img``).

A few rounds after a failed sync (whose FLUSHes must all be ERROR) the VBD is paused and
resumed (the image reopened), as an operator would once the storage is fixed; at the end
the faults are cleared, both images are read back whole and checked, flushed, and the
backing files checked as others read them: our
``vhd-util check`` on the VHD, and every sector of both as qemu-img reads them (``qemu-img
check`` does not check the vpc format).
"""

from __future__ import annotations

import errno
import json
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blktap3.abi import SECTOR_SIZE, BlkifStatus
from blktap3.datapath import vhdformat
from blktap3.datapath.lineproc import LineProcess
from blktap3.sim.guestdrv import GARBAGE, sector_stamp

from .faultfs import FaultFs, Rule
from .rig import Rig
from .shadow import Shadow
from .tapdisk import TapdiskVbd
from .verdict import Budget, Verdict

GUEST = {"raw": 11, "vhd": 13}
IMAGES = {"raw": ("disk.img", "aio"), "vhd": ("disk.vhd", "vhd")}  # name, tapdisk driver
BYSTANDER = 12
BYSTANDER_STAMP = 0xB7
DISK_BYTES = 16 << 20
SPAN = 4096                 # sectors the rounds use (2 MiB): faults hit often
BATCH = 24
OKAY, ERROR = int(BlkifStatus.OKAY), int(BlkifStatus.ERROR)
FAULTS = ("eio-write", "enospc-write", "eio-read", "short-write", "slow", "fsync-eio",
          "random")
CHECK_SECTORS = 88          # the read-back's requests


@dataclass
class _Disk:
    """One image under test: its tapdisk, its guest, its shadow, its figures."""

    kind: str
    name: str
    vbd: TapdiskVbd
    guest: LineProcess
    shadow: Shadow = field(default_factory=Shadow)
    sync_failed: bool = False
    errors_seen: int = 0
    stats_base: int = 0


def run(count: int | None = None, seconds: float | None = None, *, seed: int = 1) -> Verdict:
    """``count`` rounds (default 400), or as many as fit in ``seconds``."""
    budget = Budget.of(count, seconds, 400)
    rnd = random.Random(seed)
    v = Verdict("faults")
    fig: Counter[str] = Counter()
    armed: Counter[str] = Counter()
    rounds = 0
    requests: dict[str, int] = {}
    with Rig() as rig:
        backing = make_backing(rig.scratch)
        plain = rig.scratch / "plain.img"
        with plain.open("wb") as f:
            f.truncate(DISK_BYTES)
        for domid in (*GUEST.values(), BYSTANDER):
            rig.machine.create_domain(domid, 8192)
        with FaultFs(backing, rig.scratch / "mnt") as fs:
            disks: list[_Disk] = []
            other = TapdiskVbd(rig, f"aio:{plain}")
            try:
                for kind, (name, driver) in IMAGES.items():
                    vbd = TapdiskVbd(rig, f"{driver}:{fs.path(name)}")
                    guest = rig.spawn("blktap3.sim.guestdrv", GUEST[kind])
                    disks.append(_Disk(kind, name, vbd, guest))
                    vbd.attach(guest, GUEST[kind])
                bystander = rig.spawn("blktap3.sim.guestdrv", BYSTANDER)
                other.attach(bystander, BYSTANDER)
                pre = bystander.call("run", qd=32, bs=4096, read_pct=0, random=False,
                                     span=DISK_BYTES // SECTOR_SIZE, ios=DISK_BYTES // 4096,
                                     verify=True, stamp=BYSTANDER_STAMP, timeout=60.0)
                if pre["errors"] or pre["lost"]:
                    v.fail(f"the bystander's prefill failed: {pre}")
                while v.ok and not budget.spent(rounds):
                    disk = disks[rounds % 2]
                    fault = rnd.choice(FAULTS)
                    armed[fault] += 1
                    bystander.send("run", qd=8, bs=4096, read_pct=50, random=True,
                                   span=DISK_BYTES // SECTOR_SIZE, ios=64, verify=True,
                                   stamp=BYSTANDER_STAMP, seed=rounds + 1, timeout=60.0)
                    _round(fs, disk, fault, rnd, rounds, v, fig)
                    by = bystander.reply()
                    fig["bystander blocks"] += by["ios"]
                    bad = by["errors"] + by["mismatches"] + by["lost"] + by["duplicates"]
                    if bad:
                        v.fail(f"round {rounds}: the bystander VBD saw {by}")
                    rounds += 1
                fs.rules()
                requests = fs.requests()
                for disk in disks:
                    if v.ok:
                        _final_check(fs, disk, v, fig)
            finally:
                for disk in disks:
                    disk.vbd.close()
                other.close()
        if v.ok:
            _check_images(backing, disks, v)
        v.figures["image requests seen by the FUSE layer"] = requests
    v.figures.update({
        "rounds": rounds,
        "faults armed": dict(sorted(armed.items())),
        **{k: fig[k] for k in sorted(fig)},
        "seconds": round(budget.elapsed(), 1),
    })
    return v


def make_backing(scratch: Path) -> Path:
    """The directory the FUSE layer serves: a raw image and a dynamic VHD, zeros."""
    backing = scratch / "backing"
    backing.mkdir()
    with (backing / IMAGES["raw"][0]).open("wb") as f:
        f.truncate(DISK_BYTES)
    vhdformat.create(backing / IMAGES["vhd"][0], DISK_BYTES)
    return backing


def _rules(fault: str, disk: _Disk, items: list[dict[str, Any]],
           rnd: random.Random) -> list[Rule]:
    """The fault's rules: on a raw image mostly over the bytes of one of the batch's
    requests (else anywhere in the span); on the VHD anywhere in its file."""
    if disk.kind == "raw" and items and rnd.random() < 0.7:
        lo = rnd.choice(items)["sector"] * SECTOR_SIZE
    else:
        size = SPAN * SECTOR_SIZE if disk.kind == "raw" else DISK_BYTES + (1 << 20)
        lo = rnd.randrange(0, size, 4096)
    hi = lo + rnd.choice((512, 4096, 16384, 65536))
    where = {"file": disk.name, "start": lo, "end": hi}
    if fault == "eio-write":
        return [Rule("write", **where)]
    if fault == "enospc-write":
        return [Rule("write", errno=errno.ENOSPC, **where)]
    if fault == "eio-read":
        return [Rule("read", **where)]
    if fault == "short-write":
        return [Rule("write", kind="short", **where)]
    if fault == "slow":
        return [Rule(rnd.choice(("read", "write")), kind="slow",
                     delay=rnd.uniform(0.05, 0.4), **where)]
    if fault == "fsync-eio":
        return [Rule("fsync", file=disk.name, count=1, drop=rnd.choice((1.0, 0.5)))]
    p = rnd.choice((0.02, 0.1))
    return [Rule("write", file=disk.name, probability=p),
            Rule("read", file=disk.name, probability=p),
            Rule("fsync", file=disk.name, probability=p, drop=0.5)]


def batch_items(rnd: random.Random, stamp: int,
                ops: tuple[str, ...] = ("read", "write")) -> list[dict[str, Any]]:
    """Up to BATCH reads and writes (``ops``) of 4 KiB multiples in SPAN, none
    overlapping."""
    taken: set[int] = set()
    items: list[dict[str, Any]] = []
    for _ in range(rnd.randrange(1, BATCH + 1)):
        count = 8 * rnd.randrange(1, 12)
        sector = 8 * rnd.randrange(0, (SPAN - count) // 8)
        blocks = set(range(sector // 8, (sector + count) // 8))
        if blocks & taken:
            continue
        taken |= blocks
        op = rnd.choice(ops)
        items.append({"op": op, "sector": sector, "count": count,
                      **({"stamp": stamp} if op == "write" else {})})
    return items


def _hit(item: dict[str, Any], name: str, injected: list[dict[str, Any]]) -> str | None:
    """The kind of injected fault that hit this request's bytes (raw: sector = offset)."""
    lo, hi = item["sector"] * SECTOR_SIZE, (item["sector"] + item["count"]) * SECTOR_SIZE
    for f in injected:
        if f["file"] == name and f["op"] == item["op"] and f["kind"] != "slow" and \
                f["off"] < hi and f["off"] + f["len"] > lo:
            return str(f["kind"])
    return None


def _round(fs: FaultFs, disk: _Disk, fault: str, rnd: random.Random, n: int, v: Verdict,
           fig: Counter[str]) -> None:
    stamp = (n + 1) << 8 | GUEST[disk.kind]
    items = batch_items(rnd, stamp)
    fs.rules(*_rules(fault, disk, items, rnd), seed=rnd.randrange(1 << 30))
    flush = rnd.random() < 0.6
    if flush:
        items.append({"op": "flush"})
    results = disk.guest.call("batch", items=items, timeout=30.0)
    injected = fs.injected()
    fs.rules()
    fig["faults injected"] += sum(f["kind"] != "slow" for f in injected)
    fig["slowed requests"] += sum(f["kind"] == "slow" for f in injected)
    synced_bad = any(f["op"] == "fsync" and f["kind"] == "error" for f in injected)
    where = f"round {n} ({disk.kind}, {fault})"
    for item, res in zip(items, results, strict=True):
        status = res["status"]
        fig["requests"] += 1
        if status is None:
            v.fail(f"{where}: {item['op']} {item.get('sector')} never answered")
            continue
        if status == ERROR:
            disk.errors_seen += 1
            fig[f"{item['op']} answered ERROR"] += 1
        elif status != OKAY:
            v.fail(f"{where}: {item} answered {status}")
            continue
        if item["op"] == "flush":
            continue
        hit = _hit(item, disk.name, injected)
        if disk.kind == "raw":
            if hit == "error" and status == OKAY:
                v.fail(f"{where}: {item} answered OKAY though its I/O failed ({injected})")
            if hit is None and status == ERROR:
                v.fail(f"{where}: {item} answered ERROR with no fault on it ({injected})")
        elif status == ERROR and not any(f["kind"] != "slow" for f in injected):
            v.fail(f"{where}: {item} answered ERROR in a round with no fault")
        if item["op"] == "write":
            disk.shadow.write(item["sector"], item["count"], item["stamp"], status == OKAY)
        elif status == OKAY:
            _check_read(disk, item, res["stamps"], where, v)
            fig["sectors read and checked"] += item["count"]
    if synced_bad:
        disk.sync_failed = True
        disk.shadow.sync_failed()
    if flush:
        status = results[-1]["status"]
        if status == OKAY and disk.sync_failed:
            v.fail(f"{where}: FLUSH answered OKAY after a failed sync of the open image "
                   "(fsyncgate: what the failed sync covered may be gone)")
        elif status == ERROR and not disk.sync_failed:
            v.fail(f"{where}: FLUSH answered ERROR with no sync failing ({injected})")
        elif status == OKAY:
            disk.shadow.flushed()
    if disk.sync_failed and rnd.random() < 0.3:
        # Some rounds later (their FLUSHes must all be ERROR), the storage is fixed and
        # the operator reopens the image (pause, resume).
        _reopen(disk, fig)


def _reopen(disk: _Disk, fig: Counter[str]) -> None:
    disk.vbd.client.pause(disk.vbd.minor, timeout=30)
    disk.vbd.client.resume(disk.vbd.minor, timeout=30)
    disk.sync_failed = False
    fig["reopened after a failed sync"] += 1


def _check_read(disk: _Disk, item: dict[str, Any], stamps: list[int], where: str,
                v: Verdict) -> None:
    for k, got in enumerate(stamps):
        sector = item["sector"] + k
        allowed = disk.shadow.may_read(sector)
        if got == GARBAGE or got not in allowed:
            v.fail(f"{where}: sector {sector} read {got}, allowed {sorted(allowed)}")
            return


def _final_check(fs: FaultFs, disk: _Disk, v: Verdict, fig: Counter[str]) -> None:
    """Faults cleared: a FLUSH (all of it to the backing file), the whole span read back
    and checked; ERRORs counted in stats."""
    if disk.sync_failed:
        _reopen(disk, fig)
    if disk.guest.call("batch", items=[{"op": "flush"}], timeout=30.0)[0]["status"] != OKAY:
        v.fail(f"the final FLUSH of {disk.kind} failed")
        return
    for sector in range(0, SPAN, CHECK_SECTORS):
        count = min(CHECK_SECTORS, SPAN - sector)
        item = {"op": "read", "sector": sector, "count": count}
        res = disk.guest.call("batch", items=[item], timeout=30.0)[0]
        if res["status"] != OKAY:
            v.fail(f"final read of {disk.kind} at {sector}: {res['status']}")
            return
        _check_read(disk, item, res["stamps"], f"final read ({disk.kind})", v)
        fig["sectors read and checked"] += count
    stats = json.loads(disk.vbd.client.stats(disk.vbd.minor))
    counted = stats["xenbus"]["errors"]["img"]
    v.figures[f"{disk.kind}: ERROR seen by the guest / counted by tap-ctl stats"] = (
        f"{disk.errors_seen} / {counted}")
    if counted != disk.errors_seen:
        v.fail(f"{disk.kind}: the guest saw {disk.errors_seen} ERROR responses, "
               f"tap-ctl stats counts {counted}")


def _check_images(backing: Path, disks: list[_Disk], v: Verdict) -> None:
    """The backing files as others read them: the VHD valid for our vhd-util check, and
    both images, read by qemu-img (the VHD converted to raw), holding what the shadow
    allows in every sector."""
    vhd = backing / "disk.vhd"
    done = subprocess.run([sys.executable, "-m", "blktap3.tools.vhd_util", "check", "-n",
                           str(vhd)], capture_output=True, text=True, timeout=120)
    v.figures["vhd-util check"] = "ok" if done.returncode == 0 else f"exit {done.returncode}"
    if done.returncode:
        v.fail(f"vhd-util check: {done.stdout.strip()[-300:]} {done.stderr.strip()[-300:]}")
    for disk in disks:
        raw = backing / disk.name
        if disk.kind == "vhd":
            raw = backing.parent / "vhd-as-raw.img"
            subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(vhd),
                            str(raw)], check=True, capture_output=True, timeout=120)
        data = raw.read_bytes()[:SPAN * SECTOR_SIZE]
        wrong = 0
        for sector in range(SPAN):
            got = sector_stamp(data[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE], sector)
            wrong += got not in disk.shadow.may_read(sector)
        v.figures[f"{disk.kind}: sectors wrong as qemu-img reads the image"] = wrong
        v.expect_zero(**{f"{disk.kind} sectors wrong as qemu-img reads them": wrong})
