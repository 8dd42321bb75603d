"""The simulated guest against a real tapdisk on the simulated host: handshake per
personality, verified I/O, detach on request and on the back-end's Closing, reconnect."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from blktap3.abi import BlkifProtocol, VdiskInfo
from blktap3.fsm import FrontendState
from blktap3.sim import xstrace
from blktap3.sim.frontend import Step
from blktap3.sim.guest import guest_env, run_guest, start_guest
from blktap3.sim.host import Host
from blktap3.sim.toolstack import Image
from tests.support import wait_until

from .conftest import DEVID, MiB, MiniBackend

pytestmark = pytest.mark.integration

Vbd = Callable[..., MiniBackend]


def whats(result_timeline: list[Step], who: str) -> list[str]:
    return [s.what for s in result_timeline if s.who == who]


def test_linux_guest_connects_writes_and_reads_back_every_byte(host: Host, vbd: Vbd) -> None:
    be = vbd(3, size=16 * MiB)
    result = run_guest(host, 3, DEVID, "linux", "verify", timeout=60)
    assert result.ok, result.summary() + "\n" + result.timeline_text()
    assert result.sectors == 16 * MiB // 512
    io = result.report.io
    assert io.writes == io.reads == 8 * MiB // 4096  # the default 8 MiB span, both ways
    assert result.iops > 0 and result.mbps > 0
    # Linux: the transport keys in ONE transaction, single page ring, x86_64 protocol.
    fe = whats(result.timeline, "fe")
    tx = [w for w in fe if w.startswith("[tx] ring-ref=")]
    assert len(tx) == 1 and "protocol=x86_64-abi" in tx[0] and "feature-persistent=1" in tx[0]
    (transport,) = be.connected_transport
    assert transport.ring_page_order == 0 and transport.protocol is BlkifProtocol.X86_64
    # Detached at the end: 5 then 6 from us, Closed from the back-end.
    assert fe.index("[tx] state=5 (CLOSING)") < fe.index("[tx] state=6 (CLOSED)")
    assert be.frontend_state() == "6" and be.state() == "6"
    hs = result.handshakes[0]
    assert hs.initialising_to_connected_ms and hs.initialised_to_backend_connected_ms
    assert not be.errors



def test_minios_writes_key_by_key_without_protocol(host: Host, vbd: Vbd) -> None:
    be = vbd(4, size=8 * MiB)
    result = run_guest(host, 4, DEVID, "minios", "verify", timeout=60)
    assert result.ok, result.summary()
    fe = whats(result.timeline, "fe")
    writes = [w for w in fe if w.startswith("ring-ref=")]
    assert writes == [f"ring-ref={be.connected_transport[0].queues[0].ring_refs[0]} "
                      f"event-channel={be.connected_transport[0].queues[0].event_channel}"]
    assert not any(w.startswith("[tx]") for w in fe)  # neither keys nor state in a transaction
    (transport,) = be.connected_transport
    assert transport.protocol is BlkifProtocol.NATIVE and not transport.feature_persistent
    assert be.xs.read_optional(be.paths.frontend_key("protocol")) is None


@pytest.mark.parametrize(("backend_max", "order"), [(3, 2), (1, 1)])
def test_multipage_ring_order_is_capped_by_the_backend(host: Host, vbd: Vbd, backend_max: int,
                                                       order: int) -> None:
    be = vbd(5, max_ring_page_order=backend_max)
    result = run_guest(host, 5, DEVID, "linux-multipage", "randrw", timeout=60,
                       extra=["--qd", "48", "--seconds", "0.3"])
    assert result.ok, result.summary()
    (transport,) = be.connected_transport
    assert transport.ring_page_order == order and len(transport.queues[0].ring_refs) == 1 << order
    assert result.report.io.mismatches == 0 and result.report.io.reads > 0


def test_detach_on_request_closes_then_waits_for_the_backend(host: Host, vbd: Vbd) -> None:
    be = vbd(6)
    with start_guest(host, 6, DEVID, "linux", "none", hold=True) as guest:
        guest.wait_for_step("holding")
        assert be.frontend_state() == "4" and be.state() == "4"
        guest.detach()
        result = guest.result(30)
    assert result.ok, result.summary()
    fe = whats(result.timeline, "fe")
    assert fe.index("[tx] state=5 (CLOSING)") < fe.index("[tx] state=6 (CLOSED)")
    assert fe.index("[tx] state=6 (CLOSED)") < fe.index("ring released")
    assert be.state() == "6" and be.frontend_state() == "6"


def test_backend_closing_makes_the_guest_let_go(host: Host, vbd: Vbd) -> None:
    be = vbd(7)
    with start_guest(host, 7, DEVID, "linux", "verify", hold=True) as guest:
        guest.wait_for_step("holding")
        be.close_device()
        result = guest.result(30)
    assert result.ok, result.summary()
    fe = whats(result.timeline, "fe")
    assert "closed by the back-end" in fe
    assert "[tx] state=6 (CLOSED)" in fe and "[tx] state=5 (CLOSING)" not in fe
    assert wait_until(lambda: be.state() == "6")


def test_reconnect_after_closed_runs_the_handshake_again(host: Host, vbd: Vbd) -> None:
    be = vbd(8)
    result = run_guest(host, 8, DEVID, "linux", "verify", timeout=60, extra=["--cycles", "2"])
    assert result.ok, result.summary()
    assert len(result.handshakes) == 2 and len(be.connected_transport) == 2
    assert [c.phases[-1].mismatches for c in result.report.cycles] == [0, 0]
    fe = whats(result.timeline, "fe")
    assert "[tx] state=1 (INITIALISING)" in fe  # started over after Closed


def test_resize_announced_by_the_backend_is_seen(host: Host, vbd: Vbd) -> None:
    be = vbd(9, size=8 * MiB)
    with start_guest(host, 9, DEVID, "linux", "none", hold=True) as guest:
        guest.wait_for_step("holding")
        be.publish_disk(32 * MiB // 512)
        be.xs.write(be.paths.backend_key("state"), "4")  # re-announced Connected
        guest.wait_for_step("capacity changed")
        guest.detach()
        result = guest.result(30)
    assert result.ok, result.summary()
    assert result.report.resizes == ((8 * MiB // 512, 32 * MiB // 512),)
    assert result.sectors == 32 * MiB // 512


def test_a_backend_out_of_protocol_is_logged_and_the_guest_stays(host: Host, vbd: Vbd) -> None:
    be = vbd(23)
    state = be.paths.backend_key("state")
    with start_guest(host, 23, DEVID, "linux", "none", hold=True) as guest:
        guest.wait_for_step("holding")
        be.xs.write(state, "3")  # a front-end-only state
        guest.wait_for_step("out of protocol in connected")
        be.xs.write(state, "banana")
        guest.wait_for_step("'banana'")
        be.xs.write(state, "4")  # back in protocol (Connected: re-read), then detach
        guest.detach()
        result = guest.result(30)
    assert result.ok, result.summary() + "\n" + result.timeline_text()
    fe = whats(result.timeline, "fe")
    assert "ignored: back-end state 3 (a front-end-only state): out of protocol in connected" in fe
    assert [w for w in fe if "state=" in w and w.startswith("[tx]")] == [
        "[tx] state=3 (INITIALISED)", "[tx] state=4 (CONNECTED)", "[tx] state=5 (CLOSING)",
        "[tx] state=6 (CLOSED)"]  # the faults published nothing
    assert be.frontend_state() == "6"


def test_read_only_disk_serves_reads_and_the_guest_refuses_to_write(host: Host,
                                                                      vbd: Vbd) -> None:
    vbd(10, readonly=True)
    reads = run_guest(host, 10, DEVID, "linux", "read", timeout=60,
                      extra=["--seconds", "0.2"])
    assert reads.ok, reads.summary()
    assert reads.report.disk is not None and reads.report.disk.info & VdiskInfo.READONLY
    assert reads.report.io.reads > 0
    vbd(14, readonly=True)
    writes = run_guest(host, 14, DEVID, "linux", "verify", timeout=60)
    assert not writes.ok and writes.returncode == 1
    assert "read-only" in str(writes.error), writes.summary()


def test_a_later_guest_process_on_a_domain_reconnects(host: Host, vbd: Vbd) -> None:
    # The xenstore port belongs to the domain, not to one guest process: a second
    # blkfront process starts over from Initialising and connects again.
    vbd(15)
    assert run_guest(host, 15, DEVID, "linux", "none", timeout=60).ok
    again = run_guest(host, 15, DEVID, "linux", "verify", timeout=60)
    assert again.ok, again.summary()


def test_two_live_guest_processes_cannot_share_a_domain(host: Host, vbd: Vbd) -> None:
    vbd(16)
    with start_guest(host, 16, DEVID, "linux", "none", hold=True) as first:
        first.wait_for_step("CONNECTED")
        second = run_guest(host, 16, DEVID, "linux", "none", timeout=60)
        assert second.returncode == 1 and "xenstore port" in str(second.error)


def test_writes_the_backend_rejects_fail_the_guest(host: Host, vbd: Vbd) -> None:
    # The back-end hides the read-only bit: the guest writes and tapdisk answers ERROR.
    vbd(11, readonly=True, info_override=0)
    result = run_guest(host, 11, DEVID, "linux", "verify", timeout=60)
    assert result.returncode == 1 and not result.ok
    assert "write:" in str(result.error) and "errors" in str(result.error)
    assert result.report.final_state == FrontendState.CLOSED  # it still detached cleanly


def test_no_backend_means_a_handshake_timeout(host: Host) -> None:
    with host.toolstack() as ts:
        ts.create_domain(12)
        ts.add_vbd(12, DEVID, Image.parse(f"aio:{host.run_dir}/none", must_exist=False))
    result = run_guest(host, 12, DEVID, "linux", "verify", timeout=30,
                       extra=["--timeout", "1"])
    assert result.returncode == 1
    assert "waiting for Connected" in str(result.error) and "back-end 1" in str(result.error)


def test_unknown_device_is_a_clear_failure(host: Host) -> None:
    with host.toolstack() as ts:
        ts.create_domain(13)
    result = run_guest(host, 13, DEVID, "linux", "verify", timeout=30)
    assert result.returncode == 1 and "no device" in str(result.error)


def test_three_guests_at_once(host: Host, vbd: Vbd) -> None:
    backends = [vbd(domid, size=8 * MiB) for domid in (20, 21, 22)]
    guests = [start_guest(host, domid, DEVID, "linux", "randrw", extra=["--seconds", "0.3"])
              for domid in (20, 21, 22)]
    try:
        results = [g.result(60) for g in guests]
    finally:
        for g in guests:
            g.kill()
    assert all(r.ok for r in results), [r.summary() for r in results]
    assert all(be.state() == "6" for be in backends)


def guest_requests(host: Host, token_prefix: str) -> list[tuple[str, str]]:
    """(op, args) of every request xenstored received on the guest's ring connection,
    from C xenstored's own trace (`-T`): what the daemon saw, not what the guest says."""
    requests = xstrace.requests((host.run_dir / "xenstored-trace").read_text().splitlines())
    conn = next(r.conn for r in requests if r.op == "WATCH" and f" {token_prefix}" in r.args)
    return [(r.op, r.args) for r in requests if r.conn == conn]


def transactions(requests: list[tuple[str, str]]) -> list[list[str]]:
    """The WRITE arguments of each committed transaction, and of each write outside one
    (as a group of its own)."""
    groups: list[list[str]] = []
    current: list[str] | None = None
    for op, args in requests:
        if op == "TRANSACTION_START":
            current = []
        elif op == "TRANSACTION_END":
            if current:
                groups.append(current)
            current = None
        elif op == "WRITE":
            key_value = args.strip("()").split("/")[-1].strip()  # "ring-ref 8"
            if current is None:
                groups.append([key_value])
            else:
                current.append(key_value)
    return groups


@pytest.mark.parametrize("personality", ["linux", "minios"])
def test_xenstored_sees_the_personalitys_transactions(host: Host, vbd: Vbd,
                                                      personality: str) -> None:
    vbd(16)
    assert run_guest(host, 16, DEVID, personality, "none", timeout=60).ok
    groups = transactions(guest_requests(host, "blkfront-16-"))
    ring_keys = ["ring-ref", "event-channel", "protocol", "feature-persistent"]
    if personality == "linux":
        assert [k.split()[0] for k in groups[0]] == ring_keys  # one transaction for all four
        assert groups[1:] == [["state 3"], ["state 4"], ["state 5"], ["state 6"]]
    else:
        assert [[k.split()[0] for k in g] for g in groups[:2]] == [["ring-ref"],
                                                                     ["event-channel"]]
        assert groups[2:] == [["state 3"], ["state 4"], ["state 5"], ["state 6"]]


def test_data_changed_behind_the_guests_back_fails_it(host: Host, vbd: Vbd) -> None:
    # Two guests on ONE image file: the second overwrites the region the first is
    # verifying (another stamp), so the first must see mismatches and exit 1.
    first = vbd(17, size=8 * MiB)
    vbd(18, shared=first.image)
    with start_guest(host, 17, DEVID, "linux", "randrw",
                     extra=["--seconds", "1.5", "--span-mib", "2"]) as victim:
        victim.wait_for_step("I/O write")
        assert run_guest(host, 18, DEVID, "linux", "verify", timeout=60,
                         extra=["--span-mib", "2"]).sectors == 8 * MiB // 512
        result = victim.result(60)
    assert result.returncode == 1 and "mismatches" in str(result.error), result.summary()
    assert result.report.io.mismatches > 0


def test_the_guest_command_prints_sectors_figures_and_timeline(host: Host, vbd: Vbd) -> None:
    vbd(19, size=8 * MiB)
    done = subprocess.run(
        [sys.executable, "-m", "blktap3.sim.guest", "--run-dir", str(host.run_dir),
         "--domid", "19", "--devid", str(DEVID), "--workload", "verify"],
        env=guest_env(host.run_dir, 19), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"sectors {8 * MiB // 512} (8.0 MiB)" in out
    assert "IOPS" in out and "MB/s" in out and "OK: every byte written read back" in out
    assert "fe  [tx] state=3 (INITIALISED)" in out and "be  state=4 (CONNECTED)" in out


def test_signals_during_io_do_not_cut_a_run_short(host: Host, vbd: Vbd) -> None:
    """SIGTERM (detach) interrupts the ring driver's wait for responses: that is no
    timeout, the run goes on (it used to end with requests in flight, counted lost, and
    the next phase failed with EBUSY)."""
    vbd(24)
    with start_guest(host, 24, DEVID, "linux", "randrw", hold=True,
                     extra=["--seconds", "1", "--span-mib", "2"]) as guest:
        guest.wait_for_step("I/O write")
        signals = 0
        while guest.proc.poll() is None and not any("random read/write" in s.what
                                                    for s in guest.steps):
            guest.detach()  # SIGTERM: asks for a detach once the workload is done
            signals += 1
            time.sleep(0.005)  # spreads the signals over the phase; not a wait for it
        result = guest.result(30)
    assert result.ok, result.summary() + "\n" + result.timeline_text()
    assert signals > 10
    assert any("I/O read back" in s for s in whats(result.timeline, "fe"))
