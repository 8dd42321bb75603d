"""Two processes on one simulated machine: a page through a grant, 10,000 events."""

from __future__ import annotations

import subprocess
from pathlib import Path

from blktap3.sim import xensim
from blktap3.sim.xenlib import EventChannel, GrantShare

from .conftest import probe_env

ROUNDS = 10_000


def test_page_through_a_grant_and_10000_notifications_none_lost(
        machine: xensim.Machine, probe_binary: Path) -> None:
    machine.create_domain(1, 64)  # this process: the guest
    machine.create_domain(2, 64)  # the probe: the back-end
    with GrantShare(machine.run_dir, 1) as gs, EventChannel(machine.run_dir, 1) as evt:
        share = gs.share_pages(2, 1)
        assert share.buffer is not None
        share.buffer[:6] = b"hello\0"
        port = evt.bind_unbound_port(2)
        backend = subprocess.Popen(
            [str(probe_binary), "pingpong", "1", str(port), str(ROUNDS), str(share.refs[0])],
            env=probe_env(machine, 2), stdout=subprocess.PIPE, text=True)
        try:
            assert evt.wait(10.0) == port, "the back-end said it is ready"
            assert bytes(share.buffer[64:69]) == b"HELLO", "the back-end wrote the page"
            replies = 0
            for _ in range(ROUNDS):
                evt.notify(port)
                # one event in flight each way: a lost one would time out here
                assert evt.wait(5.0) == port
                replies += 1
            out, _ = backend.communicate(timeout=30)
        finally:
            backend.kill()
            backend.wait()
        assert replies == ROUNDS
        assert out.strip() == f"ok {ROUNDS}"
