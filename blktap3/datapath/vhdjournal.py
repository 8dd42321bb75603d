"""libvhd's undo journal: what a journaled change of a VHD (`vhd-util resize -j`) saves
before it writes, so that a crash at any point can be undone (`vhd-util revert`).

The journal file is blktap's (vhd/lib/libvhd-journal.c, include/libvhd-journal.h), so
blktap's `vhd-util revert` undoes our changes and ours undoes blktap's:

- a 512-byte header: cookie `vjournal`, the image's UUID, where its footer was
  (`vhd_footer_offset`), the counts and first offsets of the metadata and data entries,
  and the journal's end (`journal_eof`, which blktap never byte-swaps: it is stored in
  the byte order of the host, little-endian here);
- entries, each a 32-byte head (cookie 0xaaaa12344321aaaa, type, size, offset in the
  image, checksum: the one's complement of the byte sum of head and data) and the bytes
  that were at that offset. First the metadata, in this order: the footer at the end,
  then (dynamic and differencing disks) the footer copy at 0, the header, each parent
  locator, the BAT, the batmap's header and map; then, as the change goes, data entries:
  each block's bitmap and data before the block is moved.

While the journal is open the image is disabled: its footers carry the cookie
`v_poison`, so neither tapdisk nor vhd-util opens it. Commit (the change is complete)
empties the journal; removing it enables the image again. Revert writes every entry
back, cuts the file to its old length, and enables the image.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from blktap3.abi import SECTOR_SIZE

from . import vhdformat as vhd

JOURNAL_COOKIE = b"vjournal"
ENTRY_COOKIE = 0xAAAA12344321AAAA
HEADER_SIZE = 512
_HEAD = struct.Struct(">8s16sQIIQQ")     # then journal_eof, host order, at 56
_EOF = struct.Struct("<Q")
_ENTRY = struct.Struct(">QIIQI4x")       # 32 bytes, as the C struct with its padding

FOOTER_P, FOOTER_C, HEADER, LOCATOR, BAT, BATMAP_H, BATMAP_M, DATA = range(1, 9)
METADATA_ORDER = (FOOTER_P, FOOTER_C, HEADER, LOCATOR, BAT, BATMAP_H, BATMAP_M)


class JournalError(OSError):
    def __init__(self, path: str | os.PathLike[str], why: str, err: int = errno.EINVAL):
        super().__init__(err, f"{os.fspath(path)}: {why}")


def _sum(blob: bytes) -> int:
    return sum(blob)


def entry_checksum(head: bytes, data: bytes) -> int:
    """vhd_journal_checksum_entry: the head with its checksum field counted as zero."""
    total = _sum(head) - _sum(head[24:28]) + _sum(data)
    return ~total & 0xFFFF_FFFF


@dataclass
class Entry:
    kind: int
    offset: int
    data: bytes


@dataclass
class Journal:
    path: Path
    image: Path
    uuid: bytes = bytes(16)
    footer_offset: int = 0
    data_entries: int = 0
    meta_entries: int = 0
    data_offset: int = 0
    meta_offset: int = 0
    eof: int = HEADER_SIZE
    f: BinaryIO | None = field(default=None, repr=False)

    # ---- the file ---------------------------------------------------------------

    def _file(self) -> BinaryIO:
        assert self.f is not None
        return self.f

    def _write_header(self) -> None:
        raw = bytearray(HEADER_SIZE)
        _HEAD.pack_into(raw, 0, JOURNAL_COOKIE, self.uuid, self.footer_offset,
                        self.data_entries, self.meta_entries, self.data_offset,
                        self.meta_offset)
        _EOF.pack_into(raw, 56, self.eof)
        f = self._file()
        f.seek(0)
        f.write(raw)

    def add(self, kind: int, offset: int, data: bytes) -> None:
        """vhd_journal_update: the entry at the journal's end, then the header."""
        if not data or len(data) % SECTOR_SIZE:
            raise JournalError(self.path, f"entry of {len(data)} bytes is not whole sectors")
        head = bytearray(_ENTRY.pack(ENTRY_COOKIE, kind, len(data), offset, 0))
        struct.pack_into(">I", head, 24, entry_checksum(bytes(head), data))
        f = self._file()
        f.seek(self.eof)
        f.write(bytes(head) + data)
        if kind == DATA:
            if not self.data_entries:
                self.data_offset = self.eof
            self.data_entries += 1
        else:
            if not self.meta_entries:
                self.meta_offset = self.eof
            self.meta_entries += 1
        self.eof += _ENTRY.size + len(data)
        self._write_header()

    def sync(self) -> None:
        f = self._file()
        f.flush()
        os.fsync(f.fileno())

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    # ---- reading ---------------------------------------------------------------

    @classmethod
    def open(cls, image: str | os.PathLike[str], path: str | os.PathLike[str]) -> Journal:
        p = Path(path)
        try:
            f = open(p, "r+b")  # noqa: SIM115 (the journal keeps it)
        except OSError as exc:
            raise JournalError(p, exc.strerror or str(exc), exc.errno or errno.EIO) from None
        j = cls(p, Path(image), f=f)
        raw = f.read(HEADER_SIZE)
        if len(raw) != HEADER_SIZE or raw[:8] != JOURNAL_COOKIE:
            j.close()
            raise JournalError(p, "not a VHD journal")
        (_, j.uuid, j.footer_offset, j.data_entries, j.meta_entries, j.data_offset,
         j.meta_offset) = _HEAD.unpack_from(raw)
        (j.eof,) = _EOF.unpack_from(raw, 56)
        size = os.fstat(f.fileno()).st_size
        # A committed journal is cut to its header; its end is left as it was.
        if (j.eof > size and not j.committed) or j.data_offset > j.eof or \
                j.meta_offset > j.eof:
            j.close()
            raise JournalError(p, f"header points past the journal's end ({size} bytes)")
        return j

    def entries(self, start: int, count: int) -> list[Entry]:
        """`count` entries from `start`, each checked (cookie, size, checksum)."""
        f = self._file()
        f.seek(start)
        out = []
        for _ in range(count):
            head = f.read(_ENTRY.size)
            if len(head) != _ENTRY.size:
                raise JournalError(self.path, "truncated entry")
            cookie, kind, size, offset, csum = _ENTRY.unpack(head)
            if cookie != ENTRY_COOKIE or not size or size % SECTOR_SIZE:
                raise JournalError(self.path, f"bad entry at {f.tell() - _ENTRY.size}")
            data = f.read(size)
            if len(data) != size or entry_checksum(head, data) != csum:
                raise JournalError(self.path, f"entry at {f.tell() - size - _ENTRY.size}: "
                                              "checksum does not match")
            out.append(Entry(kind, offset, data))
        return out

    @property
    def committed(self) -> bool:
        """Nothing to undo: the change completed (or never wrote a thing)."""
        return self.meta_entries == 0 and self.data_entries == 0

    # ---- commit and revert ----------------------------------------------------

    def commit(self) -> None:
        """vhd_journal_commit: the change is complete; nothing is left to undo."""
        self.data_entries = self.meta_entries = self.data_offset = self.meta_offset = 0
        self._write_header()
        self._file().truncate(HEADER_SIZE)
        self.sync()

    def revert(self) -> None:
        """vhd_journal_revert: every saved byte back where it was, the image cut to its
        old length (what a change appended goes), then durable."""
        metadata = self.entries(HEADER_SIZE, self.meta_entries)
        kinds = [e.kind for e in metadata]
        if not kinds or kinds[0] != FOOTER_P or \
                [k for k in kinds if k in METADATA_ORDER] != kinds or \
                kinds != sorted(kinds, key=METADATA_ORDER.index):
            raise JournalError(self.path, f"metadata entries out of order: {kinds}")
        data = self.entries(self.data_offset, self.data_entries) if self.data_entries else []
        end = self.footer_offset + vhd.FOOTER_SIZE
        with open(self.image, "r+b") as img:
            for e in metadata + data:
                if e.offset + len(e.data) > end:
                    raise JournalError(self.path, f"entry at image offset {e.offset} lies "
                                                  f"past the image's old end ({end})")
            for e in metadata + data:
                img.seek(e.offset)
                img.write(e.data)
            img.truncate(end)
            img.flush()
            os.fsync(img.fileno())

    def remove(self) -> None:
        """vhd_journal_remove: the image enabled again, the journal gone."""
        enable(self.image)
        self.close()
        self.path.unlink()


def create(image: str | os.PathLike[str], path: str | os.PathLike[str]) -> Journal:
    """vhd_journal_create: save the image's metadata, then disable the image."""
    p, img = Path(path), Path(image)
    layer = vhd.Layer.open(img)
    if layer.header is None:
        # libvhd's journal reads a BAT first: a fixed disk has none (EINVAL, as blktap).
        raise JournalError(p, "a fixed disk cannot be journaled")
    try:
        f = open(p, "x+b")  # noqa: SIM115 (the journal keeps it)
    except OSError as exc:
        raise JournalError(p, exc.strerror or str(exc), exc.errno or errno.EIO) from None
    j = Journal(p, img, uuid=layer.footer.uuid, footer_offset=layer.footer_offset, f=f)
    try:
        j._write_header()
        for kind, offset, size in metadata_regions(layer):
            with open(img, "rb") as src:
                src.seek(offset)
                j.add(kind, offset, src.read(size))
        j.data_offset = j.eof
        j._write_header()
        j.sync()
        disable(img, layer)
    except BaseException:
        j.close()
        p.unlink(missing_ok=True)
        raise
    return j


def has_batmap(footer: vhd.Footer) -> bool:
    """vhd_has_batmap for what we open: created by tapdisk, version 1.2 or later."""
    return footer.disk_type != vhd.DiskType.FIXED and footer.creator_app == b"tap\0" and \
        footer.creator_version >= 0x00010002


def metadata_regions(layer: vhd.Layer) -> list[tuple[int, int, int]]:
    """(entry type, offset, size) of what vhd_journal_add_metadata saves."""
    out = [(FOOTER_P, layer.footer_offset, vhd.FOOTER_SIZE)]
    h = layer.header
    if h is None:
        return out
    out += [(FOOTER_C, 0, vhd.FOOTER_SIZE),
            (HEADER, layer.footer.data_offset, vhd.HEADER_SIZE)]
    out += [(LOCATOR, loc.data_offset, loc.space_bytes) for loc in h.locators
            if loc.code != vhd.Platform.NONE]
    out.append((BAT, h.table_offset, layer.bat_bytes))
    if has_batmap(layer.footer):
        at = h.table_offset + layer.bat_bytes
        with open(layer.path, "rb") as f:
            f.seek(at)
            head = f.read(SECTOR_SIZE)
        boff, bsecs = struct.unpack_from(">QI", head, 8)
        out += [(BATMAP_H, at, SECTOR_SIZE), (BATMAP_M, boff, bsecs * SECTOR_SIZE)]
    return out


def _set_cookie(image: Path, cookie: bytes, footer_offset: int, dynamic: bool) -> None:
    with open(image, "r+b") as f:
        for at in (footer_offset, 0) if dynamic else (footer_offset,):
            f.seek(at)
            raw = bytearray(f.read(vhd.FOOTER_SIZE))
            raw[:8] = cookie
            struct.pack_into(">I", raw, 64, vhd.checksum(bytes(raw), 64))
            f.seek(at)
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())


def disable(image: Path, layer: vhd.Layer) -> None:
    """vhd_journal_disable_vhd: the poison cookie in both footers."""
    _set_cookie(image, vhd.POISON_COOKIE, layer.footer_offset, layer.header is not None)


def enable(image: Path) -> None:
    """vhd_journal_enable_vhd: a disabled image's footers get their cookie back."""
    size = image.stat().st_size
    with open(image, "rb") as f:
        f.seek(size - vhd.FOOTER_SIZE)
        end = f.read(vhd.FOOTER_SIZE)
        f.seek(0)
        copy = f.read(vhd.FOOTER_SIZE)
    if end[:8] != vhd.POISON_COOKIE:
        return
    _set_cookie(image, vhd.FOOTER_COOKIE, size - vhd.FOOTER_SIZE,
                copy[:8] == vhd.POISON_COOKIE)
