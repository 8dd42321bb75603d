"""blktap's changed-block log (CBT): its file format, checked before the data path maps it.

The file (include/cbt-util.h, drivers/block-log.c in xapi-project/blktap v4.0.8) is
`struct cbt_log_metadata { uuid_t parent; uuid_t child; int consistent; uint64_t size; }`
(48 bytes on x86-64: 4 bytes of padding before `size`, little-endian), then one bit per
64 KiB block of a disk of `size` bytes: bit n is bit n % 8 of byte n / 8 (blktap's
set_bit on little-endian longs). blktap's tapdisk maps whatever file it is given; we
refuse at open a log that cannot be the one of this disk: missing, not writable, too
short for its own header, a `size` that does not cover the disk, or a `consistent`
flag other than 0 or 1 (a corrupt header).
"""

from __future__ import annotations

import errno
import os
import struct
import uuid
from dataclasses import dataclass

BLOCK_SIZE = 64 * 1024
HEADER = struct.Struct("<16s16si4xQ")
assert HEADER.size == 48


def bitmap_size(disk_bytes: int) -> int:
    """Bytes of the bitmap of a disk of `disk_bytes` (blktap's bitmap_size)."""
    return (-(-disk_bytes // BLOCK_SIZE) + 7) // 8


@dataclass(frozen=True)
class Metadata:
    parent: uuid.UUID
    child: uuid.UUID
    consistent: int
    size: int

    def pack(self) -> bytes:
        return HEADER.pack(self.parent.bytes, self.child.bytes, self.consistent, self.size)

    @classmethod
    def unpack(cls, data: bytes) -> Metadata:
        parent, child, consistent, size = HEADER.unpack_from(data)
        return cls(uuid.UUID(bytes=parent), uuid.UUID(bytes=child), consistent, size)


def create(path: str, size: int) -> None:
    """A new log for a disk of `size` bytes: null UUIDs, not consistent, no bit set
    (blktap's `cbt-util create`: fopen "w+", so an existing file is replaced)."""
    meta = Metadata(uuid.UUID(int=0), uuid.UUID(int=0), 0, size)
    with open(path, "wb") as f:
        f.write(meta.pack())
        f.write(bytes(bitmap_size(size)))


def read_metadata(path: str) -> Metadata:
    with open(path, "rb") as f:
        data = f.read(HEADER.size)
    if len(data) < HEADER.size:
        raise OSError(errno.EINVAL, f"CBT log {path}: {len(data)} bytes, shorter than its header")
    return Metadata.unpack(data)


def check_for_disk(path: str, disk_bytes: int) -> Metadata:
    """The log's metadata if it can track a disk of `disk_bytes` here, else an OSError
    saying why (its errno: ENOENT, EACCES/EROFS, EINVAL)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"CBT log {path}: {exc.strerror}") from None
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            raise OSError(errno.EROFS, f"CBT log {path}: read-only file system")
        st = os.fstat(fd)
        # A log nobody may write is refused even for root, who could open it anyway.
        if not st.st_mode & 0o222:
            raise OSError(errno.EACCES, f"CBT log {path}: the file is read-only")
        data = os.pread(fd, HEADER.size, 0)
        length = st.st_size
    finally:
        os.close(fd)
    if len(data) < HEADER.size:
        raise OSError(errno.EINVAL, f"CBT log {path}: {len(data)} bytes, shorter than its header")
    meta = Metadata.unpack(data)
    if meta.consistent not in (0, 1):
        raise OSError(errno.EINVAL,
                      f"CBT log {path}: corrupt header (consistent flag {meta.consistent})")
    if meta.size < disk_bytes:
        raise OSError(errno.EINVAL, f"CBT log {path}: made for {meta.size} bytes, "
                      f"the disk has {disk_bytes}")
    if length < HEADER.size + bitmap_size(meta.size):
        raise OSError(errno.EINVAL, f"CBT log {path}: {length} bytes, its header's size "
                      f"{meta.size} needs {HEADER.size + bitmap_size(meta.size)}")
    return meta


def blocks_set(bitmap: bytes) -> list[int]:
    """The numbers of the 64 KiB blocks whose bit is set."""
    return [i * 8 + b for i, byte in enumerate(bitmap) if byte for b in range(8)
            if byte >> b & 1]


def read_bitmap(path: str) -> bytes:
    meta = read_metadata(path)
    with open(path, "rb") as f:
        f.seek(HEADER.size)
        return f.read(bitmap_size(meta.size))
