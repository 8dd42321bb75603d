"""Live storage migration (`blktap3-sim vbd migrate`) under a guest that writes throughout.

The real system (xenstored, tapback, tapdisk, the simulated guest's blkfront), the target
served by Debian's qemu-nbd or by another tapdisk's export, nbdcopy for the bulk copy.
The migration starts as soon as the guest is connected, while it fills its span, so
the target gets the guest's data by all three routes: the bulk copy, the mirror, and the
catch-up of the blocks written during the copy. The oracle is the guest's own: after the
switch it reads back every block it wrote, from the target, and checks each byte.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from blktap3.ctl import ops
from blktap3.sim import cli, migrate
from blktap3.sim.guest import start_guest
from blktap3.sim.host import Host
from blktap3.sim.toolstack import Image

from .conftest import DEVID, MiB
from .test_with_tapback import system

pytestmark = pytest.mark.integration
for _tool in ("qemu-nbd", "nbdcopy"):
    if shutil.which(_tool) is None:
        pytest.skip(f"{_tool} is missing (Debian: qemu-utils, libnbd-bin)",
                    allow_module_level=True)

__all__ = ["system"]
SIZE = 32 * MiB
# Long enough a fill (16 MiB in 4 KiB writes) that the copy runs beside it.
GUEST = ["--seconds", "2", "--span-mib", "16", "--qd", "8"]


def attached(host: Host, domid: int) -> tuple[Path, Path]:
    source, target = host.run_dir.parent / f"src{domid}.img", host.run_dir.parent / f"t{domid}.img"
    source.write_bytes(os.urandom(SIZE))
    with host.toolstack() as ts:
        ts.create_domain(domid)
    host.attach_disk(domid, DEVID, Image.parse(f"aio:{source}"))
    return source, target


def served_params(host: Host) -> list[str]:
    return [f"{r.type}:{r.path}" for r in ops.list_all(host.control_dir)]


@pytest.mark.parametrize(("server", "pass_fd"), [("qemu-nbd", False), ("tapdisk", True)])
def test_a_disk_moves_under_a_writing_guest_that_never_sees_an_error(
    system: Host, server: str, pass_fd: bool
) -> None:
    """The second case hands the target's socket to the tapdisk on nbdclient<pid>."""
    domid = 40 + migrate.SERVERS.index(server)
    source, target = attached(system, domid)
    with start_guest(system, domid, DEVID, "linux", "randrw", extra=GUEST) as guest:
        guest.wait_for_step("read sectors=")
        result = migrate.migrate(system, domid, DEVID, target, server=server,
                                 pass_fd=pass_fd)
        # The source is wiped: the guest's read back can succeed from the target only.
        source.write_bytes(bytes(SIZE))
        seen = guest.result(90)
    assert result.ok, result.error
    assert seen.ok, seen.error   # every byte read back from the target after the switch
    assert result.copied == SIZE and result.size == SIZE
    assert served_params(system) == [f"aio:{target}"]
    assert any("nbdclient" in step for step in result.steps) == pass_fd
    print(result.summary())
    system.destroy_domain(domid)
    assert served_params(system) == []


def test_a_target_killed_mid_mirror_aborts_and_the_guest_goes_on_from_the_source(
    system: Host,
) -> None:
    domid = 45
    source, target = attached(system, domid)

    def kill_the_target(step: str) -> None:
        if step.startswith("target "):
            found = re.search(r"pid (\d+)", step)
            assert found, step
            kill_the_target.pid = int(found.group(1))  # type: ignore[attr-defined]
        if step.startswith("VBD "):     # mirrored now: the target's server dies
            os.kill(kill_the_target.pid, signal.SIGKILL)  # type: ignore[attr-defined]

    with start_guest(system, domid, DEVID, "linux", "randrw", extra=GUEST) as guest:
        guest.wait_for_step("read sectors=")
        result = migrate.migrate(system, domid, DEVID, target, on_step=kill_the_target)
        seen = guest.result(90)
    assert not result.ok and result.error is not None
    assert "ABORTED" in result.summary()
    assert seen.ok, seen.error   # the guest saw nothing, its data is on the source
    assert served_params(system) == [f"aio:{source}"] and not target.exists()
    assert not (system.run_dir / f"migrate-{domid}-{DEVID}").exists()
    system.destroy_domain(domid)


def test_the_command_prints_its_steps_and_refuses_what_it_cannot_do(
    system: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    domid = 46
    source, target = attached(system, domid)
    base = ["--run-dir", str(system.run_dir), "vbd", "migrate"]
    target.write_bytes(b"")                      # the target must be a new file
    assert cli.main([*base, str(domid), "xvda", str(target)]) == 1
    assert "exists" in capsys.readouterr().err and target.read_bytes() == b""
    assert cli.main([*base, str(domid), "xvdb", str(target) + "2"]) == 1   # no such disk
    assert "no attached device" in capsys.readouterr().err
    assert served_params(system) == [f"aio:{source}"]
    target.unlink()
    assert cli.main([*base, str(domid), "xvda", str(target), "--pass-fd"]) == 0
    out = capsys.readouterr().out
    assert "nbdclient" in out and "mirrored to nbd:migrate-" in out
    assert out.splitlines()[-1].startswith(f"migrated aio:{source} -> aio:{target}")
    assert served_params(system) == [f"aio:{target}"]
    assert target.read_bytes() == source.read_bytes()   # no guest wrote meanwhile
    system.destroy_domain(domid)
