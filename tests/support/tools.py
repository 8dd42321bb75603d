"""Running oracles not written here (qemu-img, qemu-io, blktap's vhd-util) from tests.

Under the sanitizer run (blktap3/datapath/sanitize.sh) every process inherits
LD_PRELOAD of the ASan/UBSan runtimes; preloaded into qemu-img it never finishes. The
oracles run without it: they are not what is under test.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def tool_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}


def run_tool(*cmd: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an external tool; its output as text."""
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True,
                          text=True, env=tool_env(), timeout=120)


def blktap_vhd_util() -> Path | None:
    """blktap's vhd-util in the blktap install prefix BLKTAP_BUILD names (as for
    blktap3.tools.parity: `configure --prefix=P`, `make install` in vhd/ puts it in
    P/bin), or None."""
    prefix = os.environ.get("BLKTAP_BUILD")
    tool = Path(prefix, "bin", "vhd-util") if prefix else None
    return tool if tool is not None and tool.exists() else None
