"""cbt-util: blktap's tool for changed-block-tracking logs (cbt/cbt-util.c, v4.0.8).

Same commands, options (getopt strings), output and exit codes: `create -n LOG -s
BYTES`, `set -n LOG [-p UUID] [-c UUID] [-f 0|1] [-s BYTES]`, `get -n LOG -p|-c|-f|-s|-b`
(one of them; `-b` writes the raw bitmap to stdout), `coalesce -p PARENT -c CHILD`
(the child's bitmap |= the parent's). A command returns a negative errno, the process
exits with its absolute value; bad options print the command's usage on stdout (as
blktap does) and exit 22. Where blktap silently takes nonsense we refuse it with one
line on stderr: a UUID that does not parse, a flag other than 0 or 1, a size that is
not a number, a log shorter than its header or its bitmap.
The format is `blktap3.datapath.cbtlog`'s.
"""

from __future__ import annotations

import errno
import getopt
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace

from blktap3.datapath import cbtlog

COMMANDS_ORDER = ("create", "set", "get", "coalesce")

CREATE_USAGE = ("cbt-util create: Create new CBT metadata log with default values\n\n"
                "Options:\n\t-n Log file name\n\t-s Num blocks in bitmap\n\t[-h help]")
SET_USAGE = ("cbt-util set: Set field in log file\n\nOptions:\n -n name\tName of log file\n"
             "[-p parent]\tParent log file UUID\n[-c child]\tChild log file UUID\n"
             "[-f 0|1]\tConsistency flag\n[-s size]\tSize of the disk in bytes\n[-h]\t\thelp")
GET_USAGE = ("cbt-util get: Read field from log file\n\nOptions:\n -n name\tName of log file\n"
             "[-p]\t\tPrint parent log file UUID\n[-c]\t\tPrint child log file UUID\n"
             "[-f]\t\tPrint consistency flag\n[-s]\t\tPrint size of disk in bytes\n"
             "[-b]\t\tPrint bitmap contents\n[-h]\t\thelp")
COALESCE_USAGE = ("cbt-util coalesce: Coalesce contents of parent bitmap on to child bitmap\n\n"
                  "Options:\n\t-p Parent log file name\n\t-c Child log file name\n"
                  "\t[-h help]")


class Usage(Exception):
    """Print the command's usage on stdout and return -EINVAL."""


def _opts(args: list[str], spec: str) -> dict[str, str]:
    try:
        pairs, _ = getopt.getopt(args, spec)
    except getopt.GetoptError:
        raise Usage() from None
    opts = {k[1:]: v for k, v in pairs}
    if "h" in opts:
        raise Usage()
    return opts


def _size(text: str) -> int:
    if not text.isdigit():
        raise Usage()
    return int(text)


def _fail(message: str, err: int) -> int:
    print(message, file=sys.stderr)
    return -err


def _open_error(name: str, exc: OSError) -> int:
    return _fail(f"Failed to open log file {name}. {exc.strerror}", exc.errno or errno.EIO)


def _metadata(name: str) -> cbtlog.Metadata:
    """The log's header; OSError(EIO) when the file is shorter (blktap's fread fails)."""
    with open(name, "rb") as f:
        data = f.read(cbtlog.HEADER.size)
    if len(data) < cbtlog.HEADER.size:
        raise OSError(errno.EIO, f"Failed to read CBT metadata from file {name}")
    return cbtlog.Metadata.unpack(data)


def _bitmap(name: str, meta: cbtlog.Metadata) -> bytes:
    with open(name, "rb") as f:
        f.seek(cbtlog.HEADER.size)
        data = f.read(cbtlog.bitmap_size(meta.size))
    if len(data) < cbtlog.bitmap_size(meta.size):
        raise OSError(errno.EIO, f"Failed to read bitmap from file {name}")
    return data


def create(args: list[str]) -> int:
    try:
        opts = _opts(args, "n:s:h")
        name, size = opts.get("n"), _size(opts.get("s", "0"))
        if not name or not size:
            raise Usage()
    except Usage:
        print(CREATE_USAGE)
        return -errno.EINVAL
    try:
        cbtlog.create(name, size)
    except OSError as exc:
        return _open_error(name, exc)
    return 0


def get(args: list[str]) -> int:
    try:
        opts = _opts(args, "n:pcfsbh")
        name = opts.get("n")
        fields = [f for f in "pcfsb" if f in opts]
        if not name or len(fields) != 1:
            raise Usage()
    except Usage:
        print(GET_USAGE)
        return -errno.EINVAL
    try:
        meta = _metadata(name)
        field = fields[0]
        if field == "b":
            sys.stdout.flush()
            sys.stdout.buffer.write(_bitmap(name, meta))
            sys.stdout.buffer.flush()
            return 0
    except OSError as exc:
        if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
            return _open_error(name, exc)
        return _fail(str(exc.strerror or exc), exc.errno or errno.EIO)
    value = {"p": str(meta.parent), "c": str(meta.child), "f": str(meta.consistent),
             "s": str(meta.size)}[field]
    print(value)
    return 0


def set_(args: list[str]) -> int:
    try:
        opts = _opts(args, "n:p:c:f:s:h")
        name = opts.get("n")
        size = _size(opts["s"]) if "s" in opts else 0
        if "f" in opts and opts["f"] not in ("0", "1"):
            raise Usage()
        if not name or not ({"p", "c", "f"} & opts.keys() or size):
            raise Usage()
        ids = {k: uuid.UUID(opts[k]) for k in "pc" if k in opts}
    except ValueError as exc:
        return _fail(f"Invalid UUID: {exc}", errno.EINVAL)
    except Usage:
        print(SET_USAGE)
        return -errno.EINVAL
    try:
        meta = _metadata(name)
        if size and size < meta.size:
            return _fail(f"Size smaller than current file size ({meta.size})", errno.EINVAL)
        new = replace(meta, parent=ids.get("p", meta.parent), child=ids.get("c", meta.child),
                      consistent=int(opts.get("f", meta.consistent)), size=size or meta.size)
        bitmap = _bitmap(name, meta)
        with open(name, "r+b") as f:
            if size:  # the bitmap grows with zeroes for the new blocks
                f.seek(cbtlog.HEADER.size)
                f.write(bitmap.ljust(cbtlog.bitmap_size(size), b"\0"))
            f.seek(0)
            f.write(new.pack())
    except OSError as exc:
        if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
            return _open_error(name, exc)
        return _fail(str(exc.strerror or exc), exc.errno or errno.EIO)
    return 0


def coalesce(args: list[str]) -> int:
    try:
        opts = _opts(args, "p:c:h")
        parent, child = opts.get("p"), opts.get("c")
        if not parent or not child:
            raise Usage()
    except Usage:
        print(COALESCE_USAGE)
        return -errno.EINVAL
    name = parent
    try:
        pmeta = _metadata(parent)
        name = child
        cmeta = _metadata(child)
        if cbtlog.bitmap_size(pmeta.size) > cbtlog.bitmap_size(cmeta.size):
            return _fail("Parent bitmap larger than child bitmap, can't coalesce", errno.EINVAL)
        pbits, cbits = bytearray(_bitmap(parent, pmeta)), bytearray(_bitmap(child, cmeta))
        for i, byte in enumerate(pbits):
            cbits[i] |= byte
        with open(child, "r+b") as f:
            f.seek(cbtlog.HEADER.size)
            f.write(cbits)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
            return _open_error(name, exc)
        return _fail(str(exc.strerror or exc), exc.errno or errno.EIO)
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "create": create, "set": set_, "get": get, "coalesce": coalesce}


def _help() -> None:
    print("usage: cbt-util COMMAND [OPTIONS]")
    print("COMMAND := { " + " | ".join(COMMANDS_ORDER) + " }")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if not words:
        _help()
        return errno.EINVAL
    command = COMMANDS.get(words[0])
    if command is None:
        print(f"Invalid COMMAND {words[0]}", file=sys.stderr)
        _help()
        return 0  # blktap's exit status for an unknown command
    try:
        rc = command(words[1:])
    except (BrokenPipeError, KeyboardInterrupt):
        rc = -errno.EINTR
    return abs(rc)


if __name__ == "__main__":
    sys.exit(main())
