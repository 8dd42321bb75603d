"""blktap3-sim end to end: up, domains, disks, ls, down, and its one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap3.sim.host import Host
from tests.support import assert_no_process_left, wait_until

pytestmark = pytest.mark.integration


def sim(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blktap3.sim.cli", "--run-dir", str(run_dir), *args],
        capture_output=True, text=True, timeout=60)


@pytest.fixture
def work(run_dir: Path) -> Iterator[Path]:
    """The CLI's host lives in `work/run`, brought up and down by other processes."""
    try:
        yield run_dir
    finally:
        Host(run_dir / "run").down()


@pytest.fixture
def image(work: Path) -> Path:
    path = work / "disk.img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    return path


@pytest.mark.parametrize("kind", ["c", "ocaml"])
def test_up_domain_vbd_ls_down(work: Path, image: Path, kind: str) -> None:
    run = work / "run"
    up = sim(run, "up", "--xenstored", kind)
    assert up.returncode == 0, up.stderr
    socket = run / "xenstored" / "socket"
    assert up.stdout.splitlines() == [f"export XENSTORED_PATH={socket}",
                                      f"export BLKTAP_CONTROL_DIR={run}/blktap-control",
                                      f"export BLKTAP3_SHM_DIR={run}/shm"]
    pid = Host(run).xenstored_pid
    assert pid and os.path.exists(f"/proc/{pid}")

    assert sim(run, "domain", "create", "3").returncode == 0
    add = sim(run, "vbd", "add", "3", "xvdb", str(image), "--mode", "r")
    assert add.returncode == 0, add.stderr
    backend, frontend, tapdisk = add.stdout.splitlines()
    assert (backend, frontend) == ("/local/domain/0/backend/vbd3/3/51728",
                                   "/local/domain/3/device/vbd/51728")
    # the hotplug step ran: a tapdisk serves the image, named where tapback looks for it
    tapdisk_pid = int(tapdisk.split()[1])
    assert tapdisk.endswith(f"{run}/blktap-control/nbd{tapdisk_pid}.0")
    tapback_pid = Host(run).tapback_pid
    assert tapback_pid and os.path.exists(f"/proc/{tapback_pid}")

    # Debian's own client sees what the toolstack wrote, with libxl's permissions.
    env = dict(os.environ, XENSTORED_PATH=str(socket))
    ls = subprocess.run(["xenstore-ls", "-f", "-p", "/local/domain/0/backend/vbd3/3/51728"],
                        env=env, capture_output=True, text=True, check=True).stdout
    assert '/mode = "r"' in ls and "(n0,r3)" in ls
    assert f'params = "aio:{image}"' in ls
    tree = sim(run, "ls", "/local/domain/3/device/vbd/51728").stdout
    assert '/local/domain/3/device/vbd/51728/backend-id = "0"   (n3,r0)' in tree

    assert sim(run, "domain", "destroy", "3").returncode == 0
    assert "/local/domain/3" not in sim(run, "ls").stdout
    down = sim(run, "down")
    assert down.returncode == 0, down.stderr
    assert_no_process_left({pid: "xenstored", tapback_pid: "tapback", tapdisk_pid: "tapdisk"})
    assert not run.exists()


def test_commands_without_a_host_fail_in_one_line(work: Path) -> None:
    result = sim(work / "run", "domain", "create", "1")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "no simulated host" in result.stderr


def test_bad_input_errors(work: Path, image: Path) -> None:
    run = work / "run"
    assert sim(run, "up").returncode == 0
    assert sim(run, "domain", "create", "1").returncode == 0

    taken = sim(run, "domain", "create", "1")
    assert (taken.returncode, taken.stderr) == (1, "blktap3-sim: domain 1 already exists\n")

    missing = sim(run, "vbd", "add", "1", "xvda", str(work / "nope.img"))
    assert missing.returncode == 1 and "is not a file" in missing.stderr

    no_domain = sim(run, "vbd", "add", "7", "xvda", str(image))
    assert (no_domain.returncode, no_domain.stderr) == (1, "blktap3-sim: no domain 7\n")

    assert sim(run, "vbd", "add", "1", "xvda", str(image)).returncode == 0
    twice = sim(run, "vbd", "add", "1", "xvda", str(image))
    assert twice.returncode == 1 and "already has device 51712" in twice.stderr

    for bad in (["domain", "create", "0"], ["domain", "create", "x"],
                ["vbd", "add", "1", "sda", str(image)], ["up", "--xenstored", "go"]):
        usage = sim(run, *bad)
        assert usage.returncode == 2, bad
        assert "usage:" in usage.stderr and "error:" in usage.stderr

    again = sim(run, "up")
    assert again.returncode == 1 and "already up" in again.stderr


def test_guest_run_and_remove_through_the_cli(work: Path, image: Path) -> None:
    run = work / "run"
    assert sim(run, "up").returncode == 0
    assert sim(run, "domain", "create", "2").returncode == 0
    assert sim(run, "vbd", "add", "2", "xvda", str(image)).returncode == 0

    guest = sim(run, "guest", "run", "2", "xvda", "--personality", "minios")
    assert guest.returncode == 0, guest.stdout + guest.stderr
    assert "sectors 16384 (8.0 MiB)" in guest.stdout
    assert "OK: every byte written read back identically" in guest.stdout

    removed = sim(run, "vbd", "remove", "2", "xvda")
    assert (removed.returncode, removed.stdout) == (0, "back-end state at removal: CLOSED\n")
    assert "/local/domain/0/backend/vbd3/2" not in sim(run, "ls").stdout

    # no disk any more: the guest gives up with an error, not a hang
    missing = sim(run, "guest", "run", "2", "xvda", "--timeout", "10")
    assert missing.returncode == 1
    assert "FAILED" in missing.stdout


def test_guest_run_hold_keeps_the_vbd_connected_until_the_hold_ends(
        work: Path, image: Path) -> None:
    run = work / "run"
    assert sim(run, "up").returncode == 0
    assert sim(run, "domain", "create", "2").returncode == 0
    assert sim(run, "vbd", "add", "2", "xvda", str(image)).returncode == 0
    held = subprocess.Popen(
        [sys.executable, "-m", "blktap3.sim.cli", "--run-dir", str(run), "guest", "run", "2",
         "xvda", "--workload", "randrw", "--hold", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert held.stderr is not None
        line = held.stderr.readline()  # printed once the guest holds the device
        assert "connected to 51712, holding for 600 s" in line, line
        # Live after its workload: Connected, and its stats files are there.
        backend = "/local/domain/0/backend/vbd3/2/51712"
        assert f'{backend}/state = "4"' in sim(run, "ls", backend).stdout
        assert (run / "shm" / "vbd3-2-51712" / "statistics").exists()
        held.send_signal(signal.SIGINT)  # ends the hold: the guest detaches
        out, err = held.communicate(timeout=60)
    finally:
        held.kill()
        held.wait()
    assert held.returncode == 0, out + err
    assert "OK: every byte written read back identically" in out
    wait_until(lambda: not (run / "shm" / "vbd3-2-51712").exists(), what="ring files gone")
