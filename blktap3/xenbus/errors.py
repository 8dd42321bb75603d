"""Typed XenStore errors: one exception class per error a caller must tell apart.

xenstored answers a failed request with an ERROR packet whose payload is an errno *name*
(`EACCES`, `ENOENT`, ...; the table is `xsd_errors` in xen/io/xs_wire.h). pyxs turns that
into a bare `PyXSError(errno, text)`; we turn it into a subclass of `XenStoreError` that
carries `.errno`, so callers write `except XenStoreNotFound` instead of comparing numbers.

`XenbusValueError` is the other family: a value read from XenStore that does not parse.
"""

from __future__ import annotations

import errno as _errno
import os


class XenStoreError(Exception):
    """A XenStore request failed; `errno` says why (0 when there is no errno)."""

    def __init__(self, errno: int, message: str = "", path: str | None = None) -> None:
        self.errno = errno
        self.path = path
        text = message or (os.strerror(errno) if errno else "XenStore error")
        name = _errno.errorcode.get(errno, str(errno)) if errno else ""
        where = f" ({path})" if path else ""
        super().__init__(f"{name}: {text}{where}" if name else f"{text}{where}")


class XenStoreNotFound(XenStoreError):
    """ENOENT: the node (or its parent, for a write) does not exist."""


class XenStorePermissionError(XenStoreError):
    """EACCES/EPERM: the connection's domain may not do this on this node."""


class XenStoreAgain(XenStoreError):
    """EAGAIN: a transaction conflicted with another writer; re-run it."""


class XenStoreExists(XenStoreError):
    """EEXIST: e.g. a watch with the same path and token is already registered."""


class XenStoreInvalid(XenStoreError, ValueError):
    """EINVAL: a bad path, value or argument (raised by xenstored or before sending)."""


class XenStoreQuota(XenStoreError):
    """ENOSPC/E2BIG/ENOMEM: a XenStore quota or size limit was hit."""


class XenStoreConnectionError(XenStoreError):
    """The connection to xenstored is lost (ECONNRESET) or could not be opened (the
    errno of the failed connect: ENOENT no socket, ECONNREFUSED nobody listening...)."""

    def __init__(self, message: str, errno: int = _errno.ECONNRESET) -> None:
        super().__init__(errno, message)


def os_errno_of(exc: BaseException) -> int | None:
    """The errno of the OSError inside `exc` (itself, its causes, or an (errno, text)
    pair in its arguments, as pyxs wraps a failed connect), else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        for arg in seen.args:
            if (isinstance(arg, tuple) and len(arg) == 2 and isinstance(arg[0], int)
                    and arg[0] in _errno.errorcode):
                return arg[0]
        seen = seen.__cause__ or seen.__context__
    return None


class XenStoreTimeout(XenStoreError):
    """No answer within the call's timeout (xenstored hung, or our reader thread died)."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.ETIMEDOUT, message)


class XenStoreTransactionConflict(XenStoreAgain):
    """A transaction still conflicted (EAGAIN) after the helper's last retry."""


_BY_ERRNO: dict[int, type[XenStoreError]] = {
    _errno.ENOENT: XenStoreNotFound,
    _errno.EACCES: XenStorePermissionError,
    _errno.EPERM: XenStorePermissionError,
    _errno.EAGAIN: XenStoreAgain,
    _errno.EEXIST: XenStoreExists,
    _errno.EINVAL: XenStoreInvalid,
    _errno.ENOSPC: XenStoreQuota,
    _errno.E2BIG: XenStoreQuota,
    _errno.ENOMEM: XenStoreQuota,
}


def error_for_errno(code: int, path: str | None = None) -> XenStoreError:
    """The typed exception for an errno number (`XenStoreError` for the rest)."""
    return _BY_ERRNO.get(code, XenStoreError)(code, path=path)


def error_from_wire(payload: bytes, path: str | None = None) -> XenStoreError:
    """The typed exception for an ERROR packet's payload (`b"EACCES\\0"`).

    An unknown name (a newer xenstored, or garbage) still gives a `XenStoreError`,
    with errno EIO and the name in the message, never a crash.
    """
    name = payload.split(b"\0", 1)[0].decode("ascii", errors="replace")
    code = getattr(_errno, name, None) if name.isupper() and name.startswith("E") else None
    if not isinstance(code, int):
        return XenStoreError(_errno.EIO, f"unknown XenStore error {name!r}", path)
    return error_for_errno(code, path)


class XenbusValueError(ValueError):
    """A value read from XenStore (typically written by an untrusted guest) is malformed.

    Names the key (a path or key name) and the offending value, so the back-end can
    publish a precise `error` node and close the device instead of crashing.
    """

    def __init__(self, key: str, value: str | None, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        if value is None:
            super().__init__(f"missing key {key}")
        else:
            super().__init__(f"bad value for {key}: {value[:64]!r}: {reason}")
