"""Handshake latency of tapback, and the time to bring up many VBDs on one host.

Runs the real system on the simulated host: C xenstored, tapback, one tapdisk per VBD
(or `--shared-tapdisks N`), and guest front-ends that speak XenStore over their own
xenstore rings and share a real ring page (xengntshr) and event channel, so every
XENBLKIF_CONNECT maps a ring. Each guest domain's front-end is watch-driven, as blkfront
is: InitWait -> ring shared, transport keys + Initialised in ONE transaction; back-end
Connected -> Connected.

Figures:
- latency (`--rounds` VBDs brought up one at a time): front-end Initialising (the
  toolstack wrote the directories) to both Connected, and front-end Initialised to
  back-end Connected (as seen by the guest's watch); median and p99;
- bring-up (`--vbds`, default 1,000, added all at once over `--domains` guests, default
  50, in `--shared-tapdisks` tapdisks, default 50): wall time until every VBD is Connected
  on both ends;
- tear-down of them all, as libxl does it (`online=0` and back-end Closing in one
  transaction; the front-end closes; once the back-end is Closed, the hotplug remove step
  and both directories removed): wall time until every VBD is gone;
- XenStore requests per VBD during the bring-up and during the tear-down, from
  xenstored's trace: tapback's own connections, and every party together (toolstack,
  hotplug, tapback, front-ends);
- tapback's memory per VBD: its RSS with every VBD Connected less its RSS before.

One tapdisk per VBD (`--shared-tapdisks 0`) does not fit 1,000 VBDs on this machine (an
idle Python tapdisk holds ~23 MB: 23 GB for 1,000); CI runs a small count.

For scale, in a real Xen rig Initialised -> Connected took ~100 ms for qdisk, 160-195 ms
for blkback and ~300 ms for blktap's tapback (reference/traces.md).

    python -m blktap3.tools.bench_handshake [--rounds 30] [--vbds 200] [--domains 10]
        [--shared-tapdisks 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from blktap3.abi import BlkifProtocol
from blktap3.sim import hotplug, xenlib, xstrace
from blktap3.sim.host import Host
from blktap3.sim.toolstack import Image
from blktap3.tapback import service
from blktap3.xenbus import (
    BoundPort,
    Transaction,
    VbdPaths,
    WatchEvent,
    WatchStream,
    XenbusState,
    XenStore,
    XenStoreError,
)

FIRST_DEVID = 51712


@dataclass
class Vbd:
    paths: VbdPaths
    t_initialising: float = 0.0  # toolstack committed the directories
    t_initialised: float = 0.0  # front-end committed its transport + state 3
    t_backend_connected: float = 0.0  # the guest saw the back-end's state 4
    t_connected: float = 0.0  # the front-end wrote state 4
    done: threading.Event = field(default_factory=threading.Event)
    closing: bool = False  # the toolstack asked the back-end to close
    closed: threading.Event = field(default_factory=threading.Event)  # back-end Closed


class GuestFrontends:
    """All the VBD front-ends of one guest domain, on its xenstore ring, in one thread."""

    def __init__(self, host: Host, domid: int) -> None:
        self.host = host
        self.domid = domid
        info = host.machine.domain(domid)
        self._page = xenlib.map_xenstore_page(host.run_dir, domid)
        self._evtchn = xenlib.EventChannel(host.run_dir, domid)
        self._evtchn.claim(info.xenstore_port)
        port = BoundPort(self._evtchn, info.xenstore_port, self._evtchn.fd)
        self.xs = XenStore.over_ring(memoryview(self._page), port, timeout=10.0,
                                     name=f"dom{domid}-xenstore")
        self.stream = WatchStream(lambda: self.xs)
        self.grants = xenlib.GrantShare(host.run_dir, domid)
        self.ring_evtchn = xenlib.EventChannel(host.run_dir, domid)
        self.vbds: dict[str, Vbd] = {}  # back-end state path -> VBD
        self._lock = threading.Lock()
        self.errors: list[str] = []
        self._adds: queue.SimpleQueue[tuple[Vbd, threading.Event]] = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"fe-{domid}", daemon=True)
        self._thread.start()

    def add(self, vbd: Vbd) -> None:
        """Watch the VBD's back-end state; returns once the watch is registered."""
        registered = threading.Event()
        self._adds.put((vbd, registered))
        registered.wait()

    def _register(self) -> None:
        # WatchStream.watch() must not run while another thread is in wait(): the
        # stream's own thread registers them.
        while True:
            try:
                vbd, registered = self._adds.get_nowait()
            except queue.Empty:
                return
            path = vbd.paths.backend_key("state")
            with self._lock:
                self.vbds[path] = vbd
            self.stream.watch(path, "be")
            registered.set()

    def _run(self) -> None:
        while not self._stop:
            self._register()
            event = self.stream.wait(0.02)
            if not isinstance(event, WatchEvent):
                continue
            with self._lock:
                vbd = self.vbds.get(event.path)
            if vbd is None or vbd.closed.is_set():
                continue
            try:
                raw = self.xs.read_optional(event.path)
            except XenStoreError:
                continue  # not created yet (its parent is not readable for the guest)
            try:
                if raw == "2" and not vbd.t_initialised:
                    self._publish(vbd)
                elif raw == "4" and vbd.t_initialised and not vbd.done.is_set():
                    vbd.t_backend_connected = time.perf_counter()
                    self.xs.write(vbd.paths.frontend_key("state"),
                                  XenbusState.CONNECTED.wire())
                    vbd.t_connected = time.perf_counter()
                    vbd.done.set()
                elif raw == "5" and vbd.closing:
                    # blkfront on the back-end's Closing: Closing, then Closed.
                    self.xs.write(vbd.paths.frontend_key("state"), XenbusState.CLOSING.wire())
                    self.xs.write(vbd.paths.frontend_key("state"), XenbusState.CLOSED.wire())
                elif raw == "6" and vbd.closing:
                    vbd.closed.set()
                elif raw == "6":
                    error = self.xs.read_optional(vbd.paths.backend_key("error"))
                    self.errors.append(f"{vbd.paths.backend}: Closed: {error}")
            except (OSError, XenStoreError) as exc:
                self.errors.append(f"{vbd.paths.frontend}: {exc}")

    def _publish(self, vbd: Vbd) -> None:
        share = self.grants.share_pages(0, 1)
        assert share.buffer is not None
        # SHARED_RING_INIT: producers 0, events 1 (io/ring.h).
        share.buffer[:16] = struct.pack("<IIII", 0, 1, 0, 1)
        port = self.ring_evtchn.bind_unbound_port(0)
        fe = vbd.paths.frontend_key

        def body(tx: Transaction) -> None:
            tx.write(fe("ring-ref"), str(share.refs[0]))
            tx.write(fe("event-channel"), str(port))
            tx.write(fe("protocol"), str(BlkifProtocol.X86_64.xenstore))
            tx.write(fe("state"), XenbusState.INITIALISED.wire())

        self.xs.transact(body)
        vbd.t_initialised = time.perf_counter()

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.stream.close()
        self.grants.close()
        self.ring_evtchn.close()
        self._evtchn.close()


def _trace_offset(host: Host) -> int:
    path = host.run_dir / "xenstored-trace"
    return path.stat().st_size if path.exists() else 0


def _trace_requests(host: Host, start: int) -> tuple[Counter[str], list[str]]:
    """Requests per connection since `start`, and connections created since."""
    per_conn: Counter[str] = Counter()
    created: list[str] = []
    with open(host.run_dir / "xenstored-trace", encoding="utf-8", errors="replace") as f:
        f.seek(start)
        for line in f:
            if request := xstrace.parse_request(line):
                per_conn[request.conn] += 1
            elif conn := xstrace.created_connection(line):
                created.append(conn)
    return per_conn, created


@contextmanager
def _running_host(run_dir: Path) -> Iterator[tuple[Host, list[str]]]:
    host = Host(run_dir)
    host.up("c")
    try:
        before = _trace_offset(host)
        service.start(run_dir, xenstored_path=str(host.xenstored_path))
        # Nobody else connects while tapback starts: the connections made now are its own.
        _, tapback_conns = _trace_requests(host, before)
        yield host, tapback_conns
    finally:
        service.stop(run_dir)
        host.down()


def _add_vbd(host: Host, domid: int, devid: int, image_dir: Path,
             tapdisk: int | None) -> Vbd:
    image = image_dir / f"d{domid}.{devid}.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    img = Image("aio", image)
    with host.toolstack() as ts:
        paths = ts.add_vbd(domid, devid, img)
    vbd = Vbd(paths, t_initialising=time.perf_counter())
    hotplug.hotplug_add(host, paths, img, tapdisk=tapdisk)
    return vbd


def _remove_vbd(host: Host, vbd: Vbd) -> None:
    """libxl's tear-down of one VBD: close, wait for Closed, hotplug remove, directories."""
    paths = vbd.paths
    vbd.closing = True

    def close(tx: Transaction) -> None:
        tx.write(paths.backend_key("online"), "0")
        tx.write(paths.backend_key("state"), XenbusState.CLOSING.wire())

    with host.toolstack() as ts:
        device = ts.xs.read(paths.backend_key("physical-device-path"))
        ts.xs.transact(close)
    if not vbd.closed.wait(120):
        raise RuntimeError(f"VBD {paths.domid}/{paths.devid} did not close")
    hotplug.hotplug_remove(host, paths, device=device)
    with host.toolstack() as ts:
        ts.remove_vbd(paths.domid, paths.devid)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise OSError(f"no VmRSS for {pid}")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _latency(host: Host, rounds: int, image_dir: Path) -> dict[str, Any]:
    domid = 1
    with host.toolstack() as ts:
        ts.create_domain(domid)
    fe = GuestFrontends(host, domid)
    try:
        whole, init_to_conn = [], []
        for n in range(rounds):
            devid = FIRST_DEVID + 16 * n
            paths = VbdPaths(domid, devid)
            # Watch first, so the guest sees InitWait as blkfront would.
            vbd = Vbd(paths)
            fe.add(vbd)
            added = _add_vbd(host, domid, devid, image_dir, None)
            vbd.t_initialising = added.t_initialising
            if not vbd.done.wait(30):
                raise RuntimeError(f"VBD {domid}/{devid} did not connect: {fe.errors[:5]}")
            whole.append((vbd.t_connected - vbd.t_initialising) * 1e3)
            init_to_conn.append((vbd.t_backend_connected - vbd.t_initialised) * 1e3)
        return {
            "rounds": rounds,
            "initialising_to_connected_ms": {
                "median": statistics.median(whole), "p99": _percentile(whole, 0.99)},
            "initialised_to_backend_connected_ms": {
                "median": statistics.median(init_to_conn),
                "p99": _percentile(init_to_conn, 0.99)},
        }
    finally:
        fe.close()


def _bring_up(host: Host, tapback_conns: list[str], count: int, domains: int,
              shared: int, image_dir: Path) -> dict[str, Any]:
    domids = list(range(10, 10 + domains))
    with host.toolstack() as ts:
        for domid in domids:
            ts.create_domain(domid)
    frontends = {domid: GuestFrontends(host, domid) for domid in domids}
    tapdisks = [hotplug.spawn_tapdisk(host.run_dir) for _ in range(shared)]
    plan = [(domids[n % domains], FIRST_DEVID + 16 * (n // domains)) for n in range(count)]
    vbds = {key: Vbd(VbdPaths(*key)) for key in plan}
    for key, vbd in vbds.items():
        frontends[key[0]].add(vbd)
    offset = _trace_offset(host)
    tapback = service.status(host.run_dir)
    if tapback is None:
        raise RuntimeError("tapback is not running")
    rss_before = _rss_kib(tapback)
    start = time.perf_counter()
    try:
        def add(item: tuple[int, tuple[int, int]]) -> None:
            n, (domid, devid) = item
            tapdisk = tapdisks[n % shared] if shared else None
            vbds[(domid, devid)].t_initialising = _add_vbd(
                host, domid, devid, image_dir, tapdisk).t_initialising

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(add, enumerate(plan)))
        for vbd in vbds.values():
            if not vbd.done.wait(120):
                errors = [e for fe in frontends.values() for e in fe.errors]
                raise RuntimeError(f"VBD {vbd.paths.domid}/{vbd.paths.devid} did not "
                                   f"connect; front-end errors: {errors[:5]}")
        elapsed = time.perf_counter() - start
        rss_up = _rss_kib(tapback)
        per_conn, _ = _trace_requests(host, offset)
        offset = _trace_offset(host)
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda v: _remove_vbd(host, v), vbds.values()))
        down = time.perf_counter() - start
    finally:
        for fe in frontends.values():
            fe.close()
    down_conn, _ = _trace_requests(host, offset)
    return {
        "vbds": count,
        "domains": domains,
        "tapdisks": shared or count,
        "seconds": elapsed,
        "teardown_seconds": down,
        "xenstore_requests_per_vbd": {
            "tapback": sum(per_conn[c] for c in tapback_conns) / count,
            "all_parties": sum(per_conn.values()) / count,
        },
        "teardown_xenstore_requests_per_vbd": {
            "tapback": sum(down_conn[c] for c in tapback_conns) / count,
            "all_parties": sum(down_conn.values()) / count,
        },
        "tapback_rss_kib": {"before": rss_before, "connected": rss_up,
                            "per_vbd": (rss_up - rss_before) / count},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_handshake", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="VBDs timed one at a time")
    parser.add_argument("--vbds", type=int, default=1000, help="VBDs brought up at once")
    parser.add_argument("--domains", type=int, default=50, help="guests sharing them")
    parser.add_argument("--shared-tapdisks", type=int, default=50, metavar="N",
                        help="put the VBDs in N tapdisks (default 50; 0: one tapdisk per "
                             "VBD, ~23 MB each)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # warnings go to stderr: stdout holds the figures (one JSON object with --json)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    run_dir = Path(tempfile.mkdtemp(prefix="b3hs-", dir="/tmp"))
    result: dict[str, Any] = {}
    try:
        with _running_host(run_dir / "host") as (host, tapback_conns):
            if args.rounds:
                result["latency"] = _latency(host, args.rounds, run_dir)
            if args.vbds:
                result["bring_up"] = _bring_up(host, tapback_conns, args.vbds, args.domains,
                                               args.shared_tapdisks, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return 0
    if "latency" in result:
        lat = result["latency"]
        a, b = lat["initialising_to_connected_ms"], lat["initialised_to_backend_connected_ms"]
        print(f"handshake latency over {lat['rounds']} VBDs:")
        print(f"  front-end Initialising -> both Connected: median {a['median']:.1f} ms, "
              f"p99 {a['p99']:.1f} ms  (hotplug's tapdisk spawn included)")
        print(f"  front-end Initialised -> back-end Connected: median {b['median']:.1f} ms, "
              f"p99 {b['p99']:.1f} ms  (real Xen: qdisk ~100, blkback 160-195, "
              "blktap tapback ~300)")
    if "bring_up" in result:
        up = result["bring_up"]
        ops = up["xenstore_requests_per_vbd"]
        print(f"bring-up of {up['vbds']} VBDs ({up['domains']} guests, {up['tapdisks']} "
              f"tapdisks): {up['seconds']:.2f} s")
        print(f"  XenStore requests per VBD: tapback {ops['tapback']:.1f}, "
              f"all parties {ops['all_parties']:.1f}")
        down = up["teardown_xenstore_requests_per_vbd"]
        print(f"tear-down of them all: {up['teardown_seconds']:.2f} s")
        print(f"  XenStore requests per VBD: tapback {down['tapback']:.1f}, "
              f"all parties {down['all_parties']:.1f}")
        rss = up["tapback_rss_kib"]
        print(f"tapback RSS: {rss['before'] / 1024:.1f} MiB before, "
              f"{rss['connected'] / 1024:.1f} MiB with every VBD Connected: "
              f"{rss['per_vbd']:.1f} KiB per VBD")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
