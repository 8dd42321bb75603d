"""Ring.disconnect frees the C ring only when no other call is using it.

STATS is served concurrently with the serialized control messages, so a `stats()` may
run while DISCONNECT frees the ring: the facade must refuse new uses once disconnect
starts and wait for the ones in progress. The C calls are replaced by fakes that
record when the ring is freed and whether a call touched it afterwards.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import Any

import pytest
from pytest_mock import MockerFixture

from blktap3.datapath import ring as ring_mod
from blktap3.datapath.ring import Ring


class FakeC:
    """Stands in for lib.td_ring_*: a pause that blocks until released, a free flag."""

    def __init__(self) -> None:
        self.freed = False
        self.used_after_free = False
        self.pause_entered = threading.Event()
        self.release_pause = threading.Event()

    def td_ring_pause(self, handle: Any, timeout_ms: int) -> int:
        self.pause_entered.set()
        self.release_pause.wait(5)
        self.used_after_free |= self.freed
        return 0

    def td_ring_stats(self, handle: Any, st: Any) -> None:
        self.used_after_free |= self.freed

    def td_ring_disconnect(self, handle: Any, timeout_ms: int) -> int:
        self.freed = True
        return 0


@pytest.fixture
def fake(mocker: MockerFixture) -> FakeC:
    c = FakeC()
    mocker.patch.object(ring_mod, "lib", c)
    return c


def make_ring() -> Ring:
    return Ring(object(), image=None, domid=7, devid=51712)  # type: ignore[arg-type]


def test_disconnect_waits_for_a_pause_in_progress(fake: FakeC) -> None:
    ring = make_ring()
    pauser = threading.Thread(target=ring.pause)
    pauser.start()
    assert fake.pause_entered.wait(5)
    closer = threading.Thread(target=ring.disconnect)
    closer.start()
    time.sleep(0.1)
    assert not fake.freed, "disconnect freed the ring under a pause"
    fake.release_pause.set()
    pauser.join(5)
    closer.join(5)
    assert fake.freed and not fake.used_after_free
    assert not ring.connected


def test_calls_during_and_after_disconnect_are_refused_not_run(fake: FakeC) -> None:
    ring = make_ring()
    fake.release_pause.set()
    ring.pause()
    ring.disconnect()
    with pytest.raises(OSError) as err:
        ring.stats()
    assert err.value.errno == errno.ENODEV
    ring.disconnect()  # idempotent
    assert not fake.used_after_free


def test_stats_hammered_while_disconnecting_never_touches_a_freed_ring(fake: FakeC) -> None:
    ring = make_ring()
    stop = threading.Event()
    refused = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                ring.stats()
            except OSError as e:
                refused.append(e.errno)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    ring.disconnect()
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(5)
    assert fake.freed and not fake.used_after_free
    assert refused and set(refused) == {errno.ENODEV}
