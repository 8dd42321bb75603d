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

from blktap3.vbd3.disk import (
    BACKEND_DOMID,
    BLOCK_TAP_SCRIPT,
    DOMID_MAX,
    IMAGE_DRIVERS,
    TOOLSTACKS,
    Image,
    ToolstackError,
    device_name,
    domain_path,
    parse_devid,
    parse_domid,
    remove_vbd_nodes,
    write_vbd_nodes,
)
from blktap3.xenbus import Transaction, VbdPaths, XenStore, owned_by

from .xensim import DomainInfo, Machine

__all__ = [
    "BACKEND_DOMID", "BLOCK_TAP_SCRIPT", "DOMID_MAX", "IMAGE_DRIVERS", "TOOLSTACKS", "Image",
    "Toolstack", "ToolstackError", "device_name", "domain_path", "parse_devid", "parse_domid",
]


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
                cdrom: bool = False, script: str | None = None,
                discard: bool | None = None) -> VbdPaths:
        """Write the back-end and front-end directories of a new disk in one transaction
        (`script`: libxl's hotplug script node, which libxl writes for vbd3 disks;
        `discard`: libxl's `discard-enable` ("1"/"0"), None leaves the key out)."""
        if domid not in self.machine.domain_ids():
            raise ToolstackError(f"no domain {domid}")
        paths = self.vbd_paths(domid, devid)
        self.xs.transact(lambda tx: write_vbd_nodes(tx, paths, image, mode=mode, cdrom=cdrom,
                                                    script=script, discard=discard))
        return paths

    def remove_vbd(self, domid: int, devid: int) -> None:
        """Take the disk away as libxl does at the end: both directories removed, and the
        domain's `backend/vbd3/<domid>` when it holds no other disk."""
        paths = self.vbd_paths(domid, devid)
        self.xs.transact(lambda tx: remove_vbd_nodes(tx, paths))
