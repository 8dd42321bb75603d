"""XenStore error names on the wire map to typed exceptions carrying errno."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from blktap3.xenbus import (
    XenStoreAgain,
    XenStoreError,
    XenStoreExists,
    XenStoreInvalid,
    XenStoreNotFound,
    XenStorePermissionError,
    XenStoreQuota,
)
from blktap3.xenbus.errors import error_from_wire


@pytest.mark.parametrize(
    ("wire", "kind"),
    [(b"ENOENT\0", XenStoreNotFound), (b"EACCES\0", XenStorePermissionError),
     (b"EPERM\0", XenStorePermissionError), (b"EAGAIN\0", XenStoreAgain),
     (b"EEXIST\0", XenStoreExists), (b"EINVAL\0", XenStoreInvalid),
     (b"E2BIG\0", XenStoreQuota), (b"ENOSPC\0", XenStoreQuota)],
)
def test_known_errors_are_typed(wire: bytes, kind: type[XenStoreError]) -> None:
    error = error_from_wire(wire, "/p")
    assert type(error) is kind
    assert error.errno == getattr(errno, wire[:-1].decode())
    assert error.path == "/p"


def test_every_error_xs_wire_h_lists_gets_its_errno() -> None:
    header = Path("/usr/include/xen/io/xs_wire.h").read_text()
    names = re.findall(r"XSD_ERROR\((E\w+)\)", header)
    assert len(names) >= 15
    for name in names:
        assert error_from_wire(name.encode() + b"\0").errno == getattr(errno, name)


@pytest.mark.parametrize("wire", [b"EWHATEVER\0", b"\xff\xfe", b"", b"strerror", b"E\0"])
def test_unknown_or_garbage_errors_do_not_crash(wire: bytes) -> None:
    error = error_from_wire(wire)
    assert type(error) is XenStoreError
    assert error.errno == errno.EIO
