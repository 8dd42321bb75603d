"""An initramfs image built in memory and written as a `newc` cpio archive.

Files come from the unpacked Debian tree (or the host, for what the host's Debian
packages already hold): ELF programs bring the shared libraries `ldd` resolves, kernel
modules bring the modules they depend on (read from their `.modinfo`, since Debian's
kernel package ships no `modules.dep`). The layout is Debian's merged /usr: /bin, /sbin,
/lib and /lib64 are links into /usr. The archive is left uncompressed: unpacking it
costs the guest kernel nothing under emulation, and the host loads it from memory.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Iterable
from pathlib import Path

MERGED = ("bin", "sbin", "lib", "lib64")
LIBDIR = "/usr/lib/x86_64-linux-gnu"
_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)\s+\(0x")
_LOADER_LINE = re.compile(r"^\s*(/\S*ld-linux\S*)\s+\(0x")


def merged(path: str) -> str:
    """/lib/x -> /usr/lib/x: files live under /usr, the top-level names are links."""
    parts = path.lstrip("/").split("/", 1)
    if parts[0] in MERGED:
        return "/usr/" + "/".join(parts)
    return "/" + "/".join(parts)


class Initramfs:
    """A set of directories, files and links, written out as one cpio archive."""

    def __init__(self, search_libs: Iterable[Path] = (), loader: Path | None = None) -> None:
        # dest path -> (mode, content bytes, or link target as str)
        self.entries: dict[str, tuple[int, bytes | str]] = {}
        self.search_libs = [str(p) for p in search_libs]
        # A distribution's own loader resolves its programs (`ld.so --list`, what `ldd`
        # runs): the host's cannot load a program built for a newer glibc.
        self.loader = loader
        for name in ("dev", "proc", "sys", "run", "tmp", "etc", "root", "mnt", "usr/bin",
                     "usr/sbin", "usr/lib64", LIBDIR.lstrip("/")):
            self.add_dir("/" + name)
        for name in MERGED:
            self.entries["/" + name] = (stat.S_IFLNK | 0o777, f"usr/{name}")

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        path = merged(path)
        parent = os.path.dirname(path)
        if parent not in ("/", "") and parent not in self.entries:
            self.add_dir(parent)
        self.entries.setdefault(path, (stat.S_IFDIR | mode, b""))

    def add_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = merged(path)
        self.add_dir(os.path.dirname(path))
        self.entries[path] = (stat.S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        path = merged(path)
        self.add_dir(os.path.dirname(path))
        self.entries[path] = (stat.S_IFLNK | 0o777, target)

    def add_file(self, path: str, source: Path, mode: int | None = None) -> None:
        """Copy a file (links followed)."""
        real = source.resolve()
        self.add_bytes(path, real.read_bytes(), mode if mode is not None else
                       stat.S_IMODE(real.stat().st_mode))

    def add_tree(self, path: str, source: Path, skip: Iterable[str] = ()) -> None:
        """Copy a directory tree, keeping symlinks; names in `skip` are left out."""
        skipped = set(skip)
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = [d for d in dirnames if d not in skipped]
            rel = os.path.relpath(dirpath, source)
            dest_dir = os.path.normpath(os.path.join(path, rel))
            self.add_dir(dest_dir)
            for name in filenames + [d for d in dirnames if os.path.islink(
                    os.path.join(dirpath, d))]:
                if name in skipped:
                    continue
                src = Path(dirpath) / name
                if src.is_symlink():
                    self.add_symlink(f"{dest_dir}/{name}", os.readlink(src))
                else:
                    self.add_file(f"{dest_dir}/{name}", src)

    def add_elf(self, path: str, source: Path) -> None:
        """Copy a program or library and every shared library it needs."""
        self.add_file(path, source)
        for soname, lib in self.libraries_of(source):
            dest = f"{LIBDIR}/{soname}" if "/" not in soname else soname
            if merged(dest) not in self.entries:
                self.add_file(dest, Path(lib), 0o755)

    def libraries_of(self, source: Path) -> list[tuple[str, str]]:
        """(name, resolved path) of each library `ldd` finds, the loader included."""
        path = ":".join(self.search_libs)
        if self.loader is not None:
            command = [str(self.loader), "--list", "--library-path", path, str(source)]
            env = dict(os.environ)
        else:
            command, env = ["ldd", str(source)], dict(os.environ, LD_LIBRARY_PATH=path)
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        libs = []
        for line in done.stdout.splitlines():
            if "not found" in line:
                raise RuntimeError(f"{source}: {line.strip()}")
            m = _LDD_LINE.match(line)
            if m:
                libs.append((m.group(1), m.group(2)))
                continue
            m = _LOADER_LINE.match(line)
            if m:
                libs.append((m.group(1), m.group(1)))
        return libs

    def add_busybox(self, source: Path) -> None:
        """busybox and a link per applet, where no real program took the name."""
        self.add_file("/usr/bin/busybox", source, 0o755)
        applets = subprocess.run([str(source), "--list"], capture_output=True, text=True,
                                 check=True).stdout.split()
        for applet in applets:
            if f"/usr/bin/{applet}" not in self.entries and applet != "busybox":
                self.add_symlink(f"/usr/bin/{applet}", "busybox")

    def add_modules(self, modules_dir: Path, names: Iterable[str]) -> list[str]:
        """Copy modules and their dependencies to /modules; returns the load order."""
        index = {p.name.removesuffix(".ko").replace("_", "-"): p
                 for p in modules_dir.rglob("*.ko")}
        order: list[str] = []

        def visit(name: str) -> None:
            key = name.replace("_", "-")
            if key in order:
                return
            ko = index.get(key)
            if ko is None:
                return  # built into the kernel (modules.builtin)
            for dep in _depends(ko):
                visit(dep)
            order.append(key)
            self.add_file(f"/modules/{ko.name}", ko, 0o644)

        for name in names:
            visit(name)
        return [index[k].name for k in order]

    def write(self, out: Path) -> None:
        """The newc archive (cpio -H newc), entries sorted so parents come first."""
        with out.open("wb") as f:
            for ino, path in enumerate(sorted(self.entries), start=1):
                mode, content = self.entries[path]
                data = content.encode() if isinstance(content, str) else content
                f.write(_header(path.lstrip("/"), ino, mode, len(data)))
                f.write(data)
                f.write(b"\0" * (-len(data) % 4))
            f.write(_header("TRAILER!!!", 0, 0, 0))


def _header(name: str, ino: int, mode: int, size: int) -> bytes:
    raw = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(raw), 0]
    head = b"070701" + b"".join(b"%08X" % v for v in fields)
    pad = b"\0" * (-(len(head) + len(raw)) % 4)
    return head + raw + pad


def _depends(ko: Path) -> list[str]:
    """The `depends=` entry of a module's .modinfo section."""
    m = re.search(rb"\0depends=([^\0]*)\0", ko.read_bytes())
    if not m or not m.group(1):
        return []
    return m.group(1).decode().split(",")
