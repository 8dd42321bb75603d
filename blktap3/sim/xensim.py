"""xensim: build and load the simulated hypervisor library, and drive the machine.

`libxensim.so` (C sources in `csrc/xensim/`) stands in for libxenctrl,
libxenevtchn, libxengnttab and libxengntshr when preloaded into a real program
(xenstored, tapdisk, a C guest driver). Its state lives in a run directory so
that separate processes share one simulated machine; each process names its
domain with `XENSIM_DOMID`.

This module builds the library on demand (`library_path()`), gives the
environment for a process on the machine (`process_env()`), and offers the
toolstack's view (`Machine`: create and destroy domains), calling the one C
implementation of the tables through ctypes.

The library keeps one run directory per process: a Python process drives one
machine at a time (each call re-selects the run directory of its `Machine`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = _PACKAGE_DIR / "csrc" / "xensim"
BUILD_DIR = _PACKAGE_DIR / "_build"

PAGE_SIZE = 4096
#: pfn of every created domain's xenstore page (XENSIM_XENSTORE_PFN in C).
XENSTORE_PFN = 1
#: the grant ref toolstacks reserve for the xenstore page (GNTTAB_RESERVED_XENSTORE).
GNTTAB_RESERVED_XENSTORE = 1
#: the global virtual interrupt fired when a domain dies (xen/xen.h).
VIRQ_DOM_EXC = 3
DEFAULT_DOMAIN_PAGES = 1024
DOM0_PAGES = 256

_CFLAGS = ["-O2", "-g", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
           "-fvisibility=hidden", "-pthread"]
_SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]


class XensimError(RuntimeError):
    """The library could not be built or the machine is not set up."""


def _sources() -> list[Path]:
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".c", ".h"))


def _is_stale(target: Path) -> bool:
    if not target.exists():
        return True
    built = target.stat().st_mtime
    return any(src.stat().st_mtime > built for src in _sources())


def build_dir() -> Path:
    """Where the library is built: beside its sources when we may write there (a
    checkout, or an install made by whoever runs it), else this user's cache
    ($XDG_CACHE_HOME/blktap3, ~/.cache/blktap3): a user who cannot write into root's
    site-packages still gets a library of their own."""
    if os.access(BUILD_DIR if BUILD_DIR.is_dir() else _PACKAGE_DIR, os.W_OK | os.X_OK):
        return BUILD_DIR
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "blktap3" / "xensim"


def library_path(sanitize: bool = False) -> Path:
    """The path of libxensim.so (ASan+UBSan variant if `sanitize`), built if needed.

    Builds go to a temporary file renamed into place under a lock, so that
    concurrent test processes never load a half-written library.
    """
    name = "libxensim-asan.so" if sanitize else "libxensim.so"
    if not _is_stale(BUILD_DIR / name):
        return BUILD_DIR / name  # built already (by root, or at install): anyone loads it
    directory = build_dir()
    target = directory / name
    if not _is_stale(target):
        return target
    # Every user may load what root built (the library is preloaded into their programs).
    directory.mkdir(mode=0o755, parents=directory != BUILD_DIR, exist_ok=True)
    # The build directory ignores itself (lock file, temporaries) for git.
    ignore = directory / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_stale(target):
            _compile(target, sanitize)
    return target


def _compile(target: Path, sanitize: bool) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    flags = _CFLAGS + (_SANITIZE_FLAGS if sanitize else [])
    sources = [str(p) for p in _sources() if p.suffix == ".c"]
    cmd = ["gcc", *flags, "-o", tmp, *sources, "-ldl"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        os.unlink(tmp)
        raise XensimError(f"building {target.name} failed:\n{result.stderr}")
    os.chmod(tmp, 0o755)  # mkstemp made it 0600: only its builder could have loaded it
    os.replace(tmp, target)


def sanitizer_runtime() -> list[Path]:
    """The ASan/UBSan runtimes to put first in LD_PRELOAD for the sanitized build."""
    paths = []
    for name in ("libasan.so", "libubsan.so"):
        out = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True,
                             text=True, check=True).stdout.strip()
        paths.append(Path(out).resolve())
    return paths


def process_env(run_dir: str | os.PathLike[str], domid: int = 0,
                sanitize: bool = False) -> dict[str, str]:
    """Variables to add to a process's environment to run it as `domid` on the machine.

    Returns only LD_PRELOAD, XENSIM_DIR and XENSIM_DOMID: merge them into a
    full environment (`{**os.environ, **process_env(...)}`).
    """
    preload = [str(library_path(sanitize))]
    if sanitize:
        preload = [str(p) for p in sanitizer_runtime()] + preload
    return {
        "LD_PRELOAD": " ".join(preload),
        "XENSIM_DIR": str(Path(run_dir).resolve()),
        "XENSIM_DOMID": str(domid),
    }


class _DomainInfoC(ctypes.Structure):
    _fields_ = [
        ("domid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("nr_pages", ctypes.c_uint64),
        ("xenstore_pfn", ctypes.c_uint64),
        ("xenstore_port", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("mem_path", ctypes.c_char * 512),
    ]


_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    """libxensim loaded into this process (for the toolstack and Python guests)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL(str(library_path()), use_errno=True)
            _declare(lib)
            _lib = lib
        return _lib


def _declare(lib: ctypes.CDLL) -> None:
    u32, u64, vp, i = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int
    protos: dict[str, tuple[type | None, list[type]]] = {
        "xensim_use_dir": (i, [ctypes.c_char_p]),
        "xensim_machine_init": (i, []),
        "xensim_domain_create": (i, [u32, u64, ctypes.POINTER(u32)]),
        "xensim_domain_destroy": (i, [u32]),
        "xensim_domain_info": (i, [u32, ctypes.POINTER(_DomainInfoC)]),
        "xensim_domain_list": (i, [ctypes.POINTER(u32), u32]),
        "xensim_map_own_pages": (vp, [u32, u64, u32, i]),
        "xensim_unmap_pages": (i, [vp, u32]),
        "xensim_evtchn_open_as": (vp, [u32]),
        "xensim_evtchn_claim": (i, [vp, u32]),
        "xenevtchn_close": (i, [vp]),
        "xenevtchn_fd": (i, [vp]),
        "xenevtchn_notify": (i, [vp, u32]),
        "xenevtchn_bind_unbound_port": (i, [vp, u32]),
        "xenevtchn_bind_interdomain": (i, [vp, u32, u32]),
        "xenevtchn_bind_virq": (i, [vp, ctypes.c_uint]),
        "xenevtchn_unbind": (i, [vp, u32]),
        "xenevtchn_pending": (i, [vp]),
        "xenevtchn_unmask": (i, [vp, u32]),
        "xensim_gnttab_open_as": (vp, [u32]),
        "xensim_gntshr_open_as": (vp, [u32]),
        "xengnttab_close": (i, [vp]),
        "xengnttab_map_grant_ref": (vp, [vp, u32, u32, i]),
        "xengnttab_map_domain_grant_refs": (vp, [vp, u32, u32, ctypes.POINTER(u32), i]),
        "xengnttab_unmap": (i, [vp, vp, u32]),
        "xengnttab_grant_copy": (i, [vp, u32, vp]),
        "xengntshr_close": (i, [vp]),
        "xengntshr_share_pages": (vp, [vp, u32, i, ctypes.POINTER(u32), i]),
        "xengntshr_unshare": (i, [vp, vp, u32]),
        "xensim_gntshr_end_access": (i, [vp, u32]),
    }
    for name, (restype, argtypes) in protos.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


def check(result: int, what: str) -> int:
    """Turn a C -1 return into OSError with the library's errno."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def check_ptr(result: int | None, what: str) -> int:
    """Turn a C NULL return into OSError with the library's errno."""
    if not result:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def use_dir(run_dir: str | os.PathLike[str]) -> ctypes.CDLL:
    """The loaded library, pointed at `run_dir`."""
    lib = load()
    check(lib.xensim_use_dir(os.fsencode(Path(run_dir).resolve())), "xensim_use_dir")
    return lib


@dataclass(frozen=True)
class DomainInfo:
    """What XenStore INTRODUCE needs, and the domain's memory."""

    domid: int
    xenstore_mfn: int
    xenstore_port: int
    nr_pages: int = 0
    dying: bool = False
    mem_path: str = ""


class Machine:
    """The toolstack's side of a simulated machine kept in `run_dir`."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir).resolve()

    def _lib(self) -> ctypes.CDLL:
        return use_dir(self.run_dir)

    @property
    def exists(self) -> bool:
        return (self.run_dir / "machine").exists()

    def init(self, dom0_pages: int = DOM0_PAGES) -> DomainInfo:
        """Create the run directory's state and dom0 (idempotent); returns dom0.

        Dom0's xenstore port (unbound, for dom0 itself) is published in
        `xsd_port` and a zero `xsd_kva` page is written, where the redirected
        /proc/xen files of C xenstored and the oxenstored config point.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lib = self._lib()
        check(lib.xensim_machine_init(), "xensim_machine_init")
        if 0 not in self.domain_ids():
            self.create_domain(0, dom0_pages)
        dom0 = self.domain(0)
        # oxenstored parses xsd_port strictly: no trailing newline.
        (self.run_dir / "xsd_port").write_text(str(dom0.xenstore_port))
        kva = self.run_dir / "xsd_kva"
        if not kva.exists():
            kva.write_bytes(bytes(PAGE_SIZE))
        return dom0

    def create_domain(self, domid: int, memory_pages: int = DEFAULT_DOMAIN_PAGES) -> DomainInfo:
        """Create a domain: memory, xenstore page (grant ref 1), unbound xenstore port."""
        port = ctypes.c_uint32()
        check(self._lib().xensim_domain_create(domid, memory_pages, ctypes.byref(port)),
              f"create domain {domid}")
        return self.domain(domid)

    def destroy_domain(self, domid: int) -> None:
        """Mark dying, close its ports, fire VIRQ_DOM_EXC, remove its state."""
        check(self._lib().xensim_domain_destroy(domid), f"destroy domain {domid}")

    def domain(self, domid: int) -> DomainInfo:
        info = _DomainInfoC()
        check(self._lib().xensim_domain_info(domid, ctypes.byref(info)), f"domain {domid}")
        return DomainInfo(
            domid=info.domid,
            xenstore_mfn=info.xenstore_pfn,
            xenstore_port=info.xenstore_port,
            nr_pages=info.nr_pages,
            dying=bool(info.flags & 1),
            mem_path=info.mem_path.decode(),
        )

    def domain_ids(self) -> list[int]:
        buf = (ctypes.c_uint32 * 4096)()
        n = check(self._lib().xensim_domain_list(buf, len(buf)), "domain list")
        return list(buf[:n])

    def domains(self) -> list[DomainInfo]:
        return [self.domain(d) for d in self.domain_ids()]

    def teardown(self) -> None:
        """Destroy every domain (freeing /dev/shm memory) and remove the run directory.

        Only a directory that holds a simulated machine is removed: a wrong `run_dir`
        (say the current directory) must never be wiped.
        """
        if not self.exists:
            return
        for domid in reversed(self.domain_ids()):
            try:
                self.destroy_domain(domid)
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise
        shutil.rmtree(self.run_dir, ignore_errors=True)
