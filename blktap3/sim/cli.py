"""blktap3-sim: drive the simulated Xen host from a shell.

    blktap3-sim [--run-dir DIR] up [--xenstored c|ocaml] [--no-tapback] [--toolstack xapi|libxl]
    blktap3-sim [--run-dir DIR] down
    blktap3-sim [--run-dir DIR] domain create|destroy DOMID
    blktap3-sim [--run-dir DIR] vbd add DOMID DEVID IMAGE [--mode r|w] [--cdrom] [--no-hotplug]
    blktap3-sim [--run-dir DIR] vbd remove DOMID DEVID
    blktap3-sim [--run-dir DIR] vbd migrate DOMID DEVID TARGET [--server qemu-nbd|tapdisk]
                                        [--pass-fd]
    blktap3-sim [--run-dir DIR] guest run DOMID DEVID [--personality P] [--workload W]
                                      [--seconds S] [--hold SECONDS]
    blktap3-sim [--run-dir DIR] ls [PATH]
    blktap3-sim demo [--xenstored c|ocaml]

The run directory defaults to $BLKTAP3_SIM_DIR, else /run/blktap3-sim. Errors are one
line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from blktap3 import cmdline
from blktap3.ctl import runtime
from blktap3.vbd3.disk import devid_argument, domid_argument
from blktap3.xenbus import XenStore, XenStoreError

from . import demo, migrate
from .frontend import personality_names
from .guest import WORKLOADS, GuestResult, run_guest, start_guest
from .host import Host, HostError, default_run_dir
from .hotplug import HotplugError
from .toolstack import TOOLSTACKS, Image, ToolstackError
from .xensim import XensimError
from .xenstored import XenstoredError

PROG = "blktap3-sim"
EXIT_INTERRUPTED = 130
EXIT_ERROR = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line input: reported with the usage line."""


_seconds = cmdline.float_in(0, 86400)  # 0 allowed: `--hold 0` holds nothing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="The simulated Xen host: xenstored under xensim, a toolstack.")
    parser.add_argument("--run-dir", default=None,
                        help=f"state directory (default $BLKTAP3_SIM_DIR or {default_run_dir()})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start xenstored under xensim and tapback, in the background")
    up.add_argument("--xenstored", choices=("c", "ocaml"), default="c",
                    help="Debian's C xenstored (default) or oxenstored")
    up.add_argument("--no-tapback", dest="tapback", action="store_false",
                    help="do not start tapback")
    up.add_argument("--toolstack", choices=TOOLSTACKS, default="xapi",
                    help="whose order the toolstack and tapback follow: xapi (default: "
                         "hotplug, then InitWait) or libxl (Xen >= 4.19: InitWait, then "
                         "Xen's block-tap script)")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop everything and remove the run directory")
    down.set_defaults(func=cmd_down)

    domain = sub.add_parser("domain", help="create or destroy a guest domain")
    dsub = domain.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = dsub.add_parser("create", help="memory, xenstore page, introduce")
    create.add_argument("domid", type=domid_argument)
    create.set_defaults(func=cmd_domain_create)
    destroy = dsub.add_parser("destroy", help="detach its disks (tapdisks destroyed), "
                              "release, remove its nodes, VIRQ_DOM_EXC")
    destroy.add_argument("domid", type=domid_argument)
    destroy.set_defaults(func=cmd_domain_destroy)

    vbd = sub.add_parser("vbd", help="add or remove a vbd3 disk")
    vsub = vbd.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = vsub.add_parser("add", help="write the nodes, then the hotplug step (tapdisk)")
    add.add_argument("domid", type=domid_argument)
    add.add_argument("devid", type=devid_argument, help="virtual-device number or xvdX name")
    add.add_argument("image", help="aio:/path, raw:/path, vhd:/path or a plain path")
    add.add_argument("--mode", choices=("r", "w"), default="w")
    add.add_argument("--cdrom", action="store_true", help="device-type cdrom (read-only)")
    add.add_argument("--no-hotplug", dest="hotplug", action="store_false",
                     help="only write the nodes (no tapdisk)")
    add.set_defaults(func=cmd_vbd_add)
    remove = vsub.add_parser("remove", help="online=0 + Closing, wait for Closed, "
                             "tap-ctl destroy, remove both directories")
    remove.add_argument("domid", type=domid_argument)
    remove.add_argument("devid", type=devid_argument)
    remove.set_defaults(func=cmd_vbd_remove)
    mig = vsub.add_parser("migrate", help="live storage migration to a new raw file: mirror "
                          "to it over NBD, bulk copy, pause, switch, resume (exit 1: aborted, "
                          "the VBD stays on its source)")
    mig.add_argument("domid", type=domid_argument)
    mig.add_argument("devid", type=devid_argument)
    mig.add_argument("target", type=Path, help="the new raw file (must not exist)")
    mig.add_argument("--server", choices=migrate.SERVERS, default="qemu-nbd",
                     help="what serves the target over NBD during the mirror: Debian's "
                          "qemu-nbd (default) or another tapdisk's export")
    mig.add_argument("--pass-fd", action="store_true",
                     help="connect to the target here and hand the socket to the tapdisk "
                          "on nbdclient<pid> (as xapi does), then -2 nbd:NAME")
    mig.set_defaults(func=cmd_vbd_migrate)

    guest = sub.add_parser("guest", help="run a simulated guest against a disk")
    gsub = guest.add_subparsers(dest="action", required=True, metavar="ACTION")
    grun = gsub.add_parser("run", help="handshake, verified I/O, detach; exit 0 only if "
                           "every byte read back identically")
    grun.add_argument("domid", type=domid_argument)
    grun.add_argument("devid", type=devid_argument)
    grun.add_argument("--personality", default="linux", choices=personality_names())
    grun.add_argument("--workload", default="verify", choices=WORKLOADS)
    grun.add_argument("--seconds", type=_seconds, default=1.0,
                      help="length of the timed phase of randrw and read (default 1): a "
                           "guest writing while a disk migrates")
    grun.add_argument("--timeout", type=cmdline.positive_float, default=60.0,
                      help="seconds the guest may take (default 60)")
    grun.add_argument("--hold", type=_seconds, metavar="SECONDS", default=0.0,
                      help="stay connected this long after the workload (a live VBD to "
                           "look at: tap-ctl stats, the stats files, NBD), then detach; "
                           "SIGINT ends the hold early")
    grun.set_defaults(func=cmd_guest_run)

    ls = sub.add_parser("ls", help="print the XenStore tree with permissions")
    ls.add_argument("path", nargs="?", default="/")
    ls.set_defaults(func=cmd_ls)

    dm = sub.add_parser("demo", help="the main job: bring a host up, show it, take it down")
    dm.add_argument("--xenstored", choices=("c", "ocaml"), default="c")
    dm.set_defaults(func=cmd_demo)
    return parser


def cmd_up(host: Host, args: argparse.Namespace) -> None:
    host.up(args.xenstored, tapback=args.tapback, toolstack=args.toolstack)
    print(f"export XENSTORED_PATH={host.xenstored_path}")
    print(f"export {runtime.ROOT_ENV}={host.control_dir}")
    print(f"export {runtime.SHM_ENV}={runtime.shm_dir(host.run_dir)}")


def cmd_down(host: Host, args: argparse.Namespace) -> None:
    host.down()


def cmd_domain_create(host: Host, args: argparse.Namespace) -> None:
    with host.toolstack() as ts:
        info = ts.create_domain(args.domid)
    print(f"domain {info.domid}: xenstore mfn {info.xenstore_mfn} port {info.xenstore_port}")


def cmd_domain_destroy(host: Host, args: argparse.Namespace) -> None:
    host.destroy_domain(args.domid)


def cmd_vbd_add(host: Host, args: argparse.Namespace) -> None:
    image = Image.parse(args.image)
    mode = "r" if args.cdrom else args.mode
    if args.hotplug:
        paths, attached = host.attach_disk(args.domid, args.devid, image, mode=mode,
                                           cdrom=args.cdrom)
    else:
        with host.toolstack() as ts:
            paths = ts.add_vbd(args.domid, args.devid, image, mode=mode, cdrom=args.cdrom)
    print(paths.backend)
    print(paths.frontend)
    if args.hotplug:
        print(f"tapdisk {attached.pid} minor {attached.minor}: {attached.device_path}")


def cmd_vbd_remove(host: Host, args: argparse.Namespace) -> None:
    state = host.detach_disk(args.domid, args.devid)
    print(f"back-end state at removal: {state.name if state else 'gone'}")


def cmd_vbd_migrate(host: Host, args: argparse.Namespace) -> None:
    try:
        result = migrate.migrate(host, args.domid, args.devid, args.target, server=args.server,
                                 pass_fd=args.pass_fd,
                                 on_step=lambda text: print(text, flush=True))
    except migrate.MigrationError as exc:
        raise HostError(str(exc)) from None
    print(result.summary())
    if not result.ok:
        raise SystemExit(EXIT_ERROR)


def cmd_guest_run(host: Host, args: argparse.Namespace) -> None:
    if args.hold:
        result = _held_guest(host, args)
    else:
        result = run_guest(host, args.domid, args.devid, args.personality, args.workload,
                           args.timeout + args.seconds, extra=["--seconds", str(args.seconds)])
    print(result.summary())
    if not result.ok:
        raise SystemExit(EXIT_ERROR)


def _held_guest(host: Host, args: argparse.Namespace) -> GuestResult:
    """A guest that stays connected `--hold` seconds after its workload, then detaches."""
    with start_guest(host, args.domid, args.devid, args.personality, args.workload,
                     hold=True, extra=["--timeout", str(min(args.timeout, 30.0)),
                                       "--seconds", str(args.seconds)]) as guest:
        try:
            guest.wait_for_step("holding", timeout=args.timeout + args.seconds)
        except TimeoutError:
            return guest.result(args.timeout)
        print(f"guest {args.domid}: connected to {args.devid}, holding for {args.hold:g} s "
              "(Ctrl-C detaches now)", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.hold)  # the point of the command: a person looks meanwhile
        guest.detach()
        return guest.result(args.timeout)


def cmd_ls(host: Host, args: argparse.Namespace) -> None:
    with host.xs() as xs:
        for line in tree_lines(xs, args.path):
            print(line)


def cmd_demo(host: Host, args: argparse.Namespace) -> None:
    raise SystemExit(demo.run(xenstored=args.xenstored, run_dir=args.run_dir))


def tree_lines(xs: XenStore, path: str) -> list[str]:
    """`path = "value"  (perms)` for `path` and every node under it, depth first."""
    lines: list[str] = []

    def walk(node: str) -> None:
        value = xs.read(node)
        perms = ",".join(str(p) for p in xs.get_perms(node))
        lines.append(f'{node} = "{value}"   ({perms})')
        base = "" if node == "/" else node
        for child in xs.ls(node):
            walk(f"{base}/{child}")

    walk(path)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(10 if args.verbose else 30))
    func: Callable[[Host, argparse.Namespace], None] = args.func
    # SIGTERM and SIGHUP unwind as ^C does: the demo takes its host down, a guest run
    # stops its guest.
    cmdline.terminate_as_interrupt()
    try:
        if func is cmd_demo:
            func(Host(args.run_dir or "/unused"), args)
            return 0
        host = Host(args.run_dir)
        if func is not cmd_up:
            host.require_up()
        func(host, args)
    except (HostError, ToolstackError, HotplugError, XenstoredError, XensimError,
            XenStoreError, OSError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
