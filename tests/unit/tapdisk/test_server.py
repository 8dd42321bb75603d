"""The control socket served in-process: garbage, silent and concurrent clients."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from blktap3.ctl import protocol as p
from blktap3.ctl import runtime
from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.tapdisk.control import Tapdisk
from blktap3.tapdisk.server import ControlServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    runtime.ensure_dirs(tmp_path)
    srv = ControlServer(Tapdisk(tmp_path), tmp_path / "ctl1", client_timeout=0.5)
    srv.bind()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.stop()
    thread.join(5)
    srv.close()
    assert not thread.is_alive()


def client(server: ControlServer) -> TapdiskClient:
    return TapdiskClient(os.getpid(), path=server.path, timeout=5)


def raw_exchange(server: ControlServer, data: bytes, *, half_close: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(server.path))
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


def error_of(raw: bytes) -> tuple[int, str]:
    reply = p.decode(raw)
    assert reply.type is p.MessageType.ERROR and isinstance(reply.payload, p.Response)
    return reply.payload.error, reply.payload.message


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (struct.pack("<HH", 99, 0).ljust(p.MESSAGE_SIZE, b"\0"), "unknown message type 99"),
        (b"\x03\x00garbage", "short message"),
    ],
)
def test_garbage_gets_einval_and_the_server_goes_on(
    server: ControlServer, data: bytes, why: str
) -> None:
    code, message = error_of(raw_exchange(server, data))
    assert code == errno.EINVAL and why in message
    assert client(server).get_pid() == os.getpid()


def test_a_partial_message_then_silence_is_answered_after_the_timeout(
    server: ControlServer,
) -> None:
    start = time.monotonic()
    code, message = error_of(raw_exchange(server, b"\x03\x00\x00", half_close=False))
    assert code == errno.EINVAL and "short" in message
    assert time.monotonic() - start >= 0.4


def test_a_silent_client_does_not_block_others(server: ControlServer) -> None:
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(str(server.path))
        start = time.monotonic()
        assert client(server).list() == []
        assert time.monotonic() - start < 0.4  # answered before the silent one timed out
        silent.settimeout(5)
        assert silent.recv(1) == b""  # then the server dropped the silent client


def test_concurrent_clients_are_all_answered(server: ControlServer) -> None:
    runtime.allocate_minor(server.tapdisk.root)
    client(server).attach(0)

    def ask(i: int) -> object:
        c = client(server)
        return c.list() if i % 2 else c.get_pid()

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(ask, range(40)))
    assert results.count(os.getpid()) == 20
    assert all(r == results[1] for r in results[1::2]) and len(results[1]) == 1  # type: ignore[arg-type]


def test_errors_reach_the_client_as_ctlerror(server: ControlServer) -> None:
    with pytest.raises(CtlError) as err:
        client(server).detach(5)
    assert err.value.errno == errno.ENODEV and "minor 5" in str(err.value)


def test_last_detach_stops_the_server(tmp_path: Path) -> None:
    runtime.ensure_dirs(tmp_path)
    srv = ControlServer(Tapdisk(tmp_path), tmp_path / "ctl2", client_timeout=1)
    srv.bind()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    runtime.allocate_minor(tmp_path)
    c = client(srv)
    c.attach(0)
    c.detach(0)
    thread.join(5)
    assert not thread.is_alive()
    srv.close()
    assert not srv.path.exists()


# -- hostile clients ---------------------------------------------------------------------


def test_a_client_trickling_bytes_is_cut_off_at_the_timeout(server: ControlServer) -> None:
    """The timeout bounds the whole message, not each byte: one byte every 0.1 s must not
    hold a connection (and its thread) for 544 * 0.1 s."""
    with socket.socket(socket.AF_UNIX) as slow:
        slow.connect(str(server.path))
        slow.setblocking(False)
        start = time.monotonic()
        answered = None
        while time.monotonic() - start < 3:
            try:
                slow.send(b"\x03")
            except OSError:
                answered = time.monotonic() - start  # the server closed on us
                break
            try:
                if slow.recv(p.MESSAGE_SIZE) is not None:
                    answered = time.monotonic() - start
                    break
            except BlockingIOError:
                pass
            time.sleep(0.1)
        assert answered is not None and answered < 1.5, answered


def test_descriptor_exhaustion_does_not_spin_the_accept_loop(
    server: ControlServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accept() failing with EMFILE leaves the connection queued, so the listener stays
    readable: the loop must back off rather than retry at full speed."""
    calls = 0
    failing = True
    real_accept = socket.socket.accept

    def accept(sock: socket.socket) -> tuple[socket.socket, object]:
        nonlocal calls
        if sock is server.listener and failing:
            calls += 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_accept(sock)

    monkeypatch.setattr(socket.socket, "accept", accept)
    with socket.socket(socket.AF_UNIX) as waiting:
        waiting.connect(str(server.path))
        time.sleep(0.5)
        spins = calls
        failing = False  # descriptors came back
        assert 1 <= spins <= 20, spins
    assert client(server).get_pid() == os.getpid()  # and the queued clients get served


def test_silent_connections_hold_a_bounded_number_of_threads(tmp_path: Path) -> None:
    runtime.ensure_dirs(tmp_path)
    srv = ControlServer(Tapdisk(tmp_path), tmp_path / "ctl3", client_timeout=0.3,
                        max_clients=4)
    srv.bind()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    before = threading.active_count()
    silent = []
    try:
        for _ in range(30):
            s = socket.socket(socket.AF_UNIX)
            silent.append(s)
            s.connect(str(srv.path))
        time.sleep(0.2)
        assert threading.active_count() - before <= 4
        start = time.monotonic()
        assert client(srv).get_pid() == os.getpid()  # served once slots free up
        assert time.monotonic() - start < 4
    finally:
        for s in silent:
            s.close()
        srv.stop()
        thread.join(5)
        srv.close()
    assert not thread.is_alive()


def test_a_path_that_is_not_utf8_is_einval_and_the_server_goes_on(
    server: ControlServer,
) -> None:
    pytest.importorskip("blktap3.datapath", reason="the data path is not built")
    minor = runtime.allocate_minor(server.tapdisk.root)
    client(server).attach(minor)
    raw = bytearray(p.Message(p.MessageType.OPEN, minor, p.Params(path="aio:/x")).encode())
    at = raw.index(b"aio:/x")
    bad = b"aio:/tmp/\xff\xfe.img\0"
    raw[at:at + len(bad)] = bad
    code, message = error_of(raw_exchange(server, bytes(raw)))
    assert code == errno.EINVAL and "UTF-8" in message
    assert [v.minor for v in client(server).list()] == [minor]


# -- what blktap's clients send and read beyond one message (blktap v4.0.8 lines) ----------

LOG = p.OpenFlags.ADD_LOG
KEY = p.OpenFlags.OPEN_ENCRYPTED


def open_message(flags: int) -> bytes:
    return p.Message(p.MessageType.OPEN, 0, p.Params(flags=flags, path="aio:/x")).encode()


def attach(server: ControlServer, minor: int) -> None:
    root = server.path.parent
    runtime.allocate_minor(root, minor)
    client(server).attach(minor)


def test_a_log_path_after_open_is_read_then_the_open_refused(server: ControlServer) -> None:
    # drivers/tapdisk-control.c:736 reads a char[256] after OPEN with ADD_LOG.
    attach(server, 0)
    reply = raw_exchange(server, open_message(LOG) + b"/var/log/cbt".ljust(256, b"\0"))
    assert error_of(reply)[0] == errno.EOPNOTSUPP


def test_a_missing_log_path_is_eio(server: ControlServer) -> None:
    # The server waits for the 256 bytes (its client timeout, 0.5 s here) before it
    # answers: it does read them.
    attach(server, 0)
    code, message = error_of(raw_exchange(server, open_message(LOG) + b"/var/log"))
    assert code == errno.EIO and "log path" in message


@pytest.mark.parametrize(
    ("trailer", "code"),
    [
        (b"\x20" + b"k" * 32, errno.EOPNOTSUPP),  # read, then refused: no encryption yet
        (b"\x00", errno.EINVAL),  # drivers/tapdisk-control.c:774: size 0 or > 128
        (b"\xc8" + b"k" * 200, errno.EINVAL),
        (b"\x20" + b"k" * 5, errno.EIO),  # fewer bytes than the size said
    ],
)
def test_a_key_after_open_is_read(server: ControlServer, trailer: bytes, code: int) -> None:
    attach(server, 0)
    assert error_of(raw_exchange(server, open_message(KEY) + trailer))[0] == code


def test_log_path_then_key_in_that_order(server: ControlServer) -> None:
    # control/tap-ctl-ipc.c:191-219 sends the log path first, then the key.
    attach(server, 0)
    data = open_message(LOG | KEY) + b"/l".ljust(256, b"\0") + b"\x40" + b"k" * 64
    assert error_of(raw_exchange(server, data))[0] == errno.EOPNOTSUPP


def test_resume_reads_only_a_log_path(server: ControlServer) -> None:
    # drivers/tapdisk-control.c:1037: after RESUME the tapdisk reads a log path, no key.
    resume = p.Message(p.MessageType.RESUME, 9, p.Resume(flags=LOG | KEY)).encode()
    assert error_of(raw_exchange(server, resume + b"/l".ljust(256, b"\0")))[0] == errno.ENODEV


def test_the_client_sends_what_the_flags_announce(server: ControlServer) -> None:
    attach(server, 0)
    with pytest.raises(CtlError) as err:
        client(server).open(0, "aio:/x", logpath="/var/log/cbt", key=b"k" * 32)
    assert err.value.errno == errno.EOPNOTSUPP  # not EIO: both trailers arrived


def test_a_stats_error_carries_no_text(server: ControlServer) -> None:
    # control/tap-ctl-stats.c:131 reads u.info.length (bytes 16-23) of whatever comes
    # back: an ERROR's text would be taken for a length.
    raw = raw_exchange(server, p.Message(p.MessageType.STATS, 9).encode())
    assert error_of(raw) == (errno.ENODEV, "")
    assert struct.unpack_from("<Q", raw, 16) == (0,)
    # Other errors keep their detail.
    assert error_of(raw_exchange(server, p.Message(p.MessageType.PAUSE, 9).encode()))[1] != ""


def test_stats_of_every_vbd_is_a_json_array(server: ControlServer) -> None:
    # drivers/tapdisk-control.c:1087: cookie (u16)-1 asks for every VBD, "[ {...}, ... ]".
    assert client(server).stats(p.ALL_VBDS) == "[  ]"
    attach(server, 3)
    attach(server, 1)
    text = client(server).stats(p.ALL_VBDS)
    assert text.startswith("[ { ") and text.endswith(" } ]")
    # A VBD without an image is named as blktap's printf names NULL.
    assert [vbd["name"] for vbd in json.loads(text)] == ["(null)", "(null)"]
