"""What `tap-ctl list` imports: nothing heavy on the control path's most frequent call.

Issue 18: `tap-ctl list` runs in every hotplug script and storage-manager probe, so its
start-up is the interpreter's plus what it imports. structlog (asyncio, ssl, OpenSSL:
~100 ms, 10 MB), transitions, cffi, the thread pool and subprocess are imported only by
the paths that use them. Run in a fresh interpreter: this one has imported everything.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

HEAVY = ("structlog", "transitions", "cffi", "asyncio", "ssl", "concurrent.futures",
         "subprocess", "logging", "json", "blktap3.fsm", "blktap3.datapath",
         # With no tapdisk to speak to: neither the client nor the message codec, nor
         # dataclasses (inspect, ast, dis, tokenize: the codec's records need them).
         "blktap3.ctl.client", "blktap3.ctl.protocol", "dataclasses", "socket")

PROBE = """
import sys
from blktap3.ctl import cli
code = cli.main(sys.argv[1:])
print("MODULES", code, *sorted(sys.modules), file=sys.stderr)
"""


def _imports(root: Path, *argv: str) -> tuple[int, set[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv],
                          env={"BLKTAP_CONTROL_DIR": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, check=True)
    _, code, *modules = done.stderr.strip().splitlines()[-1].split()
    return int(code), set(modules)


@pytest.mark.parametrize("argv", [("list",), ("list", "-m", "3"), ("list", "-p", "77"),
                                  ("list", "-h")])
def test_list_imports_nothing_heavy(tmp_path: Path, argv: tuple[str, ...]) -> None:
    code, modules = _imports(tmp_path, *argv)
    assert code == 0
    assert not {m for m in modules for h in HEAVY if m == h or m.startswith(h + ".")}


def test_debug_imports_structlog(tmp_path: Path) -> None:
    """The probe can fail: with --debug, a message sent loads structlog. The "tapdisk"
    is a socket named for a live pid (ours) that hangs up on each connection."""
    pid = os.getpid()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / f"ctl{pid}"))
        listener.listen()

        def hang_up() -> None:
            with contextlib.suppress(OSError):
                while True:
                    listener.accept()[0].close()

        threading.Thread(target=hang_up, daemon=True).start()
        _, modules = _imports(tmp_path, "list", "-p", str(pid), "--debug")
        _, quiet = _imports(tmp_path, "list", "-p", str(pid))
    assert "structlog" in modules
    assert "structlog" not in quiet
