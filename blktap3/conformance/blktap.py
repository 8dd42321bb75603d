"""blktap's own back-end under the harness: its tapback and tapdisk, from a build of
xapi-project/blktap, run on the simulated host.

The user builds blktap (`configure --prefix=P`, `make install`) and names `P`
(`--prefix`, or `$BLKTAP_BUILD`); nothing of blktap is part of this project. From `P`:
`bin/tapback` (the daemon), `sbin/tap-ctl` (what the toolstack's hotplug step runs, as
Xen's block-tap script does) and `libexec/tapdisk` (which that tap-ctl spawns).

blktap's binaries have their paths compiled in: tapdisks' sockets and minors under
`/run/blktap-control`, tapback's socket `/var/run/tapback.<domid|master>`, stats under
`/dev/shm`. So a run with this back-end happens in a private mount namespace
(`in_namespace`: `unshare --mount`, root) with tmpfs on /run and /dev/shm, and each
scenario's host has its control directory bind-mounted on `/run/blktap-control`: the
harness reaches the same tapdisks through the host's directory, blktap through its own
path. The host's other parts are reached as with ours: `XENSTORED_PATH` (libxenstore)
for xenstored, xensim preloaded for the Xen devices and libraries (blktap's tapdisk
opens `/dev/xen/gntdev` itself, and tapback will not start without it: xensim's node).

tapback (tapback.c) forks a slave per guest domain and ignores SIGTERM while it serves a
device or a slave; it is stopped as systemd ends a unit that will not stop: SIGKILL to
its process group, after a short grace. It logs only to syslog and keeps no status
file, so the harness cannot see its machine (`handled` is not judged). A restarted
tapback takes back no VBD until its back-end directory changes (`wait_settled`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from blktap3.sim import xensim
from blktap3.sim.host import Host
from blktap3.vbd3.blocktap import TapCtl

from .backends import Unlogged

RUN_ROOT = Path("/run/blktap-control")  # blktap's compiled-in tapdisk runtime root
SHM_DIR = Path("/dev/shm")  # blktap's stats: vbd3-<domid>-<devid>, td3-<pid> (private here)
SOCKET_DIR = Path("/var/run")  # tapback.c: /var/run/tapback.<domid> and .master
NS_ENV = "BLKTAP3_CONFORMANCE_NS"  # set inside the private mount namespace
PREFIX_ENV = "BLKTAP_BUILD"
BINARIES = ("bin/tapback", "sbin/tap-ctl", "libexec/tapdisk")
START_TIMEOUT = 10.0
STOP_GRACE = 0.5  # tapback answers SIGTERM at once or not at all (see module doc)
POLL = 0.02


class BlktapError(RuntimeError):
    """blktap's back-end cannot be used as asked (said in one line)."""


def check_prefix(prefix: str | os.PathLike[str] | None) -> Path:
    """The install prefix of a blktap build, with every binary the harness runs."""
    if not prefix:
        raise BlktapError(f"--backend blktap needs --prefix DIR (or ${PREFIX_ENV}): the "
                          "install prefix of a blktap build")
    path = Path(prefix).absolute()
    missing = [b for b in BINARIES if not os.access(path / b, os.X_OK)]
    if missing:
        raise BlktapError(f"no {', '.join(missing)} under {path}: not a blktap install "
                          "prefix (configure --prefix=DIR; make install in control, "
                          "drivers and tapback)")
    return path


def in_namespace() -> bool:
    return os.environ.get(NS_ENV) == "1"


def reexec_in_namespace(argv: Sequence[str]) -> int:
    """Run the harness again in a private mount namespace; its exit status."""
    if os.geteuid() != 0:
        raise BlktapError("--backend blktap needs root: blktap's paths are compiled in, "
                          "so it runs in a private mount namespace (unshare --mount)")
    env = {**os.environ, NS_ENV: "1"}
    command = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
               "blktap3.conformance.cli", *argv]
    try:
        return subprocess.run(command, env=env, check=False).returncode
    except OSError as e:
        raise BlktapError(f"unshare: {e}") from e


def private_mounts() -> None:
    """Inside the namespace: tmpfs on /run and /dev/shm (blktap's runtime files)."""
    for where in ("/run", "/dev/shm"):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "blktap3-conformance",
                        where], check=True)
    RUN_ROOT.mkdir(parents=True, exist_ok=True)


class BlktapBackend(Unlogged):
    """blktap's tapback and tapdisk from the build at `prefix` (see the module doc)."""

    name = "blktap"

    def __init__(self, prefix: str | os.PathLike[str] | None) -> None:
        self.prefix = check_prefix(prefix)
        self.xenstored_via: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._bound: Path | None = None

    # -- the host's control directory seen at blktap's path ------------------------------
    def _bind(self, host: Host) -> None:
        if not in_namespace():
            raise BlktapError("blktap's back-end runs only in the harness's private mount "
                              "namespace (blktap3-conformance re-executes itself there)")
        if self._bound == host.control_dir:
            return
        if self._bound is not None:  # lazily: the last host's sockets may still be bound
            subprocess.run(["umount", "-l", str(RUN_ROOT)], check=False)
        host.control_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(host.control_dir), str(RUN_ROOT)], check=True)
        self._bound = host.control_dir
        # A new host is a machine just booted: no stats of an earlier host's tapdisks.
        # blktap's tapdisk creates /dev/shm/vbd3-<domid>-<devid>/io_ring~ exclusively
        # (td-blkif.c) and a killed one leaves it: the next ring of that VBD, here the
        # next scenario's (same domid and devid), would be refused EEXIST.
        for stale in [*SHM_DIR.glob("vbd3-*"), *SHM_DIR.glob("td3-*")]:
            shutil.rmtree(stale, ignore_errors=True)

    def env(self, host: Host) -> dict[str, str]:
        """A blktap process on the host: dom0 of the machine, reaching its xenstored."""
        xenstored = self.xenstored_via or host.xenstored_path
        return {**os.environ, **xensim.process_env(host.run_dir, 0),
                "XENSTORED_PATH": str(xenstored),
                # tapback execs its per-domain slaves by name (backend.c)
                "PATH": f"{self.prefix / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def tap_ctl(self, host: Host) -> TapCtl:
        """blktap's tap-ctl, for the toolstack's hotplug step (it spawns blktap's tapdisk)."""
        self._bind(host)
        return TapCtl((str(self.prefix / "sbin" / "tap-ctl"),), self.env(host), RUN_ROOT)

    # -- the daemon ------------------------------------------------------------------------
    def start(self, host: Host) -> None:
        self._bind(host)
        master = SOCKET_DIR / "tapback.master"
        master.unlink(missing_ok=True)
        with open(host.run_dir / "blktap-tapback.out", "ab") as out:
            # -d: stay in the foreground (it logs to syslog only; the file keeps what
            # it prints before that, e.g. a failed start).
            self._proc = subprocess.Popen([str(self.prefix / "bin" / "tapback"), "-d"],
                                          env=self.env(host), stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=out, start_new_session=True)
        # The master binds its socket once it watches backend/vbd3 (tapback.c).
        self._wait(lambda: master.exists(), "tapback's socket")

    def _wait(self, ready: object, what: str) -> None:
        assert callable(ready)
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise BlktapError(f"blktap's tapback exited ({code}) before {what}")
            if time.monotonic() > deadline:
                raise BlktapError(f"no {what} within {START_TIMEOUT:g} s")
            time.sleep(POLL)  # nothing announces it: look again soon

    def stop(self, host: Host) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_GRACE)
        # The slaves are in the master's process group whether or not it is gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Killed, they leave their sockets: a restart must not take them for new ones.
        for stale in SOCKET_DIR.glob("tapback.*"):
            stale.unlink(missing_ok=True)

    def restart(self, host: Host) -> None:
        self.stop(host)
        self.start(host)
        self.wait_settled(host)

    def wait_settled(self, host: Host) -> None:
        """Nothing to wait for past `start`: a restarted master takes back no VBD ("master
        restart not yet implemented, ignoring domain", backend.c tapback_domain_scan);
        a domain's slave is forked only when something under its back-end directory
        changes, and nothing announces what it then takes back."""

    def alive(self, host: Host) -> bool:
        return self._proc is not None and self._proc.poll() is None
