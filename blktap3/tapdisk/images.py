"""The tapdisk's one door to the data path: image `type:/path` parsing, open, ring connect.

Every use of `blktap3.datapath` by the tapdisk goes through this module, imported lazily,
so the control plane (ATTACH, DETACH, LIST, PID...) runs even where the data path is not
built; OPEN then fails with ENOSYS and says why. The Protocols below are the part of the
data path's facade (`Image`, `ImageInfo`, `Ring`) the tapdisk relies on.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from blktap3.abi import SECTOR_SIZE, BlkifProtocol, VdiskInfo
from blktap3.ctl.protocol import OpenFlags


class ImageInfo(Protocol):
    """What the tapdisk reads of `blktap3.datapath.ImageInfo`."""

    @property
    def sectors(self) -> int: ...

    @property
    def sector_size(self) -> int: ...

    @property
    def info(self) -> int: ...

    @property
    def physical_sector_size(self) -> int: ...

    @property
    def discard(self) -> bool: ...

    @property
    def o_direct(self) -> bool: ...  # the NBD export opens the file the same way


class Image(Protocol):
    """The part of `blktap3.datapath.Image` the tapdisk uses."""

    @property
    def info(self) -> ImageInfo: ...

    @property
    def shared(self) -> bool: ...  # writes tracked (CBT) or mirrored

    def close(self) -> None: ...

    def pread_into(self, buf: memoryview, sector: int) -> None: ...

    def pwrite(self, buf: memoryview, sector: int) -> None: ...

    def discard(self, sector: int, count: int) -> None: ...

    def flush(self) -> None: ...

    def set_log(self, path: str) -> None: ...

    def set_mirror(self, secondary: Any) -> None: ...

    def set_mirror_nbd(self, fd: int) -> None: ...

    def mirror_stats(self) -> dict[str, Any]: ...


class Ring(Protocol):
    """The part of `blktap3.datapath.Ring` the tapdisk uses."""

    def pause(self, timeout: float = 30.0) -> None: ...

    def resume(self, image: Any = None) -> None: ...

    def disconnect(self, timeout: float = 30.0) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def io_stats(self) -> dict[str, Any]: ...

    def set_req_timeout(self, seconds: int) -> None: ...


# Image types the data path serves now; blktap's others (ram, nbd, filters) later.
SUPPORTED_TYPES = ("aio", "raw", "vhd", "null")
# Open flags we honour; the rest name blktap features we do not have, refused loudly.
SUPPORTED_FLAGS = (OpenFlags.RDONLY | OpenFlags.NO_O_DIRECT | OpenFlags.SHARED
                   | OpenFlags.ADD_LOG | OpenFlags.SECONDARY)


@dataclass(frozen=True)
class ImageSpec:
    """A parsed `type:/path`."""

    type: str
    path: str

    def __str__(self) -> str:
        return f"{self.type}:{self.path}"


def parse_params(params: str) -> ImageSpec:
    """Split `type:/path` with blktap's errnos (drivers/tapdisk-disktype.c,
    tapdisk_disktype_parse_params): no colon is EINVAL, an unknown (or empty) type
    ENOENT; an empty path is ENOENT too, what opening "" gives."""
    kind, sep, path = params.partition(":")
    if not sep:
        raise OSError(errno.EINVAL, f"expected type:/path, got {params!r}")
    try:
        # The wire's bytes arrive surrogate-escaped; the data path takes UTF-8 only.
        params.encode()
    except UnicodeEncodeError:
        raise OSError(errno.EINVAL, f"image path is not valid UTF-8: {params!r}") from None
    if kind not in SUPPORTED_TYPES:
        raise OSError(
            errno.ENOENT,
            f"image type {kind!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})",
        )
    if not path:
        raise OSError(errno.ENOENT, f"{params!r} names no image")
    return ImageSpec(kind, path)


def check_flags(flags: int) -> None:
    """Refuse blktap's open/resume flags for features we do not have (EOPNOTSUPP);
    bits above 0xffff are ours (`ResumeFlags`)."""
    unsupported = OpenFlags(flags & ~SUPPORTED_FLAGS & 0xFFFF)
    if unsupported:
        raise OSError(errno.EOPNOTSUPP, f"open flags not supported: {unsupported!r}")


def _datapath() -> Any:
    try:
        import blktap3.datapath as datapath
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise OSError(errno.ENOSYS, f"data path unavailable: {exc}") from None
    if not hasattr(datapath, "Image"):
        raise OSError(errno.ENOSYS, "data path unavailable: blktap3.datapath has no Image")
    return datapath


def open_image(spec: ImageSpec, flags: int) -> Image:
    """Open the image; failures keep their errno (a missing file is ENOENT, as blktap's
    aio driver answers) and say which image."""
    check_flags(flags)
    datapath = _datapath()
    try:
        image: Image = datapath.Image.open(
            spec.type,
            spec.path,
            readonly=bool(flags & OpenFlags.RDONLY),
            o_direct=not flags & OpenFlags.NO_O_DIRECT,
        )
    except OSError as exc:
        raise OSError(exc.errno or errno.EIO, f"{spec}: {exc.strerror or exc}") from None
    return image


def add_tracking(image: Image, *, logpath: str = "", secondary: str = "",
                 passed: Callable[[str], int | None] = lambda _: None) -> None:
    """Give a just-opened image its changed-block log (`-C`) and its mirror (`-2`
    SECONDARY: `aio:`/`vhd:` image, `nbd:SOCKET`, or `nbd:NAME` of a socket `passed`
    gives by name); on any failure the image is closed and the OSError says which part
    failed: nothing stays half-opened."""
    try:
        if image.info.info & VdiskInfo.READONLY:  # nothing is written, nothing to track
            raise OSError(errno.EINVAL, "a read-only image has no writes to log or mirror")
        if logpath:
            image.set_log(logpath)
        if secondary:
            _add_secondary(image, secondary, passed)
    except BaseException:
        image.close()
        raise


def _add_secondary(image: Image, secondary: str,
                   passed: Callable[[str], int | None]) -> None:
    kind, sep, path = secondary.partition(":")
    if kind == "nbd" and sep and path:
        from .nbd import client  # only mirrors need it

        size = image.info.sectors * SECTOR_SIZE
        if path.startswith("/"):    # tap-ctl sends absolute paths only
            sock = client.connect(path, size)
        else:   # a name: the socket handed over on nbdclient<pid> (blktap's block-nbd.c)
            fd = passed(path)
            if fd is None:
                raise OSError(errno.ENOENT, f"NBD secondary {path}: no socket was passed "
                              "under that name")
            sock = client.start(socket.socket(fileno=fd), path, size)
        image.set_mirror_nbd(sock.detach())
        return
    try:
        spec = parse_params(secondary)
    except OSError as exc:
        raise OSError(exc.errno, f"secondary: {exc.strerror}") from None
    other = open_image(spec, 0)
    try:
        image.set_mirror(other)
    except BaseException:
        other.close()
        raise


def connect_ring(
    image: Image,
    *,
    domid: int,
    devid: int,
    grefs: tuple[int, ...],
    order: int,
    port: int,
    protocol: int,
    poll_us: int = 0,
    poll_idle_threshold: int = 0,
    max_indirect_segments: int = 0,
    discard: bool = True,
    persistent: bool = False,
) -> Ring:
    """Map the front-end's ring and start serving it (OSError with the reason if not).

    `poll_us` is XENBLKIF_CONNECT's `poll_duration` (blktap's: how long the ring spins
    for more requests before sleeping); 0 leaves the data path's default.
    `poll_idle_threshold` (blktap's, 0..100): spin only while that % of CPU is idle.
    `max_indirect_segments` is ours: the segments per indirect request the back-end
    offered (0: not offered); EINVAL beyond the data path's limit. `discard` False:
    the back-end withheld discard (DISCARD answered EOPNOTSUPP). `persistent`: persistent
    grants were negotiated with the front-end (data grants mapped once and kept).
    """
    datapath = _datapath()
    # blkif.proto on the wire is Xen's `enum blkif_protocol` (0 = unset: native).
    layout = BlkifProtocol.from_wire(protocol)
    if layout is None:
        raise OSError(errno.EINVAL, f"unknown blkif protocol {protocol}")
    try:
        ring: Ring = datapath.Ring.connect(
            image, domid=domid, devid=devid, grefs=list(grefs), order=order, port=port,
            protocol=layout, poll_us=poll_us or None,
            # A percentage: more than all of the CPU idle reads as "only when all is".
            poll_idle_threshold=min(poll_idle_threshold, 100),
            max_indirect_segments=max_indirect_segments, discard=discard,
            persistent=persistent,
        )
    except OSError as exc:
        raise OSError(
            exc.errno or errno.EIO, f"ring {domid}/{devid}: {exc.strerror or exc}"
        ) from None
    return ring
