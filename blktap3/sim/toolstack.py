"""The simulated toolstack: what libxl does in XenStore for a domain and a vbd3 disk.

Domains: memory and xenstore page from xensim, then XenStore INTRODUCE and the domain's
home directory, as libxl leaves them (`/local/domain/<domid>` owned by dom0, readable by
the guest; `device/` likewise, the guest's own device directories owned by the guest).

Disks: the back-end directory `backend/vbd3/<domid>/<devid>` (owner the back-end domain,
guest read) and the front-end directory `device/vbd/<devid>` (owner the guest, back-end
read), written in ONE transaction so that the guest's blkfront, which probes as soon as
its directory appears, always finds a readable back-end (see reference/real-xen.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from blktap3.xenbus import (
    BackendKey,
    FrontendKey,
    Permission,
    Transaction,
    VbdPaths,
    XenbusState,
    XenStore,
    owned_by,
)

from .xensim import DomainInfo, Machine

BACKEND_DOMID = 0
DOMID_MAX = 0x7FEF  # DOMID_FIRST_RESERVED - 1
IMAGE_DRIVERS = ("aio", "raw", "vhd")
XVD_MAJOR = 202


class ToolstackError(Exception):
    """A toolstack request that cannot be carried out (said in one line)."""


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def parse_domid(text: str) -> int:
    if not re.fullmatch(r"[1-9][0-9]{0,4}", text) or int(text) > DOMID_MAX:
        raise ToolstackError(f"bad domid {text!r}: a guest domid is 1..{DOMID_MAX}")
    return int(text)


def parse_devid(text: str) -> int:
    """`xvda`..`xvdz` (and `xvdaa`...) as Xen's virtual-device number, or a plain number."""
    if re.fullmatch(r"[0-9]{1,9}", text):
        return int(text)
    m = re.fullmatch(r"xvd([a-z]{1,2})", text)
    if not m:
        raise ToolstackError(f"bad device {text!r}: a number or xvd<letters> (e.g. xvda)")
    index = 0
    for ch in m.group(1):
        index = index * 26 + (ord(ch) - ord("a") + 1)
    index -= 1
    if index < 16:
        return (XVD_MAJOR << 8) | (index << 4)
    return (1 << 28) | (index << 8)  # the extended xvd scheme of xen-vbd-interface


def device_name(devid: int) -> str:
    """The guest-side name of a virtual-device number (inverse of `parse_devid`)."""
    if devid & (1 << 28):
        index = (devid >> 8) & 0xFFFFF
    elif devid >> 8 == XVD_MAJOR:
        index = (devid & 0xFF) >> 4
    else:
        return str(devid)
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return f"xvd{letters}"


@dataclass(frozen=True)
class Image:
    """A disk image named as tap-ctl names it: `driver:/absolute/path`."""

    driver: str
    path: Path

    @property
    def params(self) -> str:
        return f"{self.driver}:{self.path}"

    @classmethod
    def parse(cls, text: str, *, must_exist: bool = True) -> Image:
        driver, sep, path = text.partition(":")
        if not sep:
            driver, path = "aio", text
        if driver not in IMAGE_DRIVERS:
            raise ToolstackError(
                f"bad image {text!r}: driver {driver!r} is not one of {', '.join(IMAGE_DRIVERS)}")
        resolved = Path(path).resolve()
        if must_exist and not resolved.is_file():
            raise ToolstackError(f"bad image {text!r}: {resolved} is not a file")
        if must_exist and not os.access(resolved, os.R_OK):
            raise ToolstackError(f"bad image {text!r}: {resolved} is not readable")
        return cls(driver, resolved)


class Toolstack:
    """Creates and destroys simulated domains and their vbd3 disks, as libxl would."""

    def __init__(self, machine: Machine, xs: XenStore, backend_kind: str = "vbd3") -> None:
        self.machine = machine
        self.xs = xs
        self.backend_kind = backend_kind

    # -- domains ---------------------------------------------------------------------

    def create_domain(self, domid: int, memory_pages: int | None = None) -> DomainInfo:
        if domid in self.machine.domain_ids():
            raise ToolstackError(f"domain {domid} already exists")
        info = (self.machine.create_domain(domid) if memory_pages is None
                else self.machine.create_domain(domid, memory_pages))
        try:
            home = domain_path(domid)
            guest_reads = owned_by(BACKEND_DOMID, readers=[domid])

            def write_home(tx: Transaction) -> None:
                tx.write(home, "", guest_reads)
                tx.write(f"{home}/domid", str(domid), guest_reads)
                tx.write(f"{home}/name", f"guest{domid}", guest_reads)
                tx.write(f"{home}/device", "", guest_reads)
                tx.write(f"{home}/data", "", owned_by(domid))

            self.xs.transact(write_home)
            self.xs.introduce(domid, info.xenstore_mfn, info.xenstore_port)
        except BaseException:
            self.machine.destroy_domain(domid)
            raise
        return info

    def destroy_domain(self, domid: int) -> None:
        if domid not in self.machine.domain_ids():
            raise ToolstackError(f"no domain {domid}")
        if self.xs.is_domain_introduced(domid):
            self.xs.release(domid)
        self.xs.rm(f"{domain_path(BACKEND_DOMID)}/backend/{self.backend_kind}/{domid}")
        self.xs.rm(domain_path(domid))
        self.machine.destroy_domain(domid)

    # -- disks -----------------------------------------------------------------------

    def vbd_paths(self, domid: int, devid: int) -> VbdPaths:
        return VbdPaths(domid, devid, BACKEND_DOMID, self.backend_kind)

    def add_vbd(self, domid: int, devid: int, image: Image, *, mode: str = "w",
                cdrom: bool = False) -> VbdPaths:
        """Write the back-end and front-end directories of a new disk in one transaction."""
        if domid not in self.machine.domain_ids():
            raise ToolstackError(f"no domain {domid}")
        if mode not in ("r", "w"):
            raise ToolstackError(f"bad mode {mode!r}: r or w")
        paths = self.vbd_paths(domid, devid)
        device_type = "cdrom" if cdrom else "disk"
        backend_perms = owned_by(BACKEND_DOMID, readers=[domid])
        frontend_perms = owned_by(domid, readers=[BACKEND_DOMID])
        initialising = XenbusState.INITIALISING.wire()
        backend: dict[str, str] = {
            BackendKey.FRONTEND: paths.frontend,
            BackendKey.FRONTEND_ID: str(domid),
            BackendKey.ONLINE: "1",
            BackendKey.PARAMS: image.params,
            BackendKey.MODE: mode,
            BackendKey.TYPE: self.backend_kind,
            BackendKey.DEVICE_TYPE: device_type,
            "removable": "1" if cdrom else "0",
            "bootable": "1",
            "dev": device_name(devid),
            BackendKey.STATE: initialising,
        }
        frontend: dict[str, str] = {
            FrontendKey.BACKEND: paths.backend,
            FrontendKey.BACKEND_ID: str(BACKEND_DOMID),
            FrontendKey.VIRTUAL_DEVICE: str(devid),
            FrontendKey.DEVICE_TYPE: device_type,
            FrontendKey.STATE: initialising,
        }

        def write(tx: Transaction) -> None:
            if tx.exists(paths.backend) or tx.exists(paths.frontend):
                raise ToolstackError(f"domain {domid} already has device {devid}")
            _write_dir(tx, paths.backend, backend, backend_perms)
            _write_dir(tx, paths.frontend, frontend, frontend_perms)

        self.xs.transact(write)
        return paths

    def remove_vbd(self, domid: int, devid: int) -> None:
        """Take the disk away as libxl does at the end: both directories removed, and the
        domain's `backend/vbd3/<domid>` when it holds no other disk."""
        paths = self.vbd_paths(domid, devid)

        domain_dir = paths.backend.rsplit("/", 1)[0]

        def remove(tx: Transaction) -> None:
            tx.rm(paths.frontend)
            tx.rm(paths.backend)
            # Leave no empty per-domain directory behind (blktap's toolstack did).
            if tx.exists(domain_dir) and not tx.ls(domain_dir):
                tx.rm(domain_dir)

        self.xs.transact(remove)


def _write_dir(tx: Transaction, path: str, keys: Mapping[str, str],
               perms: list[Permission]) -> None:
    tx.write(path, "", perms)
    for key, value in keys.items():
        tx.write(f"{path}/{key}", value, perms)

