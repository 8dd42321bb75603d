"""The README's main job runs to the end and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", ["c", "ocaml"])
def test_demo_passes_every_check(kind: str) -> None:
    result = subprocess.run([sys.executable, "-m", "blktap3.sim.cli", "demo", "--xenstored", kind],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout
    assert result.stdout.rstrip().endswith("demo passed: 0 failed checks")
