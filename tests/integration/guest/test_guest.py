"""The simulated guest against a real tapdisk on the simulated host: handshake per
personality, verified I/O, detach on request and on the back-end's Closing, reconnect."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from blktap3.sim.guest import run_guest
from blktap3.sim.host import Host

from .conftest import DEVID, MiB, MiniBackend

pytestmark = pytest.mark.integration

Vbd = Callable[..., MiniBackend]


def whats(result_timeline: list[dict[str, object]], who: str) -> list[str]:
    return [str(s["what"]) for s in result_timeline if s["who"] == who]


def test_linux_guest_connects_writes_and_reads_back_every_byte(host: Host, vbd: Vbd) -> None:
    be = vbd(3, size=16 * MiB)
    result = run_guest(host, 3, DEVID, "linux", "verify", timeout=60)
    assert result.ok, result.summary() + "\n" + result.timeline_text()
    assert result.sectors == 16 * MiB // 512
    io = result.report["io"]
    assert io["writes"] == io["reads"] == 8 * MiB // 4096  # the default 8 MiB span, both ways
    assert result.iops > 0 and result.mbps > 0
    # Linux: the transport keys in ONE transaction, single page ring, x86_64 protocol.
    fe = whats(result.timeline, "fe")
    tx = [w for w in fe if w.startswith("[tx] ring-ref=")]
    assert len(tx) == 1 and "protocol=x86_64-abi" in tx[0] and "feature-persistent=1" in tx[0]
    (transport,) = be.connected_transport
    assert transport.ring_page_order == 0 and transport.protocol.value == "x86_64-abi"
    # Detached at the end: 5 then 6 from us, Closed from the back-end.
    assert fe.index("[tx] state=5 (CLOSING)") < fe.index("[tx] state=6 (CLOSED)")
    assert be.frontend_state() == "6" and be.state() == "6"
    hs = result.handshakes[0]
    assert hs["initialising_to_connected_ms"] and hs["initialised_to_backend_connected_ms"]
    assert not be.errors

