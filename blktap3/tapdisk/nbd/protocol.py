"""The NBD protocol as a codec with no I/O: greetings, option haggling, requests, replies.

What a VBD's NBD export speaks (doc/proto.md of NetworkBlockDevice/nbd): the fixed
newstyle handshake, and blktap's old-style greeting for clients handed over by fd
passing. `Negotiation` takes one option at a time and hands back the bytes to send and
what comes next (more options, transmission, or the end); `parse_request` and
`check_request` turn a request header into a `Request` and the NBD errno it deserves.
Nothing here reads a socket or a file (the h11 rule): `server.py` does, and the unit
tests feed this module hostile bytes directly.

A client that breaks the framing (bad magic, an option or a write payload too large to
skip) gets `ProtocolError`: the server drops it, because nothing after that point can be
parsed. Everything else a client may get wrong is answered with an NBD error and the
connection goes on.
"""

from __future__ import annotations

import enum
import errno
import functools
import struct
from dataclasses import dataclass

from blktap3.abi import SECTOR_SIZE

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
REP_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

MiB = 1 << 20
# Block sizes of INFO/GO (`NBD_INFO_BLOCK_SIZE`): the minimum is the image's sector
# size (O_DIRECT needs it), the maximum payload 32 MiB, the largest the spec says no
# client may call a denial of service. blktap advertises 1 / 4096 / 2 MiB.
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 * MiB
# Option data beyond this is not skipped but dropped: export names and metadata queries
# are strings of at most 4096 bytes, so an honest option is far smaller.
MAX_OPTION_DATA = 64 * 1024
# Options per connection before the server gives up on a client (blktap: 32).
MAX_OPTIONS = 64
# Descriptors in one BLOCK_STATUS reply (the spec's bound is 2^20; blktap answers
# at most 2 MiB of the export per request).
MAX_EXTENTS = 4096
# What LIST names (blktap's NBD_FIXED_SINGLE_EXPORT). Every name selects the one export,
# as in blktap ("we cheat outrageously"), so "" (qemu's and libnbd's default) works.
EXPORT_NAME = b"tapdisk_client"
BASE_ALLOCATION = b"base:allocation"
BASE_ALLOCATION_ID = 1  # blktap's context id

GREETING = struct.Struct(">QQH")
OLDSTYLE_GREETING = struct.Struct(">QQQI124x")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
ZEROES_AFTER_EXPORT_NAME = 124


class ProtocolError(ValueError):
    """The client broke the framing: the connection cannot go on."""


class HandshakeFlags(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlags(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlags(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR + 1
    ERR_POLICY = _REP_ERR + 2
    ERR_INVALID = _REP_ERR + 3
    ERR_PLATFORM = _REP_ERR + 4
    ERR_TLS_REQD = _REP_ERR + 5
    ERR_UNKNOWN = _REP_ERR + 6
    ERR_SHUTDOWN = _REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
    ERR_TOO_BIG = _REP_ERR + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlags(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1


class State(enum.IntFlag):
    """`base:allocation` status of an extent."""

    DATA = 0
    HOLE = 1 << 0
    ZERO = 1 << 1


class Errno(enum.IntEnum):
    """The error values NBD allows on the wire (a subset of Linux's errno numbers)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


_ERRNO_OF_OS = {
    errno.EPERM: Errno.EPERM, errno.EROFS: Errno.EPERM, errno.EACCES: Errno.EPERM,
    errno.ENOSPC: Errno.ENOSPC, errno.EDQUOT: Errno.ENOSPC, errno.EFBIG: Errno.ENOSPC,
    errno.EINVAL: Errno.EINVAL, errno.ENOMEM: Errno.ENOMEM,
    errno.EOVERFLOW: Errno.EOVERFLOW, errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(os_errno: int | None) -> Errno:
    """The NBD error for an OS errno (the spec maps EDQUOT/EFBIG to ENOSPC); EIO else."""
    return _ERRNO_OF_OS.get(os_errno or 0, Errno.EIO)


# -- the export as the handshake describes it --------------------------------------------


@dataclass(frozen=True)
class ExportInfo:
    """What a client is told about the export."""

    size: int
    readonly: bool
    can_trim: bool
    min_block: int = SECTOR_SIZE

    @functools.cached_property
    def flags(self) -> TransmissionFlags:
        """Transmission flags, only what is true. FLUSH is fdatasync of the image file,
        which covers writes of every connection (each answered after its write
        returned): hence CAN_MULTI_CONN."""
        f = TransmissionFlags.HAS_FLAGS | TransmissionFlags.SEND_FLUSH
        f |= TransmissionFlags.CAN_MULTI_CONN
        if self.readonly:
            return f | TransmissionFlags.READ_ONLY
        f |= TransmissionFlags.SEND_FUA | TransmissionFlags.SEND_WRITE_ZEROES
        if self.can_trim:
            f |= TransmissionFlags.SEND_TRIM
        return f


def newstyle_greeting() -> bytes:
    flags = HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES
    return GREETING.pack(NBDMAGIC, IHAVEOPT, int(flags))


def oldstyle_greeting(export: ExportInfo) -> bytes:
    """blktap's greeting on its old-style fd receiver: 152 bytes, then transmission.
    blktap sends flags 0; ours are the transmission flags (HAS_FLAGS set)."""
    return OLDSTYLE_GREETING.pack(NBDMAGIC, OLDSTYLE_MAGIC, export.size, int(export.flags))


def parse_client_flags(data: bytes) -> ClientFlags:
    """The client's 32-bit flags; unknown bits end the session (the spec's MUST)."""
    (value,) = CLIENT_FLAGS.unpack(data)
    # An int: ~ of an IntFlag keeps only the flag's own bits, and would hide the rest.
    known = int(ClientFlags.FIXED_NEWSTYLE | ClientFlags.NO_ZEROES)
    if value & ~known:
        raise ProtocolError(f"unknown client flags {value:#x}")
    return ClientFlags(value)


def parse_option_header(data: bytes) -> tuple[int, int]:
    """(option, data length) of an option header; bad magic or oversized data is fatal."""
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#x}")
    if length > MAX_OPTION_DATA:
        raise ProtocolError(f"option {option} carries {length} bytes (limit {MAX_OPTION_DATA})")
    return option, length


def option_reply(option: int, reply: Rep, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REP_MAGIC, option, int(reply), len(data)) + data


class Phase(enum.Enum):
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(frozen=True)
class Session:
    """What a connection agreed on for the transmission phase."""

    export: ExportInfo
    structured: bool = False
    base_allocation: bool = False


class _Malformed(Exception):
    """Option data that does not parse: answered NBD_REP_ERR_INVALID."""


class _Reader:
    """Reads big-endian fields from option data; running short is `_Malformed`."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise _Malformed(f"needs {n} more bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def string(self) -> bytes:
        return self.take(self.u32())

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _Malformed(f"{len(self.data) - self.pos} bytes of trailing data")


class Negotiation:
    """Option haggling of one fixed-newstyle connection: an option in, replies out.

    `handle` returns the bytes to send and the phase that follows. The session's
    settings (structured replies, `base:allocation`) accumulate here and are read by the
    server once `phase` is TRANSMISSION.
    """

    def __init__(self, export: ExportInfo, client_flags: ClientFlags) -> None:
        self.export = export
        self.no_zeroes = bool(client_flags & ClientFlags.NO_ZEROES)
        self.structured = False
        self.base_allocation = False
        self.options = 0
        self.phase = Phase.OPTIONS

    @property
    def session(self) -> Session:
        return Session(self.export, self.structured, self.base_allocation)

    def handle(self, option: int, data: bytes) -> bytes:
        """The reply to one option; `phase` says what comes next."""
        if self.phase is not Phase.OPTIONS:
            raise ProtocolError(f"option {option} after the handshake ended")
        self.options += 1
        if self.options > MAX_OPTIONS:
            raise ProtocolError(f"more than {MAX_OPTIONS} options")
        try:
            return self._handle(option, data)
        except _Malformed as exc:
            return option_reply(option, Rep.ERR_INVALID, f"malformed option: {exc}".encode())

    def _handle(self, option: int, data: bytes) -> bytes:
        if option == Opt.EXPORT_NAME:
            self.phase = Phase.TRANSMISSION
            reply = EXPORT_NAME_REPLY.pack(self.export.size, int(self.export.flags))
            return reply if self.no_zeroes else reply + bytes(ZEROES_AFTER_EXPORT_NAME)
        if option == Opt.ABORT:
            self.phase = Phase.CLOSED  # data, if any, is ignored (the spec's SHOULD)
            return option_reply(option, Rep.ACK)
        if option == Opt.LIST:
            if data:
                raise _Malformed("LIST takes no data")
            return (option_reply(option, Rep.SERVER, U32.pack(len(EXPORT_NAME)) + EXPORT_NAME)
                    + option_reply(option, Rep.ACK))
        if option in (Opt.INFO, Opt.GO):
            return self._info(option, data)
        if option == Opt.STRUCTURED_REPLY:
            if data:
                raise _Malformed("STRUCTURED_REPLY takes no data")
            self.structured = True
            return option_reply(option, Rep.ACK)
        if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            return self._meta_context(option, data)
        # STARTTLS (no TLS here, as in blktap), EXTENDED_HEADERS, anything unknown.
        return option_reply(option, Rep.ERR_UNSUP, b"not supported by this server")

    def _info(self, option: int, data: bytes) -> bytes:
        reader = _Reader(data)
        reader.string()  # any name is the one export
        for _ in range(reader.u16()):
            reader.u16()  # we always send EXPORT and BLOCK_SIZE, nothing else
        reader.end()
        export = self.export
        replies = [
            option_reply(option, Rep.INFO,
                         INFO_EXPORT.pack(Info.EXPORT, export.size, int(export.flags))),
            option_reply(option, Rep.INFO,
                         INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, export.min_block,
                                              max(PREFERRED_BLOCK, export.min_block),
                                              MAX_PAYLOAD)),
            option_reply(option, Rep.ACK),
        ]
        if option == Opt.GO:
            self.phase = Phase.TRANSMISSION
        return b"".join(replies)

    def _meta_context(self, option: int, data: bytes) -> bytes:
        listing = option == Opt.LIST_META_CONTEXT
        if not listing:
            self.base_allocation = False  # SET replaces the selection, even when it fails
        if not self.structured:
            return option_reply(option, Rep.ERR_INVALID,
                                b"negotiate structured replies first")
        reader = _Reader(data)
        reader.string()  # the export name: any name is the one export
        queries = [reader.string() for _ in range(reader.u32())]
        reader.end()
        if listing:
            found = not queries or any(q in (b"base:", BASE_ALLOCATION) for q in queries)
            context_id = 0  # reserved in LIST replies
        else:
            found = BASE_ALLOCATION in queries
            context_id = BASE_ALLOCATION_ID
            self.base_allocation = found
        replies = []
        if found:
            replies.append(option_reply(option, Rep.META_CONTEXT,
                                        U32.pack(context_id) + BASE_ALLOCATION))
        replies.append(option_reply(option, Rep.ACK))
        return b"".join(replies)


# -- transmission --------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def parse_request(data: bytes) -> Request:
    """A 28-byte request header; bad magic is fatal (the stream cannot be resynced)."""
    magic, flags, kind, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, kind, cookie, offset, length)


def write_payload(request: Request) -> int:
    """Bytes of payload that follow this request's header; a WRITE larger than the
    maximum payload is fatal (skipping up to 4 GiB is what a denial of service wants)."""
    if request.type != Cmd.WRITE:
        return 0
    if request.length > MAX_PAYLOAD:
        raise ProtocolError(f"WRITE of {request.length} bytes (maximum {MAX_PAYLOAD})")
    return request.length


# Checked once per request: plain ints (IntFlag arithmetic costs microseconds).
_ALLOWED_FLAGS = {
    Cmd.READ: 0,
    Cmd.WRITE: int(CmdFlags.FUA),
    Cmd.DISC: 0,
    Cmd.FLUSH: 0,
    Cmd.TRIM: int(CmdFlags.FUA),
    Cmd.WRITE_ZEROES: int(CmdFlags.FUA | CmdFlags.NO_HOLE),
    Cmd.BLOCK_STATUS: int(CmdFlags.REQ_ONE),
}
_CHANGES = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
_READ_ONLY = int(TransmissionFlags.READ_ONLY)
_SEND_TRIM = int(TransmissionFlags.SEND_TRIM)


@dataclass(frozen=True)
class Refusal:
    """An NBD error for a request, with the reason (sent with structured replies)."""

    error: Errno
    message: str


def check_request(request: Request, session: Session, size: int) -> Refusal | None:
    """Whether the request may run on an export of `size` bytes, else the error.

    `size` is the export's size now (a resize while paused may have grown it). The
    request's payload, if any, has been read by then whatever the answer.
    """
    try:
        cmd = Cmd(request.type)
    except ValueError:
        return Refusal(Errno.EINVAL, f"unknown command {request.type}")
    export = session.export
    flags = int(export.flags)
    allowed = _ALLOWED_FLAGS.get(cmd)
    if allowed is None:  # CACHE, RESIZE: not advertised
        return Refusal(Errno.EINVAL, f"{cmd.name} is not supported")
    if request.flags & ~allowed:
        return Refusal(Errno.EINVAL, f"flags {request.flags:#x} not allowed on {cmd.name}")
    if cmd in (Cmd.DISC, Cmd.FLUSH):
        return None
    if cmd in _CHANGES and flags & _READ_ONLY:
        return Refusal(Errno.EPERM, "the export is read-only")
    if cmd == Cmd.TRIM and not flags & _SEND_TRIM:
        return Refusal(Errno.EINVAL, "TRIM is not supported by this image")
    if cmd == Cmd.BLOCK_STATUS and not session.base_allocation:
        return Refusal(Errno.EINVAL, "no metadata context was negotiated")
    if request.length == 0:
        return Refusal(Errno.EINVAL, f"{cmd.name} of length 0")
    if cmd == Cmd.READ and request.length > MAX_PAYLOAD:
        return Refusal(Errno.EINVAL, f"READ of {request.length} bytes (maximum {MAX_PAYLOAD})")
    if request.end > size:
        error = Errno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
        return Refusal(error, f"{request.offset}+{request.length} is beyond the export's "
                              f"{size} bytes")
    if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) and (
        request.offset % export.min_block or request.length % export.min_block
    ):
        return Refusal(Errno.EINVAL, f"{cmd.name} not aligned to {export.min_block} bytes")
    return None


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, kind: ReplyType, payload_length: int, *, done: bool = True) -> bytes:
    """A structured reply chunk's header."""
    flags = REPLY_FLAG_DONE if done else 0
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, int(kind), cookie, payload_length)


def read_reply_header(cookie: int, offset: int, length: int, session: Session) -> bytes:
    """What precedes a READ's data: a simple reply, or one final OFFSET_DATA chunk."""
    if session.structured:
        return chunk(cookie, ReplyType.OFFSET_DATA, U64.size + length) + U64.pack(offset)
    return simple_reply(cookie)


def error_reply(cookie: int, refusal: Refusal, session: Session) -> bytes:
    """An error: an ERROR chunk with the reason under structured replies, else simple."""
    if not session.structured:
        return simple_reply(cookie, refusal.error)
    message = refusal.message.encode()[:4096]
    body = struct.pack(">IH", refusal.error, len(message)) + message
    return chunk(cookie, ReplyType.ERROR, len(body)) + body


def block_status_reply(cookie: int, extents: list[tuple[int, State]]) -> bytes:
    """One final BLOCK_STATUS chunk for `base:allocation`: (length, state) descriptors."""
    body = U32.pack(BASE_ALLOCATION_ID) + b"".join(
        struct.pack(">II", length, int(state)) for length, state in extents
    )
    return chunk(cookie, ReplyType.BLOCK_STATUS, len(body)) + body
