"""The export follows the VBD through the control messages (`Tapdisk.handle`, real
images, no socket for control): OPEN starts it, PAUSE holds its requests, RESUME runs
them on the reopened image, CLOSE and the tapdisk's end remove it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap3.ctl import protocol as p
from blktap3.ctl import runtime
from blktap3.tapdisk.control import Tapdisk
from tests.support.nbd import READ, T_READ_ONLY, NbdClient, NbdError

pytest.importorskip("blktap3.datapath", reason="the data path (Image.open) is not built")

T = p.MessageType
MiB = 1 << 20


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="b3nbd-", dir="/tmp"))  # AF_UNIX paths are short
    runtime.ensure_dirs(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tapdisk(root: Path) -> Iterator[Tapdisk]:
    td = Tapdisk(root, drain_timeout=10.0)
    yield td
    td.shutdown()


def send(td: Tapdisk, mtype: T, minor: int, payload: p.Payload) -> p.Message:
    reply = td.handle(p.decode(p.Message(mtype, minor, payload).encode()))
    assert reply.messages[0].type is not T.ERROR, reply
    return reply.messages[0]


def image(root: Path, name: str, fill: bytes = b"") -> Path:
    path = root / name
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.write(fill)
    return path


def opened(td: Tapdisk, root: Path, disk: Path, flags: int = 0) -> int:
    minor = runtime.allocate_minor(root)
    send(td, T.ATTACH, minor, p.Params(devnum=minor))
    send(td, T.OPEN, minor, p.Params(path=f"aio:{disk}", flags=flags))
    return minor


def nbd_socket(root: Path, minor: int) -> Path:
    return root / f"nbd{os.getpid()}.{minor}"


def nbd_files(root: Path) -> list[str]:
    return sorted(name for name in os.listdir(root) if name.startswith("nbd"))


def test_open_exports_the_image_and_close_removes_the_sockets(
    tapdisk: Tapdisk, root: Path
) -> None:
    disk = image(root, "disk.img", b"\x7e" * 4096)
    minor = opened(tapdisk, root, disk)
    pid = os.getpid()
    assert nbd_files(root) == [f"nbd-old{pid}.{minor}", f"nbd{pid}.{minor}",
                               f"nbdserver-new{pid}.{minor}", f"nbdserver{pid}.{minor}"]
    with NbdClient(nbd_socket(root, minor)) as client:
        assert client.size == 8 * MiB
        assert client.read(0, 4096) == b"\x7e" * 4096
        client.write(8192, b"\x01" * 4096)
    assert disk.read_bytes()[8192:12288] == b"\x01" * 4096
    idle = NbdClient(nbd_socket(root, minor))
    send(tapdisk, T.CLOSE, minor, p.Empty())
    assert nbd_files(root) == []
    assert idle.sock.recv(1) == b""  # dropped
    send(tapdisk, T.OPEN, minor, p.Params(path=f"aio:{disk}"))  # reopened: exported again
    with NbdClient(nbd_socket(root, minor)) as client:
        assert client.read(8192, 512) == b"\x01" * 512


def test_a_paused_vbd_holds_requests_until_resume_on_the_new_image(
    tapdisk: Tapdisk, root: Path
) -> None:
    minor = opened(tapdisk, root, image(root, "disk.img", b"\x11" * 512))
    swapped = image(root, "swapped.img", b"\x22" * 512)
    with NbdClient(nbd_socket(root, minor)) as client:
        send(tapdisk, T.PAUSE, minor, p.Empty())
        assert nbd_socket(root, minor).exists()  # paused, not gone (as blktap)
        cookie = client.send(READ, 0, 512)
        send(tapdisk, T.RESUME, minor, p.Resume(new_params=f"aio:{swapped}"))
        reply = client.receive()
        assert reply.cookie == cookie and reply.data == b"\x22" * 512


def test_a_refused_resume_keeps_the_requests_waiting(tapdisk: Tapdisk, root: Path) -> None:
    disk = image(root, "disk.img")
    minor = opened(tapdisk, root, disk)
    bigger = root / "bigger.img"
    with open(bigger, "wb") as f:
        f.truncate(16 * MiB)
    with NbdClient(nbd_socket(root, minor)) as client:
        send(tapdisk, T.PAUSE, minor, p.Empty())
        client.send(READ, 0, 512)
        reply = tapdisk.handle(p.Message(T.RESUME, minor, p.Resume(new_params=f"aio:{bigger}")))
        assert reply.messages[0].type is T.ERROR  # EMEDIUMTYPE: still paused
        send(tapdisk, T.RESUME, minor, p.Resume(new_params=f"aio:{disk}"))
        assert client.receive().data == bytes(512)


def test_a_read_only_vbd_exports_read_only(tapdisk: Tapdisk, root: Path) -> None:
    disk = image(root, "disk.img")
    minor = opened(tapdisk, root, disk, flags=p.OpenFlags.RDONLY)
    with NbdClient(nbd_socket(root, minor)) as client:
        assert client.flags & T_READ_ONLY
        with pytest.raises(NbdError) as err:
            client.write(0, b"\xff" * 512)
        assert err.value.error == 1  # EPERM
    assert disk.read_bytes()[:512] == bytes(512)


def test_the_tapdisks_end_removes_every_export(tapdisk: Tapdisk, root: Path) -> None:
    for name in ("a.img", "b.img"):
        opened(tapdisk, root, image(root, name))
    assert len(nbd_files(root)) == 8
    tapdisk.shutdown()
    assert nbd_files(root) == []


def test_a_vbd_whose_export_cannot_listen_still_opens(tmp_path: Path) -> None:
    root = tmp_path / ("x" * 100)  # beyond AF_UNIX's 108 bytes
    runtime.ensure_dirs(root)
    td = Tapdisk(root)
    try:
        opened(td, root, image(root, "disk.img"))
        assert nbd_files(root) == []
    finally:
        td.shutdown()
