"""Build and run the fuzz targets on their seed corpora: ``python -m tests.fuzz.run_fuzzers
[--seconds S] [TARGET...]``; exit 1 when any target found something.

- ``checks``: libFuzzer (clang, with ASan+UBSan) on ``blktap3/datapath/checks.c``
  (``fuzz_checks.c``);
- ``vhd``: libFuzzer on the VHD driver's BAT, bitmap and allocation code
  (``blktap3/datapath/vhd.c``, ``fuzz_vhd.c``);
- ``ctl``, ``xenbus``, ``nbd``, ``vhdformat``: atheris on the Python parsers
  (``fuzz_parsers.py``). ``vhd`` and ``vhdformat`` share the seeds in ``corpus/vhd/``
  (``vhd_seeds.py`` makes them).

The seeds in ``corpus/<target>/`` are read, never written: what a run finds goes to a
scratch directory (crashes are printed with the input's path, to be kept as a seed).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CORPUS = HERE / "corpus"
PY_TARGETS = ("ctl", "xenbus", "nbd", "vhdformat")
C_TARGETS = ("checks", "vhd")
TARGETS = (*C_TARGETS, *PY_TARGETS)
SEEDS = {"vhdformat": "vhd"}
DATAPATH = ROOT / "blktap3" / "datapath"
# What each libFuzzer target links beside its harness.
C_SOURCES = {"checks": (["checks.c"], []), "vhd": (["vhd.c", "ioengine.c"], ["-luring"])}


def build(target: str, out: Path) -> Path:
    exe = out / f"fuzz_{target}"
    sources, libs = C_SOURCES[target]
    subprocess.run(
        ["clang", "-g", "-O1", "-fsanitize=fuzzer,address,undefined",
         "-fno-sanitize-recover=all", "-D__XEN_TOOLS__=1", "-Wall", "-Wextra", "-Werror",
         "-I", str(DATAPATH), str(HERE / f"fuzz_{target}.c"),
         *(str(DATAPATH / src) for src in sources), *libs, "-o", str(exe)],
        check=True)
    return exe


def run(target: str, seconds: float, scratch: Path) -> subprocess.CompletedProcess[str]:
    found = scratch / target
    found.mkdir()
    if target in C_TARGETS:
        argv = [str(build(target, scratch))]
    else:
        argv = [sys.executable, str(HERE / "fuzz_parsers.py"), target]
    argv += [f"-max_total_time={max(1, int(seconds))}", f"-artifact_prefix={scratch}/",
             "-print_final_stats=1", str(found), str(CORPUS / SEEDS.get(target, target))]
    return subprocess.run(argv, capture_output=True, text=True, cwd=scratch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    ap.add_argument("targets", nargs="*", metavar="TARGET", help=f"of {', '.join(TARGETS)}")
    args = ap.parse_args(argv)
    for target in args.targets:
        if target not in TARGETS:
            ap.error(f"no target {target!r} (targets: {', '.join(TARGETS)})")
    scratch = Path(tempfile.mkdtemp(prefix="blktap3-fuzz."))
    failed = 0
    try:
        for target in args.targets or TARGETS:
            done = run(target, args.seconds, scratch)
            lines = done.stderr.splitlines()
            summary = [ln for ln in lines if "DONE" in ln or "stat::number_of_executed" in ln]
            print(f"{target}: {'ok' if done.returncode == 0 else 'FOUND SOMETHING'}; "
                  + "; ".join(s.strip() for s in summary))
            if done.returncode:
                failed += 1
                print("\n".join(lines[-60:]))
                for crash in scratch.glob("crash-*"):
                    keep = Path(tempfile.gettempdir()) / f"blktap3-fuzz-{target}-{crash.name}"
                    shutil.copy(crash, keep)
                    print(f"  input kept in {keep}")
    finally:
        # Only the directory made above.
        if scratch.name.startswith("blktap3-fuzz."):
            shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
