"""Start and stop tapback as a background process for a run directory.

What the simulated host (and anything else that is not systemd) uses:

    service.start(run_dir, xenstored_path=..., control_root=...) -> pid
    service.stop(run_dir)
    service.status(run_dir) -> pid or None

Files in `run_dir`: `tapback.pid` (written by tapback itself once it watches, so
`start` returning means the daemon is serving) and `tapback.log` (JSON lines); its
status file (every VBD's machine state, `status_path`) is in the control directory.
`start` may run in one process and `stop` in another: both go by the pid file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from blktap3.ctl import runtime

from . import status as status_file

PID_FILE = "tapback.pid"
LOG_FILE = "tapback.log"
CONTROL_DIR = "blktap-control"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

# tapbacks this process started: kept so that they are reaped by `stop` (not warned
# about as "still running" when the Popen object would be collected).
_children: dict[int, subprocess.Popen[bytes]] = {}


class ServiceError(RuntimeError):
    """tapback could not be started or stopped (said in one line)."""


def control_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The tapdisk runtime root of a simulated host: `<run_dir>/blktap-control`."""
    return Path(run_dir).absolute() / CONTROL_DIR


def pid_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / PID_FILE


def log_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / LOG_FILE


def status_path(run_dir: str | os.PathLike[str], backend_kind: str = "vbd3") -> Path:
    """The status file of the tapback `start` runs (its default, in the control dir)."""
    return status_file.default_path(control_dir(run_dir), backend_kind)


def command(
    run_dir: str | os.PathLike[str],
    *,
    xenstored_path: str | None = None,
    control_root: str | os.PathLike[str] | None = None,
    backend_kind: str = "vbd3",
    verbose: bool = False,
    toolstack: str = "xapi",
) -> list[str]:
    """The tapback command line `start` runs."""
    argv = [sys.executable, "-m", "blktap3.tapback", "-d",  # foreground: we background it
            "--backend-kind", backend_kind, "--toolstack", toolstack,
            "--control-dir", str(control_root or control_dir(run_dir)),
            "--pid-file", str(pid_path(run_dir)),
            "--log-file", str(log_path(run_dir))]
    if xenstored_path:
        argv += ["--xenstored", xenstored_path]
    if verbose:
        argv.append("--verbose")
    return argv


def status(run_dir: str | os.PathLike[str]) -> int | None:
    """The pid of the tapback serving `run_dir`, or None."""
    try:
        pid = int(pid_path(run_dir).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if is_live(pid, "tapback") else None


def start(
    run_dir: str | os.PathLike[str],
    *,
    xenstored_path: str | None = None,
    control_root: str | os.PathLike[str] | None = None,
    backend_kind: str = "vbd3",
    env: Mapping[str, str] | None = None,
    verbose: bool = False,
    timeout: float = START_TIMEOUT,
    toolstack: str = "xapi",
) -> int:
    """Start tapback in the background; returns its pid once it watches XenStore."""
    if status(run_dir) is not None:
        raise ServiceError(f"tapback already runs for {run_dir}")
    pid_path(run_dir).unlink(missing_ok=True)
    root = Path(control_root) if control_root is not None else control_dir(run_dir)
    runtime.ensure_dirs(root)
    child_env = dict(os.environ if env is None else env)
    child_env[runtime.ROOT_ENV] = str(root)
    # The tapdisks it spawns keep their stats files under the host's run dir.
    child_env.setdefault(runtime.SHM_ENV, str(runtime.shm_dir(run_dir)))
    if xenstored_path:
        child_env["XENSTORED_PATH"] = xenstored_path
    with open(log_path(run_dir), "ab") as log:  # the child keeps its own copy
        proc = subprocess.Popen(
            command(run_dir, xenstored_path=xenstored_path, control_root=root,
                    backend_kind=backend_kind, verbose=verbose, toolstack=toolstack),
            env=child_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=log, start_new_session=True,  # not killed with the caller's terminal
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"tapback exited at start ({proc.returncode}); see "
                               f"{log_path(run_dir)}")
        if status(run_dir) == proc.pid:
            _children[proc.pid] = proc
            return proc.pid
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise ServiceError(f"tapback did not start within {timeout:g} s; see {log_path(run_dir)}")


def stop(run_dir: str | os.PathLike[str], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM tapback (SIGKILL after `timeout`) and wait until it is gone (idempotent)."""
    pid = status(run_dir)
    if pid is None:
        pid_path(run_dir).unlink(missing_ok=True)
        return
    terminate(pid, "tapback", timeout)
    child = _children.pop(pid, None)
    if child is not None:
        child.wait()
    pid_path(run_dir).unlink(missing_ok=True)


def reap(pid: int) -> None:
    """Wait for a tapback this process started and that was killed: no zombie left."""
    child = _children.pop(pid, None)
    if child is not None:
        child.wait()


def terminate(pid: int, name: str, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the live process `pid` named `name` (SIGKILL after `timeout`), wait until
    it is gone. Nothing happens if `pid` is no longer such a process (pid reuse)."""
    if not is_live(pid, name):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while is_live(pid, name):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.02)


def is_live(pid: int, name: str) -> bool:
    """Whether `pid` is a live (not zombie) process whose command line names `name`."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        # Our own child: reap it so the pid does not linger.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return name.encode() in cmdline
