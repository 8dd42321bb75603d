"""Xen's own block-tap script (Debian 13's xen-utils-common, Xen 4.20) against our tap-ctl,
tapdisk and tapback (--toolstack libxl) on the simulated host: the oracle of libxl's order.

The script is not ours and not in the tree: it is fetched with `apt-get download` from
Debian trixie once (cached beside the real-Xen rig's packages) and run as libxl runs it
(`block-tap add|remove` with XENBUS_PATH, XENBUS_TYPE=vbd3, XENBUS_BASE_PATH=backend),
after libxl's nodes and the back-end's InitWait, and before libxl's removal of the nodes.
It hard-codes /run/blktap-control, so it runs in a private mount namespace where that
is the simulated host's control directory. Skipped when the package cannot be fetched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap3.ctl import runtime
from blktap3.sim.guest import run_guest
from blktap3.sim.host import Host
from blktap3.sim.hotplug import tapdisk_env
from blktap3.sim.toolstack import BLOCK_TAP_SCRIPT, Image
from blktap3.xenbus import XenbusState
from tests.realxen.debs import cache_dir
from tests.support import wait_gone, wait_until
from tests.support.processes import tapdisk_pids

from .conftest import serving

pytestmark = pytest.mark.integration
DOMID = 6
XVDA = 51712
PACKAGE = "xen-utils-common"
SOURCES = """Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def trixie_scripts() -> Path:
    """/etc/xen/scripts of trixie's xen-utils-common, fetched once (skip if it cannot be)."""
    base = cache_dir() / "trixie-xen-utils-common"
    scripts = base / "root" / "etc" / "xen" / "scripts"
    if (scripts / "block-tap").is_file():
        return scripts
    apt = base / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "sources"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "sources" / "trixie.sources").write_text(SOURCES)
    options = ["-o", "Dir::Etc::sourcelist=/dev/null",
               "-o", f"Dir::Etc::sourceparts={apt / 'sources'}",
               "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
               "-o", "Debug::NoLocking=1", "-qq"]
    try:
        subprocess.run(["apt-get", *options, "update"], check=True, capture_output=True,
                       timeout=300)
        subprocess.run(["apt-get", *options, "download", PACKAGE], check=True,
                       capture_output=True, timeout=300, cwd=base)
        (deb,) = base.glob(f"{PACKAGE}_*.deb")
        subprocess.run(["dpkg", "-x", str(deb), str(base / "root")], check=True, timeout=60)
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        pytest.skip(f"Debian trixie's {PACKAGE} cannot be fetched here: {exc}")
    if "vbd3" not in (scripts / "block-tap").read_text():
        pytest.fail(f"{scripts / 'block-tap'} knows no vbd3 (not Xen >= 4.19's)")
    return scripts


@pytest.fixture
def xenstored_kind() -> str:
    return "c"


@pytest.fixture
def libxl(host: Host) -> Iterator[Host]:
    yield from serving(host, "libxl", DOMID)


def block_tap(host: Host, scripts: Path, command: str, backend: str) -> None:
    """Run Xen's block-tap as libxl would, with /run/blktap-control = the host's."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a private /run")
    # Xen's hotplugpath.sh puts the system's directories before ours in PATH.
    system = shutil.which("tap-ctl", path="/usr/bin:/usr/sbin:/sbin:/bin")
    if system is not None:
        pytest.skip(f"{system} would be run by the script instead of ours")
    env = {**tapdisk_env(host.run_dir), **host.env(),
           runtime.ROOT_ENV: "/run/blktap-control",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "XENBUS_PATH": backend, "XENBUS_TYPE": "vbd3", "XENBUS_BASE_PATH": "backend"}
    # A private /run (block-tap's lock, the control dir) and /var/log (its xtrace log).
    mounts = (f"mount -t tmpfs tmpfs /run && mkdir -p /run/blktap-control && "
              f"mount -t tmpfs tmpfs /var/log && mkdir /var/log/xen && "
              f"mount --bind {host.control_dir} /run/blktap-control && "
              f"exec bash {scripts / 'block-tap'} {command}")
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", mounts],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"block-tap {command}: {done.returncode}\n{done.stderr}"


def test_xen_block_tap_drives_our_tap_ctl_in_libxl_order(libxl: Host) -> None:
    scripts = trixie_scripts()
    image = Path(libxl.run_dir) / "xen.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    # libxl: the nodes (with `script`), then its wait for InitWait, then `block-tap add`
    with libxl.toolstack() as ts:
        paths = ts.add_vbd(DOMID, XVDA, Image.parse(f"aio:{image}"), script=BLOCK_TAP_SCRIPT)
    wait_until(lambda: _read(libxl, paths.backend_key("state")) == "2", what="InitWait")
    block_tap(libxl, scripts, "add", paths.backend)
    pid, minor = _read(libxl, paths.backend_key("pid")), _read(libxl, paths.backend_key("minor"))
    assert _read(libxl, paths.backend_key("physical-device-path")) == \
        f"/run/blktap-control/nbd{pid}.{minor}"
    assert _read(libxl, paths.backend_key("hotplug-status")) == "connected"
    assert [str(p) for p in tapdisk_pids(libxl.control_dir)] == [pid]

    result = run_guest(libxl, DOMID, XVDA, "linux", "verify", timeout=60.0)
    assert result.ok, result.summary()

    # libxl's removal: online=0 (and Closing unless Closed), wait for Closed, block-tap
    # remove (tap-ctl destroy with pid/minor read back), then the nodes removed.
    with libxl.xs() as xs:
        xs.write(paths.backend_key("online"), "0")
        if xs.read(paths.backend_key("state")) != XenbusState.CLOSED.wire():
            xs.write(paths.backend_key("state"), XenbusState.CLOSING.wire())
    wait_until(lambda: _read(libxl, paths.backend_key("state")) == "6", what="Closed")
    block_tap(libxl, scripts, "remove", paths.backend)
    wait_gone(int(pid or 0), what="tapdisk destroyed by block-tap remove")
    assert runtime.allocated_minors(libxl.control_dir) == []
    with libxl.toolstack() as ts:
        ts.remove_vbd(DOMID, XVDA)


def _read(host: Host, key: str) -> str | None:
    with host.xs() as xs:
        return xs.read_optional(key)
