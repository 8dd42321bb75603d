"""Where tapdisks and minors live on disk: the runtime root, control sockets, minor markers.

blktap3 has no kernel driver: a minor is "allocated" when a marker file
`<root>/tapdisk/tapdisk-<minor>` exists, created and removed under an flock of that
directory. A tapdisk that attached the minor holds an flock on the marker, so freeing a
minor in use fails with EAGAIN, and the lock vanishes with the process when it dies.

The root is `/run/blktap-control` unless `BLKTAP_CONTROL_DIR` (or an explicit argument)
says otherwise: every test uses its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

DEFAULT_ROOT = Path("/run/blktap-control")
ROOT_ENV = "BLKTAP_CONTROL_DIR"
# Where a tapdisk keeps blktap's stats files (td3-<pid>, vbd3-<domid>-<devid>; default
# /dev/shm): a simulated host gives itself its own (`shm_dir`).
SHM_ENV = "BLKTAP3_SHM_DIR"
MAX_MINOR = 16384  # blktap's limit on minors (exclusive)
MARKER_PREFIX = "tapdisk-"
SOCKET_PREFIX = "ctl"

# A tapdisk's NBD sockets, per VBD: `<prefix><pid>.<minor>` (blktap's names; see
# blktap3.tapdisk.nbd.server for what each one speaks).
def shm_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The stats files' root of a simulated host: `<run_dir>/shm`."""
    return Path(run_dir).absolute() / "shm"


NBD_SOCKET_PREFIXES = ("nbd", "nbd-old", "nbdserver", "nbdserver-new")

_SOCKET_RE = re.compile(rf"^{SOCKET_PREFIX}(\d+)$")
_NBD_SOCKET_RE = re.compile(rf"^(?:{'|'.join(NBD_SOCKET_PREFIXES)})(\d+)\.\d+$")
_MARKER_RE = re.compile(rf"^{MARKER_PREFIX}(\d+)$")


def root_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The runtime root: the argument, else $BLKTAP_CONTROL_DIR, else /run/blktap-control."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def minors_dir(root: Path) -> Path:
    return root / "tapdisk"


def socket_path(root: Path, pid: int) -> Path:
    return root / f"{SOCKET_PREFIX}{pid}"


def nbd_socket_path(root: Path, prefix: str, pid: int, minor: int) -> Path:
    """One of a VBD's NBD sockets, `<root>/<prefix><pid>.<minor>`."""
    if prefix not in NBD_SOCKET_PREFIXES:
        raise ValueError(f"not an NBD socket prefix: {prefix!r}")
    return root / f"{prefix}{pid}.{minor}"


def nbdclient_path(root: Path, pid: int) -> Path:
    """Where tapdisk `pid` takes NBD sockets passed by name (blktap's `nbdclient<pid>`)."""
    return root / f"nbdclient{pid}"


def marker_path(root: Path, minor: int) -> Path:
    """The device name blktap prints for a minor: `<root>/tapdisk/tapdisk-<minor>`."""
    return minors_dir(root) / f"{MARKER_PREFIX}{minor}"


def minor_of_devname(devname: str) -> int:
    """The minor in a device name `.../tapdisk-<minor>` (EINVAL if it is not one)."""
    match = _MARKER_RE.match(Path(devname).name)
    if match is None or int(match.group(1)) >= MAX_MINOR:
        raise OSError(errno.EINVAL, f"not a tapdisk device name: {devname}")
    return int(match.group(1))


def ensure_dirs(root: Path) -> None:
    """Create the root and the minors directory, private to root as blktap's are (0700).
    The root's parent must exist: a mistyped root must not build a tree (ENOENT)."""
    for directory in (root, minors_dir(root)):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise OSError(errno.ENOENT, f"cannot make {directory}: {directory.parent} "
                          "does not exist") from None


@contextlib.contextmanager
def _locked_minors(root: Path) -> Iterator[Path]:
    """Hold the flock of the minors directory: allocation and free are serialized by it."""
    ensure_dirs(root)
    directory = minors_dir(root)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield directory
    finally:
        os.close(fd)


def allocate_minor(root: Path, minor: int | None = None) -> int:
    """Create a marker file: the lowest free minor, or `minor` (EEXIST if taken)."""
    with _locked_minors(root):
        candidates = [minor] if minor is not None else range(MAX_MINOR)
        for candidate in candidates:
            if not 0 <= candidate < MAX_MINOR:
                raise OSError(errno.EINVAL, f"minor {candidate} out of range")
            try:
                fd = os.open(
                    marker_path(root, candidate),
                    os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC,
                    0o600,
                )
            except FileExistsError:
                if minor is not None:
                    raise OSError(errno.EEXIST, f"minor {minor} is allocated") from None
                continue
            os.close(fd)
            return candidate
    raise OSError(errno.ENOSPC, "no free minor")


def free_minor(root: Path, minor: int) -> None:
    """Remove a marker: ENOENT if unknown, EAGAIN if a tapdisk holds it."""
    with _locked_minors(root):
        path = marker_path(root, minor)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise OSError(errno.ENOENT, f"minor {minor} is not allocated") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OSError(errno.EAGAIN, f"minor {minor} is held by a tapdisk") from None
            path.unlink()
        finally:
            os.close(fd)


def allocated_minors(root: Path) -> list[int]:
    """Every minor with a marker file, ascending; none when the directory is missing."""
    try:
        names = os.listdir(minors_dir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = (_MARKER_RE.match(name) for name in names)
    return sorted(int(m.group(1)) for m in found if m is not None)


def socket_pids(root: Path) -> list[int]:
    """Pids named by `ctl<pid>` sockets under the root, ascending (not yet confirmed)."""
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = (_SOCKET_RE.match(name) for name in names)
    return sorted(int(m.group(1)) for m in found if m is not None)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs (EPERM still means it does; a zombie,
    dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) S ...": the state follows the last ')' (comm may hold any byte).
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def shm_root() -> Path:
    """Where tapdisks keep their stats files: $BLKTAP3_SHM_DIR, else /dev/shm."""
    return Path(os.environ.get(SHM_ENV) or "/dev/shm")


def remove_stale_stats(pid: int, rings: Iterable[tuple[int, int]]) -> None:
    """Remove what a dead tapdisk left in the shm root: `td3-<pid>` and the
    `vbd3-<domid>-<devid>` directories of its rings (only regular files inside)."""
    if process_alive(pid):
        return
    root = shm_root()
    for top in (root / f"td3-{pid}", *(root / f"vbd3-{d}-{v}" for d, v in rings)):
        with contextlib.suppress(OSError):
            for entry in top.iterdir():
                if entry.is_file() and not entry.is_symlink():
                    entry.unlink()
            top.rmdir()


def remove_stale_socket(root: Path, pid: int) -> bool:
    """Unlink `ctl<pid>` and its NBD sockets when the process is gone (a SIGKILLed
    tapdisk, blktap's or ours, leaves them behind)."""
    if process_alive(pid):
        return False
    for path in (socket_path(root, pid), nbdclient_path(root, pid)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for name in os.listdir(root):
            match = _NBD_SOCKET_RE.match(name)
            if match is not None and int(match.group(1)) == pid:
                with contextlib.suppress(FileNotFoundError):
                    (root / name).unlink()
    return True
