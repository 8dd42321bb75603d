"""Read blktap's stats files as Xen's tools do: the VBD counters xentop shows, and more.

    python -m blktap3.tools.vbdstat [--json] [--shm-root DIR]   (XENSTORED_PATH as usual)

The reader of `td3-<pid>/vbd-<domid>-<devid>` follows libxenstat's (Xen 4.19 and later,
tools/libs/stat/xenstat_linux.c: `xenstat_collect_vbds` and `read_attributes_vbd3`, from
the patch "tools/xentop: Add VBD3 support to xentop", 2024; the struct is `vbd3_stats`
of tools/libs/stat/xenstat_priv.h): for each vbd3 device it reads the back-end's
`kthread-pid` from XenStore, opens `/dev/shm/td3-<kthread-pid>/vbd-<domid>-<devid>`,
reads one `struct vbd3_stats` (u32 version, u32 pad, 11 x u64), refuses a version other
than 1, and keeps oo_reqs, read_reqs_submitted, read_sectors, write_reqs_submitted and
write_sectors (xentop's OO, RD, RSECT, WR, WSECT).  libxenstat finds the devices under
/sys/bus/xen-backend/devices (the kernel's mirror of XenStore's back-end directories); a
host without a Xen kernel has no such directory, so this reader lists
`backend/vbd3/<domid>/<devid>` in XenStore instead.  Debian 12's xentop (Xen 4.17)
predates vbd3 support, hence this reader.

It also decodes the other two files blktap keeps per ring, for people and tests:
`vbd3-<domid>-<devid>/statistics` (`struct blkback_stats`, include/blktap3.h) and
`io_ring` (an 8-byte crc32 of the text that follows, drivers/td-blkif.c).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from blktap3.ctl.runtime import SHM_ENV
from blktap3.xenbus import XenStore, XenStoreError

# Spelled again from Xen's and blktap's headers, not imported from the writer
# (blktap3.tapdisk.metrics): a reader sharing the writer's layout could not catch it.
VBD3_STATS = struct.Struct("<II11Q")  # sizeof(struct vbd3_stats) = 96
VBD3_FIELDS = ("oo_reqs", "read_reqs_submitted", "read_reqs_completed", "read_sectors",
               "read_total_ticks", "write_reqs_submitted", "write_reqs_completed",
               "write_sectors", "write_total_ticks", "io_errors", "flags")
BLKBACK = struct.Struct("<14Q")
BLKBACK_FIELDS = ("st_ds_req", "st_f_req", "st_oo_req", "st_rd_req", "st_rd_cnt",
                  "st_rd_sect", "st_rd_sum_usecs", "st_rd_max_usecs", "st_wr_req",
                  "st_wr_cnt", "st_wr_sect", "st_wr_sum_usecs", "st_wr_max_usecs", "flags")
CRC = struct.Struct("<Q")
BACKEND = "/local/domain/0/backend/vbd3"


class StatsFileError(Exception):
    """A stats file missing, short, of another version, or failing its checksum."""


@dataclass(frozen=True)
class VbdCounters:
    """What xentop shows of one vbd3 device (libxenstat's xenstat_vbd fields)."""

    domid: int
    devid: int
    oo_reqs: int
    rd_reqs: int
    wr_reqs: int
    rd_sects: int
    wr_sects: int


def shm_root(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get(SHM_ENV) or "/dev/shm")


def read_vbd3_stats(path: Path) -> dict[str, int]:
    """One `struct vbd3_stats`, as read_attributes_vbd3 reads it (fread, version 1)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(VBD3_STATS.size)
    except OSError as exc:
        raise StatsFileError(f"{path}: {exc.strerror}") from None
    if len(raw) != VBD3_STATS.size:
        raise StatsFileError(f"{path}: {len(raw)} bytes, not {VBD3_STATS.size}")
    version, _pad, *values = VBD3_STATS.unpack(raw)
    if version != 1:
        raise StatsFileError(f"{path}: version {version}, not 1")
    return dict(zip(VBD3_FIELDS, values, strict=True))


def read_blkback(path: Path) -> dict[str, int]:
    """`vbd3-<domid>-<devid>/statistics`."""
    try:
        raw = path.read_bytes()[:BLKBACK.size]
    except OSError as exc:
        raise StatsFileError(f"{path}: {exc.strerror}") from None
    if len(raw) != BLKBACK.size:
        raise StatsFileError(f"{path}: {len(raw)} bytes, not {BLKBACK.size}")
    return dict(zip(BLKBACK_FIELDS, BLKBACK.unpack(raw), strict=True))


def read_io_ring(path: Path) -> dict[str, int]:
    """`vbd3-<domid>-<devid>/io_ring`: the checksum checked, the numbers parsed."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StatsFileError(f"{path}: {exc.strerror}") from None
    if len(raw) < CRC.size:
        raise StatsFileError(f"{path}: no checksum")
    (crc,), text = CRC.unpack(raw[:CRC.size]), raw[CRC.size:]
    if crc != zlib.crc32(text):
        raise StatsFileError(f"{path}: checksum {crc:#x} does not match its text")
    words = text.decode().split()
    try:
        # nr_ents N / req prod P cons C event E / rsp prod P pvt V event E
        return {"nr_ents": int(words[1]), "req_prod": int(words[4]),
                "req_cons": int(words[6]), "req_event": int(words[8]),
                "rsp_prod": int(words[11]), "rsp_prod_pvt": int(words[13]),
                "rsp_event": int(words[15])}
    except (IndexError, ValueError):
        raise StatsFileError(f"{path}: not blktap's io_ring text: {text!r}") from None


def collect(xs: XenStore, root: Path) -> tuple[list[VbdCounters], list[str]]:
    """Every vbd3 device's counters, as libxenstat collects them; and what failed."""
    found: list[VbdCounters] = []
    errors: list[str] = []
    domids = xs.ls(BACKEND) if xs.read_optional(BACKEND) is not None else []
    for domid in sorted(domids, key=int):
        for devid in sorted(xs.ls(f"{BACKEND}/{domid}"), key=int):
            pid = xs.read_optional(f"{BACKEND}/{domid}/{devid}/kthread-pid")
            if pid is None:
                continue  # libxenstat skips a device without it
            try:
                st = read_vbd3_stats(root / f"td3-{pid}" / f"vbd-{domid}-{devid}")
            except StatsFileError as exc:
                errors.append(str(exc))
                continue
            found.append(VbdCounters(int(domid), int(devid), st["oo_reqs"],
                                     st["read_reqs_submitted"], st["write_reqs_submitted"],
                                     st["read_sectors"], st["write_sectors"]))
    return found, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blktap3.tools.vbdstat",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per device")
    parser.add_argument("--shm-root", help=f"default ${SHM_ENV} or /dev/shm")
    args = parser.parse_args(argv)
    try:
        with XenStore.open() as xs:
            found, errors = collect(xs, shm_root(args.shm_root))
    except (XenStoreError, OSError) as exc:
        print(f"vbdstat: cannot read XenStore: {exc}", file=sys.stderr)
        return 1
    for vbd in found:
        if args.json:
            print(json.dumps(asdict(vbd)))
        else:
            print(f"VBD Tapdisk3 d{vbd.domid} {vbd.devid:5d} OO: {vbd.oo_reqs:8d}   "
                  f"RD: {vbd.rd_reqs:8d}   WR: {vbd.wr_reqs:8d}  RSECT: {vbd.rd_sects:10d}  "
                  f"WSECT: {vbd.wr_sects:10d}")
    for error in errors:
        print(f"vbdstat: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
