"""Ring.disconnect frees the C ring only when no other call is using it.

STATS is served concurrently with the serialized control messages, so a `stats()` may
run while DISCONNECT frees the ring: the facade must refuse new uses once disconnect
starts and wait for the ones in progress. The C calls are replaced by fakes that
record when the ring is freed and whether a call touched it afterwards.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any

import pytest
from pytest_mock import MockerFixture

from blktap3.datapath import ring as ring_mod
from blktap3.datapath.ring import Ring
from tests.support import wait_until


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
    # Disconnect has begun once new uses are refused; the pause still holds its use.
    wait_until(lambda: _refused(ring.stats), 5, "disconnect to start refusing new uses")
    assert closer.is_alive() and not fake.freed, "disconnect freed the ring under a pause"
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
    refused: list[int] = []
    served = [threading.Event() for _ in range(4)]  # each hammer had a stats() answered
    turned_away = [threading.Event() for _ in range(4)]  # ... and one refused

    def hammer(i: int) -> None:
        while not stop.is_set():
            try:
                ring.stats()
                served[i].set()
            except OSError as e:
                refused.append(e.errno)
                turned_away[i].set()

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        assert all(e.wait(5) for e in served), "every hammer is calling stats()"
        ring.disconnect()
        assert all(e.wait(5) for e in turned_away), "every hammer saw the refusal"
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert fake.freed and not fake.used_after_free
    assert set(refused) == {errno.ENODEV}


def _refused(call: Callable[[], object]) -> bool:
    """Whether `call` is refused as on a disconnected ring (ENODEV), not run."""
    try:
        call()
    except OSError as e:
        return e.errno == errno.ENODEV
    return False
