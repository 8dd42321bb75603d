"""``blktap3-torture soak``: many guests over a long time; memory and descriptors flat.

A simulated host (the real xenstored, tapback, one tapdisk per VBD) with ``guests``
domains of two disks each, a raw image and a dynamic VHD. Every disk has a worker that,
over and over, starts a guest process (the Linux personality) that connects, runs a
random read/write load that verifies what it reads, detaches, connects again and detaches
(two cycles), and exits; then the worker waits a moment and starts the next, on the
domain's other disk (a domain has one guest process at a time: one xenstore ring). From outside,
as an operator would, ``tap-ctl stats``, ``tap-ctl pause`` and ``tap-ctl unpause`` are run
against random VBDs all the time. The VBDs stay attached for the whole run, so their
tapdisks live as long as tapback does.

Every ``interval`` seconds the resident memory (VmRSS) and the open descriptors of
tapback, xenstored and every tapdisk are sampled. Flat: for each process, the lowest
sample of the run's last quarter is not above the highest of its second quarter (the first
quarter is the warm-up), with a slack of 2 MiB or 2% of memory and none for descriptors.
A leak, of any size per cycle, raises the floor; noise does not. A run under a minute is
not judged (its first guests are still growing the processes' caches). Errors: a guest that
failed (an I/O error, a wrong block read, a lost request, a handshake that did not
finish) or a tap-ctl command that failed. A domain whose guest failed leaves the run
(the others go on, so that the figures cover the whole time); a guest whose connect came
while the operator had its VBD paused is counted on its own (``PAUSED_REFUSAL``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from blktap3.datapath import vhdformat
from blktap3.sim.guest import run_guest
from blktap3.sim.host import Host
from blktap3.sim.hotplug import tapdisk_env
from blktap3.sim.toolstack import Image

from .rig import scratch_dir
from .verdict import Verdict

FIRST_DOMID = 40
DEVIDS = (51712, 51728)     # xvda, xvdb
DISK_BYTES = 16 << 20
WARM_UP = 0.25              # of the run: its samples are not judged
MIN_JUDGED = 60.0           # seconds: a shorter run is not judged flat or not
RSS_SLACK_KIB = 2048
RSS_SLACK_FRACTION = 0.02
GUEST_TIMEOUT = 120.0
# tapdisk refuses a ring while its VBD is paused (specs/tapdisk_vbd.toml): a guest that
# connects during an operator's pause finds its back-end Closed. Counted on its own (the
# next guest of that disk must connect again), not as an error of the run.
PAUSED_REFUSAL = "XENBLKIF_CONNECT: not allowed while open paused"
TAPCTL_TIMEOUT = 60.0


@dataclass
class _Vbd:
    domid: int
    devid: int
    pid: int
    minor: int


@dataclass
class _Counts:
    lock: threading.Lock = field(default_factory=threading.Lock)
    guests: int = 0
    refused_paused: int = 0
    failures: list[str] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)

    def failed(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)


def proc_usage(pid: int) -> tuple[int, int] | None:
    """(VmRSS in KiB, open descriptors) of ``pid``; None once it is gone."""
    try:
        status = open(f"/proc/{pid}/status").read()  # noqa: SIM115 - read whole, at once
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = next((int(line.split()[1]) for line in status.splitlines()
                if line.startswith("VmRSS:")), 0)
    return rss, fds


def flat(series: list[tuple[float, int]], length: float, slack: int) -> tuple[bool, int]:
    """Whether the samples (time, value) stay flat (see the module docstring), and the
    growth of the floor: lowest of the last quarter minus highest of the second."""
    second = [v for t, v in series if WARM_UP * length <= t < 0.5 * length]
    last = [v for t, v in series if t >= 0.75 * length]
    if not second or not last:
        return True, 0
    growth = min(last) - max(second)
    return growth <= slack, growth


def _guest_worker(host: Host, disks: list[_Vbd], stop: threading.Event, rnd: random.Random,
                  counts: _Counts) -> None:
    """One domain's guest: a domain has one xenstore ring, so one guest process at a time,
    on its disks in turn."""
    turn = 0
    while not stop.is_set():
        vbd = disks[turn % len(disks)]
        turn += 1
        res = run_guest(host, vbd.domid, vbd.devid, "linux", "randrw", GUEST_TIMEOUT,
                        extra=["--cycles", "2", "--seconds", f"{rnd.uniform(0.5, 2.0):.2f}",
                               "--span-mib", "8", "--qd", str(rnd.choice((1, 8, 32)))])
        with counts.lock:
            counts.guests += 1
        if not res.ok and PAUSED_REFUSAL in res.summary():
            with counts.lock:
                counts.refused_paused += 1
        elif not res.ok:
            counts.failed(f"dom{vbd.domid}/{vbd.devid}: {res.summary()}")
            return  # this domain is out of the run; the others go on (and are sampled)
        stop.wait(rnd.uniform(0.0, 1.0))


def _tap_ctl(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blktap3.ctl.cli", *args],
                          env=tapdisk_env(host.run_dir), capture_output=True, text=True,
                          timeout=TAPCTL_TIMEOUT)


def _operator(host: Host, vbds: list[_Vbd], stop: threading.Event, rnd: random.Random,
              counts: _Counts) -> None:
    """tap-ctl stats / pause / unpause against random VBDs, as an operator would."""
    while not stop.wait(rnd.uniform(0.1, 0.5)):
        vbd = rnd.choice(vbds)
        where = ("-p", str(vbd.pid), "-m", str(vbd.minor))
        done = _tap_ctl(host, "stats", *where)
        counts.ops["stats"] += 1
        try:
            json.loads(done.stdout)
        except ValueError:
            counts.failed(f"tap-ctl stats {where}: exit {done.returncode}: "
                          f"{done.stderr.strip()[-300:]}")
            continue
        if rnd.random() < 0.5:
            for cmd in ("pause", "unpause"):
                done = _tap_ctl(host, cmd, *where)
                counts.ops[cmd] += 1
                if done.returncode:
                    counts.failed(f"tap-ctl {cmd} {where}: exit {done.returncode}: "
                                  f"{done.stderr.strip()[-300:]}")


def run(count: int | None = None, seconds: float | None = None, *, guests: int = 20,
        interval: float = 0.0, seed: int = 1) -> Verdict:
    """Run for ``seconds`` (default 3,600; ``count``: that many guest processes instead),
    ``guests`` domains of two disks; a sample every ``interval`` seconds (0: 1/40 of the
    run, 1 to 60 s)."""
    if count is None and seconds is None:
        seconds = 3600.0
    length = seconds if seconds is not None else 0.0
    interval = interval or min(60.0, max(1.0, length / 40 if length else 5.0))
    rnd = random.Random(seed)
    v = Verdict("soak")
    counts = _Counts()
    samples: dict[str, list[tuple[float, int, int]]] = {}
    t0 = time.monotonic()
    with scratch_dir() as scratch:
        host = Host(scratch / "host")
        stop = threading.Event()
        threads: list[threading.Thread] = []
        try:
            host.up(tapback=True)
            vbds: list[_Vbd] = []
            for g in range(guests):
                domid = FIRST_DOMID + g
                with host.toolstack() as ts:
                    ts.create_domain(domid)
                raw = scratch / f"d{domid}.img"
                with raw.open("wb") as f:
                    f.truncate(DISK_BYTES)
                vhd = scratch / f"d{domid}.vhd"
                vhdformat.create(vhd, DISK_BYTES)
                for devid, image in zip(DEVIDS, (Image("aio", raw), Image("vhd", vhd)),
                                        strict=True):
                    _, att = host.attach_disk(domid, devid, image)
                    vbds.append(_Vbd(domid, devid, att.pid, att.minor))
            watched = {"tapback": host.tapback_pid, "xenstored": host.xenstored_pid}
            watched |= {f"tapdisk d{b.domid}/{b.devid}": b.pid for b in vbds}
            for g in range(guests):
                disks = [b for b in vbds if b.domid == FIRST_DOMID + g]
                threads.append(threading.Thread(
                    target=_guest_worker, daemon=True, name=f"soak-d{FIRST_DOMID + g}",
                    args=(host, disks, stop, random.Random(rnd.random()), counts)))
            threads.append(threading.Thread(
                target=_operator, daemon=True, name="soak-operator",
                args=(host, vbds, stop, random.Random(rnd.random()), counts)))
            for t in threads:
                t.start()
            start = time.monotonic()
            while True:
                now = time.monotonic() - start
                for name, pid in list(watched.items()):
                    use = proc_usage(pid) if pid is not None else None
                    if use is None:
                        counts.failed(f"{name} (pid {pid}) is gone at {now:.0f} s")
                        del watched[name]
                    else:
                        samples.setdefault(name, []).append((now, *use))
                if not any(t.is_alive() for t in threads[:-1]):
                    break   # every domain's guest has failed
                if seconds is not None and now >= seconds:
                    break
                if count is not None and counts.guests >= count:
                    length = now
                    break
                time.sleep(interval)
        finally:
            stop.set()
            for t in threads:
                t.join(GUEST_TIMEOUT + TAPCTL_TIMEOUT)
            with contextlib.suppress(Exception):
                host.down()
    length = length or (max((s[-1][0] for s in samples.values()), default=0.0))
    _judge(v, samples, length)
    for failure in counts.failures[:10]:
        v.fail(failure)
    if len(counts.failures) > 10:
        v.fail(f"... and {len(counts.failures) - 10} more errors")
    v.figures.update({
        "guests (domains) x disks": f"{guests} x {len(DEVIDS)} (raw + VHD)",
        "guest processes run (each 2 connect/detach cycles, verified I/O)": counts.guests,
        "tap-ctl from outside": dict(sorted(counts.ops.items())),
        "guest connects refused: VBD paused from outside at that moment":
            counts.refused_paused,
        "errors": len(counts.failures),
        "samples": max((len(s) for s in samples.values()), default=0),
        "seconds": round(time.monotonic() - t0, 1),
    })
    v.figures["over time"] = _table(samples)
    return v


def _judge(v: Verdict, samples: dict[str, list[tuple[float, int, int]]],
           length: float) -> None:
    if length < MIN_JUDGED:
        v.figures["flat"] = f"not judged (a run under {MIN_JUDGED:g} s is all warm-up)"
        return
    growth: dict[str, Any] = {}
    for name, series in samples.items():
        rss = [(t, r) for t, r, _ in series]
        fds = [(t, f) for t, _, f in series]
        first_rss = max((r for t, r in rss if t >= WARM_UP * length), default=0)
        slack = max(RSS_SLACK_KIB, int(RSS_SLACK_FRACTION * first_rss))
        rss_ok, rss_growth = flat(rss, length, slack)
        fds_ok, fds_growth = flat(fds, length, 0)
        growth[name] = (rss_growth, fds_growth)
        if not rss_ok:
            v.fail(f"{name}: resident memory grew {rss_growth} KiB (slack {slack})")
        if not fds_ok:
            v.fail(f"{name}: open descriptors grew by {fds_growth}")
    tapdisks = [g for n, g in growth.items() if n.startswith("tapdisk")]
    for name in ("tapback", "xenstored"):
        if name in growth:
            v.figures[f"{name} floor growth (RSS KiB, fds)"] = growth[name]
    if tapdisks:
        v.figures["tapdisks' largest floor growth (RSS KiB, fds)"] = (
            max(g[0] for g in tapdisks), max(g[1] for g in tapdisks))


def _table(samples: dict[str, list[tuple[float, int, int]]]) -> str:
    """About ten rows over the run: tapback's and xenstored's RSS (MiB) and fds, and the
    tapdisks' median RSS and total fds."""
    if not samples:
        return "(no samples)"
    n = min(len(s) for s in samples.values())
    rows = sorted({round(i * (n - 1) / 9) for i in range(10)}) if n > 1 else [0]
    lines = ["", "    t(s)  tapback MiB/fds  xenstored MiB/fds  tapdisk median MiB, fds total"]
    tapdisks = [s for name, s in samples.items() if name.startswith("tapdisk")]
    for i in rows:
        t = samples["tapback"][i][0] if "tapback" in samples else 0.0
        cells = []
        for name in ("tapback", "xenstored"):
            _, r, f = samples.get(name, [(0.0, 0, 0)] * n)[i]
            cells.append(f"{r / 1024:7.1f}/{f:<4d}")
        med = statistics.median(s[i][1] for s in tapdisks) / 1024 if tapdisks else 0.0
        fds = sum(s[i][2] for s in tapdisks)
        lines.append(f"  {t:6.0f}  {cells[0]:>15}  {cells[1]:>17}  {med:10.1f}, {fds}")
    return "\n".join(lines)
