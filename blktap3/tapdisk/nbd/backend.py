"""The image as the NBD export reaches it: its own descriptor on the VBD's file.

Coherence with the guest's ring: the C data path opened the same file with O_DIRECT
when the file system takes it (`ImageInfo.o_direct`); the export opens it the same way.
Two O_DIRECT descriptors both bypass the page cache, so a read on one sees every write
completed on the other; two buffered ones share the file's page cache, which is just as
coherent. FLUSH is fdatasync of the file: it makes durable what either side wrote.

Data moves with os.preadv/os.pwritev on the caller's (page-aligned) buffers, one system
call per request; holes come from SEEK_DATA/SEEK_HOLE, TRIM and WRITE_ZEROES from
fallocate(2). No Python runs per byte.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
from collections.abc import Callable
from typing import Protocol

from blktap3.abi import SECTOR_SIZE

from .protocol import MiB, State

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# WRITE_ZEROES that fallocate cannot do is written out, at most this much per request:
# beyond it the client gets EOVERFLOW (the spec's answer to a request too costly).
ZERO_WRITE_LIMIT = 32 * MiB
_ZERO_CHUNK = MiB

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); ctypes drops the GIL."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def write_zeroes(write: Callable[[memoryview, int], None], zeroes: mmap.mmap, offset: int,
                 length: int) -> None:
    """Zero [offset, offset+length) by writing `zeroes` (a page-aligned chunk of them)."""
    if length > ZERO_WRITE_LIMIT:
        raise OSError(errno.EOVERFLOW, f"cannot zero {length} bytes without fallocate")
    view = memoryview(zeroes)
    for start in range(offset, offset + length, len(zeroes)):
        write(view[:min(len(zeroes), offset + length - start)], start)


class Backend(Protocol):
    """What the export does to an image; offsets and lengths are checked by then."""

    size: int

    def read_into(self, buf: memoryview, offset: int) -> None: ...

    def write(self, buf: memoryview, offset: int, *, fua: bool) -> None: ...

    def flush(self) -> None: ...

    def trim(self, offset: int, length: int) -> None: ...

    def zero(self, offset: int, length: int, *, may_punch: bool) -> None: ...

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, State]]: ...

    def close(self) -> None: ...


class FileBackend:
    """A raw image (file or block device) on its own descriptor."""

    def __init__(self, path: str, *, size: int, readonly: bool, o_direct: bool,
                 can_punch: bool, block: int = SECTOR_SIZE) -> None:
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if o_direct:
            flags |= os.O_DIRECT
        self.fd = os.open(path, flags)
        try:
            mode = os.fstat(self.fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise OSError(errno.EINVAL, f"{path} is not a file or block device")
        except OSError:
            os.close(self.fd)
            raise
        self.path = path
        self.size = size
        self.block = block
        self.can_punch = can_punch
        self._zeroes: mmap.mmap | None = None

    def read_into(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:  # past the end of a file shorter than the export: zeroes
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    def write(self, buf: memoryview, offset: int, *, fua: bool) -> None:
        flags = os.RWF_DSYNC if fua else 0
        done = 0
        while done < len(buf):
            n = os.pwritev(self.fd, [buf[done:]], offset + done, flags)
            if n == 0:
                raise OSError(errno.EIO, "short write")
            done += n

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def trim(self, offset: int, length: int) -> None:
        """Punch the whole blocks inside the range (TRIM may discard less than asked)."""
        start = -(-offset // self.block) * self.block
        end = (offset + length) // self.block * self.block
        if end > start:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, end - start)

    def zero(self, offset: int, length: int, *, may_punch: bool) -> None:
        """Zero the range: a hole when allowed, else allocated zeroes (NO_HOLE)."""
        modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        if may_punch and self.can_punch:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        if self._zeroes is None:
            self._zeroes = mmap.mmap(-1, _ZERO_CHUNK)  # page-aligned, for O_DIRECT
        write_zeroes(lambda buf, at: self.write(buf, at, fua=False), self._zeroes,
                     offset, length)

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, State]]:
        """`base:allocation` of [offset, offset+length): holes read as zeroes, data as
        unknown. Boundaries fall on `block` multiples (a partly allocated block is
        data); a file system without SEEK_DATA reports everything as data."""
        end = offset + length
        out: list[tuple[int, State]] = []
        pos = offset
        while pos < end and len(out) < limit:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but a hole up to the end of file
                    data = end
                else:
                    out.append((end - pos, State.DATA))
                    break
            if data > pos:
                hole_end = min(end, data // self.block * self.block)
                if hole_end > pos:
                    out.append((hole_end - pos, State.HOLE | State.ZERO))
                    pos = hole_end
                    continue
            hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            data_end = -(-hole // self.block) * self.block
            if data_end <= pos:  # data starts inside pos's block: that block is data
                data_end = (pos // self.block + 1) * self.block
            data_end = min(end, data_end)
            out.append((data_end - pos, State.DATA))
            pos = data_end
        return _merged(out)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._zeroes is not None:
            self._zeroes.close()
            self._zeroes = None


class SharedImage(Protocol):
    """The part of the data path's `Image` the export shares with the ring."""

    def pread_into(self, buf: memoryview, sector: int) -> None: ...

    def pwrite(self, buf: memoryview, sector: int) -> None: ...

    def discard(self, sector: int, count: int) -> None: ...

    def flush(self) -> None: ...


class ImageBackend:
    """The export served through the very image object the ring serves (VHD, and raw
    with a CBT log or a mirror): one VHD metadata cache, one lock, and every write the
    export takes marked in the CBT log and mirrored as the guest's are.

    `raw` (a raw image's own descriptor) answers reads and `base:allocation`; without
    it (VHD) reads go through the image and every block is reported as data."""

    def __init__(self, image: SharedImage, *, size: int, raw: FileBackend | None = None,
                 block: int = SECTOR_SIZE) -> None:
        self.image = image
        self.size = size
        self.raw = raw
        self.block = block
        self._zeroes: mmap.mmap | None = None

    def read_into(self, buf: memoryview, offset: int) -> None:
        if self.raw is not None:
            self.raw.read_into(buf, offset)
        else:
            self.image.pread_into(buf, offset // SECTOR_SIZE)

    def write(self, buf: memoryview, offset: int, *, fua: bool) -> None:
        self.image.pwrite(buf, offset // SECTOR_SIZE)
        if fua:
            self.image.flush()

    def flush(self) -> None:
        self.image.flush()

    def trim(self, offset: int, length: int) -> None:
        start = -(-offset // self.block) * self.block
        end = (offset + length) // self.block * self.block
        if end > start:
            self.image.discard(start // SECTOR_SIZE, (end - start) // SECTOR_SIZE)

    def zero(self, offset: int, length: int, *, may_punch: bool) -> None:
        """Zeroes written through the image (so marked and mirrored like data)."""
        if self._zeroes is None:
            self._zeroes = mmap.mmap(-1, _ZERO_CHUNK)
        write_zeroes(lambda buf, at: self.image.pwrite(buf, at // SECTOR_SIZE), self._zeroes,
                     offset, length)

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, State]]:
        if self.raw is not None:
            return self.raw.extents(offset, length, limit)
        return [(length, State.DATA)]

    def close(self) -> None:
        """Lets go of what the export holds; the image stays the VBD's."""
        if self.raw is not None:
            self.raw.close()
        if self._zeroes is not None:
            self._zeroes.close()
            self._zeroes = None


class NullBackend:
    """The `null:` image: reads zeroes, writes vanish (a benchmark's device)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def read_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = bytes(len(buf))

    def write(self, buf: memoryview, offset: int, *, fua: bool) -> None:
        pass

    def flush(self) -> None:
        pass

    def trim(self, offset: int, length: int) -> None:
        pass

    def zero(self, offset: int, length: int, *, may_punch: bool) -> None:
        pass

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, State]]:
        return [(length, State.HOLE | State.ZERO)]

    def close(self) -> None:
        pass


def _merged(extents: list[tuple[int, State]]) -> list[tuple[int, State]]:
    """Neighbours with the same state as one extent (the spec's SHOULD)."""
    out: list[tuple[int, State]] = []
    for length, state in extents:
        if out and out[-1][1] == state:
            out[-1] = (out[-1][0] + length, state)
        else:
            out.append((length, state))
    return out
