"""A VBD's NBD export, served by a real tapdisk process (spawned by `tap-ctl create`)
on real files, checked with NBD clients none of us wrote: qemu-img, qemu-io (Debian's
qemu-utils) and nbdinfo/nbdcopy (libnbd-bin). Hostile clients next to a guest's ring on
the simulated Xen host; the sockets' lifetime through CLOSE, DETACH and SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.ctl import runtime
from blktap3.ctl.client import TapdiskClient
from tests.support import wait_gone, wait_until
from tests.support.nbd import READ, WRITE, NbdClient, NbdError

from . import test_ring as ring
from .conftest import MiB, TapCtl, parse_list
from .test_tap_ctl import create

pytestmark = pytest.mark.integration
pytest.importorskip("blktap3.datapath", reason="the data path (Image.open) is not built")
for _tool in ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy"):
    if shutil.which(_tool) is None:
        pytest.skip(f"{_tool} is missing (Debian: qemu-utils, libnbd-bin)",
                    allow_module_level=True)

SIZE = 64 * MiB


def uri(root: Path, pid: int, minor: int) -> str:
    return f"nbd+unix:///?socket={root}/nbd{pid}.{minor}"


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done


def sparse_image(root: Path, name: str = "disk.img") -> Path:
    """64 MiB: random data in [0, 1M) and [5M, 5M+192K), holes elsewhere."""
    path = root / name
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(MiB))
        f.seek(5 * MiB)
        f.write(os.urandom(192 * 1024))
    return path


def file_layout(path: Path) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) of the file, by SEEK_DATA/SEEK_HOLE, read here."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data = size
            if data > pos:
                out.append((pos, data - pos, False))
                pos = data
                continue
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            out.append((pos, hole - pos, True))
            pos = hole
    finally:
        os.close(fd)
    return out


@pytest.fixture
def vbd(tap_ctl: TapCtl, ctl_root: Path) -> tuple[Path, int, int, str]:
    disk = sparse_image(ctl_root)
    pid, minor = create(tap_ctl, f"aio:{disk}")
    return disk, pid, minor, uri(ctl_root, pid, minor)


def test_qemu_img_info_reads_the_size(vbd: tuple[Path, int, int, str]) -> None:
    _, _, _, export = vbd
    info = json.loads(run("qemu-img", "info", "--output=json", export).stdout)
    assert info["virtual-size"] == SIZE


def test_qemu_io_patterns_go_to_the_file_and_come_back(vbd: tuple[Path, int, int, str]) -> None:
    disk, _, _, export = vbd
    done = run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M",
               "-c", "write -P 0xcd 7M 64k", "-c", "write -z 5M 64k", "-c", "flush", export)
    assert "read 1048576/1048576 bytes at offset 0" in done.stdout
    content = disk.read_bytes()
    assert content[:MiB] == b"\xab" * MiB
    assert content[7 * MiB:7 * MiB + 65536] == b"\xcd" * 65536
    assert content[5 * MiB:5 * MiB + 65536] == bytes(65536)
    # The oracle does check: a wrong pattern fails.
    wrong = run("qemu-io", "-f", "raw", "-c", "read -P 0xac 0 4k", export, check=False)
    assert "Pattern verification failed" in wrong.stdout + wrong.stderr


def test_nbdinfo_map_shows_the_files_holes_and_data(vbd: tuple[Path, int, int, str]) -> None:
    disk, _, _, export = vbd
    listed = json.loads(run("nbdinfo", "--map", "--json", export).stdout)
    got = [(e["offset"], e["length"], e["type"] == 0) for e in listed]
    assert got == file_layout(disk)
    assert got[:2] == [(0, MiB, True), (MiB, 4 * MiB, False)]
    assert all(e["type"] in (0, 3) for e in listed)  # data, or hole+zero
    info = json.loads(run("nbdinfo", "--json", export).stdout)["exports"][0]
    assert info["export-size"] == SIZE and info["contexts"] == ["base:allocation"]
    assert info["can_flush"] and info["can_fua"] and info["can_multi_conn"]
    assert info["can_trim"] and info["can_zero"] and not info["is_read_only"]
    assert info["block_size_minimum"] == 512 and info["block_size_maximum"] == 32 * MiB


def test_qemu_img_compare_and_nbdcopy_see_the_file(
    vbd: tuple[Path, int, int, str], ctl_root: Path
) -> None:
    disk, _, _, export = vbd
    assert "identical" in run("qemu-img", "compare", "-f", "raw", "-F", "raw",
                              str(disk), export).stdout
    copy = ctl_root / "copy.img"
    run("nbdcopy", export, str(copy))
    assert copy.read_bytes() == disk.read_bytes()
    with open(copy, "r+b") as f:  # the oracle does tell a difference
        f.seek(5 * MiB + 10)
        f.write(b"\x00\x01")
    differ = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(copy), export,
                 check=False)
    assert differ.returncode == 1


def test_several_clients_at_once(vbd: tuple[Path, int, int, str]) -> None:
    disk, _, _, export = vbd
    procs = [subprocess.Popen(["qemu-io", "-f", "raw", "-c",
                               f"write -P {0x30 + i:#x} {8 + i}M 1M", export],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(4)]
    for proc in procs:
        assert proc.wait(120) == 0, proc.stderr.read() if proc.stderr else ""
    content = disk.read_bytes()
    for i in range(4):
        assert content[(8 + i) * MiB:(9 + i) * MiB] == bytes([0x30 + i]) * MiB


def test_a_read_only_vbd_refuses_writes(tap_ctl: TapCtl, ctl_root: Path) -> None:
    disk = sparse_image(ctl_root)
    before = disk.read_bytes()
    res = tap_ctl("create", "-R", "-a", f"aio:{disk}")
    assert res.code == 0, res.err
    row = parse_list(tap_ctl("list").out)[0]
    export = uri(ctl_root, int(row["pid"]), int(row["minor"]))
    info = json.loads(run("nbdinfo", "--json", export).stdout)["exports"][0]
    assert info["is_read_only"] and not info["can_trim"] and not info["can_zero"]
    assert run("qemu-io", "-f", "raw", "-c", "write -P 0xff 0 4k", export,
               check=False).returncode != 0
    with NbdClient(f"{ctl_root}/nbd{row['pid']}.{row['minor']}") as client:
        with pytest.raises(NbdError) as err:
            client.write(0, b"\xff" * 4096)
        assert err.value.error == 1  # NBD_EPERM, from the server
        assert client.read(0, 4096) == before[:4096]
    assert disk.read_bytes() == before


def test_pause_queues_and_resume_answers_from_the_swapped_image(
    vbd: tuple[Path, int, int, str], tap_ctl: TapCtl, ctl_root: Path
) -> None:
    _, pid, minor, export = vbd
    assert tap_ctl("pause", "-p", str(pid), "-m", str(minor)).code == 0
    assert (ctl_root / f"nbd{pid}.{minor}").is_socket()  # as blktap: kept while paused
    # qemu-io connects and sends its read now; only the swapped image holds 0x5a.
    reader = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 64k", export],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    swapped = ctl_root / "swapped.img"
    with open(swapped, "wb") as f:
        f.truncate(SIZE)
        f.write(b"\x5a" * 65536)
    res = tap_ctl("unpause", "-p", str(pid), "-m", str(minor), "-a", f"aio:{swapped}")
    assert res.code == 0, res.err
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, (out, err)
    assert "read 65536/65536" in out


def nbd_sockets(root: Path, pid: int) -> list[str]:
    """A VBD's export sockets (the process's own `nbdclient<pid>` apart)."""
    return sorted(n for n in os.listdir(root) if n.startswith("nbd") and f"{pid}" in n
                  and not n.startswith("nbdclient"))


def test_the_sockets_go_on_close_detach_and_tapdisk_exit(
    tap_ctl: TapCtl, ctl_root: Path
) -> None:
    disk = sparse_image(ctl_root)
    pid, minor = create(tap_ctl, f"aio:{disk}")
    assert nbd_sockets(ctl_root, pid) == [f"nbd-old{pid}.{minor}", f"nbd{pid}.{minor}",
                                          f"nbdserver-new{pid}.{minor}",
                                          f"nbdserver{pid}.{minor}"]
    idle = NbdClient(f"{ctl_root}/nbd{pid}.{minor}")
    assert tap_ctl("close", "-p", str(pid), "-m", str(minor)).code == 0
    assert nbd_sockets(ctl_root, pid) == []
    assert idle.sock.recv(1) == b""
    assert tap_ctl("open", "-p", str(pid), "-m", str(minor), "-a", f"aio:{disk}").code == 0
    assert len(nbd_sockets(ctl_root, pid)) == 4
    assert tap_ctl("destroy", "-p", str(pid), "-m", str(minor)).code == 0  # close+detach
    assert nbd_sockets(ctl_root, pid) == []
    wait_gone(pid, what="the tapdisk to exit")
    # The fd receiver of `-2 nbd:NAME` lives as long as the process.
    wait_until(lambda: not runtime.nbdclient_path(ctl_root, pid).exists(),
               what="nbdclient<pid> gone with its tapdisk")

    pid, minor = create(tap_ctl, f"aio:{disk}")
    with NbdClient(f"{ctl_root}/nbd{pid}.{minor}") as client:
        os.kill(pid, signal.SIGTERM)
        assert client.sock.recv(1) == b""  # dropped on the way out
    wait_gone(pid, what="the tapdisk to exit")
    assert nbd_sockets(ctl_root, pid) == []


# -- beside a guest's ring on the simulated Xen host ------------------------------------

# The simulated host and guest of test_ring, shared (pytest finds fixtures by name).
machine = ring.machine
guest = ring.guest
ring_vbd = ring.vbd  # an 8 MiB image opened in a tapdisk of the simulated dom0
GUEST, DEVID = ring.GUEST, ring.DEVID


def hostile_clients(path: Path) -> list[socket.socket]:
    """Connections that misbehave, left open while the test goes on."""
    socks = []

    def conn() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        s.connect(str(path))
        socks.append(s)
        return s

    conn().sendall(os.urandom(65536))                        # garbage
    conn()                                                   # connects, says nothing
    stalled = NbdClient(path)                                # half a request, then silence
    stalled.sock.sendall(struct.pack(">IHH", 0x25609513, 0, READ))
    socks.append(stalled.sock)
    oversized = NbdClient(path)                              # a 4 GiB write
    oversized.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, WRITE, 1, 0, 2**32 - 1))
    socks.append(oversized.sock)
    magic = NbdClient(path)                                  # bad request magic
    magic.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, READ, 1, 0, 512))
    socks.append(magic.sock)
    slow = NbdClient(path)                                   # asks, never reads
    for _ in range(8):
        slow.send(READ, 0, 32 * MiB)
    assert slow.sock.recv(1)
    socks.append(slow.sock)
    half = NbdClient(path)                                   # closes its sending side
    half.sock.shutdown(socket.SHUT_WR)
    socks.append(half.sock)
    return socks


def test_hostile_clients_stall_neither_the_ring_nor_a_good_client(
    guest: Any, ring_vbd: tuple[TapdiskClient, int, Path], ctl_root: Path, tap_ctl: TapCtl
) -> None:
    client, minor, disk = ring_vbd
    pid = client.pid
    g = guest.call("open", backend=0, order=1, protocol=BlkifProtocol.NATIVE)
    client.connect_xenblkif(minor, domid=GUEST, devid=DEVID, grefs=tuple(g["grefs"]),
                            order=1, port=g["port"], proto=1)
    path = ctl_root / f"nbd{pid}.{minor}"
    export = uri(ctl_root, pid, minor)
    socks = hostile_clients(path)
    try:
        # The guest writes through its ring; a real client reads it over NBD.
        data = b"\x6b" * 32768  # a guest request moves at most 44 KiB (no indirect)
        assert guest.call("write", sector=2048, data=data.hex()) == 0
        run("qemu-io", "-f", "raw", "-c", "read -P 0x6b 1M 32k", export)
        # A real client writes over NBD; the guest reads it through its ring.
        run("qemu-io", "-f", "raw", "-c", "write -P 0x2c 2M 32k", export)
        back = guest.call("read", sector=4096, count=64)
        assert back["status"] == 0 and bytes.fromhex(back["data"]) == b"\x2c" * 32768
        # Data identical to what the guest sees, through the export, whole.
        assert "identical" in run("qemu-img", "compare", "-f", "raw", "-F", "raw",
                                  str(disk), export).stdout
        # The control socket answers, pause drains past the slow reader, resume serves.
        assert f"pid={pid}" in tap_ctl("list").out
        assert tap_ctl("pause", "-p", str(pid), "-m", str(minor)).code == 0
        assert tap_ctl("unpause", "-p", str(pid), "-m", str(minor)).code == 0
        assert guest.call("write", sector=0, data=(b"\x11" * 512).hex()) == 0
        run("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 512", export)
    finally:
        for s in socks:
            s.close()
    client.disconnect_xenblkif(minor, domid=GUEST, devid=DEVID)
    client.close(minor)
    client.detach(minor)


def test_nbdcopy_of_the_export_equals_the_file(
    vbd: tuple[Path, int, int, str], ctl_root: Path, make_image: Callable[..., str]
) -> None:
    disk, _, _, export = vbd
    target = Path(make_image("target.img", SIZE))
    run("nbdcopy", str(sparse_image(ctl_root, "source.img")), export)  # into the export
    assert disk.read_bytes() == (ctl_root / "source.img").read_bytes()
    run("nbdcopy", export, str(target))                                # and out of it
    assert target.read_bytes() == disk.read_bytes()


def test_a_killed_tapdisks_sockets_are_cleaned_by_the_next_list(
    tap_ctl: TapCtl, ctl_root: Path
) -> None:
    pid, _ = create(tap_ctl, f"aio:{sparse_image(ctl_root)}")
    assert len(nbd_sockets(ctl_root, pid)) == 4
    assert runtime.nbdclient_path(ctl_root, pid).is_socket()
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid, what="the tapdisk to exit")
    assert len(nbd_sockets(ctl_root, pid)) == 4  # nobody was there to remove them
    assert f"pid={pid}" not in tap_ctl("list").out
    assert nbd_sockets(ctl_root, pid) == []
    assert not runtime.nbdclient_path(ctl_root, pid).exists()
