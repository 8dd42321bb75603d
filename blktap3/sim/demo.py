"""The main job (`./run demo`): the whole system on a simulated Xen host, shown step by step.

1. The host comes up: Debian's real xenstored under xensim, and tapback.
2. A guest domain is created and introduced; a raw image is attached as `xvda` the way a
   blktap3 toolstack does it (back-end and front-end nodes, then the block-tap hotplug
   step: `tap-ctl create`, `physical-device-path`, `hotplug-status=connected`).
3. The guest's blkfront (Linux personality, a real unprivileged domain talking XenStore
   through its own ring page) runs the handshake with tapback, writes a pattern through the
   blkif ring to the tapdisk and reads it back; the image file is then checked from dom0.
4. The handshake timeline, the back-end VBD machine's transitions (from tapback's log)
   and the I/O figures are printed.
5. Teardown: the disk is detached as libxl does (online=0, Closed, tap-ctl destroy, nodes
   removed), the domain destroyed, the host taken down; nothing may be left behind.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import time
from pathlib import Path

from blktap3.abi import XenbusState

from .guest import GuestReport, run_guest
from .host import Host
from .toolstack import Image, parse_devid
from .xenstored import Kind

GUEST_DOMID = 1
DEVICE = "xvda"
IMAGE_BYTES = 64 << 20
INDENT = " " * 11


class Timeline:
    """Prints each step with the time since the start, and counts failed checks."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.failures = 0

    def step(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:7.3f}s] {text}", flush=True)

    def check(self, ok: bool, text: str) -> None:
        self.step(("ok     " if ok else "FAILED ") + text)
        if not ok:
            self.failures += 1

    def detail(self, lines: list[str]) -> None:
        for line in lines:
            print(INDENT + line)


def machine_steps(log_path: Path, domid: int, devid: int) -> list[str]:
    """The back-end VBD machine's transitions for one VBD, from tapback's JSON log."""
    lines = []
    for raw in log_path.read_text().splitlines():
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if entry.get("domid") != domid or entry.get("devid") != devid:
            continue
        if entry.get("event") == "step":
            lines.append(f"{entry['source']:>18} --{entry['trigger']}--> {entry['dest']}")
        elif entry.get("event") == "published state":
            lines.append(f"{'':>18}    publishes {entry['state']}")
    return lines


def leftovers(host: Host, pids: list[int]) -> list[str]:
    """What of the host still exists: processes, its run directory, xensim memory files."""
    left = [f"process {pid}" for pid in pids if _alive(pid)]
    if host.run_dir.exists():
        left.append(f"run directory {host.run_dir}")
    return left


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def run(xenstored: Kind = "c", run_dir: str | None = None) -> int:
    """Run the demo; 0 when every check passed."""
    work = Path(tempfile.mkdtemp(prefix="b3demo-", dir="/tmp"))
    host = Host(run_dir or work / "run")
    t = Timeline()
    image = work / "disk.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    devid = parse_devid(DEVICE)
    pids: list[int] = []
    try:
        host.up(xenstored, tapback=True)
        pids += [p for p in (host.xenstored_pid, host.tapback_pid) if p]
        t.step(f"host up: {xenstored} xenstored (pid {host.xenstored_pid}) under xensim, "
               f"tapback (pid {host.tapback_pid}); XENSTORED_PATH={host.xenstored_path}")
        with host.toolstack() as ts:
            info = ts.create_domain(GUEST_DOMID)
        t.step(f"domain {GUEST_DOMID} created and introduced "
               f"(xenstore mfn {info.xenstore_mfn}, event channel {info.xenstore_port})")

        paths, attached = host.attach_disk(GUEST_DOMID, devid, Image.parse(str(image)))
        pids.append(attached.pid)
        t.step(f"{DEVICE} attached: {IMAGE_BYTES >> 20} MiB raw image, tapdisk pid "
               f"{attached.pid} minor {attached.minor}, {attached.device_path}")

        t.step("guest blkfront (linux personality) runs: handshake, write, read back")
        result = run_guest(host, GUEST_DOMID, devid, "linux", "verify", timeout=60.0)
        t.detail(result.summary().splitlines())
        t.detail(["guest timeline:"] + [
            f"  {round(s.t_ms, 3):8.1f} ms  {s.who:<8} {s.what}" for s in result.timeline])
        t.check(result.ok, "guest finished: handshake completed and every byte it wrote "
                "read back identically")
        t.check(result.sectors == IMAGE_BYTES // 512,
                f"back-end published sectors={result.sectors} (the image's size)")
        nbytes = written_bytes(result.report)
        t.check(image_holds_pattern(image, nbytes),
                f"dom0 reads the guest's pattern from the image file ({nbytes >> 20} MiB)")
        t.detail(["back-end VBD machine (tapback's log):"] + [
            "  " + line for line in machine_steps(host.tapback_log, GUEST_DOMID, devid)])

        state = host.detach_disk(GUEST_DOMID, devid)
        t.check(state == XenbusState.CLOSED,
                f"{DEVICE} detached: back-end {state.name if state else 'gone'}, "
                "tapdisk destroyed, nodes removed")
        with host.toolstack() as ts:
            ts.destroy_domain(GUEST_DOMID)
            gone = not ts.xs.exists(paths.backend) and not ts.xs.exists(paths.frontend)
        t.check(gone, f"domain {GUEST_DOMID} destroyed, none of its nodes left")
    finally:
        host.down()
        shutil.rmtree(work, ignore_errors=True)
    left = leftovers(host, pids)
    t.check(not left, "host down, nothing left behind" + (f": {left}" if left else
                                                           " (processes, run directory)"))
    print(f"demo {'passed' if not t.failures else 'FAILED'}: {t.failures} failed checks")
    return 0 if not t.failures else 1


def written_bytes(report: GuestReport) -> int:
    """How many bytes the guest's sequential write phase covered from sector 0."""
    for cycle in report.cycles:
        for phase in cycle.phases:
            if phase.phase == "write":
                return phase.bytes
    return 0


def image_holds_pattern(image: Path, nbytes: int) -> bool:
    """Read the image file from dom0 and check the guest's pattern in its first `nbytes`.

    The guest's verify workload writes every 512-byte sector as 32 copies of the
    little-endian pair (sector number, stamp), one stamp per run.
    """
    if nbytes <= 0:
        return False
    with open(image, "rb") as f:
        data = f.read(nbytes)
    stamp = struct.unpack_from("<Q", data, 8)[0]
    return stamp != 0 and all(
        data[s * 512:(s + 1) * 512] == struct.pack("<QQ", s, stamp) * 32
        for s in range(nbytes // 512))
