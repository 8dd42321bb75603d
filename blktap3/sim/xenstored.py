"""Launcher of Debian's real xenstored (C) or oxenstored (OCaml) under xensim.

The daemon runs in the background on the simulated machine of a run
directory (see `xensim.Machine`), its socket at `<run_dir>/xenstored/socket`.
C xenstored finds that directory through XENSTORED_RUNDIR; oxenstored always
uses /var/run/xenstored, so it runs in a private mount namespace where a
directory of the run directory is bind-mounted there. Clients reach it with
`XENSTORED_PATH` (see `env()`).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Literal

from . import xensim

XEN_LIB = Path("/usr/lib")  # Debian installs Xen's tools in <XEN_LIB>/xen-<version>/bin
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

Kind = Literal["c", "ocaml"]

_XS_DIRECTORY = 1  # xsd_sockmsg type of a harmless read-only request
_HEADER = struct.Struct("<IIII")  # type, req_id, tx_id, len
_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path) on Linux


class XenstoredError(RuntimeError):
    """The daemon did not start or did not stop."""


def _version_key(path: Path) -> tuple[int, ...]:
    version = path.parent.name.removeprefix("xen-")
    return tuple(int(part) for part in version.split(".") if part.isdecimal())


def xen_bin_dir(lib: Path = XEN_LIB) -> Path:
    """The directory of Debian's Xen tools (xenstored, oxenstored): /usr/lib/xen-4.17/bin on
    Debian 12, /usr/lib/xen-4.20/bin on Debian 13; the newest if several are installed."""
    found = [d for d in lib.glob("xen-[0-9]*/bin") if (d / "xenstored").is_file()]
    if not found:
        raise XenstoredError(f"no Xen tools found ({lib}/xen-<version>/bin/xenstored): "
                             "install xen-utils-<version>")
    return max(found, key=_version_key)


class Xenstored:
    """One real xenstored daemon serving the simulated machine of `run_dir`."""

    def __init__(self, run_dir: str | os.PathLike[str], kind: Kind = "c",
                 xen_bin: Path | None = None) -> None:
        if kind not in ("c", "ocaml"):
            raise ValueError(f"unknown xenstored kind {kind!r} (c or ocaml)")
        self.run_dir = Path(run_dir).resolve()
        self.kind: Kind = kind
        self._xen_bin = xen_bin
        self.state_dir = self.run_dir / "xenstored"
        self.log_path = self.run_dir / f"xenstored-{kind}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def xen_bin(self) -> Path:
        """Where the daemons are: the one given, else Debian's (found at first use)."""
        if self._xen_bin is None:
            self._xen_bin = xen_bin_dir()
        return self._xen_bin

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "socket"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """What xenstore-* tools and pyxs need to reach this daemon."""
        return {"XENSTORED_PATH": str(self.socket_path)}

    def _command(self) -> list[str]:
        if self.kind == "c":
            return [str(self.xen_bin / "xenstored"), "-N",
                    "-T", str(self.run_dir / "xenstored-trace"),
                    "-F", str(self.run_dir / "xenstored.pid")]
        config = self.run_dir / "oxenstored.conf"
        config.write_text(
            f"pid-file = {self.run_dir / 'oxenstored.pid'}\n"
            f"xenstored-log-file = {self.run_dir / 'oxenstored-daemon.log'}\n"
            f"access-log-file = {self.run_dir / 'oxenstored-access.log'}\n"
            f"xenstored-kva = {self.run_dir / 'xsd_kva'}\n"
            f"xenstored-port = {self.run_dir / 'xsd_port'}\n"
            "persistent = false\n"
        )
        # unshare execs sh which execs oxenstored: the pid we hold is the daemon's.
        script = ('mkdir -p /run/xenstored && mount --bind "$1" /run/xenstored && '
                  'exec "$2" --no-fork --config-file "$3"')
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                str(self.state_dir), str(self.xen_bin / "oxenstored"), str(config)]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the daemon and wait until it answers on its socket."""
        if self.running:
            raise XenstoredError(f"xenstored already running (pid {self.pid})")
        if not (self.run_dir / "machine").exists():
            raise XenstoredError(f"no simulated machine in {self.run_dir}: Machine.init() first")
        if len(os.fsencode(self.socket_path)) >= _SUN_PATH_MAX:
            raise XenstoredError(f"socket path too long for AF_UNIX ({_SUN_PATH_MAX} bytes): "
                                 f"{self.socket_path}; use a shorter run directory")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
        env.update(xensim.process_env(self.run_dir, 0))
        env["XENSTORED_RUNDIR"] = str(self.state_dir)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(), env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                raise XenstoredError(f"{self.kind} xenstored exited ({rc}):\n{self.log_tail()}")
            if self._answers():
                return
            time.sleep(0.02)
        self.stop()
        raise XenstoredError(
            f"{self.kind} xenstored did not answer within {timeout}s:\n{self.log_tail()}")

    def _answers(self) -> bool:
        """Whether the daemon replies to a DIRECTORY request on its socket."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                sock.connect(str(self.socket_path))
                payload = b"/\0"
                sock.sendall(_HEADER.pack(_XS_DIRECTORY, 1, 0, len(payload)) + payload)
                header = sock.recv(_HEADER.size)
                return len(header) == _HEADER.size
        except OSError:
            return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL) and wait until its socket is gone."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        # The process is reaped: nothing of it can unlink a successor's socket
        # any more. Remove a socket it left behind so no client connects to it.
        self.socket_path.unlink(missing_ok=True)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        self.stop()
        self.start(timeout)

    def log_tail(self, lines: int = 20) -> str:
        texts = []
        for path in (self.log_path, self.run_dir / "oxenstored-daemon.log"):
            if path.exists():
                texts.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(texts[-lines:])

    def __enter__(self) -> Xenstored:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
