"""The control client against tapdisks that die mid-request (no tapdisk process needed)."""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap3.ctl.client import Connection, CtlError, TapdiskClient


@pytest.fixture
def dying_tapdisk(tmp_path: Path) -> Iterator[Path]:
    """A socket whose server reads nothing and closes at once: the reader of our request
    is gone, so the client meets ECONNRESET/EPIPE rather than a clean end of file."""
    path = tmp_path / "ctl42"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(8)
    listener.settimeout(0.05)  # so that the thread sees `done` soon
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.recv(1)  # part of the request stays unread: close() resets
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    done.set()
    listener.close()
    thread.join(5)


def test_a_tapdisk_dying_mid_request_is_a_ctlerror(dying_tapdisk: Path) -> None:
    client = TapdiskClient(42, path=dying_tapdisk, timeout=5)
    for _ in range(5):  # the reset may hit sendall or recv: both must be CtlError
        with pytest.raises(CtlError) as err:
            client.get_pid()
        assert err.value.errno in (errno.ECONNRESET, errno.EPIPE, errno.EPROTO)


@pytest.mark.parametrize("timeout", [-1.0, float("nan")])
def test_an_unusable_timeout_is_einval(dying_tapdisk: Path, timeout: float) -> None:
    with pytest.raises(CtlError) as err:
        Connection(dying_tapdisk, timeout)
    assert err.value.errno == errno.EINVAL
