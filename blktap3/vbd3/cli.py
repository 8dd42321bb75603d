"""blktap3-vbd3: attach and detach vbd3 disks as libxl would, on hosts whose libxl cannot.

    blktap3-vbd3 attach DOMID DEV IMAGE [--mode r|w] [--cdrom] [--wait STATE] [--timeout S]
    blktap3-vbd3 detach DOMID DEV [--timeout S]
    blktap3-vbd3 list [DOMID]

Xen 4.19 and later make vbd3 disks themselves (`xl create` with
`vdev=xvda,backendtype=tap,format=raw,target=PATH`); Xen 4.17 (Debian 12) cannot, so this
does what libxl and its block-tap script would, against the real xenstored and `tap-ctl`:

attach: the back-end and front-end directories with libxl's keys and permissions in one
  transaction (`blktap3.vbd3.disk`), then block-tap's add (`tap-ctl list -t aio -f`, or
  allocate, spawn, attach, open; `pid`, `minor`, `physical-device-path`,
  `hotplug-status`), then a wait until tapback took the VBD (the back-end at InitWait or
  later; `--wait connected` waits for the guest's front-end too). The hotplug step runs
  at once, without waiting for InitWait first, so it serves tapback in either order
  (`--toolstack xapi` or `libxl`).
detach: `online=0` and Closing (unless Closed) in one transaction, a wait for Closed
  (libxl's 10 s), block-tap's remove (`tap-ctl destroy` unless another VBD still uses
  the file), both directories removed.

Both are idempotent and safe to rerun after a crash: attach skips nodes already written
for the same image (refuses another image), finds a tapdisk already serving the file,
and rewrites what block-tap writes; detach skips whatever is gone already.
Errors are one line on stderr: exit 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from blktap3.xenbus import (
    BackendKey,
    Transaction,
    VbdPaths,
    XenbusState,
    XenbusValueError,
    XenStore,
    XenStoreError,
    parse_state,
)

from .blocktap import BlockTap, BlockTapError, TapCtl
from .disk import (
    BACKEND_DOMID,
    Image,
    ToolstackError,
    device_name,
    devid_argument,
    domain_path,
    domid_argument,
    remove_vbd_nodes,
    write_vbd_nodes,
)

PROG = "blktap3-vbd3"
KIND = "vbd3"
DESTROY_TIMEOUT = 10.0  # libxl's LIBXL_DESTROY_TIMEOUT
ATTACH_TIMEOUT = 40.0  # libxl's LIBXL_HOTPLUG_TIMEOUT
POLL = 0.1
WAITS = {"initwait": XenbusState.INIT_WAIT, "connected": XenbusState.CONNECTED}


class Vbd3Error(Exception):
    """What went wrong, in one line."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seconds value: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 3600]")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Attach and detach vbd3 disks (tapback + tapdisk) as Xen's "
        "libxl and block-tap script would, for hosts whose libxl cannot (Xen < 4.19).")
    parser.add_argument("--xenstored", metavar="PATH",
                        help="xenstored socket (default: $XENSTORED_PATH, "
                             "/var/run/xenstored/socket or /dev/xen/xenbus)")
    parser.add_argument("--tap-ctl", default="tap-ctl", metavar="COMMAND",
                        help="the tap-ctl to run (default: tap-ctl from PATH)")
    parser.add_argument("--control-dir", type=Path, metavar="DIR",
                        default=Path(os.environ.get("BLKTAP_CONTROL_DIR")
                                     or "/run/blktap-control"),
                        help="tapdisks' runtime root (default: $BLKTAP_CONTROL_DIR or "
                             "/run/blktap-control)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log each block-tap step (on stderr)")
    parser.add_argument("--lock", type=Path, default=Path("/var/run/xen-hotplug/block"),
                        metavar="FILE", help="the hotplug lock Xen's block scripts share "
                        "(default: /var/run/xen-hotplug/block)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    attach = sub.add_parser("attach", help="write the nodes, run block-tap add, wait "
                            "for the back-end")
    attach.add_argument("domid", type=domid_argument)
    attach.add_argument("dev", type=devid_argument, help="xvdX or a virtual-device number")
    attach.add_argument("image", help="a raw image: PATH or aio:PATH")
    attach.add_argument("--mode", choices=("r", "w"), default="w")
    attach.add_argument("--cdrom", action="store_true", help="device-type cdrom (read-only)")
    attach.add_argument("--wait", choices=sorted(WAITS), default="initwait",
                        help="return once the back-end reached this state (default: "
                             "initwait, tapback took the VBD; connected: the guest too)")
    attach.add_argument("--timeout", type=_seconds, default=ATTACH_TIMEOUT,
                        help=f"seconds to wait (default: {ATTACH_TIMEOUT:g})")
    attach.set_defaults(func=cmd_attach)

    detach = sub.add_parser("detach", help="online=0 and Closing, wait for Closed, "
                            "block-tap remove, nodes removed")
    detach.add_argument("domid", type=domid_argument)
    detach.add_argument("dev", type=devid_argument)
    detach.add_argument("--timeout", type=_seconds, default=DESTROY_TIMEOUT,
                        help=f"seconds to wait for Closed (default: {DESTROY_TIMEOUT:g})")
    detach.set_defaults(func=cmd_detach)

    ls = sub.add_parser("list", help="the vbd3 disks (of one domain)")
    ls.add_argument("domid", type=domid_argument, nargs="?")
    ls.set_defaults(func=cmd_list)
    return parser


def _block_tap(xs: XenStore, args: argparse.Namespace) -> BlockTap:
    env = {**os.environ, "BLKTAP_CONTROL_DIR": str(args.control_dir)}
    return BlockTap(xs, TapCtl((args.tap_ctl,), env, args.control_dir), args.lock)


def _state(xs: XenStore, key: str) -> XenbusState | None:
    try:
        return parse_state(xs.read_optional(key), key)
    except XenbusValueError:
        return None


def _wait(xs: XenStore, key: str, done: set[XenbusState], timeout: float) -> XenbusState | None:
    """Poll `key` until it holds one of `done` (a short poll: this command is seldom run
    and a watch is no quicker to set up); the last state seen."""
    deadline = time.monotonic() + timeout
    while True:
        state = _state(xs, key)
        if state in done or time.monotonic() >= deadline:
            return state
        time.sleep(POLL)


def cmd_attach(xs: XenStore, args: argparse.Namespace) -> None:
    paths = VbdPaths(args.domid, args.dev, BACKEND_DOMID, KIND)
    mode = "r" if args.cdrom else args.mode
    image = Image.parse(args.image)
    if not xs.exists(domain_path(args.domid)):
        raise Vbd3Error(f"no domain {args.domid}")
    present = xs.read_optional(paths.backend_key(BackendKey.PARAMS))
    if present is None:
        xs.transact(lambda tx: write_vbd_nodes(tx, paths, image, mode=mode, cdrom=args.cdrom))
    elif present != image.params:
        raise Vbd3Error(f"domain {args.domid} already has {device_name(args.dev)} "
                        f"with {present}")
    try:
        pid, minor = _block_tap(xs, args).add(paths)
    except BlockTapError as exc:
        raise Vbd3Error(f"block-tap add: {exc} (undo with: {PROG} detach "
                        f"{args.domid} {device_name(args.dev)})") from exc
    wanted = WAITS[args.wait]
    done = {wanted, XenbusState.CONNECTED, XenbusState.CLOSING, XenbusState.CLOSED}
    state = _wait(xs, paths.backend_key(BackendKey.STATE), done, args.timeout)
    name = state.name if state is not None else "absent"
    print(f"{paths.backend}: tapdisk {pid} minor {minor}, back-end {name}")
    if state not in (wanted, XenbusState.CONNECTED):
        error = xs.read_optional(paths.backend_key(BackendKey.ERROR))
        raise Vbd3Error(f"back-end {name}, not {wanted.name} after {args.timeout:g} s"
                        + (f": {error}" if error else " (is tapback running?)"))


def cmd_detach(xs: XenStore, args: argparse.Namespace) -> None:
    paths = VbdPaths(args.domid, args.dev, BACKEND_DOMID, KIND)
    state_key = paths.backend_key(BackendKey.STATE)
    if not xs.exists(paths.backend):
        if xs.exists(paths.frontend):
            xs.rm(paths.frontend)
        print(f"{paths.backend}: not attached")
        return

    def close(tx: Transaction) -> None:
        if not tx.exists(paths.backend):
            return
        tx.write(paths.backend_key(BackendKey.ONLINE), "0")
        if tx.read_optional(state_key) != XenbusState.CLOSED.wire():
            tx.write(state_key, XenbusState.CLOSING.wire())

    xs.transact(close)
    state = _wait(xs, state_key, {XenbusState.CLOSED}, args.timeout)
    if state is not XenbusState.CLOSED:
        print(f"{PROG}: back-end {state.name if state else 'absent'} after "
              f"{args.timeout:g} s, not Closed: removing anyway", file=sys.stderr)
    try:
        destroyed = _block_tap(xs, args).remove(paths)
    except BlockTapError as exc:
        raise Vbd3Error(f"block-tap remove: {exc} (the nodes are kept: rerun detach)") from exc
    xs.transact(lambda tx: remove_vbd_nodes(tx, paths))
    print(f"{paths.backend}: detached" + ("" if destroyed else " (tapdisk kept: shared)"))


def cmd_list(xs: XenStore, args: argparse.Namespace) -> None:
    base = f"{domain_path(BACKEND_DOMID)}/backend/{KIND}"
    domids = [str(args.domid)] if args.domid is not None else _ls(xs, base)
    for dom in sorted(domids, key=lambda d: int(d) if d.isdigit() else -1):
        for dev in sorted(_ls(xs, f"{base}/{dom}"), key=lambda d: int(d) if d.isdigit() else -1):
            if not (dom.isdigit() and dev.isdigit()):
                continue
            paths = VbdPaths(int(dom), int(dev), BACKEND_DOMID, KIND)
            keys = {k: xs.read_optional(paths.backend_key(k)) or "-" for k in
                    ("state", "params", "mode", "pid", "minor", "hotplug-status")}
            front = xs.read_optional(paths.frontend_key("state")) or "-"
            print(f"{dom} {device_name(int(dev))} back-end={keys['state']} front-end={front} "
                  f"mode={keys['mode']} pid={keys['pid']} minor={keys['minor']} "
                  f"hotplug={keys['hotplug-status']} {keys['params']}")


def _ls(xs: XenStore, path: str) -> list[str]:
    return list(xs.ls(path)) if xs.exists(path) else []


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(20 if args.verbose else 50),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        with XenStore.open(args.xenstored) as xs:
            args.func(xs, args)
    except (Vbd3Error, ToolstackError, XenStoreError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
