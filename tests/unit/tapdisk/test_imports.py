"""What a tapdisk imports before it serves: not the back-end's and front-end's machines.

Issue 18: every VBD starts a tapdisk, and its start-up is the control path's longest step
(`tap-ctl create`, the VBD's connect). `blktap3.fsm` loads its modules on first use, so a
tapdisk defines only its own machines' events and effects; the specs are read from their
directory, without importlib.resources (tempfile, zipfile). Run in a fresh interpreter:
this one has imported everything.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

NOT_NEEDED = ("blktap3.fsm.backend", "blktap3.fsm.frontend", "blktap3.fsm.backend_observer",
              "importlib.resources", "tempfile", "zipfile")

PROBE = """
import sys
import blktap3.tapdisk.main
from blktap3.fsm import TapdiskProcess, TapdiskVbd
TapdiskProcess(), TapdiskVbd(0)  # what a tapdisk with one VBD builds (its specs loaded)
print(*sorted(sys.modules))
"""


def test_tapdisk_leaves_the_other_machines_out() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          check=True)
    modules = set(done.stdout.split())
    assert "blktap3.fsm.tapdisk" in modules  # the probe did load what a tapdisk needs
    assert not modules & set(NOT_NEEDED)


@pytest.mark.parametrize("name", ["BackendVbd", "backend", "XenbusState", "load_spec"])
def test_every_name_still_resolves(name: str) -> None:
    """The lazy package answers its names and submodules as the eager one did."""
    done = subprocess.run(
        [sys.executable, "-c", f"import blktap3.fsm as f; print(getattr(f, {name!r}))"],
        capture_output=True, text=True, check=True)
    assert done.stdout.strip()
