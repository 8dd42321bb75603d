"""The NBD export served in-process on a real file: blktap's sockets, the commands,
pause/resume queueing, and clients that misbehave (garbage, oversized or stalled
requests, readers that never read), while a good client keeps being served."""

from __future__ import annotations

import array
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blktap3.tapdisk.nbd import Export, Listener, open_backend, socket_name
from blktap3.tapdisk.nbd import protocol as nbd
from tests.support.nbd import (
    BLOCK_STATUS,
    CACHE,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_REQ_ONE,
    READ,
    T_CAN_MULTI_CONN,
    T_READ_ONLY,
    T_SEND_TRIM,
    WRITE,
    NbdClient,
    NbdError,
    recv_exact,
)

MiB = 1 << 20
SIZE = 16 * MiB
PID = 4242
MINOR = 3
EINVAL, EPERM, ENOSPC = 22, 1, 28


class FakeImageInfo:
    """What the tapdisk's data path reports of an image (blktap3.datapath.ImageInfo)."""

    def __init__(self, size: int, *, readonly: bool = False, discard: bool = True) -> None:
        self.sectors = size // 512
        self.sector_size = 512
        self.info = 0x4 if readonly else 0  # VDISK_READONLY
        self.physical_sector_size = 4096
        self.discard = discard and not readonly
        self.o_direct = True


class FakeImage:
    """The data path's image as the export sees it: neither CBT-tracked nor mirrored, so
    a raw image is served on the export's own descriptor."""

    shared = False

    def __init__(self, size: int, *, readonly: bool = False) -> None:
        self.info = FakeImageInfo(size, readonly=readonly)


def open_file(path: Path, *, readonly: bool = False) -> tuple[object, nbd.ExportInfo]:
    return open_backend("aio", str(path), FakeImage(SIZE, readonly=readonly))


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="b3nbd-", dir="/tmp"))  # AF_UNIX paths are short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def image(root: Path) -> Path:
    path = root / "disk.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(bytes(range(256)) * 256)  # 64 KiB of data, then a hole
    return path


ExportFactory = Callable[..., Export]


@pytest.fixture
def make_export(root: Path, image: Path) -> Iterator[ExportFactory]:
    started: list[Export] = []

    def make(*, readonly: bool = False, **limits: float) -> Export:
        backend, info = open_backend("aio", str(image), FakeImage(SIZE, readonly=readonly))
        export = Export(root, PID, MINOR, backend, info, **limits)  # type: ignore[arg-type]
        export.start()
        started.append(export)
        return export

    yield make
    for export in started:
        export.stop()


@pytest.fixture
def export(make_export: ExportFactory) -> Export:
    return make_export(io_timeout=5.0, handshake_timeout=5.0)


def path_of(export: Export, kind: Listener = Listener.NEWSTYLE) -> Path:
    return export.paths[kind]


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(str(path))
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes (or 30 s pass: then it did not)."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def request(cmd: int, offset: int = 0, length: int = 512, flags: int = 0,
            cookie: int = 1, magic: int = 0x25609513) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)


# -- sockets ---------------------------------------------------------------------------


def test_blktaps_four_sockets_exist_and_stop_removes_them(export: Export, root: Path) -> None:
    names = {socket_name(kind, PID, MINOR) for kind in Listener}
    assert names == {"nbd4242.3", "nbd-old4242.3", "nbdserver4242.3", "nbdserver-new4242.3"}
    assert names <= set(os.listdir(root))
    export.stop()
    assert not names & set(os.listdir(root))


def test_a_stale_socket_file_of_a_dead_tapdisk_is_replaced(
    root: Path, make_export: ExportFactory
) -> None:
    stale = root / socket_name(Listener.NEWSTYLE, PID, MINOR)
    stale.write_bytes(b"")
    export = make_export()
    with NbdClient(path_of(export)) as client:
        assert client.size == SIZE


# -- the commands --------------------------------------------------------------------


def test_read_write_flush_trim_zero_and_block_status(export: Export, image: Path) -> None:
    with NbdClient(path_of(export)) as client:
        assert client.size == SIZE
        assert client.block_sizes == (512, 4096, 32 * MiB)
        assert client.flags & T_SEND_TRIM and client.flags & T_CAN_MULTI_CONN
        assert client.read(0, 1024) == image.read_bytes()[:1024]
        data = os.urandom(65536)
        client.write(MiB, data, FLAG_FUA)
        assert image.read_bytes()[MiB:MiB + 65536] == data
        assert client.read(MiB + 100, 1000) == data[100:1100]  # unaligned read
        client.flush()
        assert client.block_status(0, 2 * MiB) == [
            (65536, 0), (MiB - 65536, 3), (65536, 0), (MiB - 65536, 3)]
        assert client.block_status(0, 4096, FLAG_REQ_ONE) == [(4096, 0)]
        client.trim(MiB, 65536)
        assert image.read_bytes()[MiB:MiB + 65536] == bytes(65536)
        client.write(MiB, data)
        client.zero(MiB, 4096, FLAG_NO_HOLE | FLAG_FUA)
        client.zero(MiB + 4096, 4096)
        assert image.read_bytes()[MiB:MiB + 65536] == bytes(8192) + data[8192:]


def test_simple_replies_without_structured_negotiation(export: Export, image: Path) -> None:
    with NbdClient(path_of(export), structured=False) as client:
        assert client.read(512, 512) == image.read_bytes()[512:1024]
        with pytest.raises(NbdError) as err:
            client.read(SIZE, 512)
        assert err.value.error == EINVAL
        with pytest.raises(NbdError) as err:  # no context without structured replies
            client.block_status(0, 512)
        assert err.value.error == EINVAL
        assert client.read(0, 512) == image.read_bytes()[:512]  # still in step


def test_export_name_handshake(export: Export) -> None:
    with NbdClient(path_of(export), go=False) as client:
        assert client.size == SIZE
        client.write(0, b"\x01" * 512)
        assert client.read(0, 512) == b"\x01" * 512


def test_nbd_old_socket_speaks_fixed_newstyle_as_blktaps_does(export: Export) -> None:
    with NbdClient(path_of(export, Listener.OLD)) as client:
        assert client.read(0, 512)[:4] == bytes(range(4))


def test_pipelined_requests_are_all_answered(export: Export, image: Path) -> None:
    content = image.read_bytes()
    with NbdClient(path_of(export)) as client:
        cookies = {client.send(READ, i * 4096, 4096): i for i in range(32)}
        for _ in range(32):
            reply = client.receive()
            i = cookies.pop(reply.cookie)
            assert reply.data == content[i * 4096:(i + 1) * 4096]
        assert not cookies


def test_several_clients_at_once_write_their_own_regions(export: Export, image: Path) -> None:
    patterns = {i: bytes([0x40 + i]) * MiB for i in range(4)}

    def writer(i: int) -> None:
        with NbdClient(path_of(export)) as client:
            for part in range(0, MiB, 128 * 1024):
                client.write(4 * MiB + i * MiB + part, patterns[i][part:part + 128 * 1024])
            client.flush()

    threads = [threading.Thread(target=writer, args=(i,)) for i in patterns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    content = image.read_bytes()
    for i, pattern in patterns.items():
        assert content[4 * MiB + i * MiB:5 * MiB + i * MiB] == pattern


def test_a_read_only_image_refuses_changes(make_export: ExportFactory, image: Path) -> None:
    export = make_export(readonly=True)
    before = image.read_bytes()
    with NbdClient(path_of(export)) as client:
        assert client.flags & T_READ_ONLY
        for call in (lambda: client.write(0, b"\xff" * 512), lambda: client.zero(0, 512),
                     lambda: client.trim(0, 512)):
            with pytest.raises(NbdError) as err:
                call()
            assert err.value.error == EPERM
        assert client.read(0, 512) == before[:512]
    assert image.read_bytes() == before


# -- fd passing ----------------------------------------------------------------------


def pass_socket(receiver: Path, fd: int, message: bytes = b"hello") -> socket.socket:
    """Hand `fd` to an fd receiver as xapi-nbd does; the transient connection."""
    transient = connect(receiver)
    transient.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", [fd]))])
    return transient


def test_fd_receiver_new_serves_the_passed_socket_with_fixed_newstyle(export: Export) -> None:
    ours, theirs = socket.socketpair()
    transient = pass_socket(path_of(export, Listener.FD_NEWSTYLE), theirs.fileno())
    theirs.close()
    assert transient.recv(16) == b""  # closed without a reply, as blktap's
    ours.settimeout(30)
    with NbdClient("", sock=ours) as client:
        assert client.read(0, 512)[:4] == bytes(range(4))


def test_fd_receiver_old_greets_the_passed_socket_oldstyle(export: Export) -> None:
    ours, theirs = socket.socketpair()
    pass_socket(path_of(export, Listener.FD_OLDSTYLE), theirs.fileno()).close()
    theirs.close()
    ours.settimeout(30)
    greeting = recv_exact(ours, 152)
    assert greeting[:16] == b"NBDMAGIC" + struct.pack(">Q", 0x00420281861253)
    size, flags = struct.unpack(">QI", greeting[16:28])
    assert size == SIZE and flags & 1 and greeting[28:] == bytes(124)
    ours.sendall(request(READ, 0, 512, cookie=9))
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(ours, 16))
    assert (magic, error, cookie) == (0x67446698, 0, 9)
    assert recv_exact(ours, 512)[:4] == bytes(range(4))
    ours.close()


def test_fd_receiver_drops_what_is_not_a_socket(export: Export) -> None:
    r, w = os.pipe()
    transient = pass_socket(path_of(export, Listener.FD_NEWSTYLE), r)
    assert closed_by_server(transient)
    os.close(r)
    os.close(w)
    empty = connect(path_of(export, Listener.FD_NEWSTYLE))
    empty.sendall(b"no descriptor")
    assert closed_by_server(empty)
    with NbdClient(path_of(export)) as client:
        assert client.size == SIZE


# -- hostile clients -----------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    os.urandom(4096),
    b"\xff\xff\xff\xff",                                      # unknown client flags
    struct.pack(">I", 3) + b"IHAVEOPX" + bytes(8),             # bad option magic
    struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 99, 2**31),  # huge option
])
def test_garbage_in_the_handshake_is_dropped(export: Export, garbage: bytes) -> None:
    sock = connect(path_of(export))
    recv_exact(sock, 18)
    sock.sendall(garbage)
    assert closed_by_server(sock)
    with NbdClient(path_of(export)) as client:
        assert client.size == SIZE


@pytest.mark.parametrize("bad", [
    request(READ, magic=0xDEADBEEF),
    request(WRITE, 0, 32 * MiB + 512),     # a payload too large to skip
    os.urandom(28),
])
def test_a_request_that_breaks_the_framing_drops_only_that_client(
    export: Export, bad: bytes
) -> None:
    with NbdClient(path_of(export)) as good:
        hostile = NbdClient(path_of(export))
        hostile.sock.sendall(bad)
        assert closed_by_server(hostile.sock)
        hostile.close()
        assert good.read(0, 512)[:4] == bytes(range(4))


@pytest.mark.parametrize(("cmd", "offset", "length", "flags", "error"), [
    (READ, 0, 32 * MiB + 512, 0, EINVAL),   # larger than the maximum payload
    (READ, SIZE - 512, 1024, 0, EINVAL),    # beyond the end
    (READ, 2**64 - 512, 1024, 0, EINVAL),
    (WRITE, SIZE, 512, 0, ENOSPC),
    (WRITE, 100, 512, 0, EINVAL),           # not aligned to the minimum block
    (CACHE, 0, 512, 0, EINVAL),             # not offered
    (77, 0, 512, 0, EINVAL),                # unknown command
    (READ, 0, 512, 0x4000, EINVAL),         # unknown flag
    (BLOCK_STATUS, SIZE, 512, 0, EINVAL),
])
def test_bad_requests_get_errors_and_the_connection_goes_on(
    export: Export, cmd: int, offset: int, length: int, flags: int, error: int
) -> None:
    with NbdClient(path_of(export)) as client:
        payload = bytes(length) if cmd == WRITE else b""
        with pytest.raises(NbdError) as err:
            client.call(cmd, offset, length, flags, payload)
        assert err.value.error == error and err.value.message
        assert client.read(0, 512)[:4] == bytes(range(4))


def test_a_client_that_closes_inside_a_request_is_dropped(export: Export) -> None:
    with NbdClient(path_of(export)) as client:
        client.sock.sendall(request(WRITE, 0, 4096)[:20])
        client.sock.shutdown(socket.SHUT_WR)
        assert closed_by_server(client.sock)
    with NbdClient(path_of(export)) as client:
        client.sock.sendall(request(WRITE, 0, 4096) + bytes(1000))  # payload cut short
        client.sock.shutdown(socket.SHUT_WR)
        assert closed_by_server(client.sock)


def test_a_request_that_stalls_halfway_is_dropped_after_the_io_timeout(
    make_export: ExportFactory,
) -> None:
    export = make_export(io_timeout=0.2)
    with NbdClient(path_of(export)) as client:
        client.sock.sendall(request(READ)[:10])
        assert closed_by_server(client.sock)


def test_a_handshake_that_stalls_is_dropped(make_export: ExportFactory) -> None:
    export = make_export(handshake_timeout=0.2)
    sock = connect(path_of(export))
    assert closed_by_server(sock)  # never sent its flags


def test_clients_over_the_limit_are_closed_at_once(make_export: ExportFactory) -> None:
    export = make_export(max_clients=2)
    first, second = NbdClient(path_of(export)), NbdClient(path_of(export))
    third = connect(path_of(export))
    assert third.recv(18) == b""
    first.close()
    second.read(0, 512)
    second.close()


def test_a_reader_that_never_reads_does_not_hold_up_pause(export: Export) -> None:
    slow = NbdClient(path_of(export))
    for _ in range(8):
        slow.send(READ, 0, 32 * MiB - 512 * 1024)
    # One byte arrived: a reply is being sent, far larger than the socket's buffer, and
    # the client reads no more. Its worker is stuck in send, not on the image.
    assert slow.sock.recv(1)
    assert export.pause(timeout=30)
    backend, info = open_backend("aio", str(export.root / "disk.img"), FakeImage(SIZE))
    export.resume(backend, info)  # type: ignore[arg-type]
    with NbdClient(path_of(export)) as good:
        assert good.read(0, 512)[:4] == bytes(range(4))
    slow.close()


# -- pause, resume, stop -------------------------------------------------------------


def test_requests_sent_while_paused_run_after_resume_on_the_new_image(
    export: Export, root: Path, image: Path
) -> None:
    with NbdClient(path_of(export)) as client:
        assert export.pause(timeout=30)
        cookie = client.send(READ, 0, 512)
        late = NbdClient(path_of(export))  # a new client's handshake needs no image
        late.send(READ, 0, 512)
        # The image is swapped while paused; a request run before RESUME could only
        # have seen the old one.
        swapped = root / "swapped.img"
        with open(swapped, "wb") as f:
            f.truncate(SIZE)
            f.write(b"\x5a" * 512)
        backend, info = open_backend("aio", str(swapped), FakeImage(SIZE))
        export.resume(backend, info)  # type: ignore[arg-type]
        reply = client.receive()
        assert reply.cookie == cookie and reply.data == b"\x5a" * 512
        assert late.receive().data == b"\x5a" * 512
        late.close()


def test_stop_drops_idle_and_waiting_clients(export: Export) -> None:
    idle = NbdClient(path_of(export))
    waiting = NbdClient(path_of(export))
    export.pause(timeout=30)
    waiting.send(READ, 0, 512)
    export.stop()
    assert closed_by_server(idle.sock)
    assert closed_by_server(waiting.sock)
    assert export.clients == 0
    with pytest.raises(OSError):
        connect(path_of(export))


_requests = st.lists(st.tuples(
    st.sampled_from([0x25609513, 0x25609513, 0x25609513, 0x67446698]),
    st.integers(0, 0xFFFF),                                     # flags
    st.integers(0, 10),                                         # command
    st.sampled_from([0, 512, SIZE - 512, SIZE, 2**63, 2**64 - 512]),
    st.sampled_from([0, 1, 512, 4096, 65536, 32 * MiB + 1, 2**32 - 1]),
), max_size=8)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=_requests, structured=st.booleans(), tail=st.binary(max_size=64))
def test_any_request_stream_ends_cleanly_and_the_export_goes_on(
    export: Export, image: Path, requests: list[tuple[int, int, int, int, int]],
    structured: bool, tail: bytes,
) -> None:
    before = image.stat().st_size
    with NbdClient(path_of(export), structured=structured) as client:
        stream = bytearray()
        for magic, flags, cmd, offset, length in requests:
            stream += request(cmd, offset, length, flags, magic=magic)
            if cmd == WRITE and length <= 65536:
                stream += os.urandom(length)
        client.sock.sendall(bytes(stream) + tail)
        client.sock.shutdown(socket.SHUT_WR)
        assert closed_by_server(client.sock)
    with NbdClient(path_of(export)) as good:
        assert len(good.read(SIZE - 512, 512)) == 512
    assert image.stat().st_size == before
