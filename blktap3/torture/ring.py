"""``blktap3-torture ring``: a hostile guest against the data path, a good one beside it.

One ring host process (dom0, the data path; its ASan+UBSan build by default) serves two
guests on two images. The hostile guest (``gd_hostile`` in the guest driver) sends
random requests in batches of random size: random ops, segment counts, sector ranges
near and past the end, grant refs of its own pages or none, indirect pages named or
lied about, slots published without being written (index jumps), requests rewritten
while the back-end may be reading them; now and then it publishes a ``req_prod`` past
the ring, which must halt that ring alone (it is then reconnected, in the next ring
protocol). The good guest meanwhile runs a verifying random read/write load on its own
image, which is checked whole from dom0 at the end.

Lost: a hostile request never answered, or answered twice or with a status blkif does
not have; a wrong block of the good guest; a sanitizer report; a process that died.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

from blktap3.abi import SECTOR_SIZE, BlkifProtocol
from blktap3.datapath.lineproc import LineProcess

from .rig import Rig
from .verdict import Verdict

HOSTILE, GOOD = 7, 8
DEVID = 51712
DISK_BYTES = 16 << 20
STAMP = 0x70_7274_7572_65   # "torture": the good guest's pattern is (sector, STAMP)
MAX_INDIRECT = 256
PROTOCOLS = (BlkifProtocol.NATIVE, BlkifProtocol.X86_32, BlkifProtocol.X86_64)
OVERFLOW_EVERY = 4          # rounds between two req_prod overflows (from the first)
HOSTILE_COUNTS = ("requests", "responses", "okay", "errors", "eopnotsupp", "bad_status",
                  "bad_ids", "lost", "extra", "scribbles", "stale")


def _connect(host: LineProcess, guest: LineProcess, name: str, domid: int,
             protocol: BlkifProtocol, max_segs: int = 0) -> None:
    g = guest.call("open", backend=0, protocol=protocol, max_segs=max_segs)
    host.call("connect", name=name, image=name, domid=domid, devid=DEVID, grefs=g["grefs"],
              order=0, port=g["port"], protocol=protocol, max_indirect_segments=max_segs)


def good_pattern_errors(disk: Path) -> int:
    """Sectors of the good guest's image that do not hold (sector, STAMP)."""
    bad = 0
    with disk.open("rb") as f:
        sector = 0
        while chunk := f.read(1 << 20):
            for off in range(0, len(chunk), SECTOR_SIZE):
                want = struct.pack("=QQ", sector, STAMP) * (SECTOR_SIZE // 16)
                bad += chunk[off:off + SECTOR_SIZE] != want
                sector += 1
    return bad


def _add_counters(into: dict[str, int], stats: dict[str, Any]) -> None:
    for cause, n in stats["errors"].items():
        into[cause] = into.get(cause, 0) + n


def loaded_sanitized(pid: int) -> bool:
    """The process has the ASan runtime and an instrumented data path mapped."""
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    return "libasan" in maps and "_datapath" in maps


def _halt_and_reconnect(host: LineProcess, hostile: LineProcess, v: Verdict,
                        protocol: BlkifProtocol, counters: dict[str, int]) -> None:
    """Publish a req_prod past the ring: that ring halts (and only it), then reconnects."""
    hostile.call("overflow", extra=7)
    deadline = time.monotonic() + 30
    while not host.call("stats", name="hostile")["halted"]:
        if time.monotonic() > deadline:
            v.fail("req_prod past the ring did not halt it within 30 s")
            return
        time.sleep(0.01)
    _add_counters(counters, host.call("stats", name="hostile"))
    host.call("disconnect", name="hostile")
    _connect(host, hostile, "hostile", HOSTILE, protocol, MAX_INDIRECT)


def run(count: int | None = None, seconds: float | None = None, *, sanitize: bool = True,
        seed: int = 1) -> Verdict:
    """At least ``count`` hostile requests (default 1,000,000) or for ``seconds``."""
    if count is None and seconds is None:
        count = 1_000_000
    v = Verdict("ring")
    t0 = time.monotonic()
    with Rig(sanitize=sanitize) as rig:
        rig.machine.create_domain(HOSTILE, 4096)
        rig.machine.create_domain(GOOD, 4096)
        disks = {name: rig.scratch / f"{name}.img" for name in ("hostile", "good")}
        for p in disks.values():
            with p.open("wb") as f:
                f.truncate(DISK_BYTES)
        sectors = DISK_BYTES // SECTOR_SIZE
        host = rig.spawn("blktap3.datapath.host", 0)
        good = rig.spawn("blktap3.sim.guestdrv", GOOD)
        hostile = rig.spawn("blktap3.sim.guestdrv", HOSTILE)
        for name, p in disks.items():
            host.call("open", name=name, driver="aio", path=str(p))
        _connect(host, good, "good", GOOD, BlkifProtocol.NATIVE)
        load = {"qd": 8, "bs": 4096, "span": sectors, "verify": True, "stamp": STAMP,
                "timeout": 30.0}
        pre = good.call("run", read_pct=0, random=False, ios=sectors // 8, **load)
        if pre["errors"] or pre["lost"]:
            v.fail(f"the good guest's prefill failed: {pre}")
        _connect(host, hostile, "hostile", HOSTILE, BlkifProtocol.NATIVE, MAX_INDIRECT)

        totals = dict.fromkeys(HOSTILE_COUNTS, 0)
        good_totals = dict.fromkeys(("ios", "reads", "writes", "errors", "mismatches",
                                     "lost", "duplicates", "bad_ops"), 0)
        chunk, rounds, halts = 2000, 0, 0
        counters: dict[str, int] = {}
        while v.ok:
            elapsed = time.monotonic() - t0
            if count is not None and totals["requests"] >= count:
                break
            if seconds is not None and elapsed >= seconds:
                break
            if count is not None:
                chunk = min(chunk, count - totals["requests"])
            good.send("run", read_pct=50, random=True, duration=0.5, seed=seed + rounds,
                      **load)
            r0 = time.monotonic()
            res: dict[str, Any] = hostile.call(
                "hostile", requests=chunk, disk_sectors=sectors, seed=seed * 7919 + rounds,
                scribble_pct=10)
            took = time.monotonic() - r0
            g: dict[str, Any] = good.reply()
            for k in totals:
                totals[k] += res[k]
            for k in good_totals:
                good_totals[k] += g[k]
            rounds += 1
            # About a second of hostile requests per round.
            chunk = max(100, min(200_000, int(chunk / max(took, 0.05))))
            if res["lost"] or res["extra"] or res["bad_ids"] or res["bad_status"]:
                v.fail(f"hostile round {rounds}: {res}")
            if g["errors"] or g["mismatches"] or g["lost"] or g["duplicates"] or g["bad_ops"]:
                v.fail(f"good guest, round {rounds}: {g}")
            if rounds % OVERFLOW_EVERY == 1:
                halts += 1
                _halt_and_reconnect(host, hostile, v, PROTOCOLS[halts % len(PROTOCOLS)],
                                   counters)
        stats = {name: host.call("stats", name=name) for name in ("hostile", "good")}
        _add_counters(counters, stats["hostile"])
        if sanitize and not loaded_sanitized(host.pid):
            v.fail("the ring host did not load the sanitized data path")
        host.call("disconnect", name="good")
        host.call("disconnect", name="hostile")
        for what, proc in (("good guest", good), ("hostile guest", hostile), ("host", host)):
            proc.close()
            if proc.proc.returncode:
                v.fail(f"the {what} process exited {proc.proc.returncode}")
        wrong = good_pattern_errors(disks["good"])
        reports = rig.reports()
        v.figures.update({
            "sanitized": sanitize,
            "hostile requests": totals["requests"],
            "hostile answered": totals["responses"],
            "hostile statuses": {k: totals[k] for k in ("okay", "errors", "eopnotsupp")},
            "rewritten bytes": totals["scribbles"],
            "stale slots": totals["stale"],
            "req_prod overflows (ring halted, reconnected)": halts,
            "data path error counters": counters,
            "good guest blocks": good_totals["ios"],
            "good guest image sectors wrong": wrong,
            "sanitizer reports": len(reports),
            "seconds": round(time.monotonic() - t0, 1),
        })
        v.expect_zero(**{
            "unanswered hostile requests": totals["lost"],
            "surplus responses": totals["extra"],
            "responses with an unknown id": totals["bad_ids"],
            "responses with a status blkif has not": totals["bad_status"],
            "good guest errors": good_totals["errors"],
            "good guest mismatches": good_totals["mismatches"],
            "good guest image sectors wrong": wrong,
            "sanitizer reports": len(reports),
        })
        if stats["good"]["halted"]:
            v.fail(f"the good ring halted: {stats['good']['halted']}")
        for rep in reports:
            v.fail(f"sanitizer report {rep.name}:\n{rep.read_text()[:4000]}")
    return v
