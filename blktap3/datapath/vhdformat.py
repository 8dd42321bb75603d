"""The VHD image format: footer (and its copy), dynamic header, BAT, sector bitmaps,
parent locators, checksums; strict validation of one file and of a differencing chain.

The format is Microsoft's "Virtual Hard Disk Image Format Specification" (2006) as
blktap's libvhd (vhd/lib/libvhd.c, include/vhd.h) reads and writes it, with blktap's
one extension, the `hidden` byte of the footer. Everything is big-endian.

An image is untrusted input: `Layer.open` refuses, with one clear `VhdError` naming the
file and the fault, anything the data path could not serve safely (a truncated file, a
bad checksum, a BAT entry past the end or into the metadata, overlapping blocks, a block
size blktap would not open), and `open_chain` refuses loops, missing parents and parents
whose UUID or size do not match the child's header. The data path (vhd.c) then trusts
the layout this module measured and only re-checks each BAT entry against it.

A differencing disk may have a raw file for its parent (blktap's `vhd-util snapshot -m`):
its header then holds a null parent UUID (libvhd's vhd_parent_raw), its locators the
file's name as for any parent. The raw file ends the chain, as a `Layer.open_raw` that reads
like a fixed disk of the file's whole sectors.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import struct
import time
import uuid as uuidlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from blktap3.abi import SECTOR_SIZE

FOOTER_SIZE = 512
HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
# libvhd's journal "disables" an image while it changes it (a journaled resize): the
# footer's cookie is this until the change is committed or reverted.
POISON_COOKIE = b"v_poison"
HEADER_COOKIE = b"cxsparse"
BATMAP_COOKIE = b"tdbatmap"
BATMAP_VERSION = 0x00010002
VERSION = 0x00010000
FEATURES_RESERVED = 0x2
NO_OFFSET = 0xFFFF_FFFF_FFFF_FFFF
BAT_UNUSED = 0xFFFF_FFFF
DEFAULT_BLOCK_SIZE = 2 << 20
# VHD's own limit: the spec's CHS geometry tops out near 2040 GiB (65535*16*255 sectors
# is 127 GiB, but the size field is what counts); blktap refuses more (VHD_MAX_SIZE).
MAX_SIZE = 2040 << 30
# Deeper chains than this are refused (blktap walks until a loop or ENOENT).
MAX_CHAIN = 256
# Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00 UTC).
EPOCH_2000 = 946684800


class DiskType:
    FIXED = 2
    DYNAMIC = 3
    DIFF = 4


class Platform:
    NONE = 0
    W2RU = 0x57327275  # Windows relative path, UTF-16LE
    W2KU = 0x57326B75  # Windows absolute path, UTF-16LE
    MACX = 0x4D616358  # file URL, UTF-8
    KNOWN = (0, 0x57693272, 0x5769326B, W2RU, W2KU, 0x4D616320, MACX)


class VhdError(OSError):
    """A file that is not a VHD we can serve; the message names the file and the fault."""

    def __init__(self, path: str | os.PathLike[str], why: str, err: int = errno.EINVAL):
        super().__init__(err, f"{os.fspath(path)}: {why}")


def checksum(blob: bytes, at: int) -> int:
    """One's complement of the byte sum, the 4 bytes at `at` counted as zero."""
    total = sum(blob) - sum(blob[at : at + 4])
    return ~total & 0xFFFF_FFFF


def vhd_time(unix: float | None = None) -> int:
    return max(0, int(time.time() if unix is None else unix) - EPOCH_2000) & 0xFFFF_FFFF


def geometry(size: int) -> int:
    """CHS as the spec's appendix computes it (what qemu and blktap store)."""
    sectors = min(size // SECTOR_SIZE, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = sectors // spt
    else:
        spt = 17
        cth = sectors // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = sectors // spt
    cyls = min(cth // heads, 65535)
    return (cyls << 16) | (heads << 8) | spt


# ---- footer ------------------------------------------------------------------------

_FOOTER = struct.Struct(">8sIIQI4sIIQQIII16sBB")


@dataclass(frozen=True)
class Footer:
    disk_type: int
    current_size: int
    original_size: int
    data_offset: int
    uuid: bytes
    timestamp: int = 0
    creator_app: bytes = b"tap\0"
    creator_version: int = 0x00010003
    creator_os: int = 0
    geometry: int = 0
    features: int = FEATURES_RESERVED
    version: int = VERSION
    saved: int = 0
    hidden: int = 0
    checksum: int = 0

    def pack(self, cookie: bytes = FOOTER_COOKIE) -> bytes:
        """The 512 bytes, with a fresh checksum."""
        raw = bytearray(FOOTER_SIZE)
        _FOOTER.pack_into(
            raw, 0, cookie, self.features, self.version, self.data_offset,
            self.timestamp, self.creator_app, self.creator_version, self.creator_os,
            self.original_size, self.current_size, self.geometry, self.disk_type, 0,
            self.uuid, self.saved, self.hidden,
        )
        struct.pack_into(">I", raw, 64, checksum(bytes(raw), 64))
        return bytes(raw)

    @classmethod
    def unpack(cls, raw: bytes, path: str | os.PathLike[str], where: str,
               disabled_ok: bool = False) -> Footer:
        if raw[:8] == POISON_COOKIE and not disabled_ok:
            raise VhdError(path, f"disabled by an unfinished journaled change (footer "
                                 f"{where}): undo it with vhd-util revert -n IMAGE -j JOURNAL")
        if len(raw) != FOOTER_SIZE or raw[:8] not in (FOOTER_COOKIE, POISON_COOKIE):
            raise VhdError(path, f"no VHD footer {where} (cookie {raw[:8]!r})")
        (_, features, version, data_offset, ts, app, app_ver, app_os, orig, cur, geom,
         dtype, csum, uid, saved, hidden) = _FOOTER.unpack_from(raw)
        if csum != checksum(raw, 64):
            raise VhdError(path, f"footer {where}: checksum 0x{csum:08x} does not match "
                                 f"0x{checksum(raw, 64):08x}")
        if version >> 16 != 1:
            raise VhdError(path, f"footer {where}: unsupported version 0x{version:08x}")
        if dtype not in (DiskType.FIXED, DiskType.DYNAMIC, DiskType.DIFF):
            raise VhdError(path, f"footer {where}: unsupported disk type {dtype}")
        if cur % SECTOR_SIZE:
            raise VhdError(path, f"footer {where}: size {cur} is not a multiple of 512")
        if cur > MAX_SIZE:
            raise VhdError(path, f"footer {where}: size {cur} exceeds VHD's limit of "
                                 f"{MAX_SIZE} bytes (2040 GiB)", errno.EFBIG)
        return cls(dtype, cur, orig, data_offset, uid, ts, app, app_ver, app_os, geom,
                   features, version, saved, hidden, csum)


# ---- header and parent locators ----------------------------------------------------

_HEADER = struct.Struct(">8sQQIIII16sII512s")
_LOCATOR = struct.Struct(">IIIIQ")
_LOCATORS_AT = 576


@dataclass(frozen=True)
class Locator:
    code: int
    data_space: int     # as stored: sectors (spec) or bytes (some writers)
    data_len: int
    data_offset: int

    @property
    def space_bytes(self) -> int:
        """blktap's rule (vhd_parent_locator_size): < 512 counts sectors, else bytes."""
        if self.data_space < SECTOR_SIZE:
            return self.data_space * SECTOR_SIZE
        return self.data_space if self.data_space % SECTOR_SIZE == 0 else 0


@dataclass(frozen=True)
class Header:
    table_offset: int
    max_table_entries: int
    block_size: int
    parent_uuid: bytes = bytes(16)
    parent_timestamp: int = 0
    parent_name: str = ""
    locators: tuple[Locator, ...] = ()
    checksum: int = 0

    def pack(self) -> bytes:
        raw = bytearray(HEADER_SIZE)
        _HEADER.pack_into(
            raw, 0, HEADER_COOKIE, NO_OFFSET, self.table_offset, VERSION,
            self.max_table_entries, self.block_size, 0, self.parent_uuid,
            self.parent_timestamp, 0, self.parent_name.encode("utf-16-be")[:512],
        )
        for i, loc in enumerate(self.locators[:8]):
            _LOCATOR.pack_into(raw, _LOCATORS_AT + 24 * i, loc.code, loc.data_space,
                               loc.data_len, 0, loc.data_offset)
        struct.pack_into(">I", raw, 36, checksum(bytes(raw), 36))
        return bytes(raw)

    @classmethod
    def unpack(cls, raw: bytes, path: str | os.PathLike[str]) -> Header:
        if len(raw) != HEADER_SIZE or raw[:8] != HEADER_COOKIE:
            raise VhdError(path, f"no dynamic disk header (cookie {raw[:8]!r})")
        (_, data_offset, table_offset, version, entries, block_size, csum, puuid, pts, _,
         pname) = _HEADER.unpack_from(raw)
        if csum != checksum(raw, 36):
            raise VhdError(path, f"header checksum 0x{csum:08x} does not match "
                                 f"0x{checksum(raw, 36):08x}")
        if version != VERSION or data_offset != NO_OFFSET:
            raise VhdError(path, f"unsupported header version 0x{version:08x}")
        # blktap opens blocks of at most 2 MiB (vhd_validate_header); at least 4 KiB
        # keeps a block's bitmap in one sector.
        if block_size & (block_size - 1) or not SECTOR_SIZE * 8 <= block_size <= DEFAULT_BLOCK_SIZE:
            raise VhdError(path, f"unsupported block size {block_size}")
        locators = []
        for i in range(8):
            code, space, length, _, off = _LOCATOR.unpack_from(raw, _LOCATORS_AT + 24 * i)
            if code not in Platform.KNOWN:
                raise VhdError(path, f"parent locator {i}: unknown platform 0x{code:08x}")
            locators.append(Locator(code, space, length, off))
        name = pname.decode("utf-16-be", "replace").split("\0", 1)[0]
        return cls(table_offset, entries, block_size, puuid, pts, name, tuple(locators), csum)


# ---- one file ----------------------------------------------------------------------


@dataclass
class Layer:
    """One VHD file, validated; `bat[i]` is block i's sector offset or BAT_UNUSED."""

    path: Path
    footer: Footer
    header: Header | None
    bat: list[int] = field(default_factory=list)
    file_size: int = 0
    batmap_end: int = 0
    raw: bool = False   # a raw file at the end of a chain, not a VHD

    @property
    def data_start(self) -> int:
        """No block starts below this (the end of the metadata, or a lower block)."""
        used = [e * SECTOR_SIZE for e in self.bat if e != BAT_UNUSED]
        return min([self.batmap_end, *used])

    @property
    def footer_offset(self) -> int:
        return self.file_size - FOOTER_SIZE

    @property
    def sectors(self) -> int:
        return self.footer.current_size // SECTOR_SIZE

    @property
    def block_size(self) -> int:
        return self.header.block_size if self.header else DEFAULT_BLOCK_SIZE

    @property
    def bitmap_size(self) -> int:
        """Bytes of a block's sector bitmap, padded to whole sectors."""
        bits = self.block_size // SECTOR_SIZE
        return -(-bits // 8 // SECTOR_SIZE) * SECTOR_SIZE

    @property
    def bat_bytes(self) -> int:
        assert self.header is not None
        return -(-self.header.max_table_entries * 4 // SECTOR_SIZE) * SECTOR_SIZE

    @property
    def is_diff(self) -> bool:
        return self.footer.disk_type == DiskType.DIFF

    @property
    def hidden(self) -> int:
        return self.footer.hidden

    @property
    def parent_is_raw(self) -> bool:
        """A differencing disk over a raw file: the null parent UUID says so."""
        return self.is_diff and self.header is not None and \
            self.header.parent_uuid == bytes(16)

    @classmethod
    def open_raw(cls, path: str | os.PathLike[str]) -> Layer:
        """A raw parent: its whole sectors, read as a fixed disk's (no footer, no
        UUID). A size that is not whole sectors is refused (a VHD's is)."""
        p = Path(path)
        try:
            size = p.stat().st_size
        except OSError as exc:
            raise VhdError(p, exc.strerror or str(exc), exc.errno or errno.EIO) from None
        if size % SECTOR_SIZE or size == 0:
            raise VhdError(p, f"raw parent of {size} bytes: not a whole number of sectors")
        if size > MAX_SIZE:
            raise VhdError(p, f"raw parent of {size} bytes exceeds VHD's limit of "
                              f"{MAX_SIZE} bytes (2040 GiB)", errno.EFBIG)
        footer = Footer(DiskType.FIXED, size, size, NO_OFFSET, bytes(16))
        return cls(p, footer, None, file_size=size + FOOTER_SIZE, raw=True)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, disabled_ok: bool = False) -> Layer:
        """Read and check one file (not its parent). `disabled_ok`: an image a journaled
        change disabled is read too (libvhd's VHD_OPEN_IGNORE_DISABLED, for scan and
        query), from its footer copy when blocks moved over its end."""
        p = Path(path)
        try:
            with open(p, "rb") as f:
                return cls._parse(p, f, disabled_ok)
        except VhdError:
            raise
        except OSError as exc:
            raise VhdError(p, exc.strerror or str(exc), exc.errno or errno.EIO) from None

    @classmethod
    def _parse(cls, p: Path, fh: BinaryIO, disabled_ok: bool = False) -> Layer:
        size = os.fstat(fh.fileno()).st_size
        if size < FOOTER_SIZE:
            raise VhdError(p, f"too short for a VHD ({size} bytes)")

        def read_at(off: int, n: int) -> bytes:
            fh.seek(off)
            data = fh.read(n)
            if len(data) != n:
                raise VhdError(p, f"truncated: {n} bytes at {off} run past the end ({size})")
            return data

        end = read_at(size - FOOTER_SIZE, FOOTER_SIZE)
        copy = read_at(0, FOOTER_SIZE)
        try:
            footer = Footer.unpack(end, p, "at the end", disabled_ok)
        except VhdError:
            # A journaled resize that moved blocks over the old end: the copy says so.
            if end[:8] == POISON_COOKIE or copy[:8] != POISON_COOKIE:
                raise
            footer = Footer.unpack(copy, p, "copy at offset 0", disabled_ok)
            end = copy
        layer = cls(p, footer, None, file_size=size)
        if footer.disk_type == DiskType.FIXED:
            if footer.current_size != size - FOOTER_SIZE:
                raise VhdError(p, f"fixed disk of {footer.current_size} bytes in a file of "
                                  f"{size} (truncated or grown)")
            return layer
        if copy != end:
            # blktap's hidden flag on old tapdisk images lives in the copy only; any
            # other difference is damage, but the end footer is the one that counts.
            Footer.unpack(copy, p, "copy at offset 0", disabled_ok)
        hoff = footer.data_offset
        if hoff % SECTOR_SIZE or hoff < FOOTER_SIZE or hoff + HEADER_SIZE > size - FOOTER_SIZE:
            raise VhdError(p, f"header offset {hoff} is outside the file")
        header = Header.unpack(read_at(hoff, HEADER_SIZE), p)
        layer.header = header
        need = -(-footer.current_size // header.block_size)
        if header.max_table_entries < need:
            raise VhdError(p, f"BAT of {header.max_table_entries} entries cannot map "
                              f"{footer.current_size} bytes ({need} blocks)")
        toff = header.table_offset
        meta_end = layer.footer_offset
        if toff % SECTOR_SIZE:
            raise VhdError(p, f"BAT at {toff} is not sector aligned")
        if toff < FOOTER_SIZE or toff + layer.bat_bytes > meta_end:
            raise VhdError(p, f"BAT at {toff} ({layer.bat_bytes} bytes) runs past the data")
        raw = read_at(toff, header.max_table_entries * 4)
        layer.bat = list(struct.unpack(f">{header.max_table_entries}I", raw))
        # Metadata: footer copy, header, BAT, blktap's batmap, parent locators.
        regions = [(0, FOOTER_SIZE, "footer copy"), (hoff, HEADER_SIZE, "header"),
                   (toff, layer.bat_bytes, "BAT")]
        bm_at = toff + layer.bat_bytes
        if bm_at + SECTOR_SIZE <= meta_end:
            bm = read_at(bm_at, SECTOR_SIZE)
            if bm[:8] == BATMAP_COOKIE:
                boff, bsecs = struct.unpack_from(">QI", bm, 8)
                regions.append((bm_at, SECTOR_SIZE, "batmap header"))
                if boff % SECTOR_SIZE or boff + bsecs * SECTOR_SIZE > meta_end:
                    raise VhdError(p, f"batmap at {boff} runs past the data")
                regions.append((boff, bsecs * SECTOR_SIZE, "batmap"))
        for i, loc in enumerate(header.locators):
            if loc.code == Platform.NONE:
                continue
            space = loc.space_bytes
            if loc.data_offset % SECTOR_SIZE or loc.data_len > space or \
                    loc.data_offset + space > meta_end or loc.data_offset < FOOTER_SIZE:
                raise VhdError(p, f"parent locator {i} at {loc.data_offset} is outside "
                                  f"the metadata")
            regions.append((loc.data_offset, space, f"parent locator {i}"))
        span = header.block_size + layer.bitmap_size
        blocks = []
        for blk, entry in enumerate(layer.bat):
            if entry == BAT_UNUSED:
                continue
            off = entry * SECTOR_SIZE
            if blk >= need:
                raise VhdError(p, f"BAT entry {blk} is beyond the disk's {need} blocks")
            if off + span > meta_end:
                raise VhdError(p, f"BAT entry {blk}: block at {off} runs past the end of "
                                  f"the data ({meta_end})")
            blocks.append((off, span, f"block {blk}"))
        _no_overlaps(p, regions, blocks)
        layer.batmap_end = max(o + n for o, n, _ in regions)
        return layer

    def parent_names(self) -> list[str]:
        """The names the parent locators hold, in locator order (blktap tries them so)."""
        if not self.header or not self.is_diff:
            return []
        names = []
        with open(self.path, "rb") as f:
            for loc in self.header.locators:
                if loc.code not in (Platform.MACX, Platform.W2KU, Platform.W2RU):
                    continue
                f.seek(loc.data_offset)
                blob = f.read(loc.data_len)
                try:
                    if loc.code == Platform.MACX:
                        name = blob.decode("utf-8")
                        name = name.removeprefix("file://")
                    else:
                        name = blob.decode("utf-16-le").replace("\\", "/")
                except UnicodeDecodeError:
                    continue
                name = name.split("\0", 1)[0]
                if name:
                    names.append(name)
        return names

    def parent_path(self) -> Path:
        """The parent file, found as blktap finds it (relative to the child's folder)."""
        names = self.parent_names()
        if not names:
            raise VhdError(self.path, "differencing disk with no usable parent locator")
        for name in names:
            # As blktap's vhd_find_parent: relative to the child's folder, canonical.
            cand = Path(os.path.realpath(self.path.parent / name))
            if cand.exists():
                return cand
        raise VhdError(self.path, f"parent {names[0]} not found", errno.ENOENT)

    def bitmap(self, f: BinaryIO, blk: int) -> bytes:
        """Block `blk`'s sector bitmap (an open file of this layer)."""
        f.seek(self.bat[blk] * SECTOR_SIZE)
        return f.read(self.bitmap_size)


def _no_overlaps(p: Path, regions: list[tuple[int, int, str]],
                 blocks: list[tuple[int, int, str]]) -> None:
    spans = sorted(regions + blocks)
    for (a_off, a_len, a_name), (b_off, _, b_name) in itertools.pairwise(spans):
        if a_off + a_len > b_off:
            raise VhdError(p, f"{a_name} at {a_off} overlaps {b_name} at {b_off}")


def bit(bitmap: bytes, i: int) -> bool:
    """Sector i of a block is in this layer (bit 7 of byte 0 is sector 0)."""
    return bool(bitmap[i >> 3] & (0x80 >> (i & 7)))


# ---- chains ------------------------------------------------------------------------


def open_chain(path: str | os.PathLike[str], *, max_depth: int = MAX_CHAIN) -> list[Layer]:
    """The leaf and its ancestors, leaf first; loops, missing parents, and parents whose
    UUID or size the child does not expect are refused."""
    chain = [Layer.open(path)]
    seen = {_identity(chain[0].path)}
    while chain[-1].is_diff:
        child = chain[-1]
        if len(chain) >= max_depth:
            raise VhdError(path, f"chain deeper than {max_depth} images")
        parent_path = child.parent_path()
        parent = Layer.open_raw(parent_path) if child.parent_is_raw else Layer.open(parent_path)
        ident = _identity(parent.path)
        if ident in seen:
            raise VhdError(child.path, f"parent chain loops back to {parent.path}", errno.ELOOP)
        seen.add(ident)
        assert child.header is not None
        if not parent.raw and parent.footer.uuid != child.header.parent_uuid:
            raise VhdError(child.path, f"parent {parent.path} has UUID "
                           f"{uuidlib.UUID(bytes=parent.footer.uuid)}, the child expects "
                           f"{uuidlib.UUID(bytes=child.header.parent_uuid)}")
        if parent.footer.current_size > child.footer.current_size:
            raise VhdError(child.path, f"parent {parent.path} is larger "
                           f"({parent.footer.current_size} bytes) than the child "
                           f"({child.footer.current_size})")
        chain.append(parent)
    return chain


def _identity(p: Path) -> tuple[int, int]:
    st = p.stat()
    return (st.st_dev, st.st_ino)


def read_chain(chain: list[Layer], sector: int, count: int) -> bytes:
    """Read sectors through the chain (tools and tests; the data path does this in C)."""
    out = bytearray(count * SECTOR_SIZE)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(layer.path, "rb")) for layer in chain]
        bitmaps: dict[tuple[int, int], bytes] = {}
        for i in range(count):
            s = sector + i
            for layer, f in zip(chain, files, strict=True):
                if s >= layer.sectors:
                    continue
                off = _sector_offset(layer, f, s, bitmaps)
                if off is None:
                    continue
                f.seek(off)
                at = i * SECTOR_SIZE
                out[at : at + SECTOR_SIZE] = f.read(SECTOR_SIZE).ljust(SECTOR_SIZE, b"\0")
                break
    return bytes(out)


def _sector_offset(layer: Layer, f: BinaryIO, s: int,
                   bitmaps: dict[tuple[int, int], bytes]) -> int | None:
    if layer.header is None:
        return s * SECTOR_SIZE
    spb = layer.block_size // SECTOR_SIZE
    blk, idx = divmod(s, spb)
    if layer.bat[blk] == BAT_UNUSED:
        return None
    key = (id(layer), blk)
    if key not in bitmaps:
        bitmaps[key] = layer.bitmap(f, blk)
    if not bit(bitmaps[key], idx):
        return None
    return layer.bat[blk] * SECTOR_SIZE + layer.bitmap_size + idx * SECTOR_SIZE


# ---- writing new images ------------------------------------------------------------


def new_footer(disk_type: int, size: int, data_offset: int) -> Footer:
    return Footer(disk_type=disk_type, current_size=size, original_size=size,
                  data_offset=data_offset, uuid=uuidlib.uuid4().bytes, timestamp=vhd_time(),
                  geometry=geometry(size))


def create(path: str | os.PathLike[str], size: int, *, fixed: bool = False,
           parent: str | os.PathLike[str] | None = None, parent_raw: bool = False,
           block_size: int = DEFAULT_BLOCK_SIZE, max_size: int = 0) -> Layer:
    """A new fixed, dynamic or (with `parent`) differencing VHD of `size` bytes (a
    differencing disk takes its parent's size when `size` is 0), its BAT large enough to
    grow to `max_size` without moving blocks (blktap's -S). `parent_raw`: the parent is
    a raw file (a null parent UUID). Refuses to overwrite."""
    p = Path(path)
    if size % SECTOR_SIZE or size < 0:
        raise VhdError(p, f"size {size} is not a multiple of 512")
    parent_layer = None
    if parent is not None:
        parent_layer = Layer.open_raw(parent) if parent_raw else Layer.open(parent)
        if not parent_raw and parent_layer.footer.uuid == bytes(16):
            # A null parent UUID is what marks a raw parent (libvhd refuses this too).
            raise VhdError(p, f"parent {parent} has a null UUID")
        size = size or parent_layer.footer.current_size
        if size < parent_layer.footer.current_size:
            raise VhdError(p, f"size {size} is smaller than the parent's "
                              f"{parent_layer.footer.current_size}")
    if size > MAX_SIZE:
        raise VhdError(p, f"size {size} exceeds VHD's limit of {MAX_SIZE} bytes (2040 GiB)",
                       errno.EFBIG)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            if fixed:
                footer = new_footer(DiskType.FIXED, size, NO_OFFSET)
                f.truncate(size)
                f.seek(size)
                f.write(footer.pack())
            else:
                _write_dynamic(f, p, size, block_size, parent_layer, max(size, max_size))
    except BaseException:
        p.unlink(missing_ok=True)
        raise
    return Layer.open(p)


def _write_dynamic(f: BinaryIO, p: Path, size: int, block_size: int,
                   parent: Layer | None, max_size: int) -> None:
    entries = -(-max_size // block_size)
    bat_off = FOOTER_SIZE + HEADER_SIZE
    bat_bytes = -(-entries * 4 // SECTOR_SIZE) * SECTOR_SIZE
    # blktap's batmap (a bit per block, "all its sectors allocated"): its tools expect
    # one in every dynamic image that "tap" created (vhd_has_batmap). Ours stays zero:
    # a clear bit only means "look at the block's bitmap".
    batmap_at = bat_off + bat_bytes
    batmap_bytes = (entries + 7) // 8
    batmap_secs = max(1, (batmap_bytes + SECTOR_SIZE - 1) // SECTOR_SIZE)
    batmap = bytearray(SECTOR_SIZE)
    struct.pack_into(">8sQIII", batmap, 0, BATMAP_COOKIE, batmap_at + SECTOR_SIZE, batmap_secs,
                     BATMAP_VERSION, 0xFFFF_FFFF)  # the checksum of an all-zero map
    end = batmap_at + SECTOR_SIZE + batmap_secs * SECTOR_SIZE
    locators: list[Locator] = []
    blobs: list[tuple[int, bytes]] = []
    header = Header(bat_off, entries, block_size)
    kind = DiskType.DYNAMIC
    if parent is not None:
        kind = DiskType.DIFF
        for code, blob in _locator_blobs(p, parent.path):
            space = -(-len(blob) // SECTOR_SIZE) * SECTOR_SIZE
            locators.append(Locator(code, space, len(blob), end))
            blobs.append((end, blob))
            end += space
        header = replace(header, parent_uuid=parent.footer.uuid,
                         parent_timestamp=_mtime(parent.path),
                         parent_name=parent.path.name, locators=tuple(locators))
    footer = new_footer(kind, size, FOOTER_SIZE)
    # Blocks start where their data is page aligned (as blktap's tapdisk places them).
    f.seek(0)
    f.write(footer.pack())
    f.write(header.pack())
    f.write(b"\xff" * (entries * 4) + b"\0" * (bat_bytes - entries * 4))
    f.seek(batmap_at)
    f.write(bytes(batmap) + bytes(batmap_secs * SECTOR_SIZE))
    for off, blob in blobs:
        f.seek(off)
        f.write(blob)
    f.seek(end)
    f.write(footer.pack())


def _mtime(p: Path) -> int:
    return vhd_time(p.stat().st_mtime)


def set_hidden(path: str | os.PathLike[str], hidden: int) -> None:
    """blktap's `vhd-util set -f hidden`: both footers, checksum recomputed."""
    layer = Layer.open(path)
    _write_footers(path, layer, replace(layer.footer, hidden=hidden))


def grow(path: str | os.PathLike[str], size: int) -> None:
    """A dynamic disk's new, larger size, within the blocks its BAT can map (blktap's
    vhd_dynamic_grow_fast): no block moves, only the footers change."""
    layer = Layer.open(path)
    if layer.header is None:
        raise VhdError(path, "resizing a fixed disk is not supported", errno.EOPNOTSUPP)
    if size < layer.footer.current_size:
        raise VhdError(path, f"size ({size}) < curr size ({layer.footer.current_size})")
    if size > MAX_SIZE:
        raise VhdError(path, f"size {size} exceeds VHD's limit of {MAX_SIZE} bytes "
                             "(2040 GiB)", errno.EFBIG)
    if -(-size // layer.block_size) > layer.header.max_table_entries:
        raise VhdError(path, f"{size} bytes need more blocks than the BAT's "
                             f"{layer.header.max_table_entries} (moving blocks to grow "
                             "the BAT is not supported)", errno.EOPNOTSUPP)
    _write_footers(path, layer, replace(layer.footer, current_size=size,
                                        geometry=geometry(size)))


def _write_footers(path: str | os.PathLike[str], layer: Layer, new: Footer) -> None:
    footer = new.pack()
    with open(path, "r+b") as f:
        if layer.header is not None:
            f.seek(0)
            f.write(footer)
        f.seek(layer.footer_offset)
        f.write(footer)
        f.flush()
        os.fsync(f.fileno())


def _locator_blobs(child: Path, parent: Path) -> list[tuple[int, bytes]]:
    """MACX, W2KU, W2RU, each holding the parent's path relative to the child
    ("./a.vhd"; ".\\a.vhd" in UTF-16LE for the Windows two): blktap's
    vhd_write_parent_locators."""
    rel = os.path.relpath(parent.resolve(), child.resolve().parent)
    win = ".\\" + rel.replace("/", "\\")
    return [(Platform.MACX, f"file://./{rel}".encode()),
            (Platform.W2KU, win.encode("utf-16-le")),
            (Platform.W2RU, win.encode("utf-16-le"))]


def reparent(child: Layer, parent: Layer) -> None:
    """Point a differencing disk at `parent` (blktap's vhd_change_parent): UUID,
    timestamp, name and locators change; each locator keeps its space (ENOSPC if the
    new name does not fit)."""
    assert child.header is not None
    slots = [loc for loc in child.header.locators if loc.code != Platform.NONE]
    blobs = _locator_blobs(child.path, parent.path)
    if len(slots) < len(blobs):
        raise VhdError(child.path, "not enough parent locators to re-parent", errno.ENOSPC)
    locators = []
    writes = []
    for slot, (code, blob) in zip(slots, blobs, strict=False):
        if len(blob) > slot.space_bytes:
            raise VhdError(child.path, f"parent name {parent.path} does not fit the locator",
                           errno.ENOSPC)
        locators.append(Locator(code, slot.data_space, len(blob), slot.data_offset))
        writes.append((slot.data_offset, blob.ljust(slot.space_bytes, b"\0")))
    header = replace(child.header, parent_uuid=parent.footer.uuid,
                     parent_timestamp=_mtime(parent.path), parent_name=parent.path.name,
                     locators=tuple(locators))
    with open(child.path, "r+b") as f:
        for off, blob in writes:
            f.seek(off)
            f.write(blob)
        f.flush()
        os.fsync(f.fileno())    # the locators before the header that names them
        f.seek(child.footer.data_offset)
        f.write(header.pack())
        f.flush()
        os.fsync(f.fileno())


def repair_footer(path: str | os.PathLike[str]) -> None:
    """A dynamic disk whose end footer is lost (a crash while the file grew, a
    truncation): the copy at offset 0 is written after the last block, the file cut
    there (blktap's vhd-util repair)."""
    p = Path(path)
    with open(p, "r+b") as f:
        footer = Footer.unpack(f.read(FOOTER_SIZE), p, "copy at offset 0")
        if footer.disk_type == DiskType.FIXED:
            raise VhdError(p, "a fixed disk has no footer copy to repair from")
        f.seek(footer.data_offset)
        header = Header.unpack(f.read(HEADER_SIZE), p)
        f.seek(header.table_offset)
        raw = f.read(header.max_table_entries * 4)
        if len(raw) != header.max_table_entries * 4:
            raise VhdError(p, "truncated inside its BAT")
        bat = struct.unpack(f">{header.max_table_entries}I", raw)
        bitmap = -(-(header.block_size // SECTOR_SIZE) // 8 // SECTOR_SIZE) * SECTOR_SIZE
        end = header.table_offset + -(-len(raw) // SECTOR_SIZE) * SECTOR_SIZE
        for loc in header.locators:
            if loc.code != Platform.NONE:
                end = max(end, loc.data_offset + loc.space_bytes)
        f.seek(end)
        head = f.read(SECTOR_SIZE)
        if head[:8] == BATMAP_COOKIE:
            boff, bsecs = struct.unpack_from(">QI", head, 8)
            end = max(end, boff + bsecs * SECTOR_SIZE)
        for e in bat:
            if e != BAT_UNUSED:
                end = max(end, e * SECTOR_SIZE + bitmap + header.block_size)
        f.truncate(end)
        f.seek(end)
        f.write(footer.pack())
        f.flush()
        os.fsync(f.fileno())
    Layer.open(p)
