"""libblktapctl's composed operations: allocate, free, spawn, create, destroy, list.

`create` is blktap's allocate + spawn + attach + open, undone in reverse order when a
step fails; `destroy` is close + detach + free. `list` joins three sources as blktap's
does: allocated minors (marker files), live tapdisks (their `ctl<pid>` sockets,
confirmed with a PID message) and each tapdisk's VBDs.

The control client (and with it the message codec) is imported where a tapdisk is spoken
to: `tap-ctl list` with no tapdisk running, `allocate` and `free` never load it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from . import runtime

if TYPE_CHECKING:
    from .client import TapdiskClient, VbdEntry

TAPDISK_ENV = "BLKTAP_TAPDISK"  # command line of the tapdisk to spawn (shell words)
SPAWN_TIMEOUT = 30.0


class TapEntry(NamedTuple):
    """One row of `tap-ctl list`: any field may be unknown (None)."""

    pid: int | None = None
    minor: int | None = None
    state: int | None = None
    type: str | None = None
    path: str | None = None

    def as_dict(self) -> dict[str, int | str | None]:
        return {"pid": self.pid, "minor": self.minor, "state": self.state,
                "type": self.type, "path": self.path}


def allocate(root: str | os.PathLike[str] | None = None, devname: str | None = None) -> str:
    """Allocate a minor (the one named by `devname`, if given); returns its device name."""
    base = runtime.root_dir(root)
    wanted = runtime.minor_of_devname(devname) if devname else None
    minor = runtime.allocate_minor(base, wanted)
    return str(runtime.marker_path(base, minor))


def free(minor: int, root: str | os.PathLike[str] | None = None) -> None:
    """Free a minor: ENOENT if not allocated, EAGAIN if a tapdisk holds it."""
    runtime.free_minor(runtime.root_dir(root), minor)


def tapdisk_command() -> list[str]:
    """How to run a tapdisk: $BLKTAP_TAPDISK, else this Python's `-P -m blktap3.tapdisk`."""
    override = os.environ.get(TAPDISK_ENV)
    if override:
        import shlex  # imported where used: `tap-ctl list` never needs it

        return shlex.split(override)
    # -P: not the caller's working directory first on sys.path, where another blktap3
    # (a checkout, or a planted one: tap-ctl runs as root) would be imported instead.
    return [sys.executable, "-P", "-m", "blktap3.tapdisk"]


def spawn(
    root: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = SPAWN_TIMEOUT,
) -> int:
    """Start a tapdisk and return its pid once its socket answers; if it dies at start,
    CtlError with its errno and reason (blktap's spawn reports a pid regardless)."""
    import subprocess  # imported where used: `tap-ctl list` never needs it

    from .client import CtlError, TapdiskClient

    base = runtime.root_dir(root).absolute()
    child_env = dict(os.environ if env is None else env)
    child_env[runtime.ROOT_ENV] = str(base)
    try:
        done = subprocess.run(
            tapdisk_command(), env=child_env, stdin=subprocess.DEVNULL,
            capture_output=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        raise CtlError(errno.ETIMEDOUT, f"tapdisk did not start within {timeout:g} s") from None
    except OSError as exc:
        raise CtlError(exc.errno or errno.EIO, f"running tapdisk: {exc.strerror}") from None
    reason = done.stderr.decode(errors="replace").strip().splitlines()
    if done.returncode != 0:
        code = done.returncode if 0 < done.returncode < 256 else errno.EIO
        raise CtlError(code, reason[-1] if reason else f"tapdisk exited {done.returncode}")
    path = Path(done.stdout.decode(errors="replace").strip())
    if not path.name.startswith(runtime.SOCKET_PREFIX):
        raise CtlError(errno.EPROTO, f"tapdisk printed {str(path)!r}, not a socket path")
    return TapdiskClient(0, path=path).get_pid()


UNDO_TIMEOUT = 10.0  # seconds a create's rollback waits for its tapdisk to go


def _undo_spawn(client: TapdiskClient, minor: int) -> None:
    """Rollback of a failed or interrupted create: the tapdisk was spawned for this VBD
    alone, so it goes whatever the step that failed left behind (an ATTACH or OPEN it
    carried out though its answer was never read, an OPEN still under way). A DETACH
    ends it in order (it exits with its last VBD); refused (no VBD, or one still open),
    SIGTERM: its shutdown closes what is open and removes its socket, and its end
    releases the minor for the caller to free (waited for, at most `UNDO_TIMEOUT`)."""
    try:
        client.detach(minor)
        return
    except OSError:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.kill(client.pid, signal.SIGTERM)
    deadline = time.monotonic() + UNDO_TIMEOUT
    while runtime.process_alive(client.pid) and time.monotonic() < deadline:
        time.sleep(0.02)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold ^C and SIGTERM back from this thread while a tapdisk starts: stopped between
    the daemon's fork and the answer that names its pid, a command would leak a tapdisk
    it cannot name. Delivered when the block ends, they stop the caller where it can
    undo what it did."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def create(
    params: str,
    *,
    root: str | os.PathLike[str] | None = None,
    devname: str | None = None,
    flags: int = 0,
    prt_minor: int | None = None,
    req_timeout: int = 0,
    secondary: str = "",
    logpath: str | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[int, int, str]:
    """Allocate, spawn, attach, open; on failure undo what was done and re-raise.
    Returns (pid, minor, device name). `prt_minor` None: no parent (`NO_PARENT`)."""
    from .client import TapdiskClient
    from .protocol import NO_PARENT

    base = runtime.root_dir(root)
    dev = allocate(base, devname)
    minor = runtime.minor_of_devname(dev)
    client: TapdiskClient | None = None
    try:
        with _signals_deferred():
            pid = spawn(base, env=env)
            client = TapdiskClient(pid, root=base)
        client.attach(minor)
        client.open(minor, params, flags,
                    prt_minor=NO_PARENT if prt_minor is None else prt_minor,
                    req_timeout=req_timeout, secondary=secondary, logpath=logpath)
    except BaseException:
        if client is not None:
            _undo_spawn(client, minor)
        with contextlib.suppress(OSError):
            runtime.free_minor(base, minor)
        raise
    return pid, minor, dev


def destroy(
    pid: int, minor: int, *, root: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
) -> None:
    """Close (draining), detach and free a VBD's minor."""
    from .client import TapdiskClient

    client = TapdiskClient(pid, root=root)
    client.close(minor, timeout=timeout)
    client.detach(minor)
    runtime.free_minor(runtime.root_dir(root), minor)


def _probe(root: Path, pid: int) -> tuple[int, list[VbdEntry] | None] | None:
    """A live tapdisk's VBDs (None when it did not list them); None for a dead or
    foreign socket (a dead one is removed)."""
    if runtime.remove_stale_socket(root, pid) or not runtime.socket_path(root, pid).exists():
        return None  # (no socket: what connecting would say, without loading the client)
    from .client import TapdiskClient

    client = TapdiskClient(pid, root=root)
    try:
        if client.get_pid() != pid:
            return None
    except OSError:  # CtlError, or the tapdisk went away mid-answer (ECONNRESET, EPIPE)
        return None
    try:
        return pid, client.list()
    except OSError:
        return pid, None


def _rows(pid: int, vbds: list[VbdEntry] | None) -> list[TapEntry]:
    """A tapdisk's rows as blktap's tap-ctl makes them: its VBDs newest (last attached)
    first, or the tapdisk alone when it has none or did not list them."""
    if not vbds:
        return [TapEntry(pid=pid)]
    rows = []
    for vbd in reversed(vbds):
        kind, sep, path = vbd.params.partition(":")
        rows.append(TapEntry(pid=pid, minor=vbd.minor, state=vbd.state,
                             type=kind if sep else None, path=path if sep else None))
    return rows


def _probe_all(root: Path, pids: list[int]) -> list[tuple[int, list[VbdEntry] | None] | None]:
    """Probe every pid. Tapdisks answer independently: several are asked in parallel,
    so 100 cost about one; one or none needs no thread pool (nor its import)."""
    if len(pids) <= 1:
        return [_probe(root, pid) for pid in pids]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, len(pids))) as pool:
        return list(pool.map(lambda pid: _probe(root, pid), pids))


def list_all(root: str | os.PathLike[str] | None = None) -> list[TapEntry]:
    """Every tapdisk, VBD and allocated minor, in blktap's order: tapdisks by the name
    of their socket (`ctl<pid>` as text, what glob(3) sorts by), each with its VBDs
    newest first or alone when idle, then the minors no tapdisk holds, by marker name
    (control/tap-ctl-list.c, tap_ctl_list)."""
    base = runtime.root_dir(root)
    pids = sorted(runtime.socket_pids(base), key=str)
    minors = set(runtime.allocated_minors(base))
    found = [r for r in _probe_all(base, pids) if r is not None]
    entries: list[TapEntry] = []
    for pid, vbds in found:
        minors.difference_update(vbd.minor for vbd in vbds or ())
        entries.extend(_rows(pid, vbds))
    entries.extend(TapEntry(minor=minor) for minor in sorted(minors, key=str))
    return entries


def list_pid(pid: int, root: str | os.PathLike[str] | None = None) -> list[TapEntry]:
    """The rows of one tapdisk (`tap-ctl list -p`): none when no tapdisk answers as
    `pid`; no orphan minors (control/tap-ctl-list.c, tap_ctl_list_pid)."""
    found = _probe(runtime.root_dir(root), pid)
    return [] if found is None else _rows(*found)
