"""A VBD's queues served as one ring: every queue paused, resumed, disconnected; the
counters summed as blktap's layouts read them, each queue's kept."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

import pytest

from blktap3.tapdisk.queues import Queues, merge


@dataclass
class FakeRing:
    counters: dict[str, Any]
    calls: list[str] = field(default_factory=list)
    fail_disconnect: bool = False

    def pause(self, timeout: float = 30.0) -> None:
        self.calls.append("pause")

    def resume(self, image: Any = None) -> None:
        self.calls.append(f"resume {image}")

    def disconnect(self, timeout: float = 30.0) -> None:
        self.calls.append("disconnect")
        if self.fail_disconnect:
            raise OSError(errno.ETIMEDOUT, "still draining")

    def stats(self) -> dict[str, Any]:
        return self.counters

    def io_stats(self) -> dict[str, Any]:
        return {"read": {"usecs": 10, "max_usecs": self.counters["slots"]},
                "ring": {"req_prod": self.counters["slots"]}}

    def set_req_timeout(self, seconds: int) -> None:
        self.calls.append(f"timeout {seconds}")


def _ring(n: int, halted: str | None = None) -> FakeRing:
    return FakeRing({"domid": 7, "devid": 51712, "reqs": {"read": n, "write": 2 * n},
                     "slots": 32 * n, "paused": n == 2, "halted": halted,
                     "engine": "uring", "indirect": {"max_segments": 256, "read": n}})


def test_counters_are_summed_and_each_queue_is_kept() -> None:
    rings = [_ring(1), _ring(2, halted="req_prod past the ring"), _ring(3)]
    queues = Queues(rings[0])
    for ring in rings[1:]:
        queues.add(ring)
    stats = queues.stats()
    assert stats["reqs"] == {"read": 6, "write": 12} and stats["slots"] == 192
    assert stats["paused"] is True and stats["halted"] == "req_prod past the ring"
    assert (stats["domid"], stats["engine"]) == (7, "uring")  # the first queue's word
    assert stats["indirect"] == {"max_segments": 256, "read": 6}
    assert stats["queues"] == [r.counters for r in rings]
    io = queues.io_stats()
    assert io["read"] == {"usecs": 30, "max_usecs": 96}  # times summed, the worst kept
    assert io["ring"] == {"req_prod": 32}  # queue 0's indices, as blktap's io_ring file


def test_pause_resume_and_disconnect_reach_every_queue() -> None:
    rings = [_ring(1), _ring(2)]
    queues = Queues(rings[0])
    queues.add(rings[1])
    queues.pause()
    queues.resume(image="img")
    queues.set_req_timeout(5)
    queues.disconnect()
    assert all(r.calls == ["pause", "resume img", "timeout 5", "disconnect"] for r in rings)


def test_a_queue_that_cannot_disconnect_does_not_keep_the_others() -> None:
    rings = [_ring(1), _ring(2), _ring(3)]
    rings[0].fail_disconnect = True
    queues = Queues(rings[0])
    for ring in rings[1:]:
        queues.add(ring)
    with pytest.raises(OSError) as err:
        queues.disconnect()
    assert err.value.errno == errno.ETIMEDOUT
    assert all(r.calls == ["disconnect"] for r in rings)


def test_merge_of_nothing_is_empty() -> None:
    assert merge([]) == {}
