"""vhd-util resize and revert: growing a VHD, fast (`-f`, within its BAT) or journaled
(`-j JOURNAL`, moving blocks to make room for a larger BAT), and undoing a journaled
resize that did not finish (`revert -n IMAGE -j JOURNAL`).

As blktap's vhd/lib/vhd-util-resize.c and vhd-util-revert.c (v4.0.8) do, step for step,
so that the layouts agree and each tool's journal is undone by the other's revert:

1. the journal saves the metadata and disables the image (blktap3.datapath.vhdjournal);
2. a BAT (and batmap) too small for the new size needs more sectors: the blocks that
   lie in the way are moved to the end of the file, lowest first, each saved in the
   journal first and its old place zeroed (data region page aligned at the new place);
3. the parent locators and the batmap after the BAT are shifted up to make room;
4. header (more BAT entries, the locators' new places), BAT, batmap, and both footers
   (the new size, whole blocks) are written;
5. the journal is committed, then removed: the image is enabled again.

`VHD_UTIL_TEST_FAIL_RESIZE_{BEGIN,DATA_MOVED,METADATA_MOVED,END}` in the environment stop
the command at that step (as blktap's, "Failing at NAME", exit 22): a crash there, for
the tests. A crash leaves the image disabled (nothing opens it) until `vhd-util revert`
puts it back as it was; a crash after the commit leaves an empty journal, and revert
then only enables the image (blktap's cannot open an empty journal).

What blktap refuses, we refuse: journaled resize of a fixed disk (its journal needs a
BAT: "creating journal failed: -22"), shrinking a dynamic disk (ENOSYS), images not
created by tapdisk.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from typing import BinaryIO

from blktap3.abi import SECTOR_SIZE
from blktap3.datapath import vhdformat as vhd
from blktap3.datapath import vhdjournal as journal

from .vhd_util_read import strtoull

MiB = 1 << 20
PAGE = 4096
FAIL_POINTS = ("BEGIN", "DATA_MOVED", "METADATA_MOVED", "END")

RESIZE_USAGE = (
    "options: <-n name> <-s size (in MB)> (<-j journal>|<-f fast>) [-h help]\n\n"
    "The resize operation can only be performed offline and must be journaled because "
    "resizing the metadata might require moving data blocks. However, if a VHD was "
    "created with -S <msize> option (during vhd-util create/snapshot), which "
    "preallocates the metadata for growing the VHD up to size <msize>, then resizing "
    "such a VHD up to <msize> can be performed online without journaling (-f option).")
REVERT_USAGE = "options: <-n name> <-j journal> [-h help]"


def fail_at(point: str) -> None:
    """blktap's TEST_FAIL_AT: stop here, as a crash would, when the environment asks."""
    name = f"VHD_UTIL_TEST_FAIL_RESIZE_{point}"
    if os.environ.get(name) is not None:
        print(f"Failing at {name}", flush=True)
        os._exit(errno.EINVAL)


def _pad(n: int) -> int:
    return -(-n // SECTOR_SIZE) * SECTOR_SIZE


def _secs_no_zero(n: int) -> int:
    return max(1, -(-n // SECTOR_SIZE))


class Grower:
    """A dynamic or differencing disk's metadata in memory, grown as
    vhd_dynamic_grow does; `j` saves each block before it moves."""

    def __init__(self, layer: vhd.Layer, f: BinaryIO, j: journal.Journal) -> None:
        assert layer.header is not None
        self.f, self.j = f, j
        self.block = layer.block_size
        self.bm = layer.bitmap_size
        self.table_offset = layer.header.table_offset
        self.entries = layer.header.max_table_entries
        self.bat = list(layer.bat)
        self.data_offset = layer.footer.data_offset
        self.header = bytearray(self.read(self.data_offset, vhd.HEADER_SIZE))
        self.footer = bytearray(self.read(layer.footer_offset, vhd.FOOTER_SIZE))
        self.locators = [loc for loc in layer.header.locators]
        self.batmap = journal.has_batmap(layer.footer)
        if self.batmap:
            self.map_head = bytearray(self.read(self.batmap_at, SECTOR_SIZE))
            off, secs = struct.unpack_from(">QI", self.map_head, 8)
            self.map_offset, self.map_secs = off, secs
            self.map = bytearray(self.read(off, secs * SECTOR_SIZE))

    # ---- file access ------------------------------------------------------------

    def read(self, off: int, n: int) -> bytes:
        self.f.seek(off)
        data = self.f.read(n)
        if len(data) != n:
            raise OSError(errno.EIO, f"short read at {off}")
        return data

    def write(self, off: int, data: bytes) -> None:
        self.f.seek(off)
        self.f.write(data)

    @property
    def batmap_at(self) -> int:
        return self.table_offset + _pad(self.entries * 4)

    # ---- where things are -------------------------------------------------------

    def first_block(self) -> int | None:
        used = [(e, b) for b, e in enumerate(self.bat) if e != vhd.BAT_UNUSED]
        return min(used)[1] if used else None

    def end_of_headers(self) -> int:
        """vhd_end_of_headers."""
        eom = max(self.data_offset + vhd.HEADER_SIZE, self.table_offset + _pad(self.entries * 4))
        if self.batmap:
            eom = max(eom, self.batmap_at + SECTOR_SIZE,
                      self.map_offset + self.map_secs * SECTOR_SIZE)
        for loc in self.locators:
            if loc.code != vhd.Platform.NONE:
                eom = max(eom, loc.data_offset + loc.space_bytes)
        return eom

    def end_of_data(self) -> int:
        """vhd_end_of_data: past the headers and the last block."""
        ends = [e * SECTOR_SIZE + self.bm + self.block for e in self.bat if e != vhd.BAT_UNUSED]
        return max([self.end_of_headers(), *ends])

    # ---- the steps --------------------------------------------------------------

    def move_block(self, blk: int, new_off: int) -> None:
        """vhd_move_block: saved in the journal, copied, its old place zeroed."""
        old = self.bat[blk] * SECTOR_SIZE
        span = self.bm + self.block
        data = self.read(old, span)
        self.j.add(journal.DATA, old, data[: self.bm])
        self.j.add(journal.DATA, old + self.bm, data[self.bm :])
        self.j.sync()
        self.write(new_off, data)
        self.bat[blk] = new_off // SECTOR_SIZE
        self.write(old, bytes(span))

    def grow(self, secs: int) -> None:
        """vhd_dynamic_grow: to `secs` sectors, in whole blocks. blktap adds BAT entries
        for the sectors added to the *current size*: a BAT that had room already (the
        image made with -S) then grows past the size asked for; we add the entries the
        new size lacks, no more (the same when the BAT had no room, the usual case)."""
        spb = self.block // SECTOR_SIZE
        blocks = -(-secs // spb) - self.entries
        if blocks <= 0:
            size = -(-secs // spb) * self.block
            struct.pack_into(">QI", self.footer, 48, size, vhd.geometry(size))
            self.write_footer()
            return
        bat_needed, map_needed = blocks * 4, (blocks >> 3) + 1
        bat_bytes = self.entries * 4
        bat_secs = _secs_no_zero(bat_bytes)
        bat_avail = bat_secs * SECTOR_SIZE - bat_bytes
        map_avail = 0
        if self.batmap:
            map_avail = self.map_secs * SECTOR_SIZE - ((self.entries + 7) >> 3)
        else:
            map_needed = 0
        if bat_needed > bat_avail or map_needed > map_avail:
            bat_needed = _pad(bat_needed - bat_avail) if bat_needed > bat_avail else 0
            map_needed = _pad(map_needed - map_avail) if map_needed > map_avail else 0
            size_needed = bat_needed + map_needed
            eom = self.end_of_headers()
            eob = self.table_offset + bat_secs * SECTOR_SIZE
            first = self.first_block()
            while first is not None:
                new_off = self.end_of_data()
                if (new_off + self.bm) % PAGE:
                    gap = PAGE - (new_off + self.bm) % PAGE
                    self.write(new_off, bytes(gap))
                    new_off += gap
                self.move_block(first, new_off)
                first = self.first_block()
                if first is None or eom + size_needed < self.bat[first] * SECTOR_SIZE:
                    break
            fail_at("DATA_MOVED")
            self.shift_metadata(eob, bat_needed, map_needed)
            fail_at("METADATA_MOVED")
        self.add_entries(blocks)

    def shift_metadata(self, eob: int, bat_needed: int, map_needed: int) -> None:
        """vhd_shift_metadata: locators after the BAT up by the room needed, the batmap
        by the BAT's growth (written later, with the header and batmap)."""
        shift = bat_needed + map_needed
        moved = []
        for i, loc in enumerate(self.locators):
            if loc.code == vhd.Platform.NONE or loc.data_offset < eob:
                continue
            moved.append((i, loc, self.read(loc.data_offset, loc.space_bytes)))
        for i, loc, blob in moved:
            self.write(loc.data_offset + shift, blob)
            self.locators[i] = vhd.Locator(loc.code, loc.data_space, loc.data_len,
                                           loc.data_offset + shift)
        if self.batmap and self.map_offset > eob:
            self.map_offset += bat_needed

    def add_entries(self, blocks: int) -> None:
        """vhd_add_bat_entries: header, BAT, batmap, footers for `blocks` more."""
        self.entries += blocks
        self.bat += [vhd.BAT_UNUSED] * blocks
        size = self.entries * self.block
        struct.pack_into(">I", self.header, 28, self.entries)
        for i, loc in enumerate(self.locators):
            struct.pack_into(">Q", self.header, 576 + 24 * i + 16, loc.data_offset)
        struct.pack_into(">I", self.header, 36, vhd.checksum(bytes(self.header), 36))
        self.write(self.data_offset, bytes(self.header))
        bat = struct.pack(f">{self.entries}I", *self.bat)
        self.write(self.table_offset, bat.ljust(_pad(len(bat)), b"\0"))
        if self.batmap:
            new_map = _pad((self.entries + 7) >> 3)
            self.map = self.map[:new_map].ljust(new_map, b"\0")
            self.map_secs = _secs_no_zero(new_map)
            # vhd_checksum_batmap: over the map bytes the new size needs.
            counted = _secs_no_zero(size >> (21 + 3)) * SECTOR_SIZE
            struct.pack_into(">QI", self.map_head, 8, self.map_offset, self.map_secs)
            struct.pack_into(">I", self.map_head, 24, ~sum(self.map[:counted]) & 0xFFFF_FFFF)
            self.write(self.batmap_at, bytes(self.map_head))
            self.write(self.map_offset, bytes(self.map))
        struct.pack_into(">QI", self.footer, 48, size, vhd.geometry(size))
        self.write_footer()

    def write_footer(self) -> None:
        """vhd_write_footer: at the end of the data (the file cut there) and at 0."""
        struct.pack_into(">I", self.footer, 64, vhd.checksum(bytes(self.footer), 64))
        end = self.end_of_data()
        self.f.truncate(end)
        self.write(end, bytes(self.footer))
        self.write(0, bytes(self.footer))
        self.f.flush()
        os.fsync(self.f.fileno())


def _resize_journaled(layer: vhd.Layer, jname: str, size_mib: int) -> int:
    """vhd_util_resize's journaled path; `layer` as measured before the journal
    disabled the image (only the footers' cookie changes)."""
    name = str(layer.path)
    try:
        j = journal.create(name, jname)
    except OSError as exc:
        print(f"creating journal failed: {-(exc.errno or errno.EINVAL)}")
        return -(exc.errno or errno.EINVAL)
    err = 0
    try:
        fail_at("BEGIN")
        cur = layer.footer.current_size // SECTOR_SIZE
        new = size_mib * MiB // SECTOR_SIZE
        if new < cur:
            print("dynamic shrink not fully implemented")
            err = -errno.ENOSYS
        elif new > cur:
            with open(name, "r+b") as f:
                Grower(layer, f, j).grow(new)
        fail_at("END")
    except OSError as exc:
        err = -(exc.errno or errno.EIO)
    if err:
        print(f"resize failed: {err}")
        try:
            j.revert()
        except OSError as exc:
            print(f"closing journal failed: {-(exc.errno or errno.EIO)}")
            j.close()
            return err
    else:
        j.commit()
    j.remove()
    return err


def resize(args: list[str]) -> int:
    """vhd_util_resize: `-f` grows within the BAT (vhd_dynamic_grow_fast), `-j` under a
    journal (vhd_dynamic_resize)."""
    from .vhd_util import Usage, _opts

    o = _opts(args, "n:s:j:fh", RESIZE_USAGE, "ns")
    if ("j" in o) == ("f" in o):
        print(RESIZE_USAGE)
        raise Usage()
    name = o["n"]
    try:
        layer = vhd.Layer.open(name)
    except OSError as exc:
        print(f"error opening {name}: {-(exc.errno or errno.EINVAL)}")
        return -(exc.errno or errno.EINVAL)
    if layer.footer.creator_app != b"tap\0":
        print(f"{name} not created by xen; resize not supported")
        return -errno.EINVAL
    size_mib = strtoull(o["s"])
    if "j" in o:
        return _resize_journaled(layer, o["j"], size_mib)
    size = -(-size_mib * MiB // vhd.DEFAULT_BLOCK_SIZE) * vhd.DEFAULT_BLOCK_SIZE
    try:
        if size != layer.footer.current_size:
            vhd.grow(name, size)
    except OSError as exc:
        print(f"resize failed: {-(exc.errno or errno.EIO)} ({exc.strerror or exc})")
        return -(exc.errno or errno.EIO)
    return 0


def revert(args: list[str]) -> int:
    """vhd_util_revert: undo an unfinished journaled change, remove the journal."""
    from .vhd_util import _opts

    o = _opts(args, "n:j:h", REVERT_USAGE, "nj")
    try:
        j = journal.Journal.open(o["n"], o["j"])
    except OSError as exc:
        print(f"opening journal failed: {-(exc.errno or errno.EINVAL)}")
        return -(exc.errno or errno.EINVAL)
    try:
        if not j.committed:
            j.revert()
    except OSError as exc:
        print(f"reverting journal failed: {-(exc.errno or errno.EINVAL)}")
        print(exc.strerror or exc, file=sys.stderr)
        j.close()
        return -(exc.errno or errno.EINVAL)
    try:
        j.remove()
    except OSError as exc:
        print(f"removing journal failed: {-(exc.errno or errno.EIO)}")
        return -(exc.errno or errno.EIO)
    return 0
