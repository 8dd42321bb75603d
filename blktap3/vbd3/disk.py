"""A vbd3 disk as a toolstack describes it: names, the image, the nodes libxl writes.

Shared by the simulated toolstack (`blktap3.sim.toolstack`) and the real-host command
`blktap3-vbd3` (`blktap3.vbd3.cli`), so both write exactly the same directories:

- the back-end directory `backend/vbd3/<domid>/<devid>` (owner the back-end domain, the
  guest may read) with libxl's keys (tools/libs/light/libxl_disk.c: frontend,
  frontend-id, online, params, mode, type, device-type, removable, bootable, dev, state,
  and for libxl's order `script`);
- the front-end directory `device/vbd/<devid>` (owner the guest, the back-end may read):
  backend, backend-id, virtual-device, device-type, state;
both in ONE transaction, so that a blkfront, which probes as soon as its directory
appears, always finds a readable back-end (reference/real-xen.md).
"""

from __future__ import annotations

import argparse
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
    owned_by,
)


class ToolstackError(Exception):
    """A toolstack request that cannot be carried out (said in one line)."""


BACKEND_DOMID = 0
DOMID_MAX = 0x7FEF  # DOMID_FIRST_RESERVED - 1
IMAGE_DRIVERS = ("aio", "raw", "vhd")
XVD_MAJOR = 202
# What libxl (Xen >= 4.19) writes as `script` of a vbd3 disk: the hotplug script it runs
# (tools/libs/light/libxl_disk.c, LIBXL_DISK_BACKEND_TAP).
BLOCK_TAP_SCRIPT = "/etc/xen/scripts/block-tap"
TOOLSTACKS = ("xapi", "libxl")


def domid_argument(text: str) -> int:
    """`parse_domid` as an argparse type (its error in the usage message)."""
    try:
        return parse_domid(text)
    except ToolstackError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def devid_argument(text: str) -> int:
    """`parse_devid` as an argparse type."""
    try:
        return parse_devid(text)
    except ToolstackError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


def write_vbd_nodes(tx: Transaction, paths: VbdPaths, image: Image, *, mode: str = "w",
                    cdrom: bool = False, script: str | None = None,
                    discard: bool | None = None) -> None:
    """Write both directories of a new disk in `tx` (ToolstackError if either exists);
    `discard`: libxl's `discard-enable` ("1"/"0"), None leaves the key out."""
    if mode not in ("r", "w"):
        raise ToolstackError(f"bad mode {mode!r}: r or w")
    device_type = "cdrom" if cdrom else "disk"
    initialising = XenbusState.INITIALISING.wire()
    backend: dict[str, str] = {
        BackendKey.FRONTEND: paths.frontend,
        BackendKey.FRONTEND_ID: str(paths.domid),
        BackendKey.ONLINE: "1",
        BackendKey.PARAMS: image.params,
        BackendKey.MODE: mode,
        BackendKey.TYPE: paths.kind,
        BackendKey.DEVICE_TYPE: device_type,
        "removable": "1" if cdrom else "0",
        "bootable": "1",
        "dev": device_name(paths.devid),
        BackendKey.STATE: initialising,
    }
    if script is not None:
        backend["script"] = script
    if discard is not None:
        backend["discard-enable"] = "1" if discard else "0"
    frontend: dict[str, str] = {
        FrontendKey.BACKEND: paths.backend,
        FrontendKey.BACKEND_ID: str(paths.backend_domid),
        FrontendKey.VIRTUAL_DEVICE: str(paths.devid),
        FrontendKey.DEVICE_TYPE: device_type,
        FrontendKey.STATE: initialising,
    }
    if tx.exists(paths.backend) or tx.exists(paths.frontend):
        raise ToolstackError(f"domain {paths.domid} already has device {paths.devid}")
    _write_dir(tx, paths.backend, backend, owned_by(paths.backend_domid, readers=[paths.domid]))
    _write_dir(tx, paths.frontend, frontend, owned_by(paths.domid, readers=[paths.backend_domid]))


def remove_vbd_nodes(tx: Transaction, paths: VbdPaths) -> None:
    """Remove both directories of a disk in `tx`, and the domain's `backend/<kind>/<domid>`
    when it holds no other disk (blktap's toolstack left it behind)."""
    domain_dir = paths.backend.rsplit("/", 1)[0]
    tx.rm(paths.frontend)
    tx.rm(paths.backend)
    if tx.exists(domain_dir) and not tx.ls(domain_dir):
        tx.rm(domain_dir)


def _write_dir(tx: Transaction, path: str, keys: Mapping[str, str],
               perms: list[Permission]) -> None:
    tx.write(path, "", perms)
    for key, value in keys.items():
        tx.write(f"{path}/{key}", value, perms)

