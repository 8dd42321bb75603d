"""Processes a test started or must see gone: liveness, kill and reap, leftovers.

A pid is only trusted with its name where it may have been reused: `alive(pid, name)`
also checks that the command line names it. A zombie is dead; one that is our own
child is reaped on the way, so that its pid does not linger for the rest of the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from blktap3.ctl import runtime

from .waiting import wait_until

STOP_TIMEOUT = 5.0


def alive(pid: int, name: str | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, with `name`, its command line names it."""
    if not runtime.process_alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # our own zombie: reap it
        return False
    if name is None:
        return True
    try:
        return name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_gone(pids: int | Iterable[int], timeout: float = STOP_TIMEOUT,
              what: str = "processes gone") -> None:
    """Wait until none of `pids` runs any more (raises `WaitTimeout` naming the rest)."""
    waiting = {pids} if isinstance(pids, int) else set(pids)
    wait_until(lambda: not any(alive(pid) for pid in waiting), timeout,
               lambda: f"{what}: {sorted(p for p in waiting if alive(p))} still run")


def kill_and_reap(pids: Iterable[int], name: str | None, sig: int = signal.SIGKILL,
                  timeout: float = STOP_TIMEOUT) -> None:
    """Send `sig` to each pid that still runs as `name` (None: whatever it runs; only
    for pids that cannot have been reused) and wait until all are gone."""
    victims = {pid for pid in pids if alive(pid, name)}
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    wait_gone(victims, timeout, f"processes killed with {signal.Signals(sig).name}")


def assert_no_process_left(processes: Mapping[int, str]) -> None:
    """Fail naming each `{pid: name}` that still runs as that program."""
    left = {pid: name for pid, name in processes.items() if alive(pid, name)}
    assert not left, f"still running: {left}"


def tapdisk_pids(control_root: Path) -> list[int]:
    """The live tapdisks that have a control socket under `control_root`."""
    return [pid for pid in runtime.socket_pids(control_root) if alive(pid)]


def kill_tapdisks(control_root: Path, also: Iterable[int] = ()) -> None:
    """SIGKILL every tapdisk of `control_root` (and the pids `also`), wait until gone."""
    kill_and_reap({*runtime.socket_pids(control_root), *also}, "tapdisk")


def signal_midway(argv: list[str], sig: int, ready: Callable[[subprocess.Popen[str]], object],
                  env: Mapping[str, str] | None = None,
                  timeout: float = 60.0) -> tuple[int, str, str]:
    """Run a command, wait for `ready(proc)` (it may read proc.stdout), send `sig`, and
    return (returncode, rest of stdout, stderr). A command that outlives `timeout` fails
    the test with its Python threads' stacks (faulthandler's dump at SIGABRT) and is
    killed."""
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as proc:
        try:
            ready(proc)
            proc.send_signal(sig)
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                stuck = f"{argv[0]} still ran {timeout:g} s after {signal.Signals(sig).name}"
                proc.send_signal(signal.SIGABRT)
                try:
                    _, err = proc.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"{stuck}; no stacks either") from None
                raise AssertionError(f"{stuck}; its stacks:\n{err}") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, out, err
