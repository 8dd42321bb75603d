"""A tapdisk's runtime files are root's alone (issue 17): nothing in the runtime root
grants group or others anything, whatever the umask of whoever started it (sockets are
0700: bind(2) takes 0777 less the umask, and x on a socket means nothing)."""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from blktap3.ctl import runtime
from tests.support import signal_midway, tapdisk_pids, wait_until

from .conftest import TAP_CTL, TapCtl, parse_list

pytestmark = pytest.mark.integration


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_sockets_logs_and_markers_are_private(ctl_root: Path, tap_ctl: TapCtl,
                                              make_image: object) -> None:
    assert callable(make_image)
    image = make_image()
    old = os.umask(0o000)  # the loosest caller: nothing may depend on its umask
    try:
        created = tap_ctl("create", "-a", f"aio:{image}")
    finally:
        os.umask(old)
    assert created.code == 0, created.err
    [row] = parse_list(tap_ctl("list").out)
    pid, minor = int(row["pid"]), int(row["minor"])
    sockets = [runtime.socket_path(ctl_root, pid)] + [
        runtime.nbd_socket_path(ctl_root, prefix, pid, minor)
        for prefix in runtime.NBD_SOCKET_PREFIXES]
    for path in sockets:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert _mode(path) & 0o077 == 0, path
    log = ctl_root / "log" / f"tapdisk{pid}.log"
    assert _mode(log) == 0o600 and _mode(log.parent) == 0o700
    assert _mode(runtime.minors_dir(ctl_root)) == 0o700
    assert _mode(runtime.marker_path(ctl_root, minor)) & 0o077 == 0
    # ctl.ops.create holds SIGTERM back while it spawns: the tapdisk must not inherit it.
    status = Path(f"/proc/{pid}/status").read_text()
    blocked = int(status.split("SigBlk:")[1].split()[0], 16)
    assert blocked & (1 << (signal.SIGTERM - 1) | 1 << (signal.SIGINT - 1)) == 0
    assert tap_ctl("destroy", "-p", str(pid), "-m", str(minor)).code == 0


def test_a_root_whose_parent_is_missing_is_refused_not_made(run_dir: Path,
                                                             tap_ctl: TapCtl) -> None:
    missing = run_dir / "missing" / "root"
    done = tap_ctl("spawn", env={runtime.ROOT_ENV: str(missing)})
    # tap-ctl says strerror alone, as blktap's; --precise adds the tapdisk's reason.
    assert (done.code, done.err) == (errno.ENOENT, "No such file or directory\n")
    precise = tap_ctl("spawn", "--precise", env={runtime.ROOT_ENV: str(missing)})
    assert "does not exist" in precise.err
    assert not (run_dir / "missing").exists()


def test_spawn_never_imports_a_blktap3_from_the_working_directory(
        run_dir: Path, tap_ctl: TapCtl, ctl_root: Path) -> None:
    """tap-ctl runs as root: a `blktap3` package in its working directory (a checkout,
    or one planted there) must not be what the tapdisk runs."""
    planted = run_dir / "cwd" / "blktap3"
    (planted / "tapdisk").mkdir(parents=True)
    marker = run_dir / "planted-code-ran"
    (planted / "__init__.py").write_text("")
    (planted / "tapdisk" / "__init__.py").write_text("")
    (planted / "tapdisk" / "__main__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n")
    old = Path.cwd()
    os.chdir(planted.parent)
    try:
        done = tap_ctl("spawn")
    finally:
        os.chdir(old)
    assert done.code == 0, done.err
    assert not marker.exists()
    assert int(done.out) in runtime.socket_pids(ctl_root)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_create_stopped_half_way_leaves_no_tapdisk_and_no_minor(
        ctl_root: Path, sig: signal.Signals) -> None:
    """Stopped while its tapdisk starts (a slow one, so the signal lands inside the
    spawn, or, on a slow machine, in attach or open), tap-ctl create undoes what it did
    and ends as the signal would have ended it."""
    slow = (f"sh -c 'sleep 1; exec {sys.executable} -P -m blktap3.tapdisk'")
    code, out, err = signal_midway(
        [TAP_CTL, "create", "-a", "null:x"], sig,
        lambda _: wait_until(lambda: runtime.allocated_minors(ctl_root), 30, "a minor"),
        env={**os.environ, "BLKTAP_TAPDISK": slow})
    assert code == -sig, (out, err)
    assert "Traceback" not in err and out == ""
    wait_until(lambda: not tapdisk_pids(ctl_root), 30, "no tapdisk left")
    assert runtime.allocated_minors(ctl_root) == []


# A tapdisk whose OPEN takes 3 s: a signal then lands while the image opens.
SLOW_OPEN = (
    "import runpy, time\n"
    "from blktap3.tapdisk.control import Tapdisk\n"
    "real = Tapdisk._open_image\n"
    "def slow(*args, **kwargs):\n"
    "    time.sleep(3)\n"
    "    return real(*args, **kwargs)\n"
    "Tapdisk._open_image = slow\n"
    "runpy.run_module('blktap3.tapdisk', run_name='__main__')\n"
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_create_stopped_while_its_image_opens_leaves_no_tapdisk(
        ctl_root: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """Stopped after ATTACH, while OPEN is under way: the tapdisk goes all the same (its
    VBD was attached, and opened once the signal had come, so a DETACH alone left it
    running with the VBD, as blktap3-bench did once in CI)."""
    shim = tmp_path / "slow_open.py"
    shim.write_text(SLOW_OPEN)
    code, out, err = signal_midway(
        [TAP_CTL, "create", "-a", "null:x"], sig,
        lambda _: (wait_until(lambda: tapdisk_pids(ctl_root), 30, "the tapdisk"),
                   time.sleep(1.0)),
        env={**os.environ, "BLKTAP_TAPDISK": f"{sys.executable} -P {shim}"})
    assert code == -sig, (out, err)
    assert "Traceback" not in err and out == ""
    wait_until(lambda: not tapdisk_pids(ctl_root), 30, "no tapdisk left")
    assert runtime.allocated_minors(ctl_root) == []
