"""The rig's boot images: the Xen ELF, the guest's initramfs and dom0's initramfs.

dom0 carries the Xen tools and Xen's hotplug scripts, the guest's kernel and initramfs,
and, for the blktap3 mode, Debian's Python 3.11 with this project and its PyPI
dependencies (precompiled, see `pybundle`).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

from . import fio, pybundle
from .debs import Unpacked
from .initramfs import LIBDIR, Initramfs

SCRIPTS = Path(__file__).resolve().parent / "scripts"
ARCH_LIBS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")
SUPPORT = Path(__file__).resolve().parents[1] / "support"
GUEST_MODULES = ("crc32c_generic", "xen-blkfront", "ext4")
DOM0_MODULES = ("xen-evtchn", "xen-privcmd", "xenfs", "xen-gntdev", "xen-gntalloc",
                "loop", "brd", "xen-blkback", "crc32c_generic", "ext4")
XEN_PROGRAMS = ("xl", "xenstored", "xenconsoled", "xen-init-dom0", "libxl-save-helper")
# Xen 4.20's xentop reads vbd3 statistics (the trixie mode shows our VBD's counters).
XEN_PROGRAMS_4_20 = ("xentop",)
XENSTORE_TOOLS = ("read", "write", "ls", "list", "rm", "chmod", "exists", "watch")


def _first(root: Path, *candidates: str) -> Path:
    for c in candidates:
        if (root / c).exists():
            return root / c
    raise FileNotFoundError(f"none of {candidates} in {root}")


def _base(pkgs: Unpacked, modules: tuple[str, ...], dom0: bool = False) -> Initramfs:
    """busybox and modules; dom0's libraries are Xen's distribution's first."""
    image = (Initramfs(search_libs=pkgs.lib_dirs, loader=pkgs.loader) if dom0 else
             Initramfs(search_libs=[pkgs.root / d for d in ARCH_LIBS]))
    image.add_busybox(_first(pkgs.root, "bin/busybox", "usr/bin/busybox"))
    order = image.add_modules(pkgs.modules, modules)
    image.add_bytes("/modules/order", "\n".join(order).encode() + b"\n")
    return image


def xen_elf(pkgs: Unpacked, out: Path) -> Path:
    """Xen's gzipped multiboot image, unpacked: QEMU's -kernel boots the ELF."""
    src = next(iter(sorted((pkgs.xen_tree / "boot").glob(f"xen-{pkgs.xen}-amd64.gz"))))
    with gzip.open(src) as f, out.open("wb") as o:
        shutil.copyfileobj(f, o)
    return out


def guest(pkgs: Unpacked, out: Path) -> Path:
    image = _base(pkgs, GUEST_MODULES)
    image.add_file("/init", SCRIPTS / "guest-init.sh", 0o755)
    image.add_file("/usr/bin/fio", fio.binary(), 0o755)  # static: no libraries
    for prog in ("e2fsck", "mke2fs"):
        image.add_elf(f"/usr/sbin/{prog}", _first(pkgs.root, f"sbin/{prog}",
                                                   f"usr/sbin/{prog}"))
    image.write(out)
    return out


def dom0(pkgs: Unpacked, mode: str, guest_image: Path, out: Path, work: Path) -> Path:
    """dom0 for `mode` ("control" or "blktap3")."""
    root, xen_root = pkgs.root, pkgs.xen_tree
    xen_bin = f"usr/lib/xen-{pkgs.xen}/bin"
    image = _base(pkgs, DOM0_MODULES, dom0=True)
    image.add_file("/init", SCRIPTS / "dom0-init.sh", 0o755)
    image.add_elf("/usr/bin/bash", _first(root, "bin/bash", "usr/bin/bash"))
    image.add_symlink("/usr/bin/sh.bash", "bash")
    for prog in ("e2fsck", "mke2fs"):
        image.add_elf(f"/usr/sbin/{prog}", _first(root, f"sbin/{prog}", f"usr/sbin/{prog}"))
    image.add_elf("/usr/bin/flock", _first(root, "usr/bin/flock", "bin/flock"))
    programs = XEN_PROGRAMS + (XEN_PROGRAMS_4_20 if pkgs.xen == "4.20" else ())
    for prog in programs:
        image.add_elf(f"/{xen_bin}/{prog}", xen_root / xen_bin / prog)
    image.add_elf("/usr/bin/xenstore", xen_root / "usr/bin/xenstore")
    for tool in XENSTORE_TOOLS:
        image.add_symlink(f"/usr/bin/xenstore-{tool}", "xenstore")
    image.add_tree("/etc/xen/scripts", xen_root / "etc/xen/scripts")
    image.add_file("/etc/xen/guest.cfg", SCRIPTS / "guest.cfg")
    image.add_bytes("/etc/xen/xl.conf", b"")
    # glibc dlopens it for pthread_cancel: xl aborts without it.
    image.add_file(f"{LIBDIR}/libgcc_s.so.1", _first(
        xen_root, *(f"{d}/libgcc_s.so.1" for d in ARCH_LIBS)))
    image.add_tree("/etc/rig", SCRIPTS)
    # dom0's reader of a live VBD's NBD export (stdlib only; not our server's codec).
    image.add_file("/etc/rig/nbd_client.py", SUPPORT / "nbd.py")
    image.add_file("/boot/vmlinuz", pkgs.vmlinuz)
    image.add_file("/boot/guest.cpio", guest_image)
    for d in ("/var/lib/xen", "/var/log/xen", "/var/lib/xenstored"):
        image.add_dir(d)
    if mode == "blktap3":
        pybundle.add_to(image, pkgs, work)
    image.write(out)
    return out
