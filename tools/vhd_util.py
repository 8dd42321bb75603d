"""vhd-util: blktap's VHD tool, for what storage managers call of it.

Same commands, options (getopt strings), output lines and exit codes as blktap's
vhd/vhd-util.c and vhd/lib/vhd-util-*.c (v4.0.8): a command returns a negative errno,
the process exits with its absolute value; bad options print the command's usage line
(on stdout, as blktap does) and exit 22. Commands: create, snapshot, query, check, set,
coalesce, modify (-p: re-parent), repair, scan (files and LVM volume groups:
vhd_util_scan.py), resize and revert (fast or journaled: vhd_util_resize.py), read
(vhd_util_read.py). Data moves
through the C data path's VHD driver (`Image.open("vhd", ...)`), metadata through
`blktap3.datapath.vhdformat`.
"""

from __future__ import annotations

import errno
import getopt
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from blktap3.abi import SECTOR_SIZE
from blktap3.datapath import vhdformat as vhd

from .vhd_util_read import read
from .vhd_util_read import strtoull as _strtoull
from .vhd_util_resize import resize, revert
from .vhd_util_scan import scan

MiB = 1 << 20
Command = Callable[[list[str]], int]


class Usage(Exception):
    """Bad options: print the usage line, return `err`."""

    def __init__(self, err: int = -errno.EINVAL) -> None:
        super().__init__(err)
        self.err = err


def _opts(args: list[str], spec: str, usage: str, required: str = "n") -> dict[str, str]:
    """getopt as blktap's commands call it; a missing `required` option is a usage
    error too."""
    try:
        pairs, rest = getopt.getopt(args, spec)
    except getopt.GetoptError:
        print(usage)
        raise Usage() from None
    if rest:
        print(usage)
        raise Usage()
    opts = {k[1:]: v for k, v in pairs}
    if "h" in opts:
        print(usage)
        raise Usage(0)
    if any(k not in opts for k in required):
        print(usage)
        raise Usage()
    return opts


def _err(exc: OSError) -> int:
    return -(exc.errno or errno.EIO)


# ---- create / snapshot -------------------------------------------------------------

CREATE_USAGE = ("options: <-n name> <-s size (MB)> [-r reserve] [-h help] "
                "[<-S size (MB) for metadata preallocation (see vhd-util resize)>]")


def create(args: list[str]) -> int:
    # vhd-util-create.c: -s is required; size in MiB, rounded up to whole 2 MiB blocks.
    o = _opts(args, "n:s:S:rh", CREATE_USAGE, "ns")
    size = _strtoull(o["s"]) * MiB
    size = -(-size // vhd.DEFAULT_BLOCK_SIZE) * vhd.DEFAULT_BLOCK_SIZE
    if "S" in o and _strtoull(o["S"]) * MiB < size:
        print("Error: <-S size> must be greater than <-s size>")
        return -errno.EINVAL
    try:
        vhd.create(o["n"], size, fixed="r" in o, max_size=_strtoull(o.get("S", "0")) * MiB)
    except FileExistsError:
        # blktap truncates; refusing to destroy an image is the safer answer.
        print(f"{o['n']}: failed to create: {-errno.EEXIST}", file=sys.stderr)
        return -errno.EEXIST
    except OSError as exc:
        print(f"{o['n']}: failed to create: {_err(exc)}", file=sys.stderr)
        return _err(exc)
    return 0


SNAPSHOT_USAGE = ("options: <-n name> <-p parent name> [-l snapshot depth limit] "
                  "[-m parent_is_raw] [-S size (MB) for metadata preallocation "
                  "(see vhd-util resize)] [-e link to supplied parent name even if "
                  "it might be empty] [-h help]")


def snapshot(args: list[str]) -> int:
    o = _opts(args, "n:p:S:l:meh", SNAPSHOT_USAGE, "np")
    try:
        target = Path(os.path.realpath(o["p"]))
        raw = "m" in o
        if not raw and "e" not in o:
            target, raw = _snapshot_target(target)
        limit = int(o.get("l", "0") or 0)
        if limit and not raw:
            depth = len(vhd.open_chain(target))
            if depth + 1 > limit:
                print(f"snapshot depth exceeded: current depth: {depth}, limit: {limit}")
                return -errno.ENOSPC
        # The size of the image named, which may be larger than the target's.
        named = vhd.Layer.open_raw(o["p"]) if "m" in o else vhd.Layer.open(o["p"])
        vhd.create(o["n"], named.footer.current_size, parent=target, parent_raw=raw,
                   max_size=_strtoull(o.get("S", "0")) * MiB)
    except OSError as exc:
        print(str(exc), file=sys.stderr)
        return _err(exc)
    return 0


def _snapshot_target(path: Path) -> tuple[Path, bool]:
    """vhd_util_find_snapshot_target: skip down past empty differencing disks (to a raw
    parent too: the snapshot is then of the raw file)."""
    while True:
        layer = vhd.Layer.open(path)
        if not layer.is_diff or any(e != vhd.BAT_UNUSED for e in layer.bat):
            return path, False
        path = layer.parent_path()
        if layer.parent_is_raw:
            return path, True


# ---- query -------------------------------------------------------------------------

QUERY_USAGE = ("options: <-n name> [-v print virtual size (in MB)] "
               "[-s print physical utilization (bytes)] [-p print parent] "
               "[-f print fields] [-m print marker] [-d print chain depth] "
               "[-S print max virtual size (MB) for fast resize] "
               "[-a print allocated block count] "
               "[-u don't resolve parent path] "
               "[-h help]")


def physical_size(layer: vhd.Layer) -> int:
    """vhd_get_phys_size: the end of the headers or of the last block, plus a footer."""
    if layer.header is None:
        return layer.file_size
    end = layer.batmap_end
    span = layer.bitmap_size + layer.block_size
    for e in layer.bat:
        if e != vhd.BAT_UNUSED:
            end = max(end, e * SECTOR_SIZE + span)
    return end + vhd.FOOTER_SIZE


def _marker(layer: vhd.Layer) -> int:
    if layer.header is None:
        return 0
    with open(layer.path, "rb") as f:
        f.seek(layer.header.table_offset + layer.bat_bytes)
        head = f.read(SECTOR_SIZE)
    return head[28] if head[:8] == vhd.BATMAP_COOKIE else 0


def query(args: list[str]) -> int:
    # vhd-util-query.c: each asked field on its own line, in this order.
    o = _opts(args, "n:vspfdSmauh", QUERY_USAGE)
    name = o["n"]
    try:
        layer = vhd.Layer.open(name, disabled_ok=True)
    except OSError as exc:
        print(f"error opening {name}: {_err(exc)}")
        return _err(exc)
    err = 0
    if "v" in o:
        print(layer.footer.current_size >> 20)
    if "s" in o:
        print(physical_size(layer))
    if "p" in o:
        if not layer.is_diff:
            print(f"{name} has no parent")
        else:
            try:
                print(layer.parent_path() if "u" not in o else layer.parent_names()[0])
            except (OSError, IndexError):
                print("query failed")
                err = err or -errno.EINVAL
    if "f" in o:
        print(f"hidden: {layer.hidden}")
    if "m" in o:
        print(f"marker: {_marker(layer)}")
    if "d" in o:
        try:
            print(f"chain depth: {len(vhd.open_chain(name))}")
        except OSError as exc:
            print(f"error checking chain depth: {_err(exc)}")
            err = err or _err(exc)
    if "a" in o:
        print(sum(1 for e in layer.bat if e != vhd.BAT_UNUSED))
    if "S" in o and layer.header is not None:
        print(layer.header.max_table_entries * (layer.block_size >> 20))
    return err


# ---- check -------------------------------------------------------------------------

CHECK_USAGE = ("options: -n <file> [-i ignore missing primary footers] "
               "[-I ignore parent uuids] [-t ignore timestamps] "
               "[-B do not check BAT for overlapping (precludes -s, -b)] "
               "[-p check parents] [-b check bitmaps] [-s stats] [-h help]")


def _check_one(name: str | Path, ignore_uuid: bool) -> int:
    try:
        layer = vhd.Layer.open(name)
        if layer.parent_is_raw:
            layer.parent_path()     # it must be there; a raw file has nothing to check
        elif layer.is_diff:
            parent = vhd.Layer.open(layer.parent_path())
            assert layer.header is not None
            if not ignore_uuid and parent.footer.uuid != layer.header.parent_uuid:
                raise vhd.VhdError(name, f"invalid parent {parent.path}: invalid parent uuid")
    except OSError as exc:
        print(exc.strerror or str(exc))
        print(f"{name} appears invalid; dumping metadata")
        return _err(exc)   # blktap: ENOENT for a parent not found, else mostly EINVAL
    print(f"{name} is valid")
    return 0


def check(args: list[str]) -> int:
    o = _opts(args, "n:iItpbBsh", CHECK_USAGE)
    name = o["n"]
    if not os.path.exists(name):
        print(f"cannot stat {name}: {errno.ENOENT}")
        return -errno.ENOENT
    err = _check_one(name, "I" in o)
    if err or "p" not in o:
        return err
    try:
        for layer in vhd.open_chain(name)[1:]:
            if layer.raw:
                break       # vhd_util_check_parents stops at a raw parent
            err = _check_one(layer.path, "I" in o)
            if err:
                break
    except OSError as exc:
        print(f"error getting parent: {_err(exc)}")
        err = _err(exc)
    if err:
        print(f"error checking parents: {err}")
    return err


# ---- set ---------------------------------------------------------------------------

SET_USAGE = "options: <-n name> <-f field> <-v value> [-h help]"


def set_field(args: list[str]) -> int:
    o = _opts(args, "n:f:v:h", SET_USAGE, "nfv")
    field = o["f"]
    if field not in ("hidden", "marker"):
        print(f"invalid field {field}")
        print(SET_USAGE)
        return -errno.EINVAL
    value = int(o["v"]) if o["v"].lstrip("-").isdigit() else 0
    if not 0 <= value <= 255:
        print(f"invalid value {value}")
        print(SET_USAGE)
        return -errno.EINVAL
    try:
        if field == "hidden":
            vhd.set_hidden(o["n"], value)
        else:
            _set_marker(o["n"], value)
    except OSError as exc:
        print(f"error opening {o['n']}: {_err(exc)}")
        return _err(exc)
    return 0


def _set_marker(name: str, value: int) -> None:
    layer = vhd.Layer.open(name)
    if layer.header is None:
        raise OSError(errno.EINVAL, "a fixed disk has no batmap")
    at = layer.header.table_offset + layer.bat_bytes
    with open(name, "r+b") as f:
        f.seek(at)
        head = bytearray(f.read(SECTOR_SIZE))
        if head[:8] != vhd.BATMAP_COOKIE:
            raise OSError(errno.EINVAL, "no batmap")
        head[28] = value
        f.seek(at)
        f.write(head)
        os.fsync(f.fileno())


# ---- coalesce ----------------------------------------------------------------------

COALESCE_USAGE = ("options: <-n name> [-a ancestor] [-o output] [-s sparse] "
                  "[-p progress] [-h help]")


def coalesce(args: list[str]) -> int:
    """Write the sectors the child holds into its parent (vhd-util-coalesce.c)."""
    o = _opts(args, "n:o:a:x:sph", COALESCE_USAGE)
    from blktap3.datapath import Image
    try:
        child = vhd.Layer.open(o["n"])
        if not child.is_diff:
            print(f"error: {o['n']} is not a differencing disk")
            return -errno.EINVAL
        # A raw parent is written as the file it is (vhd-util-coalesce.c opens it O_RDWR).
        parent = Image.open("aio" if child.parent_is_raw else "vhd", str(child.parent_path()))
    except OSError as exc:
        print(f"error opening {o['n']}: {_err(exc)}")
        return _err(exc)
    try:
        spb = child.block_size // SECTOR_SIZE
        with open(child.path, "rb") as f:
            for blk, entry in enumerate(child.bat):
                if entry == vhd.BAT_UNUSED:
                    continue
                bitmap = child.bitmap(f, blk)
                i = 0
                while i < spb:
                    if not vhd.bit(bitmap, i):
                        i += 1
                        continue
                    n = 1
                    while i + n < spb and vhd.bit(bitmap, i + n):
                        n += 1
                    f.seek(entry * SECTOR_SIZE + child.bitmap_size + i * SECTOR_SIZE)
                    parent.write(blk * spb + i, f.read(n * SECTOR_SIZE))
                    i += n
    except OSError as exc:
        print(f"error coalescing {o['n']}: {_err(exc)}")
        return _err(exc)
    finally:
        parent.close()
    return 0


# ---- modify (re-parent) -----------------------------------------------------------

MODIFY_USAGE = ("options: <-n name> [-s size (in bytes)] [-P parent_path] "
                "[-p parent_path] [-m parent_is_raw] [-z zero_bat] [-h help]")


def modify(args: list[str]) -> int:
    """`-p PARENT [-m]`: point the differencing disk at another parent, a raw file with
    `-m` (vhd_change_parent): its UUID (null for a raw one), timestamp, name and
    locators; the locators keep their space."""
    o = _opts(args, "n:s:p:P:mzh", MODIFY_USAGE, "np")
    if set(o) - {"n", "p", "m"}:
        print(MODIFY_USAGE)
        return -errno.EINVAL
    try:
        child = vhd.Layer.open(o["n"])
        if not child.is_diff or child.header is None:
            print("would-be child is not a differencing disk")
            return -errno.EINVAL
        where = os.path.realpath(o["p"])
        parent = vhd.Layer.open_raw(where) if "m" in o else vhd.Layer.open(where)
        if parent.footer.current_size > child.footer.current_size:
            print(f"parent {o['p']} is larger than {o['n']}")
            return -errno.EINVAL
        vhd.reparent(child, parent)
    except OSError as exc:
        print(f"error modifying {o['n']}: {exc.strerror or exc}")
        return _err(exc)
    return 0


# ---- repair ------------------------------------------------------------------------

REPAIR_USAGE = "options: <-n name> [-h help]"


def repair(args: list[str]) -> int:
    """vhd-util-repair.c: a dynamic disk whose end footer is lost or damaged gets its
    footer back from the copy at offset 0, written at the end of its data."""
    o = _opts(args, "n:h", REPAIR_USAGE)
    name = o["n"]
    try:
        vhd.Layer.open(name)
        return 0        # nothing to repair
    except OSError:
        pass
    try:
        vhd.repair_footer(name)
    except OSError as exc:
        print(f"error repairing {name}: {exc.strerror or exc}")
        return _err(exc)
    return 0


COMMANDS: dict[str, Command] = {
    "create": create, "snapshot": snapshot, "query": query, "check": check,
    "set": set_field, "coalesce": coalesce, "modify": modify, "repair": repair,
    "scan": scan, "resize": resize, "revert": revert, "read": read,
}


def _help() -> int:
    print("usage: vhd-util COMMAND [OPTIONS]\nCOMMAND := { " + " | ".join(COMMANDS) + " }")
    return errno.EINVAL


def main(argv: Sequence[str] | None = None) -> int:
    words = [w for w in (sys.argv[1:] if argv is None else argv) if w != "--debug"]
    if not words:
        return _help()
    command = COMMANDS.get(words[0])
    if command is None:
        print(f"invalid COMMAND {words[0]}", file=sys.stderr)
        return _help()
    try:
        rc = command(words[1:])
    except Usage as exc:
        rc = exc.err
    except (BrokenPipeError, KeyboardInterrupt):
        rc = -errno.EINTR
    return abs(rc)


if __name__ == "__main__":
    sys.exit(main())

