"""cffi build script (API mode) of the data path: ``blktap3.datapath._datapath``.

The C sources sit beside this file; ``datapath_cdef.h`` holds the declarations cffi
parses. ``BLKTAP3_SANITIZE=1`` builds with ASan+UBSan (see sanitize.sh).
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["cbt.c", "checks.c", "cpuidle.c", "image.c", "ioengine.c", "mirror.c", "pgrant.c",
           "ring.c", "vhd.c"]


def compile_args() -> tuple[list[str], list[str]]:
    """Warnings are errors; the sanitizer build trades speed for checks."""
    # __XEN_TOOLS__ selects Xen's current interface in every header, whichever comes
    # first (else ring.h falls back to the kernel's undefined mb()/wmb()).
    cflags = ["-D__XEN_TOOLS__=1", "-std=gnu11", "-Wall", "-Wextra", "-Werror"]
    ldflags: list[str] = []
    if os.environ.get("BLKTAP3_SANITIZE") == "1":
        san = [
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=undefined",
        ]
        cflags += [*san, "-O1", "-g"]
        ldflags += san
    else:
        cflags += ["-O2"]
    return cflags, ldflags


ffibuilder = FFI()
ffibuilder.cdef((HERE / "datapath_cdef.h").read_text())
_cflags, _ldflags = compile_args()
ffibuilder.set_source(
    "blktap3.datapath._datapath",
    '#include "datapath.h"',
    # setuptools wants sources relative to the project root (the cwd of setup.py).
    sources=[os.path.relpath(HERE / s) for s in SOURCES],
    include_dirs=[str(HERE)],
    libraries=["xengnttab", "xenevtchn", "uring", "pthread"],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
