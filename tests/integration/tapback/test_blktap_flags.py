"""tapback started as blktap's unit starts it (`tapback -p PIDFILE`, Type=forking)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blktap3.ctl import runtime
from blktap3.sim.host import Host
from tests.support import wait_gone

pytestmark = pytest.mark.integration


def test_without_d_tapback_daemonizes_and_returns_once_watching(
    host: Host, tmp_path: Path
) -> None:
    # blktap v4.0.8 tapback/tapback.c:633: daemon(0, 0) unless -d; its unit
    # (tapback/tapback.service) is Type=forking with `tapback -p /var/run/tapback.pid`.
    pidfile, log = tmp_path / "tapback.pid", tmp_path / "tapback.log"
    done = subprocess.run(
        [sys.executable, "-m", "blktap3.tapback", "-n", "vbd3parity", "-p", str(pidfile),
         "--xenstored", str(host.xenstored_path), "--control-dir", str(tmp_path),
         "--log-file", str(log)],
        capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    pid = int(pidfile.read_text())  # written before the command returned
    try:
        assert runtime.process_alive(pid)
        assert os.getsid(pid) == pid  # a session of its own: detached from ours
        assert '"tapback watching"' in log.read_text()
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_gone(pid, what="the daemon to stop")
    assert not pidfile.exists()
