"""The Debian packages the real-Xen rig is built from: downloaded once, unpacked once.

`apt-get download` fetches them into a cache directory that is reused between runs
(`$BLKTAP3_REALXEN_CACHE`, default `/var/cache/blktap3-realxen` as root, else
`~/.cache/blktap3-realxen`); `dpkg -x` unpacks them all into one tree, `root/`, which
the initramfs builders pick files from. Nothing is installed on the host.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

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
    """The unpacked packages: `root` holds every file, `kver` names the kernel."""

    root: Path
    kver: str

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


def fetch(cache: Path | None = None) -> Unpacked:
    """Download what is missing, unpack into a tree keyed by the set of .deb files."""
    cache = cache or cache_dir()
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    kernel = kernel_package()
    missing = [p for p in (*PACKAGES, kernel) if not _have(debs, p)]
    if missing:
        # As root apt's sandbox user cannot write our cache: that is only a warning.
        subprocess.run(["apt-get", "download", "-q", *missing], cwd=debs, check=True,
                       stdout=subprocess.DEVNULL)
    files = sorted(
        sorted(debs.glob(f"{p}_*.deb"))[-1] for p in (*PACKAGES, kernel)
    )
    stamp = "\n".join(f.name for f in files)
    root = cache / "root"
    stamp_file = cache / "root.stamp"
    if not (stamp_file.exists() and stamp_file.read_text() == stamp):
        subprocess.run(["rm", "-rf", str(root)], check=True)
        root.mkdir()
        for deb in files:
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        stamp_file.write_text(stamp)
    kver = kernel.removeprefix("linux-image-")
    return Unpacked(root=root, kver=kver)
