"""The tapdisk's `nbdclient<pid>` receiver against real Unix sockets and SCM_RIGHTS: what
it keeps (blktap's rules: by name, 10 at most, a name again replaces) and what a hostile
sender gets (nothing kept, descriptors closed, the receiver still serving)."""

from __future__ import annotations

import array
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap3.ctl import passfd, runtime
from blktap3.tapdisk.nbd import passed
from tests.support.waiting import wait_until

PID = 4242


@pytest.fixture
def receiver() -> Iterator[passed.FdReceiver]:
    # A short directory: Unix socket paths are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="b3fd-") as root:
        r = passed.FdReceiver(runtime.nbdclient_path(Path(root), PID), passed.PassedSockets())
        r.start()
        try:
            yield r
        finally:
            r.stop()
            assert not r.path.exists()


def roundtrip(fd: int, peer: socket.socket) -> bytes:
    """What the peer of a passed socket reads when we write on the passed descriptor."""
    os.write(fd, b"ping")
    return peer.recv(4)


def send_raw(path: Path, data: bytes, fds: list[int]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(os.fspath(path))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        s.sendmsg([data], anc if fds else [])
        s.settimeout(10)
        while s.recv(16):
            pass


def test_a_passed_socket_is_taken_once_by_its_name(receiver: passed.FdReceiver) -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        passfd.pass_fd(receiver.path.parent, PID, "migrate-1-51712", ours.fileno())
        fd = receiver.sockets.take("migrate-1-51712")
        assert fd is not None and fd != ours.fileno()
        try:
            assert roundtrip(fd, peer) == b"ping"
        finally:
            os.close(fd)
        assert receiver.sockets.take("migrate-1-51712") is None


def test_a_name_passed_again_replaces_and_the_eleventh_is_refused(
    receiver: passed.FdReceiver,
) -> None:
    pairs = [socket.socketpair() for _ in range(passed.MAX_PASSED + 1)]
    try:
        for i, (ours, _) in enumerate(pairs[:passed.MAX_PASSED]):
            passfd.pass_fd(receiver.path.parent, PID, f"n{i}", ours.fileno())
        replaced, newer = pairs[0][1], socket.socketpair()
        pairs.append(newer)
        passfd.pass_fd(receiver.path.parent, PID, "n0", newer[0].fileno())
        # The older n0 was closed: its peer reads EOF once ours closes too.
        pairs[0][0].close()
        assert replaced.recv(1) == b""
        passfd.pass_fd(receiver.path.parent, PID, "eleventh", pairs[passed.MAX_PASSED][0]
                       .fileno())
        assert receiver.sockets.take("eleventh") is None
        assert len(receiver.sockets.names()) == passed.MAX_PASSED
        fd = receiver.sockets.take("n0")
        assert fd is not None
        try:
            assert roundtrip(fd, newer[1]) == b"ping"
        finally:
            os.close(fd)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_hostile_senders_leave_nothing_and_the_receiver_serves_on(
    receiver: passed.FdReceiver, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(passed, "RECV_TIMEOUT", 0.2)
    before = len(os.listdir("/proc/self/fd"))
    a, b = socket.socketpair()
    with a, b:
        send_raw(receiver.path, b"no-fd\0", [])                      # no descriptor
        send_raw(receiver.path, b"\0", [a.fileno()])                 # no name
        send_raw(receiver.path, b"\xff\xfe\0", [a.fileno()])         # not UTF-8
        send_raw(receiver.path, b"two\0", [a.fileno(), b.fileno()])  # one too many
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
            silent.connect(os.fspath(receiver.path))                 # says nothing
            silent.settimeout(10)
            assert silent.recv(1) == b""                             # dropped
        assert receiver.sockets.names() == ["two"]                   # its first one only
        fd = receiver.sockets.take("two")
        assert fd is not None
        os.close(fd)
    # Every descriptor received was closed or handed out (and closed above).
    wait_until(lambda: len(os.listdir("/proc/self/fd")) <= before,
               what="the receiver's descriptors closed")
    ours, peer = socket.socketpair()
    with ours, peer:
        passfd.pass_fd(receiver.path.parent, PID, "after", ours.fileno())
        assert receiver.sockets.names() == ["after"]


def test_the_sender_refuses_a_name_blktap_would_cut_or_cannot_carry() -> None:
    for name in ("", "a\0b", "x" * (passfd.NAME_BYTES + 1)):
        with pytest.raises(OSError) as refused:
            passfd.pass_fd(Path("/nonexistent"), PID, name, 0)
        assert refused.value.errno == 22
