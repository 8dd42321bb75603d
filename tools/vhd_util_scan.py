"""vhd-util scan: one line per image found in files or in an LVM volume group, or (`-p`)
the images as trees of parent chains.

As blktap's vhd/lib/vhd-util-scan.c (v4.0.8) does, with the same options
(`-m FILTER -f -c -l VG -p -a -v -M`), lines and exit codes:

- targets are files (the `-m` glob, then the names given) or, with `-l VG`, the logical
  volumes of VG whose names match the filter or a name (fnmatch, libc's own, with
  FNM_PATHNAME|FNM_EXTMATCH), in the order `lvs --unbuffered` lists them. A volume is
  read through the physical volume under its first (linear) segment at that segment's
  offset, as blktap reads it: `vgs`/`lvs` are asked for the layout, nothing needs the
  volume active (device-mapper is not used);
- an LVHD image names its parent by a device-mapper path in its locator
  (`/dev/mapper/VG--name-LV--name`): the parent's volume name is taken from that;
- `-a` adds each parent to the scan, `-p` prints trees: roots sorted by name, hidden
  roots first, in each tree the visible children before the hidden ones, 3 spaces of
  indent a level, `(not found in scan)` after a parent that was not scanned;
- an image that cannot be read gets `scan-error=-ERRNO error-message='...'`; without
  `-c` the scan stops there and exits with that errno.

Where we differ, on purpose: blktap reads a volume's batmap (`-M`) at the physical
volume's offset instead of the logical volume's (its marker and keyhash then come from
whatever lies there); we read the volume's own. A chain that loops is printed once per
image under `-p` (blktap recurses until its stack runs out). `{a,b}` braces in `-m` are
not expanded (Python's glob has none).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import getopt
import glob
import mmap
import os
import subprocess
import sys
from dataclasses import dataclass, field

from blktap3.abi import SECTOR_SIZE
from blktap3.datapath import vhdformat as vhd

SCAN_USAGE = ("usage: [OPTIONS] FILES\n"
              "options: [-m match filter] [-f fast] [-c continue on failure] "
              "[-l LVM volume] [-p pretty print] [-a scan parents] "
              "[-v verbose] [-h help] [-M show markers]")

# Target kinds (VHD_TYPE_* of vhd-util-scan.c): 0 is a target that failed to set up.
RAW_FILE, VHD_FILE, RAW_VOLUME, VHD_VOLUME = 0x01, 0x02, 0x04, 0x08
FNM_PATHNAME, FNM_EXTMATCH = 1 << 0, 1 << 5
INDENT = 3
MAX_LOCATOR = 64 << 10      # a path, in UTF-16 at worst: far more than PATH_MAX needs


@dataclass
class Target:
    name: str = ""
    device: str = ""
    size: int = 0
    start: int = 0
    end: int = 0
    kind: int = 0

    @property
    def volume(self) -> bool:
        return self.kind in (RAW_VOLUME, VHD_VOLUME)

    @property
    def is_vhd(self) -> bool:
        return self.kind in (VHD_FILE, VHD_VOLUME)


@dataclass
class Image:
    name: str
    target: Target
    parent: str | None = None
    parent_raw: bool = False
    capacity: int = 0
    size: int = 0
    hidden: int = 0
    marker: int = 0
    keyhash: str = ""
    error: int = 0
    message: str = ""
    children: list[Image] = field(default_factory=list)
    parent_image: Image | None = None
    printed: bool = False


class ScanError(OSError):
    """A step of reading one image failed: `message` is blktap's error-message."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)
        self.err = -abs(err)
        self.message = message


# ---- LVM: the layout of a volume group, as `vgs` and `lvs` print it -----------------

@dataclass(frozen=True)
class Volume:
    name: str
    size: int
    linear: bool
    device: str     # the physical volume under the first segment
    start: int      # that segment's byte offset on it
    length: int


def _lines(cmd: list[str]) -> list[str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError:
        return []
    return [ln for ln in res.stdout.splitlines() if ln.strip()]


def scan_vg(vg: str) -> list[Volume]:
    """lvm-util.c's lvm_scan_vg: the VG's physical volumes and where each logical
    volume's first segment lies. -EINVAL (as an OSError) when VG is not there."""
    fields = ["--noheadings", "--nosuffix", "--units=b", "--unbuffered"]
    pvs: dict[str, int] = {}
    extent = lv_count = 0
    for line in _lines(["vgs", vg, *fields, "--options=vg_name,vg_extent_size,lv_count,"
                        "pv_count,pv_name,pe_start"]):
        words = line.split()
        if len(words) != 6 or words[0] != vg:
            raise OSError(errno.EINVAL, f"vgs: unexpected line {line!r}")
        extent, lv_count = int(words[1]), int(words[2])
        pvs[words[4]] = int(words[5])
    if not pvs:
        raise OSError(errno.EINVAL, f"no volume group {vg}")
    vols: list[Volume] = []
    for line in _lines(["lvs", vg, *fields, "--options=lv_name,lv_size,segtype,seg_count,"
                        "seg_start,seg_size,devices"]):
        if len(vols) >= lv_count:
            break
        words = line.split()
        if len(words) != 7:
            raise OSError(errno.EINVAL, f"lvs: unexpected line {line!r}")
        name, size, segtype, _, seg_start, seg_size, devices = words
        if int(seg_start):
            continue    # a later segment of a volume listed already
        dev = devices.replace(",", " ").replace("(", " ").replace(")", " ").split()
        if len(dev) < 2 or dev[0] not in pvs:
            raise OSError(errno.EINVAL, f"lvs: segment on an unknown device {devices!r}")
        vols.append(Volume(name, int(size), segtype == "linear", dev[0],
                           int(dev[1]) * extent + pvs[dev[0]], int(seg_size)))
    return vols


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fnmatch.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]


def fnmatch(pattern: str, name: str) -> int:
    """libc's fnmatch as blktap calls it: 0 on a match, FNM_NOMATCH (1), else an error."""
    return int(_libc.fnmatch(os.fsencode(pattern), os.fsencode(name),
                             FNM_PATHNAME | FNM_EXTMATCH))


def volume_target(vol: Volume, kind: int) -> Target:
    if not vol.linear:
        raise OSError(errno.ENOSYS, f"{vol.name} is not linear")
    return Target(vol.name, vol.device, vol.size, vol.start, vol.start + vol.length, kind)


def extract_volume_name(locator: str) -> str:
    """An LVHD locator holds /dev/mapper/VG--name-LV--name: the LV's name."""
    if not locator:
        raise OSError(errno.EINVAL, "empty parent name")
    base = locator.rsplit("/", 1)[-1]
    out, i = [], 0
    while i < len(base):
        if base[i] == "-":
            if base[i + 1 : i + 2] == "-":
                out.append("-")
                i += 1
            else:
                out.append("/")
        else:
            out.append(base[i])
        i += 1
    name = "".join(out)
    if "/" not in name:
        raise OSError(errno.EINVAL, f"{locator}: not a device-mapper name")
    return name.rsplit("/", 1)[1]


# ---- reading one image --------------------------------------------------------------

def _decode_w2u(text: str) -> str | None:
    """vhd_w2u_decode_location: ASCII only, backslashes to slashes, no drive letter."""
    if not text.isascii():
        return None
    text = text.replace("\\", "/")
    return text[2:] if text[:2] in ("C:", "c:") else text


def _locator_name(code: int, blob: bytes) -> str | None:
    try:
        if code == vhd.Platform.MACX:
            text = blob.decode("ascii").split("\0", 1)[0]
            return text.removeprefix("file://") if text.startswith("file://") else None
        return _decode_w2u(blob.decode("utf-16-le").split("\0", 1)[0])
    except UnicodeDecodeError:
        return None


def preferred_locator(header: vhd.Header) -> vhd.Locator | None:
    """vhd_util_scan_get_parent_locator: MACX, else the last W2RU, else the first used."""
    loc = None
    for cand in header.locators:
        if cand.code == vhd.Platform.MACX:
            return cand
        if cand.code == vhd.Platform.W2RU:
            loc = cand
        if loc is None and cand.code != vhd.Platform.NONE:
            loc = cand
    return loc


class Reader:
    """Reads a target's bytes: a file from 0, a volume through its physical volume."""

    def __init__(self, target: Target) -> None:
        self.target = target
        path = target.device if target.volume else target.name
        self.fd = -1
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, off: int, n: int) -> bytes:
        """n bytes at `off` of the target (both sector aligned: O_DIRECT). A volume's
        image is read within the volume only: offsets its headers give that lie past
        it (a hostile or damaged image) are refused, never read from the next volume."""
        if self.target.volume and self.target.start + off + n > self.target.end:
            raise OSError(errno.EINVAL, f"{n} bytes at {off}: past the volume's end")
        span = -(-n // mmap.PAGESIZE) * mmap.PAGESIZE
        with mmap.mmap(-1, span) as buf:
            got = os.preadv(self.fd, [buf], self.target.start + off)
            if got < n:
                raise OSError(errno.EIO, "short read")
            return bytes(buf[:n])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Headers:
    footer: vhd.Footer
    header: vhd.Header | None


def _volume_headers(rd: Reader) -> Headers:
    """vhd_util_scan_read_volume_headers: the footer copy and header at the volume's
    start (an LVHD's end footer is somewhere inside a larger volume)."""
    raw = rd.read(0, vhd.FOOTER_SIZE + vhd.HEADER_SIZE)
    try:
        footer = vhd.Footer.unpack(raw[: vhd.FOOTER_SIZE], rd.target.name, "at offset 0")
    except OSError as exc:
        raise ScanError(exc.errno or errno.EINVAL, "invalid footer") from None
    header = None
    if footer.disk_type != vhd.DiskType.FIXED:
        try:
            if footer.data_offset == vhd.FOOTER_SIZE:
                blob = raw[vhd.FOOTER_SIZE:]
            else:
                blob = rd.read(footer.data_offset, vhd.HEADER_SIZE)
            header = vhd.Header.unpack(blob, rd.target.name)
        except OSError as exc:
            raise ScanError(exc.errno or errno.EINVAL, "reading header") from None
    return Headers(footer, header)


def _batmap_head(rd: Reader, h: Headers) -> bytes | None:
    if h.header is None:
        return None
    bat_bytes = -(-h.header.max_table_entries * 4 // SECTOR_SIZE) * SECTOR_SIZE
    try:
        head = rd.read(h.header.table_offset + bat_bytes, SECTOR_SIZE)
    except OSError:
        return None
    return head if head[:8] == vhd.BATMAP_COOKIE else None


def _markers(head: bytes | None) -> tuple[int, str]:
    """The batmap header's marker byte and keyhash (cookie at 29, hash at 62)."""
    if head is None:
        return 0, ""
    return head[28], (head[62:94].hex() if head[29] else "")


def _hidden(rd: Reader, h: Headers) -> int:
    """vhd_hidden: old tapdisk images (creator 0.1/1.1) kept the flag in the copy only."""
    f = h.footer
    if f.disk_type != vhd.DiskType.FIXED and f.creator_app == b"tap\0" and \
            f.creator_version in (0x00000001, 0x00010001) and not rd.target.volume:
        return rd.read(0, SECTOR_SIZE)[85]
    return f.hidden


def _locator_text(rd: Reader, header: vhd.Header) -> str:
    loc = preferred_locator(header)
    if loc is None or not 0 < loc.space_bytes <= MAX_LOCATOR:
        raise OSError(errno.EINVAL, "no parent locator of a sane size")
    name = _locator_name(loc.code, rd.read(loc.data_offset, loc.space_bytes)[: loc.data_len])
    if name is None:
        raise OSError(errno.EINVAL, "undecodable parent locator")
    return name


def _parent(rd: Reader, h: Headers, layer: vhd.Layer | None, fast: bool) -> str:
    assert h.header is not None
    if rd.target.volume:
        text = _decode_w2u(h.header.parent_name) if fast else None
        return extract_volume_name(text or _locator_text(rd, h.header))
    if fast:
        text = _decode_w2u(h.header.parent_name)
        if text:
            return text
    elif layer is not None:
        try:
            return str(layer.parent_path())
        except OSError:
            pass
    return _locator_text(rd, h.header)


def _canonical(name: str) -> str:
    if not name:
        raise OSError(errno.ENOENT, "no name")
    return os.path.realpath(name, strict=True)


def read_image(target: Target, *, fast: bool, pretty: bool, markers: bool) -> Image:
    """One target, as vhd_util_scan_targets' loop body reads it."""
    image = Image(target.name, target)
    if pretty and not target.volume:
        try:
            image.name = _canonical(target.name)
        except OSError as exc:
            return _failed(image, exc.errno or errno.ENOENT, "resolving name")
    rd: Reader | None = None
    try:
        h: Headers | None = None
        layer = None
        if target.volume:
            if target.end - target.start < 4096:
                return _failed(image, errno.EINVAL, "device too small")
            try:
                rd = Reader(target)
            except OSError as exc:
                return _failed(image, exc.errno or errno.EIO, "opening device")
            if target.is_vhd:
                h = _volume_headers(rd)
        elif target.is_vhd:
            try:
                layer = vhd.Layer.open(image.name, disabled_ok=True)
                rd = Reader(target)
            except OSError as exc:
                return _failed(image, exc.errno or errno.EINVAL, "opening file")
            h = Headers(layer.footer, layer.header)
        image.size = target.size
        image.capacity = h.footer.current_size if h else target.size
        try:
            image.hidden = _hidden(rd, h) if rd and h else 1
        except OSError as exc:
            raise ScanError(exc.errno or errno.EIO, "checking 'hidden' field") from None
        if markers and rd and h:
            image.marker, image.keyhash = _markers(_batmap_head(rd, h))
        if rd and h and h.footer.disk_type == vhd.DiskType.DIFF and h.header is not None:
            image.parent_raw = h.header.parent_uuid == bytes(16)
            try:
                image.parent = _parent(rd, h, layer, fast)
            except OSError as exc:
                raise ScanError(exc.errno or errno.EINVAL, "getting parent") from None
    except ScanError as exc:
        image.error, image.message = exc.err, exc.message
    finally:
        if rd is not None:
            rd.close()
    return image


def _failed(image: Image, err: int, message: str) -> Image:
    image.error, image.message = -abs(err), message
    return image


# ---- printing -----------------------------------------------------------------------

@dataclass
class Printer:
    verbose: bool
    pretty: bool
    markers: bool

    def line(self, image: Image, tab: int = 0) -> str:
        """vhd_util_scan_print_image_indent."""
        pad = " " * tab
        if image.error:
            return f"{pad}vhd={image.name} scan-error={image.error} " \
                   f"error-message='{image.message}'"
        name, parent = image.name, image.parent or "none"
        if not self.verbose:
            name = _basename(image.name)
            if image.parent:
                parent = _basename(image.parent)
        pmsg = " (not found in scan)" if self.pretty and image.parent and \
            image.parent_image is None else ""
        marks = f"marker={image.marker} keyhash={image.keyhash} " if self.markers else ""
        return f"{pad}vhd={name} capacity={image.capacity} size={image.size} " \
               f"hidden={image.hidden} {marks}parent={parent}{pmsg}"

    def trees(self, images: list[Image]) -> list[str]:
        """vhd_util_scan_pretty_print_images."""
        images = sorted(images, key=lambda i: os.fsencode(i.name))
        by_name = {os.fsencode(i.name): i for i in images}
        for image in images:
            found = by_name.get(os.fsencode(image.parent)) if image.parent else None
            image.parent_image = found
            if found is not None:
                found.children.append(image)
        out: list[str] = []
        for image in images:
            if image.parent_image is None and image.hidden:
                self._tree(image, 0, out)
        for image in images:
            if not image.printed and image.parent_image is None:
                self._tree(image, 0, out)
        for image in images:
            if not image.printed:
                self._tree(image, 0, out)
        return out

    def _tree(self, image: Image, depth: int, out: list[str]) -> None:
        image.printed = True
        out.append(self.line(image, depth * INDENT))
        for hidden in (0, 1):
            for child in image.children:
                if bool(child.hidden) == bool(hidden) and not child.printed:
                    self._tree(child, depth + 1, out)


def _basename(path: str) -> str:
    """C's basename(3) (GNU): the part after the last slash; "." for an empty name."""
    return os.path.basename(path) or ("." if not path else "")


# ---- the command --------------------------------------------------------------------

@dataclass
class Scan:
    fast: bool
    nofail: bool
    pretty: bool
    parents: bool
    printer: Printer
    volumes: list[Volume] = field(default_factory=list)
    collected: list[Image] = field(default_factory=list)

    def emit(self, image: Image) -> None:
        """vhd_util_scan_print_image: errors at once, the rest kept for the trees."""
        if not image.error and self.pretty:
            if all(i.name != image.name for i in self.collected):
                self.collected.append(image)
            return
        print(self.printer.line(image))

    def error(self, name: str, err: int) -> int:
        self.emit(Image(name, Target(), error=-abs(err), message="failure scanning target"))
        return -abs(err)

    def add_parent(self, targets: list[Target], image: Image) -> None:
        """vhd_util_scan_add_parent: parents found by name (files, by basename) once."""
        assert image.parent is not None
        volume = image.target.volume
        kind = (RAW_VOLUME if volume else RAW_FILE) if image.parent_raw else \
            (VHD_VOLUME if volume else VHD_FILE)
        try:
            if volume:
                if any(t.name == image.parent for t in targets):
                    return
                vol = next((v for v in self.volumes if fnmatch(image.parent, v.name) == 0),
                           None)
                if vol is None:
                    raise OSError(errno.ENOENT, image.parent)
                targets.append(volume_target(vol, kind))
            else:
                if any(_basename(t.name) == _basename(image.parent) for t in targets):
                    return
                targets.append(file_target(image.parent, kind))
        except OSError as exc:
            self.error(image.parent, exc.errno or errno.EINVAL)

    def run(self, targets: list[Target]) -> int:
        """vhd_util_scan_targets: the error of the image the scan stopped at, or 0."""
        err = 0
        i = 0
        while i < len(targets):
            target = targets[i]
            i += 1
            image = read_image(target, fast=self.fast, pretty=self.pretty,
                               markers=self.printer.markers)
            err = image.error
            self.emit(image)
            if self.parents and image.parent:
                self.add_parent(targets, image)
            if err and not self.nofail:
                break
        if self.pretty:
            for line in self.printer.trees(self.collected):
                print(line)
        return err


def file_target(name: str, kind: int = VHD_FILE) -> Target:
    st = os.stat(name)
    return Target(name, name, st.st_size, 0, st.st_size, kind)


def _file_targets(scan: Scan, names: list[str], filter_: str | None) -> list[Target]:
    found = []
    if filter_ is not None:
        found = glob.glob(filter_)
        if not scan.fast:
            found.sort(key=os.fsencode)
    targets = []
    for name in found + names:
        try:
            targets.append(file_target(name))
        except OSError as exc:
            err = scan.error(name, exc.errno or errno.EIO)
            if not scan.nofail:
                raise OSError(-err, name) from None
            targets.append(Target())    # blktap keeps the failed slot, zeroed
    return targets


def _volume_targets(scan: Scan, names: list[str], vg: str,
                    filter_: str | None) -> list[Target]:
    try:
        scan.volumes = scan_vg(vg)
    except OSError as exc:
        print(f"lvm_scan_vg failed {-(exc.errno or errno.EINVAL)}", file=sys.stderr)
        raise
    vols = list(scan.volumes)
    total = 0
    # vhd_util_scan_sort_volumes: the matches of each pattern swapped to the front.
    for pattern in ([filter_] if filter_ is not None else []) + names:
        matches = total
        for j in range(total, len(vols)):
            rc = fnmatch(pattern, vols[j].name)
            if rc == 0:
                vols[matches], vols[j] = vols[j], vols[matches]
                matches += 1
            elif rc != 1:
                err = scan.error(vols[j].name, rc)
                if not scan.nofail:
                    raise OSError(-err, vols[j].name)
        total = matches
    targets = []
    for vol in vols[:total]:
        try:
            targets.append(volume_target(vol, VHD_VOLUME))
        except OSError as exc:
            err = scan.error(vol.name, exc.errno or errno.EINVAL)
            if not scan.nofail:
                raise OSError(-err, vol.name) from None
            targets.append(Target())
    return targets


def scan(args: list[str]) -> int:
    try:
        pairs, rest = getopt.getopt(args, "m:fcl:pavMh")
    except getopt.GetoptError:
        print(SCAN_USAGE)
        return -errno.EINVAL
    o = {k[1:]: v for k, v in pairs}
    if "h" in o:
        print(SCAN_USAGE)
        return 0
    if "m" not in o and not rest:
        print(SCAN_USAGE)
        return -errno.EINVAL
    pretty = "p" in o
    run = Scan(fast="f" in o and not pretty, nofail="c" in o, pretty=pretty,
               parents="a" in o, printer=Printer("v" in o, pretty, "M" in o))
    try:
        if "l" in o:
            targets = _volume_targets(run, rest, o["l"], o.get("m"))
        else:
            targets = _file_targets(run, rest, o.get("m"))
    except OSError as exc:
        err = -(exc.errno or errno.EINVAL)
        print(f"scan failed: {err}. Check syslog for details", file=sys.stderr)
        return err
    if not targets:
        return 0
    err = run.run(targets)
    return 0 if run.nofail else err
