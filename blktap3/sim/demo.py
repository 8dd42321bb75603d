"""The main job (`./run demo`): the whole system on a simulated Xen host, shown step by step.

Today: the simulated host comes up (Debian's real xenstored under xensim), a guest domain
is introduced, a vbd3 disk's back-end and front-end nodes are written as libxl writes them
and shown, the guest (a real unprivileged domain talking through its own xenstore ring)
reads its nodes and is refused a write to the back-end's, then everything stops and
nothing is left behind.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from blktap3.xenbus import BoundPort, XenStore, XenStorePermissionError

from . import xenlib
from .host import Host
from .toolstack import Image, parse_devid
from .xenstored import Kind

GUEST_DOMID = 1
DEVICE = "xvda"
IMAGE_BYTES = 64 << 20


class Timeline:
    """Prints each step with the time since the start."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.failures = 0

    def step(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:7.3f}s] {text}", flush=True)

    def check(self, ok: bool, text: str) -> None:
        self.step(("ok    " if ok else "FAILED ") + text)
        if not ok:
            self.failures += 1


@contextmanager
def guest_xenstore(host: Host, domid: int) -> Iterator[XenStore]:
    """The guest's own XenStore connection, through its xenstore ring page."""
    info = host.machine.domain(domid)
    page = xenlib.map_xenstore_page(host.run_dir, domid)
    evtchn = xenlib.EventChannel(host.run_dir, domid)
    try:
        evtchn.claim(info.xenstore_port)
        port = BoundPort(evtchn, info.xenstore_port, evtchn.fd)
        with XenStore.over_ring(memoryview(page), port, name=f"dom{domid}") as xs:
            yield xs
    finally:
        evtchn.close()  # the page is unmapped when the connection's views of it are gone


def run(xenstored: Kind = "c", run_dir: str | None = None) -> int:
    """Run the demo; 0 when every check passed."""
    from .cli import tree_lines  # the CLI's `ls` format

    work = Path(tempfile.mkdtemp(prefix="b3demo-", dir="/tmp"))
    host = Host(run_dir or work / "run")
    t = Timeline()
    image = work / "disk.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    try:
        host.up(xenstored)
        t.step(f"host up: {xenstored} xenstored pid {host.xenstored_pid}, "
               f"XENSTORED_PATH={host.xenstored_path}")
        with host.toolstack() as ts:
            info = ts.create_domain(GUEST_DOMID)
            t.step(f"domain {GUEST_DOMID} created and introduced "
                   f"(xenstore mfn {info.xenstore_mfn}, port {info.xenstore_port})")
            paths = ts.add_vbd(GUEST_DOMID, parse_devid(DEVICE), Image.parse(str(image)))
            t.step(f"vbd {DEVICE} added: {IMAGE_BYTES >> 20} MiB raw image {image}")
            for line in tree_lines(ts.xs, paths.backend) + tree_lines(ts.xs, paths.frontend):
                print("          " + line)
            with guest_xenstore(host, GUEST_DOMID) as guest:
                state = guest.read(paths.frontend_key("state"))
                t.check(state == "1", f"guest reads its front-end state over its ring: {state}")
                backend_state = guest.read(paths.backend_key("state"))
                t.check(backend_state == "1", "guest reads its back-end's state: "
                        f"{backend_state}")
                try:
                    guest.write(paths.backend_key("state"), "4")
                    t.check(False, "guest write to the back-end directory was refused")
                except XenStorePermissionError as e:
                    t.check(True, f"guest write to the back-end directory refused: {e}")
            ts.destroy_domain(GUEST_DOMID)
            t.check(not ts.xs.exists(paths.backend) and not ts.xs.exists(paths.frontend),
                    f"domain {GUEST_DOMID} destroyed, its nodes removed")
    finally:
        pid = host.xenstored_pid
        host.down()
        image.unlink(missing_ok=True)
        work.rmdir()
    t.check(pid is None or not os.path.exists(f"/proc/{pid}"), "xenstored stopped")
    t.check(not host.run_dir.exists(), f"run directory {host.run_dir} removed")
    print(f"demo {'passed' if not t.failures else 'FAILED'}: {t.failures} failed checks")
    return 0 if not t.failures else 1
