"""Xen library calls for a Python process acting as a domain of the simulated machine.

ctypes over libxensim: event channels (the real xenevtchn_* calls plus
`claim` of the toolstack-allocated xenstore port, which in real Xen the guest
kernel already owns), grant sharing (xengntshr) and mapping of the domain's
own memory pages (the xenstore page by pfn). Each object names its run
directory and domain explicitly, so one process may act as several domains;
it drives one run directory at a time (see `xensim`).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select

from . import xensim
from .xensim import check, check_ptr

PathLike = str | os.PathLike[str]


class EventChannel:
    """An event-channel handle (/dev/xen/evtchn) of domain `domid`."""

    def __init__(self, run_dir: PathLike, domid: int) -> None:
        self._lib = xensim.use_dir(run_dir)
        self.domid = domid
        self._h: int | None = check_ptr(self._lib.xensim_evtchn_open_as(domid),
                                        "xenevtchn_open")

    def _handle(self) -> int:
        if self._h is None:
            raise ValueError("event channel handle is closed")
        return self._h

    @property
    def fd(self) -> int:
        """Readable when a port is pending (poll/epoll it)."""
        return int(self._lib.xenevtchn_fd(self._handle()))

    def bind_unbound_port(self, remote_domid: int) -> int:
        return check(self._lib.xenevtchn_bind_unbound_port(self._handle(), remote_domid),
                     "xenevtchn_bind_unbound_port")

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        return check(self._lib.xenevtchn_bind_interdomain(self._handle(), remote_domid,
                                                          remote_port),
                     "xenevtchn_bind_interdomain")

    def bind_virq(self, virq: int) -> int:
        return check(self._lib.xenevtchn_bind_virq(self._handle(), virq), "xenevtchn_bind_virq")

    def claim(self, port: int) -> None:
        """Take over a port the toolstack allocated in this domain (the xenstore port)."""
        check(self._lib.xensim_evtchn_claim(self._handle(), port), "xensim_evtchn_claim")

    def notify(self, port: int) -> None:
        check(self._lib.xenevtchn_notify(self._handle(), port), "xenevtchn_notify")

    def pending(self) -> int:
        """The next notified port (blocks until one is, as the real device does)."""
        return check(self._lib.xenevtchn_pending(self._handle()), "xenevtchn_pending")

    def unmask(self, port: int) -> None:
        check(self._lib.xenevtchn_unmask(self._handle(), port), "xenevtchn_unmask")

    def unbind(self, port: int) -> None:
        check(self._lib.xenevtchn_unbind(self._handle(), port), "xenevtchn_unbind")

    def wait(self, timeout: float | None = None) -> int | None:
        """The next notified port, unmasked again; None after `timeout` seconds."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return None
        port = self.pending()
        self.unmask(port)
        return port

    def close(self) -> None:
        if self._h is not None:
            self._lib.xenevtchn_close(self._h)
            self._h = None

    def __enter__(self) -> EventChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Share:
    """Pages of this domain granted to another domain (one xengntshr_share_pages call)."""

    def __init__(self, lib: ctypes.CDLL, handle: int, address: int, refs: list[int]) -> None:
        self._lib = lib
        self._handle = handle
        self.address = address
        self.refs = refs
        self.buffer: memoryview | None = memoryview(
            (ctypes.c_char * (len(refs) * xensim.PAGE_SIZE)).from_address(address)).cast("B")

    def unshare(self) -> None:
        if self.buffer is None:
            return
        self.buffer.release()
        self.buffer = None
        check(self._lib.xengntshr_unshare(self._handle, self.address, len(self.refs)),
              "xengntshr_unshare")


class GrantShare:
    """A grant-sharing handle (/dev/xen/gntalloc) of domain `domid`."""

    def __init__(self, run_dir: PathLike, domid: int) -> None:
        self._lib = xensim.use_dir(run_dir)
        self.domid = domid
        self._h: int | None = check_ptr(self._lib.xensim_gntshr_open_as(domid),
                                        "xengntshr_open")
        self._shares: list[Share] = []

    def share_pages(self, remote_domid: int, count: int, writable: bool = True) -> Share:
        if self._h is None:
            raise ValueError("grant share handle is closed")
        refs = (ctypes.c_uint32 * count)()
        address = check_ptr(self._lib.xengntshr_share_pages(self._h, remote_domid, count, refs,
                                                            int(writable)),
                            "xengntshr_share_pages")
        share = Share(self._lib, self._h, address, list(refs))
        self._shares.append(share)
        return share

    def end_access(self, ref: int) -> None:
        """End access to one grant of this handle's shares, as a guest's
        gnttab_end_foreign_access_ref: OSError EBUSY while the grantee maps it."""
        if self._h is None:
            raise ValueError("grant share handle is closed")
        check(self._lib.xensim_gntshr_end_access(self._h, ref), "xensim_gntshr_end_access")

    def close(self) -> None:
        if self._h is None:
            return
        for share in self._shares:
            share.unshare()
        self._lib.xengntshr_close(self._h)
        self._h = None

    def __enter__(self) -> GrantShare:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def map_own_pages(run_dir: PathLike, domid: int, pfn: int, count: int = 1) -> mmap.mmap:
    """Map `count` pages of domain `domid`'s own memory from `pfn`, writable and shared."""
    info = xensim.Machine(run_dir).domain(domid)
    if pfn < 0 or count < 1 or pfn + count > info.nr_pages:
        raise ValueError(f"pages {pfn}+{count} outside domain {domid}'s {info.nr_pages}")
    fd = os.open(info.mem_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        return mmap.mmap(fd, count * xensim.PAGE_SIZE, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE, offset=pfn * xensim.PAGE_SIZE)
    finally:
        os.close(fd)


def map_xenstore_page(run_dir: PathLike, domid: int) -> mmap.mmap:
    """The guest's xenstore ring page (the one the toolstack introduced)."""
    return map_own_pages(run_dir, domid, xensim.XENSTORE_PFN)


__all__ = ["EventChannel", "GrantShare", "Share", "map_own_pages", "map_xenstore_page"]
