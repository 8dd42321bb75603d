"""``blktap3-torture churn``: guests come and go mid-I/O while the daemons are killed.

A simulated host (the real xenstored, tapback, tapdisks) and, per cycle, a new guest
domain with one disk whose guest process (the Linux personality) runs a random read/write
load. At a random moment of its handshake or its I/O, one fault (chosen at random):

- ``guest-kill``: the guest process SIGKILLed (its rings die with it), then the domain
  destroyed as libxl does;
- ``domain-destroy``: the domain destroyed while the guest still runs its I/O;
- ``tapback-kill``: tapback SIGKILLed and restarted; the guest then detaches as usual
  (the new tapback must adopt the VBD and close it cleanly);
- ``xenstored-kill``: xenstored SIGKILLed and restarted (its database is lost, as on a
  real host), the guest killed, the domain destroyed (the toolstack finds its disk from
  what its hotplug step recorded);
- ``detach``: no fault, an ordinary detach, whose result must be clean.

Domain ids are reused (a few slots), so every cycle also checks that a destroyed domain
left nothing that disturbs its successor. After every cycle, nothing may be left: no
tapdisk process, control socket, minor, stats (shm) file, XenStore node of a guest or a
back-end, simulated domain, or mapping of a destroyed domain's memory in xenstored or
tapback. At the end a new guest must connect and verify its data.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

from blktap3.ctl import runtime
from blktap3.sim.guest import run_guest, start_guest
from blktap3.sim.host import Host
from blktap3.sim.toolstack import Image
from blktap3.tapback import service as tapback_service

from .rig import scratch_dir
from .verdict import Budget, Verdict

FAULTS = ("guest-kill", "domain-destroy", "tapback-kill", "xenstored-kill", "detach")
FIRST_DOMID = 20
DOMID_SLOTS = 4
DEVID = 51712
DISK_BYTES = 16 << 20
# The fault lands this long after the guest started: its handshake takes ~0.1-0.5 s here.
FAULT_WINDOW = (0.0, 1.2)
SETTLE_TIMEOUT = 15.0


def run(count: int | None = None, seconds: float | None = None, *, seed: int = 1) -> Verdict:
    """``count`` cycles (default 200), or as many as fit in ``seconds``."""
    budget = Budget.of(count, seconds, 200)
    rnd = random.Random(seed)
    v = Verdict("churn")
    faults: Counter[str] = Counter()
    cycles = 0
    with scratch_dir() as scratch:
        host = Host(scratch / "host")
        try:
            host.up(tapback=True)
            images = {}
            for slot in range(DOMID_SLOTS + 1):
                images[slot] = scratch / f"disk{slot}.img"
                with images[slot].open("wb") as f:
                    f.truncate(DISK_BYTES)
            while v.ok and not budget.spent(cycles):
                fault = rnd.choice(FAULTS)
                slot = cycles % DOMID_SLOTS
                _cycle(host, FIRST_DOMID + slot, images[slot], fault,
                       rnd.uniform(*FAULT_WINDOW), v)
                faults[fault] += 1
                cycles += 1
                for leak in settled_leaks(host):
                    v.fail(f"cycle {cycles} ({fault}): {leak}")
            if v.ok:
                # The next guest connects and its data verifies.
                domid = FIRST_DOMID + DOMID_SLOTS
                with host.toolstack() as ts:
                    ts.create_domain(domid)
                host.attach_disk(domid, DEVID, Image("aio", images[DOMID_SLOTS]))
                res = run_guest(host, domid, DEVID, "linux", "verify", timeout=60.0)
                if not res.ok:
                    v.fail(f"the guest after the churn failed: {res.summary()}")
                host.destroy_domain(domid)
                for leak in settled_leaks(host):
                    v.fail(f"after the last guest: {leak}")
        finally:
            host.down()
    v.figures.update({
        "cycles": cycles,
        "faults": dict(sorted(faults.items())),
        "seconds": round(budget.elapsed(), 1),
    })
    return v


def _cycle(host: Host, domid: int, image: Path, fault: str, delay: float, v: Verdict) -> None:
    with host.toolstack() as ts:
        ts.create_domain(domid)
    host.attach_disk(domid, DEVID, Image("aio", image))
    guest = start_guest(host, domid, DEVID, "linux", "randrw", hold=True,
                        extra=["--seconds", "2", "--span-mib", "4", "--timeout", "30"])
    try:
        time.sleep(delay)  # the random point of the fault, not a synchronisation
        if fault == "guest-kill":
            guest.kill()
        elif fault == "tapback-kill":
            _kill_tapback(host)
            host.start_tapback()
        elif fault == "xenstored-kill":
            pid = host.xenstored_pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            host.restart_xenstored()
            guest.kill()
        if fault in ("tapback-kill", "detach"):
            # Judged only for a guest that was Connected when told to detach: one told
            # during its handshake stops waiting and leaves, as it should.
            connected = any("CONNECTED" in step.what for step in list(guest.steps))
            guest.detach()
            res = guest.result(timeout=60.0)
            # A guest killed before it connected reports its own failure to reach the
            # back-end; only an ordinary detach of a connected guest must be clean.
            if fault == "detach" and connected and not res.ok:
                steps = "\n    ".join(res.timeline_text().splitlines()[-8:])
                v.fail(f"dom{domid}: an ordinary detach failed: {res.summary()}\n"
                       f"  its last steps:\n    {steps}")
        host.destroy_domain(domid)
    finally:
        guest.kill()
        guest.proc.wait()


def _kill_tapback(host: Host) -> None:
    pid = host.tapback_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    tapback_service.reap(pid)


def settled_leaks(host: Host, timeout: float = SETTLE_TIMEOUT) -> list[str]:
    """``leaks`` once they stay: a detached tapdisk exits after its reply, and its
    socket and stats files go with it, so a leak counts only if it is still there
    ``timeout`` seconds later."""
    deadline = time.monotonic() + timeout
    while True:
        found = leaks(host)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def leaks(host: Host) -> list[str]:
    """What a cycle left behind on ``host`` (nothing, when all was cleaned)."""
    found: list[str] = []
    root = host.control_dir
    pids = tapdisk_pids(root)
    if pids:
        found.append(f"tapdisk processes left: {pids}")
    sockets = runtime.socket_pids(root)
    if sockets:
        found.append(f"control sockets left: {sockets}")
    minors = runtime.allocated_minors(root)
    if minors:
        found.append(f"minors left: {minors}")
    shm = runtime.shm_dir(host.run_dir)
    stats = sorted(str(p.relative_to(shm)) for p in shm.rglob("*")) if shm.exists() else []
    if stats:
        found.append(f"stats files left: {stats}")
    domains = [d for d in host.machine.domain_ids() if d != 0]
    if domains:
        found.append(f"simulated domains left: {domains}")
    with host.xs(timeout=10.0) as xs:
        homes = xs.ls("/local/domain") if xs.exists("/local/domain") else []
        guests = [d for d in homes if d != "0"]
        if guests:
            found.append(f"guest XenStore directories left: {guests}")
        backends = "/local/domain/0/backend"
        for kind in xs.ls(backends) if xs.exists(backends) else []:
            left = xs.ls(f"{backends}/{kind}")
            if left:
                found.append(f"back-end nodes left under {backends}/{kind}: {left}")
    for name, pid in (("xenstored", host.xenstored_pid), ("tapback", host.tapback_pid)):
        stale = stale_mappings(pid, host.run_dir) if pid is not None else []
        if stale:
            found.append(f"{name} still maps destroyed domains' memory: {stale}")
    return found


def tapdisk_pids(root: Path) -> list[int]:
    """Live processes started for this control directory (its tapdisks)."""
    marker = f"{runtime.ROOT_ENV}={root}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            if b"tapdisk" in (proc / "cmdline").read_bytes() and \
                    runtime.process_alive(int(proc.name)):
                pids.append(int(proc.name))
    return sorted(pids)


def stale_mappings(pid: int, run_dir: Path) -> list[str]:
    """Mappings by ``pid`` of a destroyed domain's memory (files under ``run_dir`` that
    were deleted), other than xensim's own view of the domain: the simulated hypervisor
    keeps one mapping of a domain's state and whole memory per process, replaced when
    the domain id is reused (bounded, and absent on a real host). Any further mapping
    of that memory is a grant or foreign mapping that was never undone."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    spans: dict[str, list[int]] = {}
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 6 or str(run_dir) not in fields[5] or \
                not fields[5].endswith("(deleted)"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        spans.setdefault(fields[5], []).append(end - start)
    stale = []
    for path, sizes in sorted(spans.items()):
        extra = sorted(sizes)[:-1]  # all but the view (the largest)
        stale += [f"{path}: {size} bytes" for size in extra]
    return stale
