"""Images as the data path sees them: the raw driver ("aio"/"raw"), VHD chains ("vhd",
validated by `vhdformat` before the C driver opens them) and the null driver."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any

from blktap3.abi import SECTOR_SIZE, VdiskInfo

from . import cbtlog, vhdformat
from ._datapath import ffi, lib
from ._errors import check

DRIVERS = ("aio", "raw", "vhd", "null")
ENGINES = {
    "auto": lib.TD_ENGINE_AUTO,
    "uring": lib.TD_ENGINE_URING,
    "sync": lib.TD_ENGINE_SYNC,
    "null": lib.TD_ENGINE_NULL,
}


@dataclass(frozen=True)
class ImageInfo:
    """What the back-end publishes: ``sectors`` are always 512-byte units."""

    sectors: int
    sector_size: int
    physical_sector_size: int
    info: int
    o_direct: bool
    discard: bool


class Image:
    """An open image; owned by one VBD, handed to ``Ring.connect`` / ``Ring.resume``."""

    def __init__(self, handle: Any, driver: str, path: str) -> None:
        self._handle = handle
        self.driver = driver
        self.path = path
        self.shared = False     # writes tracked (CBT) or mirrored: see set_log, set_mirror
        raw = lib.td_image_info(handle)
        self.info = ImageInfo(
            sectors=int(raw.sectors),
            sector_size=int(raw.sector_size),
            physical_sector_size=int(raw.physical_sector_size),
            info=int(raw.info),
            o_direct=bool(raw.o_direct),
            discard=bool(raw.discard),
        )

    @classmethod
    def open(
        cls, driver: str, path: str, *, readonly: bool = False, o_direct: bool = True
    ) -> Image:
        """Open ``path`` with ``driver``; O_DIRECT falls back cleanly (see ``info``)."""
        if driver not in DRIVERS:
            raise OSError(22, f"unknown image driver {driver!r}")
        out = ffi.new("struct td_image **")
        if driver == "vhd":
            _open_vhd(path, readonly, o_direct, out)
        else:
            rc = lib.td_image_open(driver.encode(), path.encode(), int(readonly),
                                   int(o_direct), out)
            check(rc, f"open {driver}:{path}")
        return cls(out[0], driver, path)

    @property
    def readonly(self) -> bool:
        return bool(self.info.info & VdiskInfo.READONLY)

    @property
    def handle(self) -> Any:
        """The C handle (for ``Ring``); raises once closed."""
        if self._handle is None:
            raise OSError(9, f"image {self.path} is closed")
        return self._handle

    def close(self) -> None:
        """Close the file; the caller makes sure no ring uses it any more."""
        if self._handle is not None:
            lib.td_image_close(self._handle)
            self._handle = None

    def read(self, sector: int, count: int, *, engine: str = "auto") -> bytes:
        """Read ``count`` sectors through an io engine (tools and tests; not the hot path)."""
        buf = _aligned(count * SECTOR_SIZE)
        check(
            lib.td_image_rw(self.handle, ENGINES[engine], 0, buf, sector, count),
            f"read {self.path}",
        )
        return bytes(ffi.buffer(buf, count * SECTOR_SIZE))

    def write(self, sector: int, data: bytes, *, engine: str = "auto") -> None:
        """Write whole sectors through an io engine (tools and tests; not the hot path)."""
        if len(data) % SECTOR_SIZE:
            raise OSError(22, "write length must be a multiple of 512")
        buf = _aligned(len(data))
        ffi.memmove(buf, data, len(data))
        check(
            lib.td_image_rw(self.handle, ENGINES[engine], 1, buf, sector, len(data) // SECTOR_SIZE),
            f"write {self.path}",
        )


    # -- shared with the NBD export, CBT and mirroring -------------------------------

    def pread_into(self, buf: Any, sector: int) -> None:
        """Read whole sectors into ``buf`` (page-aligned, writable) through the image the
        ring serves, under its lock: the NBD export of a VHD sees every block the ring
        allocated. The call releases the GIL."""
        n = len(buf) // SECTOR_SIZE
        check(lib.td_image_sync_io(self.handle, 0, ffi.from_buffer(buf, require_writable=True),
                                   sector, n), f"read {self.path}")

    def pwrite(self, buf: Any, sector: int) -> None:
        """Write whole sectors from ``buf`` as a guest's write goes: CBT-marked and
        mirrored."""
        if self.readonly:
            raise OSError(30, f"{self.path} is read-only")
        n = len(buf) // SECTOR_SIZE
        check(lib.td_image_sync_io(self.handle, 1, ffi.from_buffer(buf), sector, n),
              f"write {self.path}")

    def discard(self, sector: int, count: int) -> None:
        check(lib.td_image_discard(self.handle, sector, count), f"discard {self.path}")

    def flush(self) -> None:
        """The image, its CBT log and its secondary durable (a guest's FLUSH)."""
        check(lib.td_image_flush(self.handle), f"flush {self.path}")

    def set_log(self, path: str) -> None:
        """Track changed blocks in blktap's log at ``path`` (OSError if it cannot be
        this disk's: see ``cbtlog.check_for_disk``). Before the image is shared."""
        disk = self.info.sectors * SECTOR_SIZE
        cbtlog.check_for_disk(path, disk)
        nbits = -(-disk // cbtlog.BLOCK_SIZE)
        check(lib.td_image_set_log(self.handle, os.fsencode(path), cbtlog.HEADER.size, nbits),
              f"CBT log {path}")
        self.shared = True

    def set_mirror(self, secondary: Image) -> None:
        """Mirror writes to ``secondary`` (same size), which this image now owns."""
        if secondary.info.sectors != self.info.sectors:
            raise OSError(22, f"secondary {secondary.path} has {secondary.info.sectors} "
                          f"sectors, the image {self.info.sectors}")
        check(lib.td_image_set_mirror_image(self.handle, secondary.handle),
              f"mirror to {secondary.path}")
        secondary._handle = None    # closed with this image
        self.shared = True

    def set_mirror_nbd(self, fd: int) -> None:
        """Mirror writes to the NBD server on ``fd`` (handshake done), owned from now on."""
        try:
            check(lib.td_image_set_mirror_nbd(self.handle, fd), "mirror to NBD")
        except OSError:
            os.close(fd)
            raise
        self.shared = True

    def mirror_stats(self) -> dict[str, Any]:
        out = ffi.new("struct td_mirror_stats *")
        lib.td_image_mirror_stats(self.handle, out)
        kind = {lib.TD_MIRROR_NONE: None, lib.TD_MIRROR_IMAGE: "image",
                lib.TD_MIRROR_NBD: "nbd"}[out.kind]
        return {"kind": kind, "active": bool(out.active), "writes": int(out.writes),
                "flushes": int(out.flushes), "failed": int(out.failed),
                "last_error": int(out.last_error)}


def _open_vhd(path: str, readonly: bool, o_direct: bool, out: Any) -> None:
    """Validate the chain (VhdError says what is wrong), then hand its layout to C."""
    chain = vhdformat.open_chain(path)
    descs = ffi.new("struct td_vhd_layer_desc[]", len(chain))
    keep = []
    for d, layer in zip(descs, chain, strict=True):
        keep.append(ffi.new("char[]", os.fsencode(layer.path)))
        d.path = keep[-1]
        d.type = layer.footer.disk_type
        d.sectors = layer.sectors
        d.footer_offset = layer.footer_offset
        if layer.header is not None:
            d.block_size = layer.header.block_size
            d.max_entries = layer.header.max_table_entries
            d.bitmap_size = layer.bitmap_size
            d.table_offset = layer.header.table_offset
            d.data_start = layer.data_start
    rc = lib.td_image_open_vhd(descs, len(chain), int(readonly), int(o_direct), out)
    check(rc, f"open vhd:{path}")


def _aligned(size: int) -> Any:
    """A page-aligned buffer (O_DIRECT): an anonymous mmap seen through cffi."""
    return ffi.from_buffer(mmap.mmap(-1, max(size, SECTOR_SIZE)))
