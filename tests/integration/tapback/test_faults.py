"""Faults: a tapdisk killed, tapback restarted, xenstored restarted, hostile front-ends."""

from __future__ import annotations

import os
import re
import signal
from typing import Any

import pytest

from blktap3.ctl import runtime
from blktap3.sim.host import Host
from blktap3.tapback import service
from blktap3.xenbus import WatchEvent, WatchStream, XenbusState, XenStore
from tests.support import log_events, tapdisk_pids, wait_until

from .conftest import Guest, GuestFactory

pytestmark = pytest.mark.integration

SPAN = 2048  # sectors: 1 MiB written with a stamp, then verified


def _prewrite(guest: Guest, stamp: int) -> None:
    assert guest.ring is not None
    done = guest.ring.call("run", qd=4, bs=4096, read_pct=0, span=SPAN, ios=SPAN // 8,
                           verify=True, stamp=stamp)
    assert done["errors"] == 0 and done["ios"] == SPAN // 8


def _verify_reads(guest: Guest, stamp: int, **extra: Any) -> dict[str, Any]:
    assert guest.ring is not None
    result: dict[str, Any] = guest.ring.call(
        "run", qd=4, bs=4096, read_pct=100, random=True, span=SPAN, verify=True,
        stamp=stamp, **extra)
    return result


def test_tapdisk_killed_during_io_closes_with_error(host: Host, guests: GuestFactory) -> None:
    guest = guests()
    guest.connect()
    _prewrite(guest, stamp=7)
    assert guest.ring is not None
    guest.ring.send("run", qd=4, bs=4096, read_pct=100, random=True, span=SPAN,
                    duration=3.0, verify=True, stamp=7, timeout=2.0)
    os.kill(guest.attached.pid, signal.SIGKILL)
    guest.wait_backend(XenbusState.CLOSED)
    assert guest.backend("error") == f"tapdisk {guest.attached.pid} died"
    guest.ring.reply()  # the guest saw its requests go unanswered; it must not hang
    died = log_events(host.tapback_log, "tapdisk died")
    assert len(died) == 1 and died[0]["pid"] == guest.attached.pid
    # The dead tapdisk's socket is cleaned up (blktap left it behind).
    ctl = service.control_dir(host.run_dir) / f"ctl{guest.attached.pid}"
    wait_until(lambda: not ctl.exists(), what="stale socket removed")
    # So are its stats files (blktap's too stay behind).
    shm = runtime.shm_dir(host.run_dir)
    left = (shm / f"td3-{guest.attached.pid}", shm / f"vbd3-{guest.domid}-{guest.paths.devid}")
    wait_until(lambda: not any(p.exists() for p in left), what="stale stats files removed")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_tapback_restart_during_io_adopts_without_disturbing(
        host: Host, guests: GuestFactory, how: str) -> None:
    guest = guests()
    guest.connect()
    _prewrite(guest, stamp=3)
    assert guest.ring is not None
    with WatchStream.open(str(host.xenstored_path)) as stream:
        stream.watch(guest.paths.backend, "b")
        assert stream.wait(2.0) == WatchEvent(guest.paths.backend, "b")  # the initial fire
        guest.ring.send("run", qd=4, bs=4096, read_pct=100, random=True, span=SPAN,
                        duration=1.5, verify=True, stamp=3)
        if how == "SIGKILL":
            pid = service.status(host.run_dir)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: service.status(host.run_dir) is None, what="tapback gone")
        else:
            service.stop(host.run_dir)
        service.start(host.run_dir, xenstored_path=str(host.xenstored_path))
        wait_until(lambda: log_events(host.tapback_log, "ring already connected (adopted)"),
                   what="adoption")
        done = guest.ring.reply()
        # Nothing the front-end watches was written: no InitWait flash, no key rewritten.
        assert stream.wait(0.3) is None
    assert done["errors"] == 0 and done["mismatches"] == 0 and done["lost"] == 0
    assert done["ios"] > 0
    assert guest.backend_state() is XenbusState.CONNECTED
    # Still a live VBD for the new tapback: it closes on the front-end's request.
    guest.close()


def test_xenstored_restart_is_survived(host: Host, guests: GuestFactory) -> None:
    pid = service.status(host.run_dir)
    host.restart_xenstored()  # the database is lost, as on a real host
    # A new domain and disk after the restart get the whole handshake.
    guest = guests(domid=6)
    guest.connect()
    assert guest.write(0, b"\x5a" * 512) == 0
    assert service.status(host.run_dir) == pid
    assert any(line["event"].startswith("xenstored connection re-made")
               for line in log_events(host.tapback_log))


HOSTILE = [
    ({"ring-ref": "zz"}, "ring-ref"),
    ({"event-channel": "0x10"}, "event-channel"),
    ({"event-channel": "0"}, "event-channel"),
    ({"ring-page-order": "9"}, "ring-page-order"),
    ({"ring-page-order": "5"}, "ring-page-order"),  # one past the 16 pages offered
    ({"protocol": "sparc64-abi"}, "protocol"),
    ({"ring-ref": "1" * 40}, "ring-ref"),
    ({"multi-queue-num-queues": "17"}, "multi-queue-num-queues"),  # past any max offered
    ({"multi-queue-num-queues": "0"}, "multi-queue-num-queues"),
    ({"multi-queue-num-queues": "2x"}, "multi-queue-num-queues"),
    ({"multi-queue-num-queues": "1"}, "queue-0/ring-ref"),  # one queue, no queue-0/
]


@pytest.mark.parametrize(("values", "key"), HOSTILE, ids=[k for _, k in HOSTILE])
def test_hostile_transport_gets_error_and_closed(
        host: Host, guests: GuestFactory, values: dict[str, str], key: str) -> None:
    guest = guests()
    guest.wait_backend(XenbusState.INIT_WAIT)
    guest.publish_transport(extra=values)
    guest.wait_backend(XenbusState.CLOSED)
    error = guest.backend("error")
    assert error is not None and key in error
    assert service.status(host.run_dir) is not None


@pytest.mark.parametrize("state", ["9", "x", "", "04", "-1"])
def test_garbage_frontend_state_gets_error_and_closed(
        host: Host, guests: GuestFactory, state: str) -> None:
    guest = guests()
    guest.wait_backend(XenbusState.INIT_WAIT)
    guest.xs.write(guest.paths.frontend_key("state"), state)
    guest.wait_backend(XenbusState.CLOSED)
    assert guest.backend("error") is not None
    assert service.status(host.run_dir) is not None


def test_hostile_guest_does_not_disturb_a_good_one(
        host: Host, dom0: XenStore, guests: GuestFactory) -> None:
    good = guests(domid=5)
    bad = guests(domid=6)
    good.connect()
    _prewrite(good, stamp=11)
    assert good.ring is not None
    good.ring.send("run", qd=4, bs=4096, read_pct=100, random=True, span=SPAN,
                   duration=1.0, verify=True, stamp=11)
    bad.wait_backend(XenbusState.INIT_WAIT)
    fe = bad.paths.frontend_key
    for i in range(50):
        bad.xs.write(fe("state"), str(i % 10))
        bad.xs.write(fe("ring-ref"), "\xff" * (i % 7))
        bad.xs.write(fe(f"junk{i}"), "x" * 100)
        bad.xs.write(fe("event-channel"), str(-i))
    done = good.ring.reply()
    assert done["errors"] == 0 and done["mismatches"] == 0 and done["lost"] == 0
    assert good.backend_state() is XenbusState.CONNECTED
    wait_until(lambda: bad.backend("error") is not None, what="error node for the bad guest")
    assert service.status(host.run_dir) is not None
    assert len(tapdisk_pids(host.control_dir)) == 2


def _stopped(pid: int, tid: str) -> bool:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_run_whose_back_end_stops_answering_says_where_the_ring_stands(
        host: Host, guests: GuestFactory) -> None:
    """A stalled run reports the ring's indices: requests published and unanswered."""
    guest = guests()
    guest.connect()
    assert guest.ring is not None
    pid = guest.attached.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: all(_stopped(pid, tid) for tid in os.listdir(f"/proc/{pid}/task")),
                   what="tapdisk stopped")
        done = guest.ring.call("run", qd=4, bs=4096, read_pct=100, span=SPAN, ios=8,
                               timeout=0.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert done["timed_out"] and done["lost"] == 4 and done["ios"] == 0
    m = re.fullmatch(r"ring: req_prod (\d+) \(private (\d+)\) req_event \d+, "
                     r"rsp_prod (\d+) rsp_event \d+ rsp_cons (\d+)", done["stall"])
    assert m is not None, done["stall"]
    req_prod, private, rsp_prod, rsp_cons = (int(x) for x in m.groups())
    assert req_prod == private == rsp_prod + 4 and rsp_cons == rsp_prod


def test_a_hung_tapdisk_delays_only_its_own_vbd(host: Host, guests: GuestFactory) -> None:
    stuck = guests(domid=5)
    other = guests(domid=6)
    stuck.wait_backend(XenbusState.INIT_WAIT)
    os.kill(stuck.attached.pid, signal.SIGSTOP)
    try:
        stuck.publish_transport()  # tapback's XENBLKIF_CONNECT to it now hangs
        other.connect()
        assert other.write(0, b"\x77" * 512) == 0
        assert stuck.backend_state() is XenbusState.INIT_WAIT
    finally:
        os.kill(stuck.attached.pid, signal.SIGCONT)
    stuck.wait_backend(XenbusState.CONNECTED)
