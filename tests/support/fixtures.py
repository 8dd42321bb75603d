"""The fixtures every test directory shares (a pytest plugin: tests/conftest.py loads it).

- `run_dir`: a fresh short directory under /tmp (AF_UNIX socket paths must fit 108
  bytes), removed when the test ends.
- `machine`: a simulated machine (xensim state, dom0) without xenstored, in
  `run_dir/xen`; a conftest that needs guest domains overrides it with one that asks
  for this `machine` and creates them.
- `xenstored_kind`: "c" (Debian's C xenstored) or "ocaml" (oxenstored): tests of the
  host run once per kind. A directory or test that needs one kind only says so, either
  by overriding the fixture in its conftest (`def xenstored_kind() -> Kind: return "c"`)
  or with `@pytest.mark.parametrize("xenstored_kind", ["ocaml"])`.
- `host`: the simulated host (`blktap3.sim.host.Host`) up on that xenstored, in
  `run_dir/host`; `XENSTORED_PATH` and the tapdisk control root (`BLKTAP_CONTROL_DIR`)
  point at it for the test. Taken down when the test ends, failed or not: every
  tapdisk of its control directory killed (SIGKILL), then `down()` (tapback, xenstored,
  the machine).
- `xs`: a dom0 `XenStore` client on the host.
- `tapback`: the real tapback daemon started on the host (its pid), stopped after.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap3.ctl import runtime
from blktap3.sim import xensim
from blktap3.sim.host import Host
from blktap3.sim.xenstored import Kind
from blktap3.tapback import service
from blktap3.xenbus import XenStore

from .processes import kill_tapdisks

XENSTORED_KINDS: tuple[Kind, ...] = ("c", "ocaml")


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="b3-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def machine(run_dir: Path) -> Iterator[xensim.Machine]:
    m = xensim.Machine(run_dir / "xen")
    m.init()
    try:
        yield m
    finally:
        m.teardown()


@pytest.fixture(params=XENSTORED_KINDS)
def xenstored_kind(request: pytest.FixtureRequest) -> Kind:
    kind: Kind = request.param
    return kind


@pytest.fixture
def host(
    request: pytest.FixtureRequest, run_dir: Path, xenstored_kind: Kind,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Host]:
    if hasattr(request, "param"):
        raise pytest.UsageError(
            f"{request.node.nodeid}: the host's xenstored is chosen with "
            f'@pytest.mark.parametrize("xenstored_kind", [...]), not an indirect "host"')
    h = Host(run_dir / "host")
    monkeypatch.setenv(runtime.ROOT_ENV, str(h.control_dir))
    monkeypatch.setenv(runtime.SHM_ENV, str(runtime.shm_dir(h.run_dir)))
    try:
        h.up(xenstored_kind)
        monkeypatch.setenv("XENSTORED_PATH", str(h.xenstored_path))
        monkeypatch.delenv("XENSTORED_RUNDIR", raising=False)
        yield h
    finally:
        # The test's tapdisks are killed, not destroyed VBD by VBD: what they served is
        # thrown away, and a graceful stop of each costs the suite seconds.
        try:
            kill_tapdisks(h.control_dir)
        finally:
            try:
                h.down()
            except Exception:
                # A down() that failed half-way may have left xenstored: once more, then
                # the first error is the one reported.
                with contextlib.suppress(Exception):
                    h.down()
                raise


@pytest.fixture
def xs(host: Host) -> Iterator[XenStore]:
    with host.xs(timeout=5.0) as client:
        yield client


@pytest.fixture
def tapback(host: Host) -> Iterator[int]:
    pid = host.start_tapback()
    try:
        yield pid
    finally:
        service.stop(host.run_dir)
