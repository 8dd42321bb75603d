"""tapback takes blktap's options with blktap's meanings (tapback/tapback.c of blktap
v4.0.8, lines cited), beside its own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_mock import MockerFixture

from blktap3.ctl.client import TapdiskClient
from blktap3.ctl.protocol import ImageInfo
from blktap3.tapback.daemon import Tapback, TapbackConfig
from blktap3.tapback.executor import VbdConfig
from blktap3.tapback.main import build_parser
from blktap3.tapback.store import SharedStore
from blktap3.tapback.worker import Prompt, VbdWorker
from tests.support import wait_until

from .test_worker import PATHS, FakeXenStore, _publish_transport
from .test_worker import xs as xs  # the fixture, under its own name


def test_blktaps_short_options() -> None:
    # Line 587: getopt_long(argc, argv, "hdvn:p:x:b", ...).
    args = build_parser().parse_args(
        ["-d", "-v", "-n", "vbd9", "-p", "/run/t.pid", "-x", "7", "-b"])
    assert (args.debug, args.verbose, args.backend_kind, args.pid_file) == (
        True, True, "vbd9", "/run/t.pid")
    assert (args.frontend_domid, args.barrier) == (7, False)


def test_blktaps_long_options() -> None:
    # Lines 575-583: --debug, --verbose, --name, --pidfile, --domain, --nobarrier.
    args = build_parser().parse_args(
        ["--debug", "--verbose", "--name", "vbd9", "--pidfile", "/run/t.pid",
         "--domain", "0x0c", "--nobarrier"])
    assert (args.debug, args.backend_kind, args.pid_file, args.frontend_domid) == (
        True, "vbd9", "/run/t.pid", 12)
    assert args.barrier is False


def test_the_defaults_are_blktaps() -> None:
    # Lines 557-562: name vbd3, no pid file, every domain, barrier on, daemonize.
    args = build_parser().parse_args([])
    assert (args.backend_kind, args.pid_file, args.frontend_domid) == ("vbd3", None, None)
    assert (args.barrier, args.debug, args.verbose) == (True, False, False)


@pytest.mark.parametrize(("text", "domid"), [("12", 12), ("0x0c", 12), ("014", 12),
                                             ("0", None)])
def test_domain_is_read_as_strtoul_reads_it(text: str, domid: int | None) -> None:
    # Line 616: strtoul(optarg, &end, 0); a domid of 0 is the master's, every domain.
    assert build_parser().parse_args(["-x", text]).frontend_domid == domid


@pytest.mark.parametrize("argv", [["-q"], ["--frobnicate"], ["-x", "twelve"], ["-x"]])
def test_a_bad_option_is_one_line(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "blktap3.tapback", *argv],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("tapback: ") and done.stderr.count("\n") == 1


def test_nobarrier_offers_no_barrier(xs: FakeXenStore, mocker: MockerFixture) -> None:
    # tapback/frontend.c:296 writes feature-barrier = 0 when -b was given.
    mocker.patch.object(TapdiskClient, "disk_info", return_value=ImageInfo(2048, 512, 0))
    mocker.patch.object(TapdiskClient, "connect_xenblkif")
    worker = VbdWorker(PATHS, PATHS.frontend, SharedStore(lambda: xs),  # type: ignore[arg-type,return-value]
                       VbdConfig(Path("/nonexistent"), barrier=False),
                       on_final=lambda worker: None, on_tapdisk=lambda worker, pid: None)
    worker.start()
    try:
        _publish_transport(xs)
        worker.post(Prompt.REFRESH)
        wait_until(lambda: xs.nodes.get(PATHS.backend_key("state")) == "4", 10, "Connected")
        assert xs.nodes[PATHS.backend_key("feature-barrier")] == "0"
    finally:
        worker.post(Prompt.STOP)
        worker.join(5)


@pytest.fixture
def one_guest_tapback(tmp_path: Path) -> Iterator[tuple[Tapback, list[str]]]:
    daemon = Tapback(TapbackConfig(control_root=tmp_path, frontend_domid=PATHS.domid))
    reads: list[str] = []

    def connect() -> FakeXenStore:
        reads.append("connect")
        raise ConnectionRefusedError("no xenstored in this test")

    daemon.store = SharedStore(connect)  # type: ignore[arg-type]
    yield daemon, reads


def test_domain_serves_only_that_guest(one_guest_tapback: tuple[Tapback, list[str]]) -> None:
    # -x: blktap runs one tapback per guest (backend.c:1204-1230 execs `tapback -d -x N`);
    # ours serves that guest's VBDs only and leaves other guests' alone.
    daemon, reads = one_guest_tapback
    daemon._discover(None, (PATHS.domid + 1, PATHS.devid))  # type: ignore[arg-type]
    assert reads == [] and daemon.workers == {}  # another guest: not even read
    with pytest.raises(ConnectionRefusedError):
        daemon._discover(None, (PATHS.domid, PATHS.devid))  # type: ignore[arg-type]
    assert reads == ["connect"]  # its own guest: looked at


def test_a_daemon_that_cannot_start_fails_the_command(tmp_path: Path) -> None:
    # Without -d the command returns only once the daemon is ready (blktap's unit is
    # Type=forking): a daemon that stops first makes it fail, in one line.
    done = subprocess.run(
        [sys.executable, "-m", "blktap3.tapback", "-p", str(tmp_path / "t.pid"),
         "--xenstored", str(tmp_path / "no-xenstored"), "--control-dir", str(tmp_path),
         "--log-file", str(tmp_path / "log")],
        capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith("tapback: ") and done.stderr.count("\n") == 1
    assert "(ENOENT); is xenstored running?" in done.stderr  # the daemon's own reason
    assert not (tmp_path / "t.pid").exists()
    assert '"event": "tapback could not start"' in (tmp_path / "log").read_text()
