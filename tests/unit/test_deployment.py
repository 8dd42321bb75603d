"""contrib/systemd/tapback.service: systemd accepts it, and it runs what the README installs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
UNIT = ROOT / "contrib" / "systemd" / "tapback.service"
INSTALLED_TAPBACK = "/opt/blktap3/bin/tapback"


def _exec_start() -> str:
    match = re.search(r"^ExecStart=(\S+)", UNIT.read_text(), re.MULTILINE)
    assert match is not None
    return match.group(1)


def test_the_unit_runs_tapback_where_the_readme_installs_it() -> None:
    assert _exec_start() == INSTALLED_TAPBACK
    readme = (ROOT / "README.md").read_text()
    assert "python3 -m venv /opt/blktap3" in readme
    assert "contrib/systemd/tapback.service /etc/systemd/system/" in readme


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """Verified as installed: the tapback of this environment stands in for
    /opt/blktap3's, and the man pages it names are found in contrib/man."""
    tapback = Path(sys.executable).parent / "tapback"
    unit = tmp_path / "tapback.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_TAPBACK, str(tapback)))
    man = tmp_path / "man"
    for page in (ROOT / "contrib" / "man").iterdir():
        section = man / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        (section / page.name).symlink_to(page)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "MANPATH": str(man)},
                          check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    # The check can fail: a unit that requires a unit Debian does not have is refused.
    unit.write_text(unit.read_text().replace(
        "Wants=xen.service", "Requires=xen-nowhere.service\nWants=xen.service"))
    refused = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                             text=True, env={"PATH": "/usr/bin:/bin", "MANPATH": str(man)},
                             check=False)
    assert refused.returncode != 0 and "xen-nowhere.service" in refused.stderr
