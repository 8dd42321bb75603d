"""The control socket served in-process: garbage, silent and concurrent clients."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from blktap3.ctl import protocol as p
from blktap3.ctl import runtime
from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.tapdisk import server as server_mod
from blktap3.tapdisk.control import Tapdisk
from blktap3.tapdisk.server import ControlServer
from tests.support import wait_until

Serve = Callable[..., ControlServer]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """`serve(name, **options)`: a ControlServer on `tmp_path/name`, served by a thread;
    stopped, joined and closed when the test ends."""
    runtime.ensure_dirs(tmp_path)
    running: list[tuple[ControlServer, threading.Thread]] = []

    def start(name: str, **options: Any) -> ControlServer:
        srv = ControlServer(Tapdisk(tmp_path), tmp_path / name, **options)
        srv.bind()
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        running.append((srv, thread))
        return srv

    yield start
    for srv, thread in running:
        srv.stop()
        thread.join(5)
        srv.close()
        assert not thread.is_alive()


@pytest.fixture
def server(serve: Serve) -> ControlServer:
    return serve("ctl1", client_timeout=0.5)


def client(server: ControlServer, timeout: float = 5) -> TapdiskClient:
    return TapdiskClient(os.getpid(), path=server.path, timeout=timeout)


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
    # The client keeps its side open: only the server's timeout can end the message, so
    # a "short message" answer is the timeout at work (a server without one would leave
    # this client waiting for its own 5 s socket timeout).
    code, message = error_of(raw_exchange(server, b"\x03\x00\x00", half_close=False))
    assert code == errno.EINVAL and "short" in message


def test_a_silent_client_does_not_block_others(serve: Serve) -> None:
    srv = serve("ctl-silent", client_timeout=60)  # the silent one outlives the test
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(str(srv.path))
        wait_until(lambda: srv.clients == 1, 5, "the silent connection to be served")
        assert client(srv).list() == []
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):  # still held, unanswered, while the other was
            silent.recv(1)


def test_a_silent_client_is_dropped_at_the_timeout(server: ControlServer) -> None:
    with capture_logs() as logs, socket.socket(socket.AF_UNIX) as silent:
        silent.connect(str(server.path))
        silent.settimeout(5)
        assert silent.recv(1) == b""  # the server closed it
    assert {"event": "client timed out", "timeout": 0.5, "log_level": "warning"} in logs
    assert client(server).get_pid() == os.getpid()


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
    thread.join(5)  # the loop ends by itself
    assert not thread.is_alive()
    srv.close()
    assert not srv.path.exists()


# -- hostile clients ---------------------------------------------------------------------


def test_a_client_trickling_bytes_is_cut_off_at_the_timeout(server: ControlServer) -> None:
    """The timeout bounds the whole message, not each byte: a client sending one byte
    every 0.1 s is answered (or dropped) long before its 544 bytes are in; a timeout per
    byte would hold the connection (and its thread) for all of them."""
    with socket.socket(socket.AF_UNIX) as slow:
        slow.connect(str(server.path))
        slow.setblocking(False)
        sent = 0
        answered = False
        while sent < p.MESSAGE_SIZE and not answered:
            try:
                slow.send(b"\x03")
                sent += 1
                slow.recv(p.MESSAGE_SIZE)  # an answer or the end: either way, cut off
                answered = True
            except BlockingIOError:
                pass  # not answered yet
            except OSError:
                answered = True  # the server closed on us
            # The stalling client under test (a byte per 0.1 s), not a synchronisation.
            time.sleep(0.1)
        assert answered and sent < p.MESSAGE_SIZE, sent


class FrozenClock:
    """Stands in for the server module's `time`: `monotonic()` stands still until
    `advance()`d, and counts its reads (each turn of the accept loop makes one)."""

    def __init__(self) -> None:
        self.now = time.monotonic()
        self.reads = 0

    def monotonic(self) -> float:
        self.reads += 1
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_descriptor_exhaustion_does_not_spin_the_accept_loop(
    server: ControlServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accept() failing with EMFILE leaves the connection queued, so the listener stays
    readable: the loop must back off (no accept before ACCEPT_BACKOFF has passed) rather
    than retry at full speed. The server's clock is frozen, so "has passed" is ours to say."""
    clock = FrozenClock()
    monkeypatch.setattr(server_mod, "time", clock)
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
        wait_until(lambda: calls, 5, "the first accept, failing")
        turns = clock.reads
        wait_until(lambda: clock.reads >= turns + 3, 5, "three turns of the accept loop")
        assert calls == 1, "accept retried before the back-off ended"
        clock.advance(server_mod.ACCEPT_BACKOFF)
        wait_until(lambda: calls == 2, 5, "accept retried once the back-off ended")
        failing = False  # descriptors came back
        clock.advance(server_mod.ACCEPT_BACKOFF)
        assert client(server).get_pid() == os.getpid()  # the queued clients get served


def test_silent_connections_hold_a_bounded_number_of_threads(serve: Serve) -> None:
    srv = serve("ctl3", client_timeout=0.3, max_clients=4)
    before = threading.active_count()
    silent = []
    try:
        for _ in range(30):
            s = socket.socket(socket.AF_UNIX)
            silent.append(s)
            s.connect(str(srv.path))
        wait_until(lambda: srv.clients == srv.max_clients, 5, "every slot taken")
        assert threading.active_count() - before <= srv.max_clients
        # Served once the silent ones ahead of it timed out, four at a time.
        assert client(srv, timeout=60).get_pid() == os.getpid()
    finally:
        for s in silent:
            s.close()


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


def test_a_log_path_after_open_reaches_the_open(server: ControlServer, tmp_path: Path) -> None:
    # drivers/tapdisk-control.c:736 reads a char[256] after OPEN with ADD_LOG; the
    # image opens, then the log (missing) refuses the OPEN, which says why.
    attach(server, 0)
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    message = p.Message(p.MessageType.OPEN, 0, p.Params(flags=LOG, path=f"aio:{disk}"))
    log = str(tmp_path / "missing.log").encode().ljust(256, b"\0")
    code, text = error_of(raw_exchange(server, message.encode() + log))
    assert code == errno.ENOENT and "CBT log" in text and "missing.log" in text


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
