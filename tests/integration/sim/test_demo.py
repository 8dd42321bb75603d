"""The README's main job runs to the end and leaves nothing behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import signal_midway, wait_gone

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", ["c", "ocaml"])
def test_demo_passes_every_check(kind: str) -> None:
    result = subprocess.run([sys.executable, "-m", "blktap3.sim.cli", "demo", "--xenstored", kind],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout
    assert result.stdout.rstrip().endswith("demo passed: 0 failed checks")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_demo_takes_its_host_down(sig: signal.Signals) -> None:
    """Stopped with a disk attached: xenstored, tapback and the tapdisk go, and the
    demo's directory with them (issue 17: every CLI cleans up on SIGINT/SIGTERM)."""
    seen: list[str] = []

    def attached(proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if " attached: " in line:
                return

    code, _, err = signal_midway([sys.executable, "-m", "blktap3.sim.cli", "demo"], sig,
                                 attached)
    pids = {int(p) for p in re.findall(r"pid (\d+)", "".join(seen))}
    work = re.search(r"(/tmp/b3demo-[^/\s]+)/", "".join(seen))
    assert len(pids) == 3 and work is not None, seen  # xenstored, tapback, tapdisk
    assert code == 130, err
    assert "Traceback" not in err
    wait_gone(pids, 30)
    assert not Path(work.group(1)).exists()
