"""Xen's ABI values, once: the one table of each that every room of blktap3 imports.

A leaf module: it imports nothing of ours and does no I/O, so the machines (`fsm`), the
XenStore layer, the control protocol, the data path's Python facade, tapdisk, tapback and
the simulated host all read the same numbers.  The C data path has its own spelling of the
two values it needs (`TD_PROTO_*` in `datapath/xenring.h`, Xen's `VDISK_*` in blkif.h); a
test checks them against this module through cffi, so they cannot drift either.

What lives here:
- `XenbusState`: `enum xenbus_state` of xen/include/public/io/xenbus.h;
- `BlkifProtocol`: the ring layouts of xen/include/public/io/protocols.h, each with its
  XenStore name (`protocol` key), its number in XENBLKIF_CONNECT (`enum blkif_protocol`,
  as blktap's tapdisk-message.h and Linux blkback carry it) which is also the C constant;
- `VdiskInfo`: the `info` bits of xen/include/public/io/blkif.h (VDISK_*);
- `SECTOR_SIZE`: blkif's sector, the unit of `sector_number` and `sectors` (512 bytes
  whatever `sector-size` says);
- `MAX_RING_PAGE_ORDER`: the largest multi-page ring (`max-ring-page-order`);
- `MAX_QUEUES`: the most queues (rings) of one VBD we serve (`multi-queue-max-queues`);
- `VbdStateBits`: blktap's TD_VBD_* word that `tap-ctl list` prints (tapdisk-vbd.h).
"""

from __future__ import annotations

import enum
from typing import Final

SECTOR_SIZE: Final = 512  # blkif.h: "sector_number" and "sectors" count 512-byte units
# The largest ring a front-end may share: 2^4 pages (XENBUS_MAX_RING_GRANT_ORDER of Linux's
# xen/xenbus.h, what blkback and QEMU offer). The C data path's TD_MAX_RING_ORDER is
# checked against it.
MAX_RING_PAGE_ORDER: Final = 4
# The most queues one VBD may use (multi-queue): a bound of ours on
# `multi-queue-max-queues`, whose default is blkback's, the online CPUs (xenblk_max_queues
# = num_online_cpus()), capped here. Linux blkfront asks min(that, its max_queues
# parameter, 4 by default, and the online CPUs).
MAX_QUEUES: Final = 16


class XenbusState(enum.IntEnum):
    """`enum xenbus_state`, io/xenbus.h."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8

    def wire(self) -> str:
        """The value written to a `state` node."""
        return str(int(self))

    @property
    def trigger_suffix(self) -> str:
        """The word used in trigger names: `frontend_initwait`, `backend_connected`..."""
        return self.name.lower().replace("_", "")

    @classmethod
    def from_wire(cls, raw: str) -> XenbusState | None:
        """A `state` node's value, strictly: only "0".."8" (no sign, space, leading 0)."""
        return _STATE_OF_WIRE.get(raw)


_STATE_OF_WIRE: Final = {s.wire(): s for s in XenbusState}


class BlkifProtocol(enum.IntEnum):
    """A ring layout: value = `enum blkif_protocol` (XENBLKIF_CONNECT, TD_PROTO_* in C).

    The front-end names it in its `protocol` key (io/protocols.h); a missing key means
    the back-end's native layout (blkif.h), which has no name of its own in XenStore
    (Linux blkback refuses the word "native" too).  On the wire of the control protocol
    0 means "not said" and is read as native, as blktap's tapdisk does.
    """

    NATIVE = 1
    X86_32 = 2
    X86_64 = 3

    @property
    def xenstore(self) -> str | None:
        """The `protocol` key's value (XEN_IO_PROTO_ABI_*); None: leave the key out."""
        return _XENSTORE_NAME.get(self)

    @classmethod
    def from_xenstore(cls, name: str | None) -> BlkifProtocol | None:
        """The layout a `protocol` key names (None: key missing, native); None for a
        name Xen does not define."""
        return cls.NATIVE if name is None else _PROTOCOL_OF_NAME.get(name)

    @classmethod
    def from_wire(cls, number: int) -> BlkifProtocol | None:
        """The layout XENBLKIF_CONNECT's `proto` names (0: not said, native)."""
        return cls.NATIVE if number == 0 else _PROTOCOL_OF_NUMBER.get(number)


_XENSTORE_NAME: Final = {
    BlkifProtocol.X86_32: "x86_32-abi",
    BlkifProtocol.X86_64: "x86_64-abi",
}
_PROTOCOL_OF_NAME: Final = {name: p for p, name in _XENSTORE_NAME.items()}
_PROTOCOL_OF_NUMBER: Final = {int(p): p for p in BlkifProtocol}


class VdiskInfo(enum.IntFlag):
    """The `info` key's bits, io/blkif.h (VDISK_*)."""

    CDROM = 0x1
    REMOVABLE = 0x2
    READONLY = 0x4


class BlkifOp(enum.IntEnum):
    """A request's `operation`, io/blkif.h (BLKIF_OP_*)."""

    READ = 0
    WRITE = 1
    WRITE_BARRIER = 2
    FLUSH_DISKCACHE = 3
    DISCARD = 5
    INDIRECT = 6


class BlkifStatus(enum.IntEnum):
    """A response's `status`, io/blkif.h (BLKIF_RSP_*)."""

    OKAY = 0
    ERROR = -1
    EOPNOTSUPP = -2


class VbdStateBits(enum.IntFlag):
    """blktap's TD_VBD_* state word of a VBD (tapdisk-vbd.h), as LIST reports it."""

    DEAD = 0x1
    CLOSED = 0x2
    QUIESCE_REQUESTED = 0x4
    QUIESCED = 0x8
    PAUSE_REQUESTED = 0x10
    PAUSED = 0x20
    SHUTDOWN_REQUESTED = 0x40
    LOCKING = 0x80
    LOG_DROPPED = 0x100
    RESUME_FAILED = 0x200
