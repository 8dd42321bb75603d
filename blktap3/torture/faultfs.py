"""A FUSE file system under the image: a disk with a volatile write cache and faults on
demand, for ``blktap3-torture faults`` and ``powercut``.

``python -m blktap3.torture.faultfs BACKING MOUNTPOINT`` serves every regular file of the
directory BACKING at MOUNTPOINT (same names; no file is created or removed there) and is
driven by JSON lines on stdin (``blktap3.datapath.lineproc``'s protocol; ``FaultFs`` is
the client):

- **The cache.** A write is kept in memory (``Volume``): reads see it at once, the backing
  file does not. A successful fsync writes every pending write to the backing file, in
  order. ``cut`` is a power cut: of the writes not yet synced, a random subset reaches
  the backing file (in order; a disk's cache may write back any of them before the power
  goes) and the rest is lost; from then on every request fails with EIO until
  ``power_on``. What a cut leaves is what an fsync'ed file holds, and the backing file
  can be checked directly (``vhd-util check``, qemu-img).
- **The faults** (``Rule``): on reads, writes or fsyncs of a chosen file, over a chosen
  byte range or anywhere, always or with a probability, a chosen number of times: an
  error (EIO, ENOSPC, ...), a short write (the first half written and reported), a
  delay, or (fsync) a lie: success reported, nothing synced, as a disk that ignores cache
  flushes (what ``powercut``'s checker must catch). A failed fsync loses a random part
  of the pending writes, as Linux does when a writeback fails (the pages are marked
  clean: the data is gone, the error is reported once, and a later fsync succeeds).
  Every fault injected is logged (``injected``) so that a run can tell which guest
  requests it hit.

The kernel is told not to cache anything (``direct_io``, no attribute caching): every
read and write of the image reaches this process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blktap3.datapath.lineproc import LineProcess

PAGE = 4096
OPS = ("read", "write", "fsync")
KINDS = ("error", "short", "slow", "lie")


@dataclass
class Rule:
    """One fault: ``op`` on ``file`` (None: any), over bytes [start, end) (None: any),
    ``kind`` error/short/slow, ``errno`` for an error, ``delay`` seconds for slow,
    ``probability`` of firing on a matching request, ``count`` times (None: unlimited);
    ``drop``: the fraction of pending writes a failed fsync loses."""

    op: str
    kind: str = "error"
    file: str | None = None
    start: int | None = None
    end: int | None = None
    errno: int = errno.EIO
    delay: float = 0.0
    probability: float = 1.0
    count: int | None = None
    drop: float = 1.0

    def __post_init__(self) -> None:
        if self.op not in OPS or self.kind not in KINDS:
            raise ValueError(f"bad rule: op {self.op!r} kind {self.kind!r}")
        if self.kind == "short" and self.op != "write":
            raise ValueError("a short answer is a write's")
        if self.kind == "lie" and self.op != "fsync":
            raise ValueError("only an fsync can lie")

    def matches(self, op: str, file: str, off: int, length: int) -> bool:
        if op != self.op or (self.file is not None and file != self.file):
            return False
        if self.count is not None and self.count <= 0:
            return False
        lo = self.start if self.start is not None else 0
        hi = self.end if self.end is not None else 1 << 63
        return op == "fsync" or (off < hi and off + length > lo)


class Volume:
    """One file: its durable content (the backing file) and the writes not yet synced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.durable_size = os.fstat(self.fd).st_size
        self.size = self.durable_size
        self.pending: list[tuple[int, bytes]] = []
        self.overlay: dict[int, bytearray] = {}     # page -> what a read sees now

    def _page(self, n: int) -> bytearray:
        page = self.overlay.get(n)
        if page is None:
            raw = os.pread(self.fd, PAGE, n * PAGE)
            page = self.overlay[n] = bytearray(raw.ljust(PAGE, b"\0"))
        return page

    def read(self, off: int, size: int) -> bytes:
        size = max(0, min(size, self.size - off))
        out = bytearray(os.pread(self.fd, size, off).ljust(size, b"\0"))
        for n in range(off // PAGE, (off + size + PAGE - 1) // PAGE):
            page = self.overlay.get(n)
            if page is None:
                continue
            lo, hi = max(off, n * PAGE), min(off + size, (n + 1) * PAGE)
            out[lo - off:hi - off] = page[lo - n * PAGE:hi - n * PAGE]
        return bytes(out)

    def write(self, off: int, data: bytes) -> None:
        self.pending.append((off, bytes(data)))
        end = off + len(data)
        for n in range(off // PAGE, (end + PAGE - 1) // PAGE):
            lo, hi = max(off, n * PAGE), min(end, (n + 1) * PAGE)
            self._page(n)[lo - n * PAGE:hi - n * PAGE] = data[lo - off:hi - off]
        self.size = max(self.size, end)

    def settle(self, keep: list[bool] | None = None) -> tuple[int, int]:
        """The pending writes to the backing file, all of them or those ``keep`` says
        (in order); the rest is lost. Returns (kept, lost)."""
        kept = 0
        for i, (off, data) in enumerate(self.pending):
            if keep is None or keep[i]:
                os.pwrite(self.fd, data, off)
                kept += 1
        lost = len(self.pending) - kept
        self.pending.clear()
        self.overlay.clear()
        self.durable_size = self.size = os.fstat(self.fd).st_size
        return kept, lost

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Faults:
    """The rules, the log of what they did, and whether the power is on."""

    rnd: random.Random = field(default_factory=lambda: random.Random(1))
    rules: list[Rule] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    dead: bool = False
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPS, 0))

    def pick(self, op: str, file: str, off: int, length: int) -> Rule | None:
        """The rule that fires on this request (logged), or None."""
        self.requests[op] += 1
        for rule in self.rules:
            if rule.matches(op, file, off, length) and self.rnd.random() < rule.probability:
                if rule.count is not None:
                    rule.count -= 1
                self.log.append({"op": op, "file": file, "off": off, "len": length,
                                 "kind": rule.kind, "errno": rule.errno})
                return rule
        return None


def keep_at_random(rnd: random.Random, n: int, keep: float) -> list[bool]:
    return [rnd.random() < keep for _ in range(n)]


class _Server:
    """The control commands (JSON lines) beside the file system."""

    def __init__(self, volumes: dict[str, Volume], faults: Faults) -> None:
        self.volumes, self.faults = volumes, faults

    def ping(self) -> str:
        return "pong"

    def rules(self, rules: list[dict[str, Any]], seed: int | None = None) -> int:
        self.faults.rules = [Rule(**r) for r in rules]
        if seed is not None:
            self.faults.rnd.seed(seed)
        return len(self.faults.rules)

    def injected(self) -> list[dict[str, Any]]:
        """The faults injected since the last call."""
        log, self.faults.log = self.faults.log, []
        return log

    def pending(self) -> dict[str, int]:
        return {name: len(v.pending) for name, v in self.volumes.items()}

    def requests(self) -> dict[str, int]:
        return dict(self.faults.requests)

    def cut(self, keep: float = 0.5) -> dict[str, int]:
        """The power cut: a random ``keep`` fraction of the pending writes reaches the
        backing files, the rest is lost; every request fails until ``power_on``."""
        self.faults.dead = True
        kept = lost = 0
        for v in self.volumes.values():
            k, lo = v.settle(keep_at_random(self.faults.rnd, len(v.pending), keep))
            kept, lost = kept + k, lost + lo
        return {"kept": kept, "lost": lost}

    def power_on(self) -> None:
        self.faults.dead = False


def _serve(backing: Path, mountpoint: Path) -> None:
    import pyfuse3
    import trio

    volumes = {p.name: Volume(p) for p in sorted(backing.iterdir())
               if p.is_file() and not p.is_symlink()}
    faults = Faults()
    server = _Server(volumes, faults)
    names = sorted(volumes)
    inode_of = {name: pyfuse3.ROOT_INODE + 1 + i for i, name in enumerate(names)}
    name_of = {ino: name for name, ino in inode_of.items()}

    class Ops(pyfuse3.Operations):
        def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = inode
            a.entry_timeout = a.attr_timeout = 0
            now = time.time_ns()
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = now
            a.st_uid, a.st_gid = os.getuid(), os.getgid()
            if inode == pyfuse3.ROOT_INODE:
                a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o755, 2, 0
            else:
                a.st_mode, a.st_nlink = stat.S_IFREG | 0o600, 1
                a.st_size = volumes[name_of[inode]].size
            a.st_blksize = PAGE
            a.st_blocks = (a.st_size + 511) // 512
            return a

        async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
            if inode != pyfuse3.ROOT_INODE and inode not in name_of:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(inode)

        async def lookup(self, parent: int, name: bytes,
                         ctx: Any = None) -> pyfuse3.EntryAttributes:
            ino = inode_of.get(os.fsdecode(name))
            if parent != pyfuse3.ROOT_INODE or ino is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(ino)

        async def opendir(self, inode: int, ctx: Any) -> int:
            if inode != pyfuse3.ROOT_INODE:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            for i, name in enumerate(names[start_id:], start_id + 1):
                if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                             self._attr(inode_of[name]), i):
                    break

        async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
            if inode not in name_of:
                raise pyfuse3.FUSEError(errno.EISDIR)
            return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

        async def _fault(self, op: str, fh: int, off: int, length: int) -> Rule | None:
            if faults.dead:
                raise pyfuse3.FUSEError(errno.EIO)
            rule = faults.pick(op, name_of[fh], off, length)
            if rule is None:
                return None
            if rule.kind == "slow":
                await trio.sleep(rule.delay)
                return None
            if rule.kind == "error":
                if op == "fsync":
                    v = volumes[name_of[fh]]
                    v.settle(keep_at_random(faults.rnd, len(v.pending), 1.0 - rule.drop))
                raise pyfuse3.FUSEError(rule.errno)
            return rule

        async def read(self, fh: int, off: int, size: int) -> bytes:
            await self._fault("read", fh, off, size)
            return volumes[name_of[fh]].read(off, size)

        async def write(self, fh: int, off: int, buf: bytes) -> int:
            rule = await self._fault("write", fh, off, len(buf))
            if rule is not None:    # short: half of it, whole sectors, at least one
                buf = buf[:max(512, len(buf) // 2 // 512 * 512)]
            volumes[name_of[fh]].write(off, buf)
            return len(buf)

        async def fsync(self, fh: int, datasync: bool) -> None:
            rule = await self._fault("fsync", fh, 0, 0)
            if rule is None:    # a lie leaves the writes where they are
                volumes[name_of[fh]].settle()

        async def flush(self, fh: int) -> None:
            return None     # close(2), not durability

        async def release(self, fh: int) -> None:
            return None

        async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any,
                          ctx: Any) -> pyfuse3.EntryAttributes:
            if fields.update_size:
                raise pyfuse3.FUSEError(errno.EPERM)    # the images keep their size
            return self._attr(inode)

        async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
            s = pyfuse3.StatvfsData()
            st = os.statvfs(backing)
            s.f_bsize, s.f_frsize = st.f_bsize, st.f_frsize
            s.f_blocks, s.f_bfree, s.f_bavail = st.f_blocks, st.f_bfree, st.f_bavail
            s.f_files, s.f_ffree, s.f_favail = st.f_files, st.f_ffree, st.f_favail
            s.f_namemax = 255
            return s

    handlers = {name: getattr(server, name) for name in
                ("ping", "rules", "injected", "pending", "requests", "cut", "power_on")}

    async def control(cancel: trio.CancelScope) -> None:
        stream = trio.lowlevel.FdStream(os.dup(0))
        buf = b""
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                req = json.loads(line)
                cmd = req.pop("cmd")
                if cmd == "exit":
                    _reply({"ok": None})
                    cancel.cancel()
                    return
                try:
                    reply: dict[str, Any] = {"ok": handlers[cmd](**req)}
                except OSError as exc:
                    reply = {"error": exc.errno or errno.EIO, "message": str(exc)}
                except (KeyError, TypeError, ValueError) as exc:
                    reply = {"error": errno.EINVAL, "message": f"{cmd}: {exc!r}"}
                _reply(reply)
        cancel.cancel()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            nursery.start_soon(control, nursery.cancel_scope)

    options = set(pyfuse3.default_options) | {"fsname=blktap3-faultfs"}
    pyfuse3.init(Ops(), str(mountpoint), options)
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)
        for v in volumes.values():
            v.close()


def _reply(msg: dict[str, Any]) -> None:
    os.write(1, (json.dumps(msg) + "\n").encode())


def missing() -> str | None:
    """Why the FUSE layer cannot run here, or None."""
    import importlib.util

    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (load the fuse module)"
    if importlib.util.find_spec("pyfuse3") is None:
        return "pyfuse3 is not installed (pip install '.[faults]', after apt-get install " \
               "libfuse3-dev fuse3)"
    return None


def unmount(mountpoint: Path) -> None:
    """Lazily unmount (a killed server leaves its mount point dead)."""
    for cmd in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        with contextlib.suppress(OSError):
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return


def is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 2)


class FaultFs:
    """The client: the file system process serving ``backing`` at ``mountpoint``."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        mountpoint.mkdir(exist_ok=True)
        self.backing, self.mountpoint = backing, mountpoint
        self.proc = LineProcess([sys.executable, "-m", "blktap3.torture.faultfs",
                                 str(backing), str(mountpoint)])
        try:
            self.proc.call("ping")
        except BaseException:
            self.close()
            raise

    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def rules(self, *rules: Rule, seed: int | None = None) -> None:
        self.proc.call("rules", rules=[asdict(r) for r in rules], seed=seed)

    def injected(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.proc.call("injected")
        return out

    def pending(self) -> dict[str, int]:
        out: dict[str, int] = self.proc.call("pending")
        return out

    def requests(self) -> dict[str, int]:
        out: dict[str, int] = self.proc.call("requests")
        return out

    def cut(self, keep: float = 0.5) -> dict[str, int]:
        out: dict[str, int] = self.proc.call("cut", keep=keep)
        return out

    def power_on(self) -> None:
        self.proc.call("power_on")

    def close(self) -> None:
        self.proc.close(timeout=10.0)
        if is_mounted(self.mountpoint):
            unmount(self.mountpoint)

    def __enter__(self) -> FaultFs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def mounted(backing: Path, mountpoint: Path) -> Iterator[FaultFs]:
    fs = FaultFs(backing, mountpoint)
    try:
        yield fs
    finally:
        fs.close()


def main() -> None:
    if len(sys.argv) != 3:
        print("usage: python -m blktap3.torture.faultfs BACKING MOUNTPOINT", file=sys.stderr)
        sys.exit(2)
    _serve(Path(sys.argv[1]), Path(sys.argv[2]))


if __name__ == "__main__":
    main()
