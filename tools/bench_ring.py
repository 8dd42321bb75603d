"""Our side of ``blktap3-bench``: guest driver -> ring -> the real tapdisk process.

A simulated machine (xensim) with dom0 and one guest. The tapdisks are spawned as
tap-ctl does (``blktap3.ctl.ops.create``) with dom0's environment, one serving the
backing file (``aio:``), one a null image; each run connects a fresh guest driver
process's ring to one of them with XENBLKIF_CONNECT, exactly as tapback would (with
the indirect offer it advertises; the guest splits a block into requests of that many
pages, as Linux blkfront does). The CPU each process spent comes from ``/proc/<pid>``
(``thread_cpu``) before and after the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from blktap3.abi import BlkifProtocol
from blktap3.ctl import ops
from blktap3.ctl.client import TapdiskClient
from blktap3.ctl.protocol import DEFAULT_MAX_INDIRECT_SEGMENTS, OpenFlags
from blktap3.datapath.lineproc import LineProcess
from blktap3.datapath.ring import POLL_ENV
from blktap3.sim import xensim

GUEST = 9
DEVID = 51712
BLKIF_PROTOCOL_NATIVE = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = 4096
DIRECT_SEGMENTS = 11


def process_env(run_dir: Path, domid: int) -> dict[str, str]:
    """xensim's variables for a process of `domid`. Under sanitize.sh (BLKTAP3_SANITIZE=1)
    the ASan/UBSan runtimes go first, so the sanitized modules load in the children."""
    env = xensim.process_env(run_dir, domid)
    if os.environ.get("BLKTAP3_SANITIZE") == "1":
        runtimes = " ".join(str(p) for p in xensim.sanitizer_runtime())
        env["LD_PRELOAD"] = f"{runtimes} {env['LD_PRELOAD']}"
    return env


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each live thread of a process (thread id -> seconds).

    From ``schedstat`` (nanoseconds on CPU, exact) when the kernel has it, else the
    process's ``stat`` utime + stime (clock ticks, sampled) under the key "all".
    """
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            # A thread ending meanwhile (a control connection's) reads as ENOENT or ESRCH.
            with contextlib.suppress(OSError, ValueError, IndexError), \
                    open(f"/proc/{pid}/task/{task}/schedstat") as f:
                out[task] = int(f.read().split()[0]) / 1e9
    if out:
        return out
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces: fields count from after its ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    return {"all": (int(fields[11]) + int(fields[12])) / CLK_TCK}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> float:
    """CPU spent between two ``thread_cpu`` readings. A thread born meanwhile counts
    from zero (the ring's thread may start just after the connect's answer); one that
    ended meanwhile (a control connection's) is not the data path and drops out."""
    return sum(cpu - before.get(t, 0.0) for t, cpu in after.items())


def pin(pid: int, cpu: int) -> None:
    """Put every thread of a process on one CPU."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), {cpu})


def context_switches(pid: int) -> int:
    """Times the process's live threads went to sleep or were preempted: wake-ups."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if "ctxt_switches:" in line:  # voluntary and nonvoluntary
                        total += int(line.split()[1])
        except OSError:
            continue    # the thread ended meanwhile
    return total


@contextlib.contextmanager
def _connected(vbd: Vbd, guests: list[LineProcess]) -> Iterator[None]:
    """The block connects the guests' rings to `vbd` and runs them; they are disconnected
    when it ends, however it ends. Interrupted (SIGINT, SIGTERM, an error), the guest
    drivers are killed first: one finishes its run whatever signal it gets (a detach
    waits for the workload), so one left running would keep its ring busy for the rest
    of `--runtime`. The connect itself may be what was interrupted, so on that path a
    disconnect the tapdisk refuses (nothing connected) is no second error."""
    try:
        yield
    except BaseException:
        for guest in guests:
            with contextlib.suppress(ProcessLookupError):
                guest.proc.kill()
        with contextlib.suppress(OSError):
            vbd.client.disconnect_xenblkif(vbd.minor, domid=GUEST, devid=DEVID)
        raise
    vbd.client.disconnect_xenblkif(vbd.minor, domid=GUEST, devid=DEVID)


class Vbd:
    """One tapdisk process with one VBD open on ``params``."""

    def __init__(self, root: Path, params: str, env: dict[str, str],
                 secondary: str = "") -> None:
        """``secondary``: mirror every write there (``-2``: ``aio:PATH``, ``nbd:SOCKET``)."""
        self.root = root
        self.pid, self.minor, _ = ops.create(
            params, root=root, env=env, secondary=secondary,
            flags=OpenFlags.SECONDARY if secondary else 0)
        self.client = TapdiskClient(self.pid, root=root)

    def close(self) -> None:
        try:
            ops.destroy(self.pid, self.minor, root=self.root, timeout=30)
        except OSError:
            # A wedged tapdisk must not outlive the benchmark.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class RingRig:
    """xensim machine + real tapdisks (dom0) + a guest driver process per run."""

    def __init__(self, run_dir: Path, disk: Path, poll_us: int = 0,
                 cpus: tuple[int, int] | None = None,
                 images: dict[str, str] | None = None) -> None:
        """``cpus``: (tapdisk's CPU, guest's CPU) to pin them to; None leaves them free.
        ``images``: more images served beside the raw one, name -> tapdisk params
        (``{"vhd": "vhd:/path"}``, then ``run(..., image="vhd")``)."""
        self.images = dict(images or {})
        self.run_dir = run_dir
        self.cpus = cpus
        self.poll_us = poll_us
        self.disk = disk
        self.ctl_root = run_dir.parent / "ctl"
        self.machine = xensim.Machine(run_dir)
        self.vbds: dict[str, Vbd] = {}
        self.last: dict[str, Any] = {}

    def __enter__(self) -> RingRig:
        self.machine.init()
        self.machine.create_domain(GUEST, 8192)
        try:
            self.add_vbd("disk", f"aio:{self.disk}")
            self.add_vbd("null", "null:/dev/null")
            for name, params in self.images.items():
                self.add_vbd(name, params)
        except BaseException:
            self._stop()
            raise
        return self

    def add_vbd(self, name: str, params: str, secondary: str = "") -> Vbd:
        """Another tapdisk serving ``params`` (mirrored to ``secondary``), run as
        ``run(..., image=name)``; it goes with the rig."""
        env = {**os.environ, **process_env(self.run_dir, 0)}
        # The tapdisk has no poll setting of its own: the data path reads this.
        env[POLL_ENV] = str(self.poll_us)
        vbd = self.vbds[name] = Vbd(self.ctl_root, params, env, secondary)
        if self.cpus:
            # Every thread; the ring's thread, started later, inherits it.
            pin(vbd.pid, self.cpus[0])
        return vbd

    def _stop(self) -> None:
        for vbd in self.vbds.values():
            vbd.close()
        self.vbds.clear()
        self.machine.teardown()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop()

    def _ring(self, image: str, order: int, run: dict[str, Any], persistent: bool = True,
              polling: tuple[int, int] = (0, 0), **ring: int) -> dict[str, Any]:
        """One guest run; ``ring``: the guest ring's ``data_slots``/``slot_pages``;
        ``persistent``: persistent grants negotiated (else grant copy); ``polling``: the
        back-end's (polling-duration us, polling-idle-threshold %) passed at connect as
        tapback passes those keys ((0, 0): the tapdisk's default, ``poll_us``)."""
        vbd = self.vbds[image]
        guest = LineProcess([sys.executable, "-m", "blktap3.sim.guestdrv"],
                            process_env(self.run_dir, GUEST))
        try:
            if self.cpus:
                pin(guest.pid, self.cpus[1])
            g = guest.call("open", backend=0, order=order, protocol=BlkifProtocol.NATIVE,
                           max_segs=DEFAULT_MAX_INDIRECT_SEGMENTS, **ring)
            with _connected(vbd, [guest]):
                vbd.client.connect_xenblkif(
                    vbd.minor, domid=GUEST, devid=DEVID, grefs=tuple(g["grefs"]),
                    order=order, port=g["port"], proto=BLKIF_PROTOCOL_NATIVE,
                    max_indirect_segments=DEFAULT_MAX_INDIRECT_SEGMENTS,
                    persistent=persistent,
                    poll_duration=polling[0], poll_idle_threshold=polling[1],
                )
                t0, g0 = thread_cpu(vbd.pid), thread_cpu(guest.pid)
                c0, gc0 = context_switches(vbd.pid), context_switches(guest.pid)
                res: dict[str, Any] = guest.call("run", poll_us=self.poll_us, **run)
                t1, g1 = thread_cpu(vbd.pid), thread_cpu(guest.pid)
                c1, gc1 = context_switches(vbd.pid), context_switches(guest.pid)
                # The tapdisk's own count of what it served (its STATS, blktap's JSON).
                res["tapdisk_stats"] = json.loads(vbd.client.stats(vbd.minor))
        finally:
            guest.close()
        if res["errors"] or res["lost"]:
            raise RuntimeError(f"ring errors: {res}")
        spins = res["tapdisk_stats"]["xenbus"].get("polling", {})
        res["spins"], res["spins_skipped"] = spins.get("polls", 0), spins.get("busy", 0)
        res["tapdisk_cpu"] = cpu_delta(t0, t1)
        res["guest_cpu"] = cpu_delta(g0, g1)
        res["tapdisk_switches"] = c1 - c0
        # The guest's process blocks only in the run (its line protocol waits outside).
        res["guest_switches"] = gc1 - gc0
        self.last = res
        return res

    @staticmethod
    def _figures(res: dict[str, Any]) -> dict[str, Any]:
        secs = res["elapsed_ns"] / 1e9
        ios = res["ios"]
        return {
            "ours_iops": res["iops"],
            "ours_mbps": res["bytes"] / secs / 1e6 if secs else 0.0,
            "ours_p50_us": res["p50_ns"] / 1e3,
            "ours_p99_us": res["p99_ns"] / 1e3,
            "cpu_us_per_req": res["tapdisk_cpu"] * 1e6 / ios if ios else None,
            "guest_cpu_us_per_req": res["guest_cpu"] * 1e6 / ios if ios else None,
            "kicks_per_req": (res["kicks_out"] + res["kicks_in"]) / ios if ios else None,
            # Each way: the guest's kicks to the tapdisk, the tapdisk's to the guest.
            "kicks_in_per_req": res["kicks_out"] / ios if ios else None,
            "kicks_out_per_req": res["kicks_in"] / ios if ios else None,
            "switches_per_req": res["tapdisk_switches"] / ios if ios else None,
            "spins_per_req": res["spins"] / ios if ios else None,
            "spins_skipped_per_req": res["spins_skipped"] / ios if ios else None,
            "guest_switches_per_req": res["guest_switches"] / ios if ios else None,
        }

    def run(self, rw: str, bs: int, qd: int, runtime: float,
            image: str = "disk", persistent: bool = True,
            polling: tuple[int, int] = (0, 0), seed: int = 12345) -> dict[str, Any]:
        sectors = self.disk.stat().st_size // 512
        pages = -(-bs // PAGE)
        # Blocks beyond a direct request's 11 pages get their own pages, one block each.
        ring = {"data_slots": qd, "slot_pages": pages} if pages > DIRECT_SEGMENTS else {}
        return self._figures(self._ring(image, 0, {
            "qd": qd, "bs": bs, "read_pct": 100 if "read" in rw else 0,
            "random": rw.startswith("rand"), "span": sectors, "duration": runtime,
            "seed": seed, "timeout": 30.0,
        }, persistent, polling, **ring))

    def run_queues(self, nr_queues: int, rw: str, bs: int, qd: int,
                   runtime: float, persistent: bool = True) -> dict[str, Any]:
        """Multi-queue: `qd` requests in flight over `nr_queues` rings (qd/N each), one
        guest driver process per queue running at the same time, connected as tapback
        does (one XENBLKIF_CONNECT per queue); IOPS and bytes summed, latencies the
        slowest queue's, CPU of every tapdisk thread."""
        vbd = self.vbds["disk"]
        sectors = self.disk.stat().st_size // 512
        guests = [LineProcess([sys.executable, "-m", "blktap3.sim.guestdrv"],
                              process_env(self.run_dir, GUEST)) for _ in range(nr_queues)]
        try:
            rings = [g.call("open", backend=0, order=0, protocol=BlkifProtocol.NATIVE)
                     for g in guests]
            run = {"qd": max(1, qd // nr_queues), "bs": bs,
                   "read_pct": 100 if "read" in rw else 0, "random": rw.startswith("rand"),
                   "span": sectors, "duration": runtime, "timeout": 30.0}
            with _connected(vbd, guests):
                vbd.client.connect_xenblkif(
                    vbd.minor, domid=GUEST, devid=DEVID, grefs=tuple(rings[0]["grefs"]),
                    order=0, port=rings[0]["port"], proto=BLKIF_PROTOCOL_NATIVE,
                    persistent=persistent,
                    extra_queues=[(tuple(r["grefs"]), r["port"]) for r in rings[1:]])
                t0 = thread_cpu(vbd.pid)
                # Not `with`: its exit would wait for the runs, and on an interrupt the
                # guests are killed only after this block.
                pool = ThreadPoolExecutor(nr_queues)
                try:
                    results = list(pool.map(
                        lambda ig: ig[1].call("run", poll_us=self.poll_us,
                                              seed=12345 + ig[0], **run),
                        enumerate(guests)))
                finally:
                    pool.shutdown(wait=False, cancel_futures=True)
                t1 = thread_cpu(vbd.pid)
                self.last = {"tapdisk_stats": json.loads(vbd.client.stats(vbd.minor))}
        finally:
            for g in guests:
                g.close()
        if any(r["errors"] or r["lost"] for r in results):
            raise RuntimeError(f"ring errors: {results}")
        ios = sum(r["ios"] for r in results)
        secs = max(r["elapsed_ns"] for r in results) / 1e9
        return {
            "ours_iops": sum(r["iops"] for r in results),
            "ours_mbps": sum(r["bytes"] for r in results) / secs / 1e6 if secs else 0.0,
            "ours_p50_us": max(r["p50_ns"] for r in results) / 1e3,
            "ours_p99_us": max(r["p99_ns"] for r in results) / 1e3,
            "cpu_us_per_req": cpu_delta(t0, t1) * 1e6 / ios if ios else None,
            "kicks_per_req": sum(r["kicks_out"] + r["kicks_in"] for r in results) / ios
            if ios else None,
            "kicks_in_per_req": sum(r["kicks_out"] for r in results) / ios if ios else None,
            "kicks_out_per_req": sum(r["kicks_in"] for r in results) / ios if ios else None,
        }

    def run_null(self, runtime: float, qd: int = 256) -> dict[str, Any]:
        """The ring with no storage and no data copy: at QD256 (8-page ring) its ceiling;
        at QD1 (one page) its round trip, guest -> tapdisk -> guest: the two wake-ups
        (a kick each way) any split driver pays, blkback too."""
        figures = self._figures(self._ring("null", 3 if qd > 32 else 0, {
            "qd": qd, "bs": 4096, "read_pct": 100, "random": False, "span": 1 << 30,
            "duration": runtime, "timeout": 30.0,
        }))
        figures.pop("ours_mbps")
        return figures
