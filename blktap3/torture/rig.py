"""The ground a torture run stands on: a scratch directory, a simulated machine, child
processes of chosen domains, and, for ``ring``, the ASan+UBSan build of the C parts.

The sanitized build is made as ``blktap3/datapath/sanitize.sh`` makes it: a copy of the
package in the scratch directory, built with ``BLKTAP3_SANITIZE=1``, put first on the
children's ``PYTHONPATH`` with the sanitizer runtimes preloaded. Reports go to files
(``log_path``) so that a run can count them; every report is fatal to its process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from blktap3.datapath.lineproc import LineProcess
from blktap3.sim import xensim

PACKAGE = Path(__file__).resolve().parent.parent
SANITIZED_MODULES = ("datapath/_datapath", "sim/guestdrv/_guestdrv")


def in_sanitized_env() -> bool:
    """Already inside sanitize.sh (or a run of ours): the children inherit its build."""
    return os.environ.get("BLKTAP3_SANITIZE") == "1"


def build_sanitized(dest: Path) -> Path:
    """Build the data path and the guest driver with ASan+UBSan in ``dest``; returns the
    directory to put on ``PYTHONPATH``."""
    src = PACKAGE.parent
    if not (src / "setup.py").exists():
        raise RuntimeError(f"the sanitized build needs the source tree ({src}/setup.py)")
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "_build")
    shutil.copytree(src / "blktap3", dest / "blktap3", ignore=ignore)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(src / name, dest / name)
    for name in ("tools", "specs"):
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name, ignore=ignore)
    env = {**os.environ, "BLKTAP3_SANITIZE": "1"}
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                          cwd=dest, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"sanitized build failed:\n{done.stderr[-2000:]}")
    for module in SANITIZED_MODULES:
        so = next((dest / "blktap3").glob(f"{module}*.so"))
        nm = subprocess.run(["nm", "-D", str(so)], capture_output=True, text=True, check=True)
        if "__asan_" not in nm.stdout:
            raise RuntimeError(f"{so}: not instrumented")
    return dest


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A scratch directory of a run, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="blktap3-torture."))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Rig:
    """A scratch directory with a simulated machine in it; children of any domain.

    ``sanitize``: the children load the ASan+UBSan build (built here unless this process
    already runs under one); their reports land in ``reports()``.
    """

    def __init__(self, *, sanitize: bool = False) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="blktap3-torture."))
        self.sanitize = sanitize
        self.machine = xensim.Machine(self.scratch / "sim")
        self.procs: list[LineProcess] = []
        self.pythonpath: str | None = None
        self.report_dir = self.scratch / "sanitizer"

    def __enter__(self) -> Rig:
        try:
            if self.sanitize and not in_sanitized_env():
                self.pythonpath = str(build_sanitized(self.scratch / "asan"))
            self.report_dir.mkdir()
            self.machine.init()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def env(self, domid: int) -> dict[str, str]:
        """The variables a child of ``domid`` needs on this machine."""
        env = dict(xensim.process_env(self.machine.run_dir, domid))
        if self.sanitize:
            runtimes = " ".join(str(p) for p in xensim.sanitizer_runtime())
            env["LD_PRELOAD"] = f"{runtimes} {env['LD_PRELOAD']}"
            env["BLKTAP3_SANITIZE"] = "1"
            # CPython keeps memory until exit by design: leak checks off, the rest fatal.
            env["ASAN_OPTIONS"] = ("detect_leaks=0:abort_on_error=1:halt_on_error=1:"
                                   f"log_path={self.report_dir}/asan")
            env["UBSAN_OPTIONS"] = ("print_stacktrace=1:halt_on_error=1:"
                                    f"log_path={self.report_dir}/ubsan")
            if self.pythonpath:
                env["PYTHONPATH"] = self.pythonpath
        return env

    def spawn(self, module: str, domid: int) -> LineProcess:
        proc = LineProcess([sys.executable, "-m", module], self.env(domid))
        self.procs.append(proc)
        return proc

    def reports(self) -> list[Path]:
        """Sanitizer reports written so far."""
        return sorted(self.report_dir.glob("*")) if self.report_dir.exists() else []

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.close()
        self.procs.clear()
        self.machine.teardown()
        # Only the directory this rig made (mkdtemp above).
        if self.scratch.name.startswith("blktap3-torture."):
            shutil.rmtree(self.scratch, ignore_errors=True)
