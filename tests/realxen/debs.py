"""The Debian packages the real-Xen rig is built from: downloaded once, unpacked once.

`apt-get download` fetches them into a cache directory that is reused between runs
(`$BLKTAP3_REALXEN_CACHE`, default `/var/cache/blktap3-realxen` as root, else
`~/.cache/blktap3-realxen`); `dpkg -x` unpacks them all into one tree, `root/`, which
the initramfs builders pick files from. Nothing is installed on the host.

Two distributions (`$BLKTAP3_REALXEN_DIST`): `bookworm` (Debian 12, Xen 4.17, the
default) and `trixie` (Debian 13, Xen 4.20, whose libxl makes vbd3 disks and whose
xentop reads their statistics). In the trixie mode only Xen and the libraries its tools
need (with trixie's glibc) come from trixie, fetched with an apt source list of the
rig's own into `trixie/root/`; the kernel, busybox, e2fsprogs and Python stay
bookworm's (they run on the newer glibc).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .aptsrc import PrivateApt

# Xen, its tools and libraries, the one kernel that serves as dom0 and guest, the
# static busybox of both initramfs, e2fsprogs for the guest's mkfs/fsck, bash for Xen's
# hotplug scripts, and Debian's Python 3.11 for the back-end in dom0.
PACKAGES = (
    "xen-hypervisor-4.17-amd64", "xen-utils-4.17", "xen-utils-common", "xenstore-utils",
    "libxencall1", "libxenevtchn1", "libxenforeignmemory1", "libxengnttab1",
    "libxenmisc4.17", "libxenstore4", "libxentoollog1", "libxendevicemodel1",
    "libxenhypfs1", "libxentoolcore1", "libyajl2", "liburing2",
    "busybox-static", "e2fsprogs", "bash", "util-linux", "libgcc-s1",
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11",
)
KERNEL_META = "linux-image-amd64"
# Debian 13's Xen and what its tools link (libxenmisc4.20: libxenlight, libxenguest,
# libxenstat; xentop: ncurses), with trixie's own glibc and libgcc.
TRIXIE_PACKAGES = (
    "xen-hypervisor-4.20-amd64", "xen-utils-4.20", "xen-utils-common", "xenstore-utils",
    "libxencall1", "libxenevtchn1", "libxenforeignmemory1", "libxengnttab1",
    "libxenmisc4.20", "libxenstore4", "libxentoollog1", "libxendevicemodel1",
    "libxenhypfs1", "libxentoolcore1", "libyajl2", "libc6", "libgcc-s1", "libext2fs2t64",
    "liblzma5", "libuuid1", "libzstd1", "zlib1g", "libncurses6", "libtinfo6",
)
DISTS = {"bookworm": "4.17", "trixie": "4.20"}  # distribution -> its Xen
LIBDIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")


def dist() -> str:
    """The distribution whose Xen the rig boots ($BLKTAP3_REALXEN_DIST, else bookworm)."""
    name = os.environ.get("BLKTAP3_REALXEN_DIST", "bookworm")
    if name not in DISTS:
        raise ValueError(f"BLKTAP3_REALXEN_DIST={name!r}: one of {', '.join(DISTS)}")
    return name


def cache_dir() -> Path:
    """Where downloads and unpacked trees live between runs."""
    override = os.environ.get("BLKTAP3_REALXEN_CACHE")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/cache/blktap3-realxen")
    return Path.home() / ".cache" / "blktap3-realxen"


@dataclass(frozen=True)
class Unpacked:
    """The unpacked packages: `root` holds bookworm's files, `kver` names the kernel;
    `xen_root` holds Xen `xen` and its tools (`root` itself in the bookworm mode), and
    `loader` is the dynamic loader their libraries are resolved with (None: the host's
    `ldd`, which cannot run programs built for a newer glibc)."""

    root: Path
    kver: str
    dist: str = "bookworm"
    xen: str = "4.17"
    xen_root: Path | None = None
    loader: Path | None = None

    @property
    def xen_tree(self) -> Path:
        return self.xen_root or self.root

    @property
    def lib_dirs(self) -> list[Path]:
        """Where dom0's libraries are looked up: Xen's tree first, then bookworm's."""
        trees = [self.xen_tree, self.root] if self.xen_root else [self.root]
        return [tree / d for tree in trees for d in LIBDIRS]

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.kver

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.kver}"


def kernel_package() -> str:
    """The versioned kernel package `linux-image-amd64` currently points at."""
    out = subprocess.run(
        ["apt-cache", "depends", KERNEL_META], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        dep = line.strip().removeprefix("Depends:").strip()
        if dep.startswith("linux-image-") and dep != KERNEL_META:
            return dep
    raise RuntimeError(f"apt-cache names no kernel for {KERNEL_META} (apt-get update?)")


def _have(debs: Path, package: str) -> bool:
    return any(debs.glob(f"{package}_*.deb"))


def fetch(cache: Path | None = None, distribution: str = "bookworm") -> Unpacked:
    """Download what is missing, unpack into a tree keyed by the set of .deb files."""
    cache = cache or cache_dir()
    kernel = kernel_package()

    def download(debs: Path, missing: list[str]) -> None:
        # As root apt's sandbox user cannot write our cache: that is only a warning.
        subprocess.run(["apt-get", "download", "-q", *missing], cwd=debs, check=True,
                       stdout=subprocess.DEVNULL)

    root = _unpacked(cache, (*PACKAGES, kernel), download)
    kver = kernel.removeprefix("linux-image-")
    if distribution == "bookworm":
        return Unpacked(root=root, kver=kver)
    apt = PrivateApt(cache / distribution / "apt", distribution)
    xen_root = _unpacked(cache / distribution, TRIXIE_PACKAGES,
                         lambda debs, missing: apt.run("download", *missing, cwd=debs))
    return Unpacked(root=root, kver=kver, dist=distribution, xen=DISTS[distribution],
                    xen_root=xen_root,
                    loader=xen_root / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")


def _unpacked(cache: Path, packages: tuple[str, ...],
              download: Callable[[Path, list[str]], object]) -> Path:
    """`cache`/root: the packages downloaded into `cache`/debs, unpacked."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not _have(debs, p)]
    if missing:
        download(debs, missing)
    files = sorted(sorted(debs.glob(f"{p}_*.deb"))[-1] for p in packages)
    stamp = "\n".join(f.name for f in files)
    root = cache / "root"
    stamp_file = cache / "root.stamp"
    if not (stamp_file.exists() and stamp_file.read_text() == stamp):
        subprocess.run(["rm", "-rf", str(root)], check=True)
        root.mkdir()
        for deb in files:
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        stamp_file.write_text(stamp)
    return root
