"""`vhd-util read`: print a VHD's footer, header, parent locators and batmap header
(-p), BAT entries (-b), and where logical sectors live (-t), in the lines and number
formats of blktap's vhd/lib/vhd-util-read.c (v4.0.8); -c counts, -x prints hexadecimal.

Its other options (-B, -m, -i, -e, -a, -j, -d, -r, -R, -C) are refused with EOPNOTSUPP.
An image that does not open prints "Failed to open NAME: -ERR" as blktap does (blktap then
dumps what headers it can read; this one does not) and returns the error.
"""

from __future__ import annotations

import errno
import getopt
import struct
import sys
import time
import uuid as uuidlib

from blktap3.abi import SECTOR_SIZE
from blktap3.datapath import vhdformat as vhd

USAGE = """options:
-h          help
-n          name
-p          print VHD headers
-t sec      translate logical sector to VHD location
-b blk      print bat entry
-B          print entire bat as a bitmap
-m blk      print bitmap
-i sec      test bitmap for logical sector
-e sec      output extent list of allocated logical sectors
-a          print batmap
-j blk      test batmap for block
-d blk      print data
-c num      num units
-r sec      read num sectors at sec
-R byte     read num bytes at byte
-x          print in hex"""

DISK_TYPES = ("None", "Reserved (deprecated)", "Fixed hard disk", "Dynamic hard disk",
              "Differencing hard disk", "Reserved (deprecated)", "Reserved (deprecated)")
PLATFORMS = {0: "PLAT_CODE_NONE", 0x57693272: "PLAT_CODE_WI2R", 0x5769326B: "PLAT_CODE_WI2K",
             vhd.Platform.W2RU: "PLAT_CODE_W2RU", vhd.Platform.W2KU: "PLAT_CODE_W2KU",
             0x4D616320: "PLAT_CODE_MAC", vhd.Platform.MACX: "PLAT_CODE_MACX"}
FEATURE_TEMPORARY = 0x1
CREATOR_OS = {0x5769326B: "Windows", 0x4D616320: "Macintosh"}


def strtoull(text: str) -> int:
    """C's strtoull(text, NULL, 10) as blktap calls it: leading digits, else 0."""
    digits = ""
    for ch in text.strip():
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else 0


class _Printer:
    def __init__(self, hexa: bool) -> None:
        self.hexa = hexa

    def n(self, value: int) -> str:
        """conv(): %#llx or %llu (C's %# prints a bare 0 for zero)."""
        if self.hexa:
            return f"{value:#x}" if value else "0"
        return str(value)


def _ctime(vhd_seconds: int) -> str:
    return time.ctime(vhd_seconds + vhd.EPOCH_2000)


def _footer(layer: vhd.Layer, p: _Printer) -> None:
    f = layer.footer
    with open(layer.path, "rb") as fh:
        fh.seek(layer.footer_offset)
        raw = fh.read(vhd.FOOTER_SIZE)
    features = f.features
    print("VHD Footer Summary:\n-------------------")
    print("Cookie              : conectix")
    print(f"Features            : (0x{features:08x}) "
          f"{'<TEMP>' if features & FEATURE_TEMPORARY else ''}"
          f"{'<RESV>' if features & vhd.FEATURES_RESERVED else ''}")
    print(f"File format version : Major: {f.version >> 16}, Minor: {f.version & 0xffff}")
    print(f"Data offset         : {p.n(f.data_offset)}")
    print(f"Timestamp           : {_ctime(f.timestamp)}")
    creator = f.creator_app.decode("latin-1").split("\0", 1)[0]
    print(f"Creator Application : '{creator}'")
    print(f"Creator version     : Major: {f.creator_version >> 16}, "
          f"Minor: {f.creator_version & 0xffff}")
    print(f"Creator OS          : {CREATOR_OS.get(f.creator_os, 'Unknown!')}")
    print(f"Original disk size  : {p.n(f.original_size >> 20)} MB "
          f"({p.n(f.original_size)} Bytes)")
    print(f"Current disk size   : {p.n(f.current_size >> 20)} MB "
          f"({p.n(f.current_size)} Bytes)")
    c, h, s = f.geometry >> 16, (f.geometry >> 8) & 0xFF, f.geometry & 0xFF
    print(f"Geometry            : Cyl: {p.n(c)}, Hds: {p.n(h)}, Sctrs: {p.n(s)}")
    print(f"                    : = {p.n((c * h * s) >> 11)} MB ({p.n(c * h * s << 9)} Bytes)")
    print(f"Disk type           : {DISK_TYPES[f.disk_type]}")
    good = vhd.checksum(raw, 64)
    print(f"Checksum            : 0x{f.checksum:x}|0x{good:x} "
          f"({'Good!' if f.checksum == good else 'Bad!'})")
    print(f"UUID                : {uuidlib.UUID(bytes=f.uuid)}")
    print(f"Saved state         : {'No' if f.saved == 0 else 'Yes'}")
    print(f"Hidden              : {f.hidden}")
    print()


def _header(layer: vhd.Layer, p: _Printer) -> None:
    hd = layer.header
    assert hd is not None
    with open(layer.path, "rb") as fh:
        fh.seek(layer.footer.data_offset)
        raw = fh.read(vhd.HEADER_SIZE)
    print("VHD Header Summary:\n-------------------")
    print("Cookie              : cxsparse")
    print(f"Data offset (unusd) : {p.n(vhd.NO_OFFSET)}")
    print(f"Table offset        : {p.n(hd.table_offset)}")
    print(f"Header version      : 0x{vhd.VERSION:08x}")
    print(f"Max BAT size        : {p.n(hd.max_table_entries)}")
    print(f"Block size          : {p.n(hd.block_size)} ({p.n(hd.block_size >> 20)} MB)")
    print(f"Parent name         : {hd.parent_name}")
    print(f"Parent UUID         : {uuidlib.UUID(bytes=hd.parent_uuid)}")
    print(f"Parent timestamp    : {_ctime(hd.parent_timestamp)}")
    good = vhd.checksum(raw, 36)
    print(f"Checksum            : 0x{hd.checksum:x}|0x{good:x} "
          f"({'Good!' if hd.checksum == good else 'Bad!'})")
    print()


def _locators(layer: vhd.Layer, p: _Printer) -> None:
    assert layer.header is not None
    print("VHD Parent Locators:\n--------------------")
    with open(layer.path, "rb") as fh:
        for i, loc in enumerate(layer.header.locators):
            if loc.code == vhd.Platform.NONE:
                continue
            print(f"locator:            : {i}")
            print(f"       code         : {PLATFORMS.get(loc.code, 'UNKOWN')}")
            print(f"       data_space   : {p.n(loc.data_space)}")
            print(f"       data_length  : {p.n(loc.data_len)}")
            print(f"       data_offset  : {p.n(loc.data_offset)}")
            fh.seek(loc.data_offset)
            print(f"       decoded name : {_locator_name(loc.code, fh.read(loc.data_len))}")
            print()


def _locator_name(code: int, blob: bytes) -> str:
    """As vhd_parent_locator_read decodes it: MACX drops "file://", the Windows codes
    are UTF-16LE with backslashes made slashes."""
    if code == vhd.Platform.MACX:
        name = blob.decode("utf-8", "replace").removeprefix("file://")
    else:
        name = blob.decode("utf-16-le", "replace").replace("\\", "/")
    return name.split("\0", 1)[0]


def _batmap(layer: vhd.Layer, p: _Printer) -> None:
    """As vhd_get_batmap: an image tapdisk made (creator "tap", version >= 1.2, or 1.1
    with a batmap header) must have a batmap whose map checks out, else one line says
    it could not be had."""
    assert layer.header is not None
    f = layer.footer
    if f.creator_app != b"tap\0" or f.creator_version <= 0x00000001:
        return
    with open(layer.path, "rb") as fh:
        fh.seek(layer.header.table_offset + layer.bat_bytes)
        head = fh.read(SECTOR_SIZE).ljust(SECTOR_SIZE, b"\0")
        offset, secs, version, csum = struct.unpack_from(">QIII", head, 8)
        valid = head[:8] == vhd.BATMAP_COOKIE and version <= vhd.BATMAP_VERSION
        if f.creator_version < 0x00010002 and not valid:
            return
        # The checksum covers the map of the disk's size (a bit per 2 MiB block), in
        # whole sectors, at least one; version 1.1 summed the bytes as signed chars.
        size = max(1, -(-(f.current_size >> 24) // SECTOR_SIZE)) * SECTOR_SIZE
        fh.seek(offset)
        blob = fh.read(size)
    total = sum(b - 256 if version == 0x00010001 and b > 127 else b for b in blob)
    good = ~total & 0xFFFF_FFFF
    if not valid or len(blob) != size or csum != good:
        print("failed to get batmap header")
        return
    print("VHD Batmap Summary:\n-------------------")
    print(f"Batmap offset       : {p.n(offset)}")
    print(f"Batmap size (secs)  : {p.n(secs)}")
    print(f"Batmap version      : 0x{version:08x}")
    print(f"Checksum            : 0x{csum:x}|0x{good:x} (Good!)")
    print()


def _bat(layer: vhd.Layer, block: int, count: int, p: _Printer) -> int:
    assert layer.header is not None
    if block + count > layer.header.max_table_entries:
        print(f"block {p.n(block + count)} past end of file", file=sys.stderr)
        return -errno.ERANGE
    for cur in range(block, min(block + count, len(layer.bat))):
        entry = layer.bat[cur]
        where = "not allocated" if entry == vhd.BAT_UNUSED else p.n(entry * SECTOR_SIZE)
        print(f"block: {p.n(cur)}: offset: {where}")
    return 0


def _translate(layer: vhd.Layer, sector: int, count: int, p: _Printer) -> int:
    assert layer.header is not None
    if (sector + count) * SECTOR_SIZE > layer.footer.current_size:
        print(f"sector {p.n(sector + count)} past end of file", file=sys.stderr)
        return -errno.ERANGE
    spb = layer.block_size // SECTOR_SIZE
    for cur in range(sector, sector + count):
        blk, lsec = divmod(cur, spb)
        entry = layer.bat[blk]
        where = "not allocated" if entry == vhd.BAT_UNUSED else \
            p.n((entry + layer.bitmap_size // SECTOR_SIZE + lsec) * SECTOR_SIZE)
        print(f"logical sector {p.n(cur)}: block number: {p.n(blk)}, "
              f"sector offset: {p.n(lsec)}, file offset: {where}")
    return 0


def read(args: list[str]) -> int:
    try:
        pairs, rest = getopt.getopt(args, "n:pt:b:Bm:i:e:aj:d:c:r:R:xCh")
    except getopt.GetoptError as exc:
        why = "option requires an argument" if "requires" in exc.msg else "invalid option"
        print(f"read: {why}"
              f" -- '{exc.opt}'", file=sys.stderr)
        print(USAGE)
        return errno.EINVAL
    o = {k[1:]: v for k, v in pairs}
    if "h" in o or "n" not in o or rest or not args:
        print(USAGE)
        return errno.EINVAL
    unsupported = sorted(set(o) & set("BmieajdrRC"))
    if unsupported:
        print(f"read: -{' -'.join(unsupported)} not supported", file=sys.stderr)
        return -errno.EOPNOTSUPP
    name, p = o["n"], _Printer("x" in o)
    count = strtoull(o.get("c", "1"))
    try:
        layer = vhd.Layer.open(name)
    except OSError as exc:
        err = -(exc.errno or errno.EIO)
        print(f"Failed to open {name}: {err}")
        return err
    if layer.header is None:
        # blktap's vhd_get_bat refuses a disk that has none, before printing anything.
        print(f"Failed to get bat for {name}: {-errno.EINVAL}")
        return -errno.EINVAL
    if "p" in o:
        _footer(layer, p)
        if layer.header is not None:
            _header(layer, p)
            if layer.is_diff:
                _locators(layer, p)
            _batmap(layer, p)
    if "t" in o:
        err = _translate(layer, strtoull(o["t"]), count, p)
        if err:
            return err
    if "b" in o:
        return _bat(layer, strtoull(o["b"]), count, p)
    return 0
