"""The NBD client of a mirror's `nbd:` secondary: connect, fixed-newstyle handshake, hand
the socket over to the data path (datapath/mirror.c speaks the transmission phase).

`nbd:PATH` names a Unix socket (qemu-nbd -k, another tapdisk's `nbd<pid>.<minor>`), or
`nbd:NAME` a connected socket handed over by name on `nbdclient<pid>` (`passed`), on
which the handshake is made as on one we connected.
The handshake is NBD_OPT_GO on the default export, no structured replies (so every
reply is a simple one). The target must be writable, take FLUSH and WRITE_ZEROES (a
mirrored discard), and be exactly the primary's size.
"""

from __future__ import annotations

import errno
import socket
import struct

from .protocol import (
    IHAVEOPT,
    NBDMAGIC,
    REP_MAGIC,
    ClientFlags,
    HandshakeFlags,
    Info,
    Opt,
    Rep,
    TransmissionFlags,
)

# A target that stops answering fails the mirror (it is then dropped) after this long.
IO_TIMEOUT = 30.0
_NEEDED = TransmissionFlags.SEND_FLUSH | TransmissionFlags.SEND_WRITE_ZEROES


def _recv(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError(errno.ECONNRESET, "the NBD target closed the connection")
        data += chunk
    return bytes(data)


def connect(path: str, size: int, *, timeout: float = IO_TIMEOUT) -> socket.socket:
    """A socket at the transmission phase of the export at `path`; OSError saying why
    not (ECONNREFUSED, EPROTO for a peer that is not a fixed-newstyle NBD server,
    EINVAL for a size other than `size`, EROFS...)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno or errno.EIO, f"NBD secondary {path}: {exc.strerror or exc}") \
            from None
    return start(sock, path, size, timeout=timeout)


def start(sock: socket.socket, label: str, size: int, *,
          timeout: float = IO_TIMEOUT) -> socket.socket:
    """The handshake on a connected socket (ours, or one passed by name); the socket is
    closed when it fails."""
    path = label
    try:
        sock.settimeout(timeout)
        _handshake(sock, path, size)
        sock.settimeout(None)
        # The data path blocks on the socket; the kernel's timeouts bound each call.
        tv = struct.pack("ll", int(timeout), 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno or errno.EIO, f"NBD secondary {path}: {exc.strerror or exc}") \
            from None
    return sock


def _handshake(sock: socket.socket, path: str, size: int) -> None:
    magic, opt_magic, flags = struct.unpack(">QQH", _recv(sock, 18))
    if magic != NBDMAGIC or opt_magic != IHAVEOPT or not flags & HandshakeFlags.FIXED_NEWSTYLE:
        raise OSError(errno.EPROTO, "not a fixed-newstyle NBD server")
    client = ClientFlags.FIXED_NEWSTYLE | (ClientFlags.NO_ZEROES
                                          if flags & HandshakeFlags.NO_ZEROES else 0)
    name = b""
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    sock.sendall(struct.pack(">I", int(client))
                 + struct.pack(">QII", IHAVEOPT, Opt.GO, len(data)) + data)
    export_size = export_flags = None
    while True:
        magic, option, reply, length = struct.unpack(">QIII", _recv(sock, 20))
        if magic != REP_MAGIC or option != Opt.GO:
            raise OSError(errno.EPROTO, "bad option reply")
        body = _recv(sock, length)
        if reply == Rep.ACK:
            break
        if reply == Rep.INFO and len(body) >= 12 and body[:2] == struct.pack(">H", Info.EXPORT):
            export_size, export_flags = struct.unpack(">QH", body[2:12])
            continue
        if reply & (1 << 31):
            raise OSError(errno.ENOENT, f"the server refused the export ({reply & 0xff}): "
                          f"{body.decode(errors='replace')}")
    if export_size is None or export_flags is None:
        raise OSError(errno.EPROTO, "the server did not tell the export's size")
    if export_flags & TransmissionFlags.READ_ONLY:
        raise OSError(errno.EROFS, "the export is read-only")
    if export_flags & _NEEDED != _NEEDED:
        raise OSError(errno.EOPNOTSUPP, "the export does not take FLUSH and WRITE_ZEROES")
    if export_size != size:
        raise OSError(errno.EINVAL, f"the export has {export_size} bytes, the image {size}")
