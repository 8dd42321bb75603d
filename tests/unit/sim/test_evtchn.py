"""xensim event channels: binding rules, delivery to the peer only, errors, coalescing."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from blktap3.sim import xensim
from blktap3.sim.xenlib import EventChannel

from .conftest import Probe


def connected(machine: xensim.Machine, a: int,
              b: int) -> tuple[EventChannel, int, EventChannel, int]:
    """An interdomain channel a <-> b, with the bind's own pending event taken."""
    ea = EventChannel(machine.run_dir, a)
    eb = EventChannel(machine.run_dir, b)
    pa = ea.bind_unbound_port(b)
    pb = eb.bind_interdomain(a, pa)
    assert eb.wait(1.0) == pb, "Xen sets a freshly bound port pending"
    return ea, pa, eb, pb


def test_unbound_port_binds_only_for_its_named_remote(machine: xensim.Machine,
                                                      probe: Probe) -> None:
    for domid in (1, 2, 3):
        machine.create_domain(domid, 16)
    with EventChannel(machine.run_dir, 1) as e1:
        port = e1.bind_unbound_port(2)
        assert probe(3, "bind", 1, port) == f"err {errno.EINVAL}"
        assert probe(2, "bind", 1, port).startswith("ok ")
        # the probe closed its handle: the port is unbound for dom2 again
        assert probe(2, "bind", 1, port).startswith("ok ")
        assert probe(2, "bind", 1, 4000) == f"err {errno.EINVAL}"
        assert probe(2, "bind", 1, 0) == f"err {errno.EINVAL}"
        assert probe(2, "bind", 9, port) == f"err {errno.ESRCH}"


def test_a_bound_port_cannot_be_bound_twice(machine: xensim.Machine) -> None:
    machine.create_domain(1, 16)
    machine.create_domain(2, 16)
    ea, pa, eb, _ = connected(machine, 1, 2)
    with ea, eb, pytest.raises(OSError) as exc:
        eb.bind_interdomain(1, pa)
    assert exc.value.errno == errno.EINVAL


def test_notify_reaches_only_the_bound_peer(machine: xensim.Machine) -> None:
    for domid in (1, 2, 3):
        machine.create_domain(domid, 16)
    ea, pa, eb, pb = connected(machine, 1, 2)
    ec, _, ed, _ = connected(machine, 1, 3)
    with ea, eb, ec, ed:
        ea.notify(pa)
        assert eb.wait(1.0) == pb
        assert ea.wait(0.05) is None, "the sender does not get its own event"
        assert ec.wait(0.05) is None and ed.wait(0.05) is None, "no other channel fires"
        eb.notify(pb)
        assert ea.wait(1.0) == pa


def test_unknown_ports_fail_with_the_linux_errno(machine: xensim.Machine,
                                                 probe: Probe) -> None:
    machine.create_domain(1, 16)
    machine.create_domain(2, 16)
    with EventChannel(machine.run_dir, 1) as e1:
        port = e1.bind_unbound_port(2)
        # a port of our domain that another handle owns is not ours to use
        assert probe(1, "notify", port).splitlines() == [f"err {errno.ENOTCONN}"] * 2
        assert probe(1, "notify", 4095).splitlines() == [f"err {errno.ENOTCONN}"] * 2
        assert probe(1, "notify", 1 << 20).splitlines() == [f"err {errno.ENOTCONN}",
                                                            f"err {errno.EINVAL}"]
        with pytest.raises(OSError) as exc:
            e1.notify(port + 1)
        assert exc.value.errno == errno.ENOTCONN


def test_events_coalesce_while_masked_and_none_is_lost(machine: xensim.Machine) -> None:
    machine.create_domain(1, 16)
    machine.create_domain(2, 16)
    ea, pa, eb, pb = connected(machine, 1, 2)
    with ea, eb:
        for _ in range(3):
            ea.notify(pa)
        assert eb.pending() == pb
        ea.notify(pa)  # arrives while the port is masked: kept pending
        assert eb.wait(0.05) is None
        eb.unmask(pb)
        assert eb.wait(1.0) == pb, "unmask delivers what arrived while masked"
        assert eb.wait(0.05) is None, "and only once"


def test_unbind_leaves_the_peer_unbound_for_us(machine: xensim.Machine) -> None:
    machine.create_domain(1, 16)
    machine.create_domain(2, 16)
    ea, pa, eb, pb = connected(machine, 1, 2)
    with ea, eb:
        eb.unbind(pb)
        ea.notify(pa)  # Xen drops a notify on an unbound port silently
        with pytest.raises(OSError) as exc:
            eb.unbind(pb)
        assert exc.value.errno == errno.ENOTCONN
        pb2 = eb.bind_interdomain(1, pa)
        assert eb.wait(1.0) == pb2
        ea.notify(pa)
        assert eb.wait(1.0) == pb2


def test_ports_of_a_dead_process_are_released(machine: xensim.Machine) -> None:
    machine.create_domain(1, 16)
    machine.create_domain(2, 16)
    with EventChannel(machine.run_dir, 1) as e1:
        port = e1.bind_unbound_port(2)
        code = textwrap.dedent(f"""
            import os
            from blktap3.sim.xenlib import EventChannel
            EventChannel({str(machine.run_dir)!r}, 2).bind_interdomain(1, {port})
            os._exit(0)  # no close: the kernel would release the fd
        """)
        subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
        with EventChannel(machine.run_dir, 2) as e2:
            local = e2.bind_interdomain(1, port)
            e1.notify(port)
            assert e2.wait(1.0) == local


def test_virq_dom_exc_fires_when_a_domain_is_destroyed(machine: xensim.Machine,
                                                       probe: Probe) -> None:
    machine.create_domain(7, 16)
    with EventChannel(machine.run_dir, 0) as e0:
        virq = e0.bind_virq(xensim.VIRQ_DOM_EXC)
        with pytest.raises(OSError) as exc:
            e0.bind_virq(xensim.VIRQ_DOM_EXC)
        assert exc.value.errno == errno.EEXIST
        assert probe(0, "getinfo", 7) == "ok 1 7 0"
        assert e0.wait(0.05) is None
        machine.destroy_domain(7)
        assert e0.wait(1.0) == virq
        assert probe(0, "getinfo", 7) == "ok 0 0 0"
        assert 7 not in machine.domain_ids()


def test_guest_claims_its_xenstore_port_and_gets_what_is_pending(
        machine: xensim.Machine) -> None:
    info = machine.create_domain(4, 16)
    with EventChannel(machine.run_dir, 0) as dom0, EventChannel(machine.run_dir, 4) as guest:
        local = dom0.bind_interdomain(4, info.xenstore_port)
        assert dom0.wait(1.0) == local
        dom0.notify(local)  # before the guest is listening
        guest.claim(info.xenstore_port)
        assert guest.wait(1.0) == info.xenstore_port
        with pytest.raises(OSError) as exc:
            guest.claim(info.xenstore_port)
        assert exc.value.errno == errno.EBUSY
        guest.notify(info.xenstore_port)
        assert dom0.wait(1.0) == local


def test_a_long_lived_notifier_keeps_no_descriptor_of_closed_peers(
        machine: xensim.Machine) -> None:
    """The writer's FIFO descriptors of handles closed since are let go (a tapdisk or
    xenstored serving guest after guest must not keep one per guest forever)."""
    machine.create_domain(1, 16)
    machine.create_domain(2, 16)

    def stale() -> int:
        fds = Path("/proc/self/fd")
        links = [os.readlink(p) for p in fds.iterdir() if p.is_symlink()]
        return sum(str(machine.run_dir) in t and t.endswith("(deleted)") for t in links)

    with EventChannel(machine.run_dir, 1) as ea:
        for _ in range(20):
            pa = ea.bind_unbound_port(2)
            with EventChannel(machine.run_dir, 2) as eb:
                pb = eb.bind_interdomain(1, pa)
                assert eb.wait(1.0) == pb
                ea.notify(pa)
                assert eb.wait(1.0) == pb
            ea.unbind(pa)
        assert stale() <= 1, "only the last closed peer's, until the next new one"


_PEER = textwrap.dedent("""
    import sys
    from blktap3.sim.xenlib import EventChannel
    with EventChannel(sys.argv[1], 2) as e:
        port = e.bind_interdomain(1, int(sys.argv[2]))
        assert e.wait(5.0) == port
        print("bound", flush=True)
        print("got" if e.wait(float(sys.argv[3])) == port else "lost", flush=True)
""")


NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
needs_pid_choice = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(NS_LAST_PID, os.W_OK),
    reason="needs root to choose a process's pid (ns_last_pid)")


def _start_as(pid: int, argv: list[str]) -> subprocess.Popen[str]:
    """`argv` started under `pid` (the kernel's next pid set through ns_last_pid, 50
    tries); skips the test when the machine's other processes kept taking it."""
    for _ in range(50):
        NS_LAST_PID.write_text(str(pid - 1))
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    pytest.skip("the machine's other processes kept taking the pid")


def _peer(machine: xensim.Machine, remote_port: int, wait: float) -> list[str]:
    """The command of a domain-2 process bound to `remote_port`."""
    return [sys.executable, "-c", _PEER, str(machine.run_dir), str(remote_port), str(wait)]


@needs_pid_choice
def test_a_peer_reusing_a_dead_peers_pid_gets_its_events(machine: xensim.Machine) -> None:
    """A long-lived notifier (xenstored, tapback's tapdisks) keeps its peers' FIFOs open;
    a new process that got a dead one's pid has a new FIFO, and events reach it (on a
    host with pid_max 32768, a day of guests reuses every pid)."""
    machine.create_domain(1, 16)
    machine.create_domain(2, 16)
    with EventChannel(machine.run_dir, 1) as ea:
        first_port = ea.bind_unbound_port(2)
        first = subprocess.Popen(_peer(machine, first_port, 5.0), stdout=subprocess.PIPE,
                                 text=True)
        assert first.stdout is not None
        assert first.stdout.readline() == "bound\n"
        ea.notify(first_port)  # the notifier opens and keeps this peer's FIFO
        assert first.stdout.readline() == "got\n"
        assert first.wait(10) == 0
        port = ea.bind_unbound_port(2)
        second = _start_as(first.pid, _peer(machine, port, 2.0))
        assert second.stdout is not None
        assert second.stdout.readline() == "bound\n"
        ea.notify(port)
        assert second.stdout.readline() == "got\n", "the event went to the dead peer's FIFO"
        assert second.wait(10) == 0


_CLAIMER = textwrap.dedent("""
    import sys, time
    from blktap3.sim.xenlib import EventChannel
    e = EventChannel(sys.argv[1], 2)
    try:
        e.claim(int(sys.argv[2]))
        print("claimed", flush=True)
    except OSError as err:
        print(f"refused {err.errno}", flush=True)
    time.sleep(float(sys.argv[3]))
""")


@needs_pid_choice
def test_a_dead_owners_port_is_freed_though_its_pid_lives_on(machine: xensim.Machine) -> None:
    """The guest that held a domain's xenstore port was killed; another process took its
    pid. The port is the dead one's no more: the domain's next guest claims it."""
    port = machine.create_domain(2, 16).xenstore_port

    def claim(hold: float) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", _CLAIMER, str(machine.run_dir),
                                 str(port), str(hold)], stdout=subprocess.PIPE, text=True)

    first = claim(60.0)
    assert first.stdout is not None and first.stdout.readline() == "claimed\n"
    first.kill()
    first.wait()
    # A process that is no guest now runs under the dead one's pid.
    squatter = _start_as(first.pid, ["sleep", "60"])
    try:
        nxt = claim(0.0)
        assert nxt.stdout is not None
        assert nxt.stdout.readline() == "claimed\n", "the port still counted as the dead one's"
        nxt.wait()
    finally:
        squatter.kill()
        squatter.wait()
