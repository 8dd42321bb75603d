"""Debian's Python 3.11, this project and its PyPI dependencies, for dom0's initramfs.

- The interpreter and standard library come from the Debian packages (`debs`), with the
  shared libraries of their extension modules; precompiled once per unpacked tree
  (`compileall --invalidation-mode unchecked-hash`: without .pyc the first import costs
  seconds under emulation).
- The PyPI dependencies are the ones installed beside this rig's own interpreter (the
  project's venv): pure Python, plus `_cffi_backend`, built for CPython 3.11 like
  Debian's interpreter.
- The data path's cffi module is built with Debian's `/usr/bin/python3.11` (dom0's ABI)
  into the work directory; the in-tree build stays untouched.
- The project goes to /opt/blktap3 (with `specs/` as `blktap3.specs`), without `sim/`:
  nothing of the simulated host runs in this rig. dom0 sets PYTHONPATH=/opt/blktap3.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .debs import Unpacked
from .initramfs import Initramfs

PROJECT = Path(__file__).resolve().parents[2]
DEST = "/opt/blktap3"
DEBIAN_PYTHON = "/usr/bin/python3.11"
# What the back-end imports at run time (cffi and pycparser only build the module).
RUNTIME_DEPS = ("pyxs", "transitions", "six", "structlog", "typing_extensions",
                "_cffi_backend")
BUILD_DEPS = ("cffi", "pycparser")
STDLIB_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
               "pydoc_data", "config-3.11-x86_64-linux-gnu", "venv", "__pycache__",
               "sqlite3", "dbm", "distutils", "site-packages", "dist-packages")
# Extension modules left out: they pull large libraries (OpenSSL, Berkeley DB, SQLite,
# Kerberos, readline) that the back-end never uses, and every MiB of initramfs costs
# dom0's boot ~0.2 s under emulation.
DYNLOAD_SKIP = ("_ssl", "_hashlib", "_sqlite3", "_dbm", "_gdbm", "readline", "_curses",
                "_curses_panel", "_tkinter", "_ctypes_test", "_testcapi", "_testbuffer",
                "_testimportmultiple", "_testmultiphase", "_testinternalcapi", "xxlimited",
                "xxlimited_35", "_xxtestfuzz", "_testclinic", "_uuid", "_lzma", "_bz2")
# Console scripts of the project, as pip would write them for dom0's interpreter.
COMMANDS = {"tap-ctl": "blktap3.ctl.cli", "tapback": "blktap3.tapback.main",
            "tapdisk": "blktap3.tapdisk.main", "blktap3-vbd3": "blktap3.vbd3.cli"}
PROJECT_SKIP = ("__pycache__", "sim", "_build", "build")


def _module_files(name: str) -> Path:
    """The package directory or module file of `name` in this interpreter."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{name} is not installed beside {sys.executable}")
    origin = Path(spec.origin)
    return origin.parent if origin.name == "__init__.py" else origin


def _copy_deps(names: tuple[str, ...], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = _module_files(name)
        target = dest / src.name
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)


def _compile(tree: Path) -> None:
    subprocess.run([DEBIAN_PYTHON, "-m", "compileall", "-q", "-j", "0",
                    "--invalidation-mode", "unchecked-hash", str(tree)],
                   check=True, stdout=subprocess.DEVNULL)


def stage_project(work: Path) -> Path:
    """/opt/blktap3 as a directory of the work tree: project, deps, built module, .pyc."""
    stage = work / "opt-blktap3"
    if stage.exists():
        shutil.rmtree(stage)
    _copy_deps(RUNTIME_DEPS, stage)
    ignore = shutil.ignore_patterns(*PROJECT_SKIP, "*.so", "*.c", "*.h", "*.sh")
    shutil.copytree(PROJECT / "blktap3", stage / "blktap3", ignore=ignore)
    shutil.copytree(PROJECT / "specs", stage / "blktap3" / "specs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    built = build_datapath(work)
    shutil.copy2(built, stage / "blktap3" / "datapath" / built.name)
    _compile(stage)
    return stage


def build_datapath(work: Path) -> Path:
    """The cffi module, compiled by Debian's python3.11 (dom0's interpreter)."""
    build = work / "datapath-build"
    deps = build / "deps"
    _copy_deps((*BUILD_DEPS, "_cffi_backend"), deps)
    # A copy of the sources: _build.py names them relative to the cwd it is imported in
    # and cffi puts each object file at that name under tmpdir, so a build from the
    # checkout would leave its .o files in the checkout (where the packaging test finds
    # files the wheel does not hold).
    out = build / "out"
    sources = out / "blktap3" / "datapath"
    if sources.exists():
        shutil.rmtree(sources)
    shutil.copytree(PROJECT / "blktap3" / "datapath", sources,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o"))
    script = (
        "import importlib.util, sys;"
        "spec = importlib.util.spec_from_file_location('dp_build', 'blktap3/datapath/_build.py');"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
        "print(m.ffibuilder.compile(tmpdir='.'))"
    )
    env = dict(os.environ, PYTHONPATH=str(deps))
    env.pop("BLKTAP3_SANITIZE", None)
    done = subprocess.run([DEBIAN_PYTHON, "-c", script], cwd=out, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building the data path with {DEBIAN_PYTHON}:\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


def _stdlib(pkgs: Unpacked) -> Path:
    """Debian's standard library as sourceless .pyc (legacy layout, `compileall -b`):
    half the bytes of sources plus caches. Staged once per unpacked tree."""
    stage = pkgs.root.parent / "stdlib-pyc"
    stamp = pkgs.root.parent / "stdlib-pyc.stamp"
    key = (pkgs.root.parent / "root.stamp").read_text()
    if stamp.exists() and stamp.read_text() == key:
        return stage
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(pkgs.root / "usr/lib/python3.11", stage, symlinks=True,
                    ignore=shutil.ignore_patterns(*STDLIB_SKIP))
    subprocess.run([DEBIAN_PYTHON, "-m", "compileall", "-q", "-b", "-j", "0",
                    "--invalidation-mode", "unchecked-hash", str(stage)],
                   check=True, stdout=subprocess.DEVNULL)
    for source in stage.rglob("*.py"):
        source.unlink()
    stamp.write_text(key)
    return stage


def add_to(image: Initramfs, pkgs: Unpacked, work: Path) -> None:
    image.add_elf(DEBIAN_PYTHON, pkgs.root / DEBIAN_PYTHON.lstrip("/"))
    image.add_symlink("/usr/bin/python3", "python3.11")
    lib = _stdlib(pkgs)
    image.add_tree("/usr/lib/python3.11", lib)
    for ext in sorted((lib / "lib-dynload").glob("*.so")):
        if ext.name.split(".")[0] in DYNLOAD_SKIP:
            image.entries.pop(f"/usr/lib/python3.11/lib-dynload/{ext.name}", None)
            continue
        try:
            image.add_elf(f"/usr/lib/python3.11/lib-dynload/{ext.name}", ext)
        except RuntimeError:
            # A library outside the stdlib packages (e.g. Tk): that module is left out.
            image.entries.pop(f"/usr/lib/python3.11/lib-dynload/{ext.name}", None)
    for command, module in COMMANDS.items():
        image.add_bytes(f"/usr/sbin/{command}", (
            f"#!{DEBIAN_PYTHON}\nimport sys\nfrom {module} import main\n"
            "sys.exit(main())\n").encode(), 0o755)
    stage = stage_project(work)
    image.add_tree(DEST, stage)
    for ext in stage.rglob("*.so"):  # their libraries too (libpthread, the Xen libraries)
        image.add_elf(f"{DEST}/{ext.relative_to(stage)}", ext)
