"""blktap's req_timeout in the C ring: a retryable I/O error (EAGAIN, EBUSY, EINTR) is
reissued until the request is older than the timeout, then answered BLKIF_RSP_ERROR with
one log line (blktap drivers/tapdisk-vbd.c: tapdisk_vbd_request_should_retry,
__tapdisk_vbd_request_timeout "req %s timed out, retried %d times").  A regular file does
not fail that way, so the ring's test hook turns completions into -EAGAIN (an error
branch: the only stand-in here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blktap3.datapath.lineproc import LineProcess
from tests.support import wait_until

from .conftest import Spawn, connect

pytestmark = pytest.mark.integration

OKAY, ERROR = 0, -1


def test_a_retryable_error_is_retried_and_the_data_lands(
        host: LineProcess, guest: LineProcess, disk: Path) -> None:
    connect(host, guest, disk)
    host.call("inject_eagain", name="r", count=3)
    data = os.urandom(4096)
    assert guest.call("write", sector=8, data=data.hex()) == OKAY
    assert disk.read_bytes()[8 * 512 : 8 * 512 + 4096] == data
    io = host.call("io_stats", name="r")
    assert (io["retried"], io["timed_out"]) == (3, 0)
    assert io["write"]["submitted"] == io["write"]["completed"] == 1


def test_a_request_older_than_req_timeout_fails_with_an_error_and_a_log_line(
        spawn: Spawn, guest: LineProcess, disk: Path, tmp_path: Path) -> None:
    log = (tmp_path / "host.log").open("w")
    host = spawn("blktap3.datapath.host", 0, stderr=log)
    connect(host, guest, disk)
    host.call("req_timeout", name="r", seconds=1)
    host.call("inject_eagain", name="r", count=1 << 31)  # it never stops failing
    back = guest.call("read", sector=0, count=8)
    assert back["status"] == ERROR
    io = host.call("io_stats", name="r")
    assert io["timed_out"] == 1 and io["retried"] > 0
    assert io["read"]["completed"] == 1 and io["read"]["usecs"] >= 1_000_000
    host.call("inject_eagain", name="r", count=0)
    assert guest.call("read", sector=0, count=8)["status"] == OKAY  # the ring goes on
    host.close()
    log.close()
    err = (tmp_path / "host.log").read_text()
    assert "ring d7/51712: req " in err and "timed out, retried" in err
    assert err.count("timed out") == 1


def test_req_timeout_out_of_range_is_refused(host: LineProcess, guest: LineProcess,
                                             disk: Path) -> None:
    connect(host, guest, disk)
    for bad in (0, 1 << 16):
        with pytest.raises(OSError) as exc:
            host.call("req_timeout", name="r", seconds=bad)
        assert exc.value.errno == 22


def test_a_disconnect_does_not_wait_for_retries(host: LineProcess, guest: LineProcess,
                                                disk: Path) -> None:
    # blktap's tapdisk_vbd_request_should_retry: no retry once shutdown is requested; the
    # default timeout (120 s) would otherwise hold the disconnect that long.
    connect(host, guest, disk)
    host.call("inject_eagain", name="r", count=1 << 31)
    guest.send("read", sector=0, count=8)
    wait_until(lambda: host.call("io_stats", name="r")["retried"] > 0, what="retrying")
    host.call("disconnect", name="r", timeout=30.0)
    assert guest.reply()["status"] == ERROR
