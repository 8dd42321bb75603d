"""Fixtures: a private runtime root, the real `tap-ctl` command, images, and cleanup.

`ctl_root` points BLKTAP_CONTROL_DIR at `ctl` in the shared short `run_dir` (AF_UNIX
paths must fit 108 bytes). Every tapdisk that ever made a socket there (or that the test
recorded in `seen_pids`) is killed and reaped when the test ends, failed or not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blktap3.ctl import runtime
from tests.support import kill_tapdisks

TAP_CTL = str(Path(sys.executable).parent / "tap-ctl")
MiB = 1 << 20


@dataclass
class Result:
    code: int
    out: str
    err: str


TapCtl = Callable[..., Result]


@pytest.fixture
def seen_pids() -> set[int]:
    """Tapdisks the test started (recorded by `tap_ctl`; tests add in-process spawns)."""
    return set()


@pytest.fixture
def ctl_root(run_dir: Path, monkeypatch: pytest.MonkeyPatch,
             seen_pids: set[int]) -> Iterator[Path]:
    root = run_dir / "ctl"
    root.mkdir()
    monkeypatch.setenv(runtime.ROOT_ENV, str(root))
    monkeypatch.setenv(runtime.SHM_ENV, str(run_dir / "shm"))
    try:
        yield root
    finally:
        kill_tapdisks(root, also=seen_pids)


@pytest.fixture
def tap_ctl(ctl_root: Path, seen_pids: set[int]) -> TapCtl:
    """Run the installed `tap-ctl` (stdout a pipe, so `list` uses blktap's dict format)."""

    def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Result:
        done = subprocess.run(
            [TAP_CTL, *args], capture_output=True, text=True, timeout=60, input=stdin,
            env={**os.environ, **(env or {})},
        )
        seen_pids.update(runtime.socket_pids(ctl_root))
        return Result(done.returncode, done.stdout, done.stderr)

    return run


@pytest.fixture
def make_image(ctl_root: Path) -> Callable[..., str]:
    def make(name: str = "disk.img", size: int = 4 * MiB) -> str:
        path = ctl_root / name
        with open(path, "wb") as f:
            f.truncate(size)
        return str(path)

    return make


def parse_list(text: str) -> list[dict[str, str]]:
    """`tap-ctl list` lines (dict format) as dicts."""
    return [dict(field.split("=", 1) for field in line.split()) for line in text.splitlines()]
