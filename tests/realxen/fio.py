"""fio for the rig's guest: Debian 12's own fio source, built once as a static program.

Debian's fio binary needs 84 MB of shared libraries (Ceph, GlusterFS, RDMA, PMEM, ICU)
for engines the guest never uses: too much for a 256 MiB guest's initramfs, and each MiB
costs boot time under emulation. So the source package (`apt-get source` from a deb-src
list of the rig's own) is configured without those engines and linked statically
(libaio and zlib from the host's -dev packages): one 3 MB file with the libaio,
io_uring and psync engines. Built once (about 2 min on a loaded 2-core machine) into the
rig's cache and reused; concurrent builders wait on a lock.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .aptsrc import PrivateApt
from .debs import cache_dir

DISABLE = ("numa", "rdma", "rados", "rbd", "http", "gfapi", "libnfs", "pmem", "native",
           "xnvme", "libzbc", "tcmalloc", "dfs", "lex")


def binary(cache: Path | None = None) -> Path:
    """The static fio, built from Debian's source if the cache has none yet."""
    base = (cache or cache_dir()) / "fio"
    base.mkdir(parents=True, exist_ok=True)
    with (base / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = sorted(base.glob("fio-*-static"))
        if built:
            return built[-1]
        return _build(base)


def _build(base: Path) -> Path:
    apt = PrivateApt(base / "apt", "bookworm", types="deb-src")
    scratch = Path(tempfile.mkdtemp(prefix="build-", dir=base))
    try:
        apt.run("source", "--download-only", "fio", cwd=scratch)
        (orig,) = (p for p in scratch.glob("fio_*.orig.tar.*") if p.suffix != ".asc")
        version = orig.name.split("_")[1].split(".orig")[0]
        with tarfile.open(orig) as tar:
            tar.extractall(scratch, filter="data")
        (src,) = (p for p in scratch.iterdir() if p.is_dir() and p.name.startswith("fio"))
        configure = ["./configure", "--build-static", *(f"--disable-{d}" for d in DISABLE)]
        for cmd in (configure, ["nice", "make", "-j2", "fio"]):
            done = subprocess.run(cmd, cwd=src, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"fio build: {' '.join(cmd)}:\n{done.stdout[-2000:]}"
                                   f"{done.stderr[-2000:]}")
        out = base / f"fio-{version}-static"
        partial = base / f"{out.name}.partial"
        subprocess.run(["strip", "-o", str(partial), str(src / "fio")], check=True)
        partial.rename(out)
        return out
    finally:
        shutil.rmtree(scratch)
