"""The tapdisk control message: blktap's fixed-size binary record, encoded and decoded.

Layout (x86-64, `include/tapdisk-message.h` of blktap, 544 bytes, alignment 8):
`u16 type; u16 cookie;` four bytes of padding, then a 536-byte union at offset 8. Which
member of the union is meaningful depends on the message type (see `PAYLOAD_OF`).
Strings are NUL-terminated `char[256]`. Errors travel as positive errno.

This module does no I/O: it turns bytes into `Message` objects and back, and rejects
short, oversized or unknown messages with `ProtocolError`.

Extensions of ours (blktap has no such thing):
- `ResumeFlags.RESIZE` in `resume.flags` asks the VBD to accept an image that grew
  (``tap-ctl resize``). The bit lies above every open flag blktap defines.
- `u.image` (OPEN_RSP, DISK_INFO_RSP) carries two more u32 after blktap's
  `{u64 sectors @8; u32 sector_size @16; u32 info @20}`: `physical_sector_size` @24 and
  `flags` @28 (`ImageFlags.DISCARD`: the image can punch holes).  They lie inside the
  536-byte union, past the end of blktap's image struct, so blktap's fields keep their
  offsets; a blktap tapdisk leaves them zero (it clears the message), which reads as
  "not reported": physical = logical sector size, no discard.
- EXIT (30) has no reply id in blktap; our tapdisk answers an idle EXIT with an EXIT
  message (and an ERROR, EBUSY, while it still has VBDs).
- `u.blkif` (XENBLKIF_CONNECT) carries one more u32 after blktap's
  `poll_idle_threshold @320`: `max_indirect_segments` @324, the
  `feature-max-indirect-segments` the back-end advertised to this front-end, which the
  tapdisk enforces on every indirect request. blktap's libblktapctl clears the message,
  so from blktap's tapback it reads 0: not offered (blktap's tapback does not advertise
  indirect descriptors), and the tapdisk answers BLKIF_OP_INDIRECT with EOPNOTSUPP.
  Then `gref_hi[8]` @328: grant refs 8..15 of an order-4 ring (blktap's `gref[8]` holds a
  ring of order 3 at most; blkback and QEMU offer 4). blktap's tapback never asks order 4.
  Then `flags` @360 (`BlkifFlags`): what the back-end withheld from this front-end, so
  that blktap's zeroes mean blktap's behaviour (serve what the image can), and
  `PERSISTENT` (0x2): persistent grants negotiated (zero: grant copy, blktap's way).
  Then `queue` @364 and `nr_queues` @368 (multi-queue): a front-end that uses N queues
  gets one XENBLKIF_CONNECT per queue, queue 0 first, each naming its index and N and
  carrying that queue's ring refs and port in blktap's fields; DISCONNECT tears every
  queue down. blktap's zeroes read as queue 0 of 1: its single ring, unchanged.

Two things of blktap's wire that its header does not say:
- RESUME travels in `u.params`, not in `u.resume`: blktap's tap-ctl writes the flags, the
  new `type:/path` and the secondary at params' offsets (control/tap-ctl-unpause.c) and
  its tapdisk reads them there (drivers/tapdisk-control.c, resume_vbd). `Resume` packs
  that layout.
- OPEN and RESUME may be followed by more bytes on the same connection (`Trailer`): with
  ADD_LOG a `char[256]` log path, and with OPEN_ENCRYPTED (OPEN only) a u8 key length and
  the key (control/tap-ctl-ipc.c, tap_ctl_send_and_receive_ex).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from blktap3 import abi

MESSAGE_SIZE = 544
UNION_OFFSET = 8
UNION_SIZE = MESSAGE_SIZE - UNION_OFFSET
STRING_MAX = 256
MAX_MINORS = 63
MAX_GREFS = 8  # blktap's u.blkif.gref[8]: a ring of order 3
MAX_RING_GREFS = 16  # with ours, gref_hi[8] @328: a ring of order 4 (blkback's, QEMU's)
MAX_QUEUES = abi.MAX_QUEUES  # the most rings (queues) one VBD's CONNECTs may name
LIST_COOKIE = 0xFFFF  # blktap's tap-ctl sends LIST with cookie = (u16)-1
ALL_VBDS = 0xFFFF  # STATS with this cookie asks for every VBD (a JSON array)
NO_PARENT = -1  # params.prt_devnum when there is no parent minor to stack on
MAX_KEY = 128  # the longest key (bytes) blktap's tapdisk reads after OPEN_ENCRYPTED
# What our back-end advertises as `feature-max-indirect-segments` and hands its tapdisk
# in XENBLKIF_CONNECT: Linux blkback's value, 1 MiB per request (a Linux bio's 256
# pages). Measured with 1 MiB blocks at QD8: one request a block costs the tapdisk the
# least CPU per block and writes fastest; 32 or 11 segments a request cost more. The
# data path takes up to 4096 (8 indirect pages of 512).
DEFAULT_MAX_INDIRECT_SEGMENTS = 256

_HEADER = struct.Struct("<HH4x")


class ProtocolError(ValueError):
    """A message that does not follow the wire format (short, oversized, unknown type...)."""


class MessageType(enum.IntEnum):
    """Message ids, from 1 in blktap's order; each reply is its request + 1."""

    ERROR = 1
    RUNTIME_ERROR = 2
    PID = 3
    PID_RSP = 4
    ATTACH = 5
    ATTACH_RSP = 6
    OPEN = 7
    OPEN_RSP = 8
    PAUSE = 9
    PAUSE_RSP = 10
    RESUME = 11
    RESUME_RSP = 12
    CLOSE = 13
    CLOSE_RSP = 14
    DETACH = 15
    DETACH_RSP = 16
    LIST_MINORS = 17
    LIST_MINORS_RSP = 18
    LIST = 19
    LIST_RSP = 20
    STATS = 21
    STATS_RSP = 22
    FORCE_SHUTDOWN = 23
    XENBLKIF_CONNECT = 24
    XENBLKIF_CONNECT_RSP = 25
    XENBLKIF_DISCONNECT = 26
    XENBLKIF_DISCONNECT_RSP = 27
    DISK_INFO = 28
    DISK_INFO_RSP = 29
    EXIT = 30


class OpenFlags(enum.IntFlag):
    """`params.flags` of OPEN (and `resume.flags`), blktap's TAPDISK_MESSAGE_FLAG_*."""

    SHARED = 0x1
    RDONLY = 0x2
    ADD_CACHE = 0x4
    VHD_INDEX = 0x8
    ADD_LOG = 0x10
    ADD_LCACHE = 0x20
    REUSE_PRT = 0x40
    SECONDARY = 0x80
    STANDBY = 0x100
    NO_O_DIRECT = 0x200
    OPEN_ENCRYPTED = 0x400


class BlkifFlags(enum.IntFlag):
    """`blkif.flags`, our extension of XENBLKIF_CONNECT (zero from blktap's tapback)."""

    NONE = 0
    NO_DISCARD = 0x1  # the toolstack's discard-enable=0: DISCARD answered EOPNOTSUPP
    # Persistent grants negotiated (both ends wrote feature-persistent=1 at connect): map
    # each data grant once and keep it. Zero, as from blktap's tapback: grant copy.
    PERSISTENT = 0x2


class ImageFlags(enum.IntFlag):
    """`image.flags`, our extension of OPEN_RSP/DISK_INFO_RSP (zero from blktap)."""

    DISCARD = 0x1  # the image driver serves DISCARD (punches holes)


class ResumeFlags(enum.IntFlag):
    """Our extension of `resume.flags`: bits above blktap's open flags."""

    RESIZE = 0x10000


def pack_string(value: str, what: str = "string") -> bytes:
    """Encode `value` as a NUL-terminated `char[256]`; too long is a ProtocolError.
    Surrogate escapes (bytes that were not UTF-8 on the wire) go back as those bytes."""
    raw = value.encode(errors="surrogateescape")
    if len(raw) >= STRING_MAX:
        raise ProtocolError(f"{what} is {len(raw)} bytes, at most {STRING_MAX - 1} fit")
    if b"\0" in raw:
        raise ProtocolError(f"{what} contains a NUL byte")
    return raw.ljust(STRING_MAX, b"\0")


def unpack_string(raw: bytes) -> str:
    """Decode a `char[256]`: up to the first NUL, undecodable bytes escaped. One with no
    NUL is a ProtocolError: no C peer can send it (C reads it past its end), and a
    truncated path would name another file (found by tests/fuzz, target ctl)."""
    text, nul, _ = raw.partition(b"\0")
    if not nul:
        raise ProtocolError(f"a string of {len(raw)} bytes with no NUL terminator")
    return text.decode(errors="surrogateescape")


class Payload(Protocol):
    """One member of the message union."""

    def pack(self) -> bytes: ...


@dataclass(frozen=True)
class Empty:
    """No payload: the union is all zeros (PID, PAUSE, CLOSE, DETACH, LIST... requests)."""

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, union: bytes) -> Empty:
        return cls()


@dataclass(frozen=True)
class Pid:
    """`u.tapdisk_pid` (PID_RSP)."""

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<i")
    pid: int

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.pid)

    @classmethod
    def unpack(cls, union: bytes) -> Pid:
        return cls(*cls.FORMAT.unpack_from(union))


@dataclass(frozen=True)
class ImageInfo:
    """`u.image` (OPEN_RSP, DISK_INFO_RSP): size in sectors, sector size, VDISK_* info.

    `physical_sector_size` and `flags` are our extension (see the module docstring):
    0 means the tapdisk did not report them (a blktap tapdisk).
    """

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<QIIII")
    sectors: int
    sector_size: int
    info: int
    physical_sector_size: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.sectors, self.sector_size, self.info,
                                self.physical_sector_size, self.flags)

    @property
    def physical(self) -> int:
        """The physical sector size, the logical one when not reported."""
        return self.physical_sector_size or self.sector_size

    @property
    def discard(self) -> bool:
        return bool(self.flags & ImageFlags.DISCARD)

    @classmethod
    def unpack(cls, union: bytes) -> ImageInfo:
        return cls(*cls.FORMAT.unpack_from(union))


@dataclass(frozen=True)
class Params:
    """`u.params` (OPEN, ATTACH): open flags, minor, domid, `type:/path`, secondary...

    `prt_devnum` is a u32 in blktap's header but its tapdisk reads it as an int and
    stacks the image on the parent minor's NBD server whenever it is >= 0
    (drivers/tapdisk-image.c, tapdisk_image_open_chain): "no parent" is -1, what
    blktap's tap-ctl sends unless `-e` is given. It is packed signed.
    """

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<III256siH256s")
    flags: int = 0
    devnum: int = 0
    domid: int = 0
    path: str = ""
    prt_devnum: int = NO_PARENT
    req_timeout: int = 0
    secondary: str = ""

    def pack(self) -> bytes:
        return self.FORMAT.pack(
            self.flags,
            self.devnum,
            self.domid,
            pack_string(self.path, "path"),
            self.prt_devnum,
            self.req_timeout,
            pack_string(self.secondary, "secondary"),
        )

    @classmethod
    def unpack(cls, union: bytes) -> Params:
        flags, devnum, domid, path, prt, timeout, secondary = cls.FORMAT.unpack_from(union)
        return cls(
            flags, devnum, domid, unpack_string(path), prt, timeout, unpack_string(secondary)
        )


@dataclass(frozen=True)
class String:
    """`u.string`: a bare `char[256]`."""

    text: str

    def pack(self) -> bytes:
        return pack_string(self.text)

    @classmethod
    def unpack(cls, union: bytes) -> String:
        return cls(unpack_string(union[:STRING_MAX]))


@dataclass(frozen=True)
class Response:
    """`u.response`: positive errno (0 = success) and a message."""

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<i256s")
    error: int = 0
    message: str = ""

    def pack(self) -> bytes:
        # The server's detail text is best effort: truncate rather than fail the reply.
        raw = self.message.encode(errors="surrogateescape")[: STRING_MAX - 1]
        text = raw.decode(errors="surrogateescape")
        return self.FORMAT.pack(self.error, pack_string(text.replace("\0", " "), "message"))

    @classmethod
    def unpack(cls, union: bytes) -> Response:
        error, message = cls.FORMAT.unpack_from(union)
        # A peer's detail text is best effort, as on encoding: cut, never refused.
        text = message.partition(b"\0")[0][: STRING_MAX - 1]
        return cls(error, text.decode(errors="surrogateescape"))


@dataclass(frozen=True)
class Minors:
    """`u.minors` (LIST_MINORS_RSP): count, then up to 63 minors."""

    FORMAT: ClassVar[struct.Struct] = struct.Struct(f"<i{MAX_MINORS}i")
    minors: tuple[int, ...] = ()

    def pack(self) -> bytes:
        if len(self.minors) > MAX_MINORS:
            raise ProtocolError(f"{len(self.minors)} minors, at most {MAX_MINORS} fit")
        padded = list(self.minors) + [0] * (MAX_MINORS - len(self.minors))
        return self.FORMAT.pack(len(self.minors), *padded)

    @classmethod
    def unpack(cls, union: bytes) -> Minors:
        count, *minors = cls.FORMAT.unpack_from(union)
        if not 0 <= count <= MAX_MINORS:
            raise ProtocolError(f"LIST_MINORS count {count} out of range")
        return cls(tuple(minors[:count]))


@dataclass(frozen=True)
class ListEntry:
    """`u.list` (LIST_RSP): VBDs still to come (N..1, 0 ends), minor, state, `type:/path`."""

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<iii256s")
    count: int
    minor: int
    state: int
    path: str = ""

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.count, self.minor, self.state, pack_string(self.path))

    @classmethod
    def unpack(cls, union: bytes) -> ListEntry:
        count, minor, state, path = cls.FORMAT.unpack_from(union)
        return cls(count, minor, state, unpack_string(path))


@dataclass(frozen=True)
class StatInfo:
    """`u.info` (STATS_RSP): a header; `length` raw bytes of JSON follow on the stream."""

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<HH4xQ")
    type: int
    cookie: int
    length: int

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.type, self.cookie, self.length)

    @classmethod
    def unpack(cls, union: bytes) -> StatInfo:
        return cls(*cls.FORMAT.unpack_from(union))


@dataclass(frozen=True)
class Blkif:
    """`u.blkif` (XENBLKIF_CONNECT/DISCONNECT): the ring the front-end shared."""

    FORMAT: ClassVar[struct.Struct] = struct.Struct(
        f"<II{MAX_GREFS}III256sIIII{MAX_RING_GREFS - MAX_GREFS}IIII")
    domid: int
    devid: int
    grefs: tuple[int, ...] = ()
    order: int = 0
    proto: int = 0
    pool: str = ""
    port: int = 0
    poll_duration: int = 0
    poll_idle_threshold: int = 0
    max_indirect_segments: int = 0  # our extension (0: indirect requests not offered)
    flags: BlkifFlags = BlkifFlags.NONE  # our extension
    queue: int = 0  # our extension: which queue this message connects (0: the first)
    nr_queues: int = 0  # our extension: how many the front-end uses (0, as blktap's: 1)

    def pack(self) -> bytes:
        if len(self.grefs) > MAX_RING_GREFS:
            raise ProtocolError(f"{len(self.grefs)} grant refs, at most {MAX_RING_GREFS} fit")
        if not 0 <= self.queue < max(self.nr_queues, 1) or self.nr_queues > MAX_QUEUES:
            raise ProtocolError(f"queue {self.queue} of {self.nr_queues}: at most "
                                f"{MAX_QUEUES} queues, numbered from 0")
        grefs = list(self.grefs) + [0] * (MAX_RING_GREFS - len(self.grefs))
        return self.FORMAT.pack(
            self.domid,
            self.devid,
            *grefs[:MAX_GREFS],
            self.order,
            self.proto,
            pack_string(self.pool, "pool"),
            self.port,
            self.poll_duration,
            self.poll_idle_threshold,
            self.max_indirect_segments,
            *grefs[MAX_GREFS:],
            int(self.flags),
            self.queue,
            self.nr_queues,
        )

    @classmethod
    def unpack(cls, union: bytes) -> Blkif:
        values = cls.FORMAT.unpack_from(union)
        domid, devid = values[0], values[1]
        rest = 2 + MAX_GREFS + 7
        grefs = (*values[2 : 2 + MAX_GREFS], *values[rest:-3])
        order, proto, pool, port, duration, idle, indirect = values[2 + MAX_GREFS : rest]
        # The ring spans 2**order pages: only that many grant refs are meaningful.
        if 1 << min(order, 31) > MAX_RING_GREFS:
            raise ProtocolError(f"ring order {order} needs more than {MAX_RING_GREFS} grant refs")
        queue, nr_queues = values[-2], values[-1]
        if nr_queues > MAX_QUEUES or queue >= max(nr_queues, 1):
            raise ProtocolError(f"queue {queue} of {nr_queues}: at most {MAX_QUEUES} "
                                f"queues, numbered from 0")
        return cls(
            domid, devid, grefs[: 1 << order], order, proto, unpack_string(pool), port,
            duration, idle, indirect, BlkifFlags(values[-3]), queue, nr_queues,
        )

    @property
    def queues(self) -> int:
        """How many queues the front-end uses (blktap's zero: its one ring)."""
        return max(self.nr_queues, 1)


@dataclass(frozen=True)
class Resume:
    """RESUME's flags, optional new `type:/path` and secondary, at the offsets of
    `u.params` (flags @8, path @20, secondary @282) where blktap puts and reads them."""

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<I8x256s6x256s")
    flags: int = 0
    new_params: str = ""
    secondary: str = ""

    def pack(self) -> bytes:
        return self.FORMAT.pack(
            self.flags,
            pack_string(self.new_params, "new params"),
            pack_string(self.secondary, "secondary"),
        )

    @classmethod
    def unpack(cls, union: bytes) -> Resume:
        flags, new_params, secondary = cls.FORMAT.unpack_from(union)
        return cls(flags, unpack_string(new_params), unpack_string(secondary))


# Byte offsets of each union member's fields inside the 544-byte message, as measured
# against blktap's header (reference/blktap.md); tests compare them with a C layout.
OFFSETS: dict[str, int] = {
    "type": 0,
    "cookie": 2,
    "tapdisk_pid": 8,
    "image.sectors": 8,
    "image.sector_size": 16,
    "image.info": 20,
    "image.physical_sector_size": 24,  # our extension
    "image.flags": 28,  # our extension
    "params.flags": 8,
    "params.devnum": 12,
    "params.domid": 16,
    "params.path": 20,
    "params.prt_devnum": 276,
    "params.req_timeout": 280,
    "params.secondary": 282,
    "string.text": 8,
    "response.error": 8,
    "response.message": 12,
    "minors.count": 8,
    "minors.list": 12,
    "list.count": 8,
    "list.minor": 12,
    "list.state": 16,
    "list.path": 20,
    "info.type": 8,
    "info.cookie": 10,
    "info.length": 16,
    "blkif.domid": 8,
    "blkif.devid": 12,
    "blkif.gref": 16,
    "blkif.order": 48,
    "blkif.proto": 52,
    "blkif.pool": 56,
    "blkif.port": 312,
    "blkif.poll_duration": 316,
    "blkif.poll_idle_threshold": 320,
    "blkif.max_indirect_segments": 324,  # our extension
    "blkif.gref_hi": 328,  # our extension: grant refs 8..15 (order 4)
    "blkif.flags": 360,  # our extension: BlkifFlags
    "blkif.queue": 364,  # our extension: the queue this CONNECT is for
    "blkif.nr_queues": 368,  # our extension: how many queues (0: 1)
    # RESUME's fields sit where `u.params` has flags, path and secondary (see Resume).
    "resume.flags": 8,
    "resume.new_params": 20,
    "resume.secondary": 282,
}

PayloadClass = (
    type[Empty] | type[Pid] | type[ImageInfo] | type[Params] | type[String] | type[Response]
    | type[Minors] | type[ListEntry] | type[StatInfo] | type[Blkif] | type[Resume]
)

PAYLOAD_OF: dict[MessageType, PayloadClass] = {
    MessageType.ERROR: Response,
    MessageType.RUNTIME_ERROR: Response,
    MessageType.PID: Empty,
    MessageType.PID_RSP: Pid,
    MessageType.ATTACH: Params,
    MessageType.ATTACH_RSP: Response,
    MessageType.OPEN: Params,
    MessageType.OPEN_RSP: ImageInfo,
    MessageType.PAUSE: Empty,
    MessageType.PAUSE_RSP: Response,
    MessageType.RESUME: Resume,
    MessageType.RESUME_RSP: Response,
    MessageType.CLOSE: Empty,
    MessageType.CLOSE_RSP: Response,
    MessageType.DETACH: Empty,
    MessageType.DETACH_RSP: Response,
    MessageType.LIST_MINORS: Empty,
    MessageType.LIST_MINORS_RSP: Minors,
    MessageType.LIST: Empty,
    MessageType.LIST_RSP: ListEntry,
    MessageType.STATS: Empty,
    MessageType.STATS_RSP: StatInfo,
    MessageType.FORCE_SHUTDOWN: Empty,
    MessageType.XENBLKIF_CONNECT: Blkif,
    MessageType.XENBLKIF_CONNECT_RSP: Response,
    MessageType.XENBLKIF_DISCONNECT: Blkif,
    MessageType.XENBLKIF_DISCONNECT_RSP: Response,
    MessageType.DISK_INFO: Empty,
    MessageType.DISK_INFO_RSP: ImageInfo,
    MessageType.EXIT: Empty,
}


@dataclass(frozen=True)
class Trailer:
    """What a client sends after an OPEN or RESUME on the same connection, before it
    reads the reply: with ADD_LOG the changed-block log path as a `char[256]`, then with
    OPEN_ENCRYPTED (OPEN only) a u8 key length and the key. A tapdisk must read them
    whatever it answers, or the bytes would be taken for the next message."""

    logpath: str = ""
    key: bytes = b""

    @staticmethod
    def expected(request: Message) -> tuple[bool, bool]:
        """(a log path follows, a key follows) for this request."""
        if request.type not in (MessageType.OPEN, MessageType.RESUME):
            return False, False
        flags = request.payload.flags if isinstance(request.payload, Params | Resume) else 0
        return (bool(flags & OpenFlags.ADD_LOG),
                request.type is MessageType.OPEN and bool(flags & OpenFlags.OPEN_ENCRYPTED))

    def encode(self, request: Message) -> bytes:
        logpath, key = self.expected(request)
        data = pack_string(self.logpath, "log path") if logpath else b""
        if key:
            if not 0 < len(self.key) <= MAX_KEY:
                raise ProtocolError(f"a key of {len(self.key)} bytes: 1 to {MAX_KEY} fit")
            data += bytes([len(self.key)]) + self.key
        return data


# How blktap names each message in its debug output ("sending 'open' message").
NAMES: dict[MessageType, str] = {
    MessageType.ERROR: "error",
    MessageType.PID: "pid",
    MessageType.PID_RSP: "pid response",
    MessageType.OPEN: "open",
    MessageType.OPEN_RSP: "open response",
    MessageType.PAUSE: "pause",
    MessageType.PAUSE_RSP: "pause response",
    MessageType.RESUME: "resume",
    MessageType.RESUME_RSP: "resume response",
    MessageType.CLOSE: "close",
    MessageType.FORCE_SHUTDOWN: "force shutdown",
    MessageType.CLOSE_RSP: "close response",
    MessageType.ATTACH: "attach",
    MessageType.ATTACH_RSP: "attach response",
    MessageType.DETACH: "detach",
    MessageType.DETACH_RSP: "detach response",
    MessageType.LIST_MINORS: "list minors",
    MessageType.LIST_MINORS_RSP: "list minors response",
    MessageType.LIST: "list",
    MessageType.LIST_RSP: "list response",
    MessageType.STATS: "stats",
    MessageType.STATS_RSP: "stats response",
    MessageType.XENBLKIF_CONNECT: "sring connect",
    MessageType.XENBLKIF_CONNECT_RSP: "sring connect rsp",
    MessageType.XENBLKIF_DISCONNECT: "sring disconnect",
    MessageType.XENBLKIF_DISCONNECT_RSP: "sring disconnect rsp",
    MessageType.DISK_INFO: "disk info",
    MessageType.DISK_INFO_RSP: "disk info rsp",
    MessageType.EXIT: "exit",
}


def message_name(mtype: int) -> str:
    """blktap's name of a message type, "unknown" for others."""
    try:
        return NAMES.get(MessageType(mtype), "unknown")
    except ValueError:
        return "unknown"


@dataclass(frozen=True)
class Message:
    """One control message: its type, the cookie (the VBD's minor) and the union member."""

    type: MessageType
    cookie: int = 0
    payload: Payload = field(default_factory=Empty)

    def encode(self) -> bytes:
        """The 544 bytes on the wire."""
        if not 0 <= self.cookie <= 0xFFFF:
            raise ProtocolError(f"cookie {self.cookie} does not fit in 16 bits")
        expected = PAYLOAD_OF[self.type]
        if not isinstance(self.payload, expected):
            raise ProtocolError(
                f"{self.type.name} carries {expected.__name__}, "
                f"not {type(self.payload).__name__}"
            )
        try:
            union = self.payload.pack()
        except struct.error as exc:
            raise ProtocolError(f"{self.type.name}: {exc}") from exc
        return _HEADER.pack(self.type, self.cookie) + union.ljust(UNION_SIZE, b"\0")


def decode(data: bytes) -> Message:
    """Parse exactly one 544-byte message; anything else is a ProtocolError."""
    if len(data) < MESSAGE_SIZE:
        raise ProtocolError(f"short message: {len(data)} bytes, expected {MESSAGE_SIZE}")
    if len(data) > MESSAGE_SIZE:
        raise ProtocolError(f"oversized message: {len(data)} bytes, expected {MESSAGE_SIZE}")
    raw_type, cookie = _HEADER.unpack_from(data)
    try:
        mtype = MessageType(raw_type)
    except ValueError:
        raise ProtocolError(f"unknown message type {raw_type}") from None
    union = data[UNION_OFFSET:]
    return Message(mtype, cookie, PAYLOAD_OF[mtype].unpack(union))


def reply_type(request: MessageType) -> MessageType:
    """The reply id of a request id (request + 1); FORCE_SHUTDOWN is answered as CLOSE."""
    if request is MessageType.FORCE_SHUTDOWN:
        return MessageType.CLOSE_RSP
    try:
        rsp = MessageType(request + 1)
    except ValueError:
        rsp = None
    if rsp is None or not rsp.name.endswith("_RSP"):
        raise ProtocolError(f"{request.name} has no reply type")
    return rsp
