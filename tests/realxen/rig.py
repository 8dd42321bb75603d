"""The real-Xen rig: Xen 4.17 + a Debian dom0 + a PV guest under `qemu-system-x86_64
-accel tcg`, the guest's real xen-blkfront served by our back-end (or, as a control, by
Linux's xen-blkback).

    python -m tests.realxen.rig [--control-blkback] [--keep]

prints the time of each step, the guest's blkfront lines and every check's verdict, and
exits 0 only when all checks passed. A run in which either kernel logged a user-space
fault (QEMU's TCG now and then corrupts user registers under Xen PV, see
reference/real-xen.md) is invalid and is run once more, never counted as a pass or as the
back-end's failure.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import debs, images

XEN_CMDLINE = ("console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M noreboot "
               "smap=0 smep=0 spec-ctrl=eager-fpu")
DOM0_CMDLINE = "console=hvc0 earlyprintk=xen loglevel=4"
BOOT_TIMEOUT = 420.0
# Both modes must pass these; every verdict line found must say pass.
EXPECTED = ("size", "odirect", "fsck1", "files1", "detached", "reattached", "size2",
            "files2", "fsck2", "image-files", "image-pattern", "features",
            "fio-4k-randread-qd16", "fio-1m-seqread-qd8", "fio-figures")
# ... and the blktap3 mode this one too.
EXPECTED_BLKTAP3 = ("real-xen-libs",)
# ... and on Xen 4.20 (trixie), where xl attaches our back-end, these.
EXPECTED_XL = ("xl-detach-no-tapdisk", "xl-destroy-no-tapdisk", "nbd-live-read",
               "xentop-vbd")
FAULT = re.compile(r"segfault at|traps:|general protection|invalid opcode|"
                   r"Illegal instruction|Segmentation fault")
RESULT = re.compile(r"@@(?:G )?RESULT (\S+) (pass|fail)\b ?(.*)")


@dataclass
class Run:
    """What one boot printed, with the host's clock for each line."""

    mode: str
    dist: str = "bookworm"
    lines: list[tuple[float, str]] = field(default_factory=list)
    returncode: int | None = None
    timed_out: bool = False

    @property
    def text(self) -> list[str]:
        return [line for _, line in self.lines]

    def steps(self) -> list[tuple[str, float]]:
        """(step, seconds since QEMU started) for Xen, dom0's and the guest's marks."""
        marks: list[tuple[str, float]] = []
        for t, line in self.lines:
            if line.startswith("@@STEP "):
                marks.append((line.split(maxsplit=1)[1], t))
            elif "Xen version" in line and not any(m[0] == "xen" for m in marks):
                marks.append(("xen", t))
            elif "] Linux version" in line and not line.startswith("[guest]") and not any(
                    m[0] == "dom0-kernel" for m in marks):
                marks.append(("dom0-kernel", t))
            elif line.startswith("[guest] @@G ") and line.split()[2] in ("up", "attached"):
                marks.append(("guest-" + line.split()[2], t))
        return marks

    def results(self) -> dict[str, tuple[str, str]]:
        found: dict[str, tuple[str, str]] = {}
        for line in self.text:
            m = RESULT.search(line)
            if m:
                found[m.group(1)] = (m.group(2), m.group(3))
        features = self.features_verdict()
        if features is not None:
            found["features"] = features
        if self.mode == "blktap3":
            found["real-xen-libs"] = self.real_xen_verdict()
        if self.xentop():
            found["xentop-vbd"] = self.xentop_verdict()
        if any(k.startswith("fio-") for k in found):
            found["fio-figures"] = self.fio_verdict()
        return found

    def fio(self) -> dict[str, dict[str, float]]:
        """Each fio job's figures, from the terse (v3) line the guest relayed."""
        jobs: dict[str, dict[str, float]] = {}
        for line in self.text:
            if "@@G FIO 3;" in line:
                parsed = fio_terse(line.split("@@G FIO ", 1)[1])
                if parsed is not None:
                    jobs[parsed[0]] = parsed[1]
        return jobs

    def fio_verdict(self) -> tuple[str, str]:
        jobs = self.fio()
        bad = [name for name, job in jobs.items() if not job["iops"] > 0]
        if len(jobs) < 2 or bad:
            return ("fail", f"jobs {sorted(jobs)}, no I/O in {bad}")
        return ("pass", "")

    def xentop(self) -> list[str]:
        """What `xentop -b -i 1 -x` printed in dom0 while the VBD was live."""
        return [line.removeprefix("@@XENTOP ") for line in self.text
                if line.startswith("@@XENTOP ")]

    def xentop_verdict(self) -> tuple[str, str]:
        """The guest's row: one VBD, and its read and write counters moved."""
        lines = self.xentop()
        header = next((line.split() for line in lines if "VBD_RD" in line), None)
        row = next((line.split() for line in lines if line.split()[:1] == ["guest"]), None)
        if header is None or row is None or len(row) != len(header):
            return ("fail", f"no guest row under a VBD header: {lines[:3]}")
        got = dict(zip(header, row, strict=True))
        try:
            vbds, rd, wr = (int(got[k]) for k in ("VBDS", "VBD_RD", "VBD_WR"))
        except ValueError:
            return ("fail", f"not numbers: {got}")
        detail = f"VBDS={vbds} VBD_RD={rd} VBD_WR={wr} VBD_RSECT={got.get('VBD_RSECT')}"
        return ("pass" if vbds == 1 and rd > 0 and wr > 0 else "fail", detail)

    def queues(self) -> int | None:
        """How many blk-mq hardware queues the guest's xvda has (blkfront's rings)."""
        for line in self.text:
            m = re.search(r"@@G QUEUES (\d+)", line)
            if m:
                return int(m.group(1))
        return None

    def queue_requests(self) -> list[int] | None:
        """Requests our tapdisk took on each of the VBD's queues, from the last `tap-ctl
        stats` printed while its rings were served (`xenbus.queues`, ours, beside blktap's
        summed `xenbus.reqs`); one queue: its total. None: no such line (blkback's run)."""
        found = None
        for line in self.text:
            if not line.startswith("@@TAPDISK-STATS "):
                continue
            try:
                xenbus = json.loads(line.removeprefix("@@TAPDISK-STATS ")).get("xenbus")
            except (ValueError, AttributeError):
                continue
            if not isinstance(xenbus, dict):
                continue  # no ring served at that moment
            queues = xenbus.get("queues") or [xenbus]
            found = [int(q["reqs"][0]) for q in queues]
        return found

    def summary(self) -> dict[str, object]:
        """What the fio pair's table needs of this run, as JSON-ready data."""
        lines = self.blkfront_lines()
        return {"mode": self.mode, "valid": not self.faults(), "failure": self.failure(),
                "blkfront": lines[-1] if lines else None, "queues": self.queues(),
                "queue_requests": self.queue_requests(), "fio": self.fio()}

    def real_xen_verdict(self) -> tuple[str, str]:
        """Our tapdisk mapped Debian's Xen libraries (no simulator) and held the real
        /dev/xen/gntdev and /dev/xen/evtchn open while serving the ring."""
        maps = [line for line in self.text if line.startswith("@@TAPDISK-MAPS")]
        fds = [line for line in self.text if line.startswith("@@TAPDISK-FDS")]
        if not maps or not fds:
            return ("fail", "dom0 printed no tapdisk maps/fds")
        problems = []
        for line in maps:
            if "xensim" in line or "sim/" in line:
                problems.append(f"simulator mapped: {line}")
            for lib in ("libxengnttab.so.1", "libxenevtchn.so.1"):
                if lib not in line:
                    problems.append(f"{lib} not mapped: {line}")
        for line in fds:
            for dev in ("/dev/xen/gntdev", "/dev/xen/evtchn"):
                if dev not in line:
                    problems.append(f"{dev} not open: {line}")
        return ("fail", "; ".join(problems)) if problems else ("pass", f"{len(maps)} tapdisks")

    def backend_keys(self) -> list[dict[str, str]]:
        """The back-end directory at each connection, as dom0 printed it."""
        return [dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                for line in self.text if line.startswith("@@BACKEND-KEYS")]

    def features_verdict(self) -> tuple[str, str] | None:
        """blkfront's line at each connection against the features advertised then."""
        keys, lines = self.backend_keys(), self.blkfront_lines()
        if not keys or not lines:
            return None
        problems = []
        for n, (adv, line) in enumerate(zip(keys, lines, strict=False), start=1):
            want = expected_blkfront(adv)
            for name, state in want.items():
                if f"{name}: {state}" not in line:
                    problems.append(f"connection {n}: want '{name}: {state}'")
        if len(lines) < len(keys):
            problems.append(f"{len(keys)} connections, {len(lines)} blkfront lines")
        return ("fail", "; ".join(problems)) if problems else ("pass", "")

    def faults(self) -> list[str]:
        return [line for line in self.text if FAULT.search(line)]

    def failure(self) -> str | None:
        """None if every check passed; else which step failed and why."""
        fails = [line for line in self.text if line.startswith("@@FAIL")]
        if fails:
            return f"{self.last_step()}: {fails[0].removeprefix('@@FAIL ')}"
        if self.timed_out:
            return f"{self.last_step()}: no end within {BOOT_TIMEOUT:g} s"
        results = self.results()
        bad = [f"{k} {v[1]}".strip() for k, v in results.items() if v[0] != "pass"]
        expected = EXPECTED + (EXPECTED_BLKTAP3 if self.mode == "blktap3" else ())
        if self.mode == "blktap3" and self.dist == "trixie":
            expected += EXPECTED_XL
        missing = [k for k in expected if k not in results]
        if bad or missing:
            return f"{self.last_step()}: failed {bad}, missing {missing}"
        if not any(m[0] == "end" for m in self.steps()):
            return f"{self.last_step()}: dom0 did not reach its end"
        return None

    def last_step(self) -> str:
        steps = self.steps()
        return steps[-1][0] if steps else "boot"

    def blkfront_lines(self) -> list[str]:
        """blkfront's "xvda: ..." line of each connection (dmesg is printed twice)."""
        seen: list[str] = []
        for line in self.text:
            if "@@G BLKFRONT " in line:
                text = line.split("@@G BLKFRONT ", 1)[1]
                if text not in seen:
                    seen.append(text)
        return seen

    def guest_log(self) -> str:
        return "\n".join(line.removeprefix("[guest] ") for line in self.text
                         if line.startswith("[guest] "))

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text[-n:])


def fio_terse(line: str) -> tuple[str, dict[str, float]] | None:
    """(job, its read IOPS, bandwidth (KiB/s), clat p50 (us)) of a fio terse v3 line."""
    fields = line.strip().split(";")
    if len(fields) < 40 or fields[0] != "3":
        return None
    p50 = next((f.split("=", 1)[1] for f in fields[17:37] if f.startswith("50.000000%=")),
               "0")
    try:
        return fields[2], {"iops": float(fields[7]), "bw_kib": float(fields[6]),
                           "clat_p50_us": float(p50), "error": float(fields[4])}
    except ValueError:
        return None


def fio_table(control: dict[str, object], ours: dict[str, object]) -> str:
    """ours / blkback for each fio job of two runs' summaries, and blkfront's lines."""
    rows = [f"{'job':<20} {'blkback iops':>12} {'ours iops':>10} {'ratio':>6} "
            f"{'blkback MiB/s':>13} {'ours MiB/s':>10} {'p50 us b/o':>14}"]
    theirs_jobs = control.get("fio") or {}
    ours_jobs = ours.get("fio") or {}
    assert isinstance(theirs_jobs, dict) and isinstance(ours_jobs, dict)
    for job in sorted(set(theirs_jobs) | set(ours_jobs)):
        b, o = theirs_jobs.get(job), ours_jobs.get(job)
        if not b or not o:
            rows.append(f"{job:<20} (missing in {'blkback' if not b else 'ours'})")
            continue
        ratio = o["iops"] / b["iops"] if b["iops"] else float("nan")
        rows.append(f"{job:<20} {b['iops']:12.0f} {o['iops']:10.0f} {ratio:6.2f} "
                    f"{b['bw_kib'] / 1024:13.1f} {o['bw_kib'] / 1024:10.1f} "
                    f"{b['clat_p50_us']:>7.0f}/{o['clat_p50_us']:<6.0f}")
    for name, run in (("blkback", control), ("ours", ours)):
        per_queue = run.get("queue_requests")
        served = (f" (tapdisk requests per queue {'/'.join(map(str, per_queue))})"
                  if isinstance(per_queue, list) else "")
        rows.append(f"{name:>7}: queues={run.get('queues')}{served} "
                    f"blkfront: {run.get('blkfront')}")
    return "\n".join(rows)


def fio_pair(control: dict[str, object], ours: dict[str, object]) -> dict[str, object]:
    """The JSON of a pair: both runs' summaries and the ratio (ours / blkback) per job."""
    ratios: dict[str, float] = {}
    b_jobs, o_jobs = control.get("fio") or {}, ours.get("fio") or {}
    assert isinstance(b_jobs, dict) and isinstance(o_jobs, dict)
    for job in sorted(set(b_jobs) & set(o_jobs)):
        if b_jobs[job]["iops"]:
            ratios[job] = round(o_jobs[job]["iops"] / b_jobs[job]["iops"], 3)
    return {"ratio_ours_over_blkback": ratios, "blkback": control, "ours": ours}


def expected_blkfront(keys: dict[str, str]) -> dict[str, str]:
    """What Linux 6.1's blkfront prints in its "xvda:" line for these back-end keys."""
    flush = keys.get("feature-flush-cache") == "1" or keys.get("feature-barrier") == "1"
    indirect = int(keys.get("feature-max-indirect-segments", "0") or 0) > 0
    return {
        ("flush diskcache" if keys.get("feature-flush-cache") == "1" else
         "barrier" if flush else "barrier or flush"): "enabled" if flush else "disabled",
        "persistent grants": "enabled" if keys.get("feature-persistent") == "1" else "disabled",
        "indirect descriptors": "enabled" if indirect else "disabled",
    }


def qemu_command(xen: Path, dom0: Path, mode: str, dist: str = "bookworm") -> list[str]:
    return [
        "nice", "-n", "10", "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35",
        # AVX off and Xen's eager FPU switching: the settings under which TCG did not
        # corrupt user registers in 7 runs (reference/real-xen.md).
        "-cpu", "max,avx=off,avx2=off", "-m", "2048", "-smp", "2",
        "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-kernel", str(xen), "-append", XEN_CMDLINE,
        # Multiboot modules, comma-separated, each with its own command line.
        "-initrd",
        f"{dom0.parent / 'vmlinuz'} {DOM0_CMDLINE} rigmode={mode} rigdist={dist},{dom0}",
    ]


def boot(xen: Path, dom0: Path, mode: str, log: Path, timeout: float = BOOT_TIMEOUT,
         dist: str = "bookworm") -> Run:
    """Run QEMU to its end, timestamping each line of the serial console into `log`."""
    run = Run(mode, dist)
    start = time.monotonic()
    proc = subprocess.Popen(qemu_command(xen, dom0, mode, dist), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        with log.open("w") as out:
            for raw in proc.stdout:
                t = time.monotonic() - start
                line = raw.decode(errors="replace").rstrip("\r\n")
                run.lines.append((t, line))
                out.write(f"{t:8.2f} {line}\n")
                out.flush()
                if t > timeout:
                    run.timed_out = True
                    break
    finally:
        if proc.poll() is None:
            proc.kill()
        run.returncode = proc.wait()
    return run


class Timer:
    """Host-side steps (download, builds), printed with the boot's own steps."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def __call__(self, name: str, since: float) -> None:
        self.marks.append((name, time.monotonic() - since))


def build(mode: str, work: Path, timer: Timer, dist: str) -> tuple[Path, Path]:
    t = time.monotonic()
    pkgs = debs.fetch(distribution=dist)
    timer("fetch+unpack debs", t)
    t = time.monotonic()
    xen = images.xen_elf(pkgs, work / "xen.elf")
    (work / "vmlinuz").write_bytes(pkgs.vmlinuz.read_bytes())
    guest = images.guest(pkgs, work / "guest.cpio")
    timer("build guest initramfs", t)
    t = time.monotonic()
    dom0 = images.dom0(pkgs, mode, guest, work / f"dom0-{mode}.cpio", work)
    timer(f"build dom0 initramfs ({dom0.stat().st_size >> 20} MiB)", t)
    return xen, dom0


def report(run: Run, timer: Timer, log: Path) -> None:
    print(f"== real-Xen rig, mode {run.mode}, {run.dist}: serial log {log}")
    for name, secs in timer.marks:
        print(f"  {secs:7.2f} s  host: {name}")
    steps = run.steps()
    print("   starts at   took  step (guest-* marks are the guest's console, relayed)")
    for i, (name, t) in enumerate(steps):
        took = f"{steps[i + 1][1] - t:6.2f}" if i + 1 < len(steps) else "     -"
        print(f"  {t:7.2f} s {took} s  {name}")
    for n, keys in enumerate(run.backend_keys(), start=1):
        features = " ".join(f"{k}={v}" for k, v in sorted(keys.items())
                            if k.startswith(("feature-", "max-", "sectors", "info")))
        print(f"  back-end at connection {n}: {features}")
    for line in run.text:
        if line.startswith(("@@TAPDISK-MAPS", "@@TAPDISK-FDS", "@@TAPDISK-STATS",
                            "@@XENTOP")):
            print(f"  {line.removeprefix('@@')[:400]}")
    print("  guest blkfront lines:")
    for line in run.blkfront_lines():
        print(f"    {line}")
    print(f"  guest queues: {run.queues()}, tapdisk requests per queue: "
          f"{run.queue_requests()}")
    for job, figures in run.fio().items():
        print(f"  fio {job}: {figures['iops']:.0f} IOPS, {figures['bw_kib'] / 1024:.1f} MiB/s, "
              f"clat p50 {figures['clat_p50_us']:.0f} us")
    for name, (verdict, detail) in run.results().items():
        print(f"  {verdict:4}  {name} {detail}".rstrip())


def run_mode(mode: str, work: Path, attempts: int = 2,
             dist: str = "bookworm") -> tuple[Run, str | None]:
    """Build and boot; a run with emulation faults is invalid and retried once."""
    work.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    xen, dom0 = build(mode, work, timer, dist)
    run = Run(mode, dist)
    for attempt in range(1, attempts + 1):
        log = work / f"serial-{mode}-{attempt}.log"
        run = boot(xen, dom0, mode, log, dist=dist)
        (work / f"guest-{mode}-{attempt}.log").write_text(run.guest_log() + "\n")
        report(run, timer, log)
        faults = run.faults()
        if not faults:
            (work / f"summary-{mode}.json").write_text(json.dumps(run.summary(), indent=1))
            return run, run.failure()
        print(f"  INVALID run (emulation faults, attempt {attempt}):")
        for line in faults[:10]:
            print(f"    {line}")
    return run, f"invalid: user-space faults in {attempts} runs (emulation, not a verdict)"


@contextlib.contextmanager
def claimed(work: Path) -> Iterator[Path]:
    """`work` if no other run holds it, else a fresh directory beside it (removed after):
    several people's rigs share one cache on these machines, and two runs writing the
    same images would spoil each other."""
    work.mkdir(parents=True, exist_ok=True)
    with (work / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            spare = Path(tempfile.mkdtemp(prefix=f"{work.name}-", dir=work.parent))
            try:
                yield spare
            finally:
                shutil.rmtree(spare)
            return
        yield work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.realxen.rig", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control-blkback", action="store_true",
                        help="serve the disk with Linux's xen-blkback (the control)")
    parser.add_argument("--both", action="store_true",
                        help="the control, then ours, and the fio table of the pair")
    parser.add_argument("--dist", choices=list(debs.DISTS), default=None,
                        help="whose Xen: bookworm (4.17; our vbd3 toolstack attaches) or "
                             "trixie (4.20; xl attaches through Xen's block-tap); "
                             "default $BLKTAP3_REALXEN_DIST, else bookworm")
    parser.add_argument("--work", type=Path, default=None,
                        help="work directory (default: the cache's work/DIST)")
    args = parser.parse_args(argv)
    dist = args.dist or debs.dist()
    work = args.work or debs.cache_dir() / "work" / dist
    if shutil.which("qemu-system-x86_64") is None:
        print("qemu-system-x86_64 is not installed: apt-get install qemu-system-x86")
        return 2
    modes = (["control", "blktap3"] if args.both else
             ["control"] if args.control_blkback else ["blktap3"])
    status, summaries = 0, {}
    for mode in modes:
        with claimed(work) as claim:
            run, failure = run_mode(mode, claim, dist=dist)
        summaries[mode] = run.summary()
        if failure:
            print(f"FAIL at {failure}\n-- log tail --\n{run.tail()}")
            status = 1
        else:
            print(f"PASS ({mode})")
    if args.both:
        out = work / "fio-pair.json"
        out.write_text(json.dumps(fio_pair(summaries["control"], summaries["blktap3"]),
                                  indent=1))
        print(f"== fio in the guest, ours against blkback (same run, {out}):")
        print(fio_table(summaries["control"], summaries["blktap3"]))
    return status


if __name__ == "__main__":
    sys.exit(main())
