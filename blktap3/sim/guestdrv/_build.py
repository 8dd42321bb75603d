"""cffi build script (API mode) of the simulated guest's ring driver:
``blktap3.sim.guestdrv._guestdrv``. It shares ``xenring.h`` with the data path."""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
DATAPATH = HERE.parent.parent / "datapath"


def _flags() -> tuple[list[str], list[str]]:
    cflags = ["-D__XEN_TOOLS__=1", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O2"]
    ldflags: list[str] = []
    if os.environ.get("BLKTAP3_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        cflags += [*san, "-g"]
        ldflags += san
    return cflags, ldflags


ffibuilder = FFI()
ffibuilder.cdef((HERE / "guestdrv_cdef.h").read_text())
_cflags, _ldflags = _flags()
ffibuilder.set_source(
    "blktap3.sim.guestdrv._guestdrv",
    '#include "guestdrv.h"',
    sources=[os.path.relpath(HERE / "guestdrv.c")],
    include_dirs=[str(HERE), str(DATAPATH)],
    libraries=["xengnttab", "xenevtchn"],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
