"""Minor allocation by marker files under an flock, and tapdisk discovery by socket."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blktap3.ctl import ops, runtime


def test_root_comes_from_argument_then_environment(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.delenv(runtime.ROOT_ENV, raising=False)
    assert runtime.root_dir() == Path("/run/blktap-control")
    monkeypatch.setenv(runtime.ROOT_ENV, str(tmp_path))
    assert runtime.root_dir() == tmp_path
    assert runtime.root_dir("/elsewhere") == Path("/elsewhere")


def test_allocate_takes_the_lowest_free_minor(tmp_path: Path) -> None:
    assert [runtime.allocate_minor(tmp_path) for _ in range(3)] == [0, 1, 2]
    runtime.free_minor(tmp_path, 1)
    assert runtime.allocate_minor(tmp_path) == 1
    assert runtime.allocated_minors(tmp_path) == [0, 1, 2]
    assert (tmp_path / "tapdisk").stat().st_mode & 0o777 == 0o700


def test_allocate_a_named_minor(tmp_path: Path) -> None:
    dev = ops.allocate(tmp_path, devname="/x/tapdisk/tapdisk-7")
    assert dev == str(tmp_path / "tapdisk" / "tapdisk-7")
    with pytest.raises(OSError) as err:
        ops.allocate(tmp_path, devname=dev)
    assert err.value.errno == errno.EEXIST
    with pytest.raises(OSError) as err:
        ops.allocate(tmp_path, devname="/dev/sda")
    assert err.value.errno == errno.EINVAL


def test_free_of_an_unknown_minor_is_enoent(tmp_path: Path) -> None:
    with pytest.raises(OSError) as err:
        runtime.free_minor(tmp_path, 7)
    assert err.value.errno == errno.ENOENT


def test_free_of_a_minor_a_tapdisk_holds_is_eagain(tmp_path: Path) -> None:
    minor = runtime.allocate_minor(tmp_path)
    # A tapdisk holds an flock on the marker; another open file description stands in.
    fd = os.open(runtime.marker_path(tmp_path, minor), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(OSError) as err:
            runtime.free_minor(tmp_path, minor)
        assert err.value.errno == errno.EAGAIN
    finally:
        os.close(fd)
    runtime.free_minor(tmp_path, minor)  # the lock went with the "process"
    assert runtime.allocated_minors(tmp_path) == []


def test_missing_root_lists_nothing(tmp_path: Path) -> None:
    assert runtime.allocated_minors(tmp_path / "nope") == []
    assert runtime.socket_pids(tmp_path / "nope") == []
    assert ops.list_all(tmp_path / "nope") == []


def test_stale_socket_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    (tmp_path / f"ctl{pid}").touch()
    (tmp_path / f"ctl{os.getpid()}").touch()  # alive: kept
    (tmp_path / "ctlfoo").touch()  # not a tapdisk socket name: ignored
    assert runtime.socket_pids(tmp_path) == sorted([pid, os.getpid()])
    assert runtime.remove_stale_socket(tmp_path, pid)
    assert not runtime.remove_stale_socket(tmp_path, os.getpid())
    assert runtime.socket_pids(tmp_path) == [os.getpid()]


def test_a_dead_tapdisks_nbd_sockets_go_with_its_control_socket(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    (tmp_path / f"ctl{pid}").touch()
    theirs = [runtime.nbd_socket_path(tmp_path, prefix, pid, minor)
              for prefix in runtime.NBD_SOCKET_PREFIXES for minor in (0, 12)]
    theirs.append(runtime.nbdclient_path(tmp_path, pid))   # its fd receiver's
    others = [tmp_path / f"nbd{pid}1.0", tmp_path / f"nbd{os.getpid()}.0",
              tmp_path / f"nbdclient{pid}1", tmp_path / f"nbd{pid}.x"]
    for path in theirs + others:
        path.touch()
    assert runtime.remove_stale_socket(tmp_path, pid)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in others)
