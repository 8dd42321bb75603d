"""tap-ctl end to end against real tapdisk processes: lifecycle, list, errors, load."""

from __future__ import annotations

import errno
import json
import os
import pty
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from blktap3.ctl import ops, runtime
from blktap3.ctl import protocol as p
from blktap3.ctl.client import CtlError, TapdiskClient
from tests.support import log_events, wait_gone, wait_until

from .conftest import TAP_CTL, MiB, TapCtl, parse_list

pytestmark = pytest.mark.integration
pytest.importorskip("blktap3.datapath", reason="the data path (Image.open) is not built")


def create(tap_ctl: TapCtl, params: str) -> tuple[int, int]:
    res = tap_ctl("create", "-a", params)
    assert res.code == 0, res.err
    minor = runtime.minor_of_devname(res.out.strip())
    rows = [r for r in parse_list(tap_ctl("list").out) if r.get("minor") == str(minor)]
    return int(rows[0]["pid"]), minor


def test_create_list_pause_swap_stats_destroy(
    tap_ctl: TapCtl, make_image: Callable[..., str], ctl_root: Path
) -> None:
    disk, other = make_image("a.img"), make_image("b.img")
    res = tap_ctl("create", "-a", f"aio:{disk}")
    assert res.code == 0 and res.out == f"{ctl_root}/tapdisk/tapdisk-0\n"
    out = tap_ctl("list").out
    pid = int(parse_list(out)[0]["pid"])
    assert out == f"pid={pid} minor=0 state=0 args=aio:{disk}\n"
    assert (ctl_root / f"ctl{pid}").is_socket()

    stats = tap_ctl("stats", "-p", str(pid), "-m", "0")
    assert stats.code == 0 and stats.out.endswith("}\n\n")
    body = json.loads(stats.out)
    assert body["name"] == f"aio:{disk}" and body["images"][0]["name"] == disk

    assert tap_ctl("pause", "-p", str(pid), "-m", "0").code == 0
    assert tap_ctl("list").out == f"pid={pid} minor=0 state=0x2a args=aio:{disk}\n"
    assert '"images": [  ]' in tap_ctl("stats", "-p", str(pid), "-m", "0").out
    assert tap_ctl("unpause", "-p", str(pid), "-m", "0", "-a", f"aio:{other}").code == 0
    assert tap_ctl("list").out == f"pid={pid} minor=0 state=0 args=aio:{other}\n"

    assert tap_ctl("destroy", "-p", str(pid), "-m", "0").code == 0
    wait_gone(pid, what="the tapdisk to exit once its last VBD detached")
    assert tap_ctl("list").out == ""
    assert not (ctl_root / f"ctl{pid}").exists()


def test_list_joins_minors_tapdisks_vbds_and_skips_dead_tapdisks(
    tap_ctl: TapCtl, make_image: Callable[..., str], ctl_root: Path
) -> None:
    assert tap_ctl("allocate").code == 0  # minor 0: allocated, never attached
    spawned = tap_ctl("spawn")
    assert spawned.code == 0
    idle = int(spawned.out)
    assert tap_ctl("allocate").code == 0  # minor 1
    assert tap_ctl("attach", "-p", str(idle), "-m", "1").code == 0
    victim, vminor = create(tap_ctl, f"aio:{make_image()}")
    rows = {victim: f"pid={victim} minor={vminor} state=0 args=aio:{ctl_root}/disk.img",
            idle: f"pid={idle} minor=1 state=0"}
    # blktap's order (control/tap-ctl-list.c:188, 364): tapdisks by socket name as
    # text (glob), then the minors no tapdisk holds.
    assert tap_ctl("list").out.splitlines() == [
        *(rows[pid] for pid in sorted(rows, key=str)), "minor=0",
    ]
    os.kill(victim, signal.SIGKILL)
    wait_gone(victim)
    # The dead tapdisk's minor is still allocated; its stale socket is cleaned up.
    assert tap_ctl("list").out.splitlines() == [
        f"pid={idle} minor=1 state=0", "minor=0", f"minor={vminor}",
    ]
    assert not (ctl_root / f"ctl{victim}").exists()
    assert tap_ctl("free", "-m", str(vminor)).code == 0  # its flock died with it
    assert tap_ctl("free", "-m", "1").code == errno.EAGAIN  # held by a live tapdisk

    listed = json.loads(tap_ctl("list", "--json").out)
    assert [(e["pid"], e["minor"]) for e in listed] == [(idle, 1), (None, 0)]
    filtered = tap_ctl("list", "-p", str(idle)).out
    assert filtered == f"pid={idle} minor=1 state=0\n"


def test_list_on_a_terminal_uses_columns(
    tap_ctl: TapCtl, make_image: Callable[..., str], ctl_root: Path
) -> None:
    disk = make_image()
    pid, minor = create(tap_ctl, f"aio:{disk}")
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([TAP_CTL, "list"], stdout=follower, stderr=subprocess.PIPE,
                              timeout=30, check=True)
        os.close(follower)
        text = os.read(leader, 4096).decode()
    finally:
        os.close(leader)
    assert done.returncode == 0
    assert text.replace("\r\n", "\n") == f"{pid:>8} {minor:>4} {'0':>4} {'aio':>10} {disk}\n"


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("pause", "-p", "999999", "-m", "0"), errno.ENOENT),  # unknown pid
        (("close", "-p", "{pid}", "-m", "42"), errno.ENODEV),  # bad minor
        (("open", "-p", "{pid}", "-m", "{spare}", "-a", "aio-no-colon"), errno.EINVAL),
        # blktap's errnos (drivers/tapdisk-disktype.c:222): ENOENT, not EINVAL.
        (("open", "-p", "{pid}", "-m", "{spare}", "-a", "aio:/no/such/file"), errno.ENOENT),
        (("open", "-p", "{pid}", "-m", "{spare}", "-a", "qcow9:/x"), errno.ENOENT),
        (("open", "-p", "{pid}", "-m", "{minor}", "-a", "aio:{disk}"), errno.EALREADY),
        # The tapdisk's EBUSY reaches blktap's tap-ctl as EINVAL (tap-ctl-detach.c:62).
        (("detach", "-p", "{pid}", "-m", "{minor}"), errno.EINVAL),
        (("attach", "-p", "{pid}", "-m", "77"), errno.EINVAL),  # minor not allocated
        (("free", "-m", "7"), errno.ENOENT),
        (("free",), errno.EINVAL),
        (("open", "-p", "{pid}", "-m", "{spare}", "-E", "-a", "aio:{disk}"), errno.EOPNOTSUPP),
    ],
)
def test_bad_input_is_one_line_and_the_errno(
    tap_ctl: TapCtl, make_image: Callable[..., str], args: tuple[str, ...], code: int
) -> None:
    disk = make_image()
    pid, minor = create(tap_ctl, f"aio:{disk}")
    spare = runtime.allocate_minor(runtime.root_dir())
    TapdiskClient(pid).attach(spare)
    words = [a.format(pid=pid, minor=minor, spare=spare, disk=disk) for a in args]
    res = tap_ctl(*words, stdin="k" * 32)  # open -E reads a 256-bit key
    assert res.code == code, res
    if words != ["free"]:
        assert res.err.startswith(os.strerror(code)) and res.err.count("\n") == 1
    # The tapdisk still serves.
    assert tap_ctl("list", "-m", str(minor)).out == (
        f"pid={pid} minor={minor} state=0 args=aio:{disk}\n"
    )


def test_garbage_on_the_socket_is_refused_and_the_tapdisk_goes_on(
    tap_ctl: TapCtl, make_image: Callable[..., str], ctl_root: Path
) -> None:
    pid, minor = create(tap_ctl, f"aio:{make_image()}")
    for garbage in (b"\xff" * p.MESSAGE_SIZE, b"hello", struct.pack("<HH", 31, 0) * 136):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(ctl_root / f"ctl{pid}"))
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            reply = p.decode(sock.recv(p.MESSAGE_SIZE, socket.MSG_WAITALL))
        assert reply.type is p.MessageType.ERROR
        assert isinstance(reply.payload, p.Response) and reply.payload.error == errno.EINVAL
    assert TapdiskClient(pid).list()[0].minor == minor


def test_twenty_tap_ctl_calls_at_once_are_all_answered(
    tap_ctl: TapCtl, make_image: Callable[..., str]
) -> None:
    pid, minor = create(tap_ctl, f"aio:{make_image()}")
    calls = [("list",), ("stats", "-p", str(pid), "-m", str(minor)),
             ("pause", "-p", str(pid), "-m", str(minor)),
             ("list", "-p", str(pid))] * 5
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda args: tap_ctl(*args), calls))
    assert [r.code for r in results] == [0] * 20, [r.err for r in results if r.code]
    assert all(f"pid={pid}" in r.out for r in results[::4])


def test_signals_do_not_break_requests(
    tap_ctl: TapCtl, make_image: Callable[..., str]
) -> None:
    pid, minor = create(tap_ctl, f"aio:{make_image()}")
    client = TapdiskClient(pid, timeout=10)
    stop = threading.Event()

    def pester() -> None:
        while not stop.is_set():
            for sig in (signal.SIGUSR1, signal.SIGHUP):
                os.kill(pid, sig)
            # The load under test (signals at ~1 kHz), not a synchronisation.
            time.sleep(0.001)

    thread = threading.Thread(target=pester)
    thread.start()
    try:
        for _ in range(100):
            assert client.list()[0].minor == minor
            assert client.get_pid() == pid
            client.pause(minor)
            client.resume(minor)
    finally:
        stop.set()
        thread.join()


def test_resize_accepts_a_grown_image(
    tap_ctl: TapCtl, make_image: Callable[..., str]
) -> None:
    disk = make_image(size=4 * MiB)
    pid, minor = create(tap_ctl, f"aio:{disk}")
    client = TapdiskClient(pid)
    os.truncate(disk, 12 * MiB)
    client.pause(minor)
    with pytest.raises(CtlError) as err:  # blktap's answer without a resize
        client.resume(minor)
    assert err.value.errno == errno.EMEDIUMTYPE
    assert tap_ctl("resize", "-p", str(pid), "-m", str(minor)).code == 0
    assert client.disk_info(minor).sectors == 12 * MiB // 512
    assert tap_ctl("list").out == f"pid={pid} minor={minor} state=0 args=aio:{disk}\n"


def test_spawn_reports_a_tapdisk_that_dies_at_start(
    tap_ctl: TapCtl, ctl_root: Path
) -> None:
    blocker = ctl_root / "file"
    blocker.touch()
    res = tap_ctl("--precise", "spawn", env={runtime.ROOT_ENV: str(blocker / "root")})
    assert res.code == errno.ENOTDIR
    assert res.err.startswith(os.strerror(errno.ENOTDIR)) and "root" in res.err


def test_create_failure_rolls_everything_back(tap_ctl: TapCtl, ctl_root: Path) -> None:
    res = tap_ctl("create", "-a", "aio:/no/such/image")
    assert res.code == errno.ENOENT and res.err == "No such file or directory\n"
    wait_until(lambda: runtime.socket_pids(ctl_root) == [], 5, "the tapdisk to exit")
    assert runtime.allocated_minors(ctl_root) == []  # the minor was freed


def test_sigterm_removes_the_socket(tap_ctl: TapCtl, ctl_root: Path,
                                    seen_pids: set[int]) -> None:
    pid = ops.spawn()
    seen_pids.add(pid)
    assert (ctl_root / f"ctl{pid}").is_socket()
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert not (ctl_root / f"ctl{pid}").exists()
    assert log_events(ctl_root / "log" / f"tapdisk{pid}.log")[-1]["event"] == "tapdisk exited"
