"""The xenstore ring protocol over an in-memory page with a fake xenstored peer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from blktap3.xenbus import (
    RingConnection,
    WatchEvent,
    WatchStream,
    XenStore,
    XenStoreConnectionError,
)
from blktap3.xenbus.ring import ring_free, ring_used

from .fakering import RSP_PROD, FakeRingPeer, event_channel_pair, new_page
from .fakexs import FakeStore

U32_MAX = 0xFFFFFFFF


def test_index_arithmetic_wraps_at_32_bits() -> None:
    assert ring_used(U32_MAX - 9, 10) == 20
    assert ring_free(U32_MAX - 9, 10) == 1024 - 20
    assert ring_used(5, 5) == 0 and ring_free(5, 5) == 1024


@pytest.fixture(params=[0, 1000, U32_MAX - 40], ids=["zero", "near-1k-wrap", "near-u32-wrap"])
def start_index(request: pytest.FixtureRequest) -> int:
    value: int = request.param
    return value


def _guest(start: int, max_chunk: int = 1024) -> Iterator[tuple[XenStore, FakeRingPeer]]:
    page = new_page(start)
    guest_end, xenstored_end = event_channel_pair()
    peer = FakeRingPeer(page, xenstored_end, FakeStore(), max_chunk=max_chunk)
    xs = XenStore.over_ring(memoryview(page), guest_end, timeout=5.0)
    yield xs, peer
    xs.close()
    peer.close()
    guest_end.close()
    xenstored_end.close()


@pytest.fixture
def guest(start_index: int) -> Iterator[tuple[XenStore, FakeRingPeer]]:
    yield from _guest(start_index)


@pytest.fixture
def slow_guest(start_index: int) -> Iterator[tuple[XenStore, FakeRingPeer]]:
    yield from _guest(start_index, max_chunk=37)


def test_requests_and_replies_cross_the_ring(guest: tuple[XenStore, FakeRingPeer]) -> None:
    xs, _peer = guest
    for i in range(50):  # 50 round trips push both indices well past the 1 KiB wrap
        xs.write(f"/local/domain/5/k{i}", f"v{i}")
    assert [xs.read(f"/local/domain/5/k{i}") for i in range(50)] == [f"v{i}" for i in range(50)]


def test_messages_larger_than_the_ring_go_in_pieces(
    slow_guest: tuple[XenStore, FakeRingPeer],
) -> None:
    xs, peer = slow_guest
    value = "".join(chr(ord("a") + i % 26) for i in range(4000))
    xs.write("/big", value)
    assert peer.store.nodes["/big"] == value.encode()
    assert xs.read("/big") == value


def test_watch_events_arrive_over_the_ring(start_index: int) -> None:
    page = new_page(start_index)
    guest_end, xenstored_end = event_channel_pair()
    peer = FakeRingPeer(page, xenstored_end, FakeStore())
    # A ring has one reader: the guest's watches and requests share its one connection.
    xs = XenStore.over_ring(memoryview(page), guest_end, timeout=5.0)
    try:
        with WatchStream(lambda: xs) as stream:
            stream.watch("/fe", "tok")
            assert stream.wait(2) == WatchEvent("/fe", "tok")
            xs.write("/fe/state", "3")
            assert stream.wait(2) == WatchEvent("/fe/state", "tok")
    finally:
        peer.close()
        guest_end.close()
        xenstored_end.close()


def test_corrupt_indices_from_the_peer_fail_the_connection(
    guest: tuple[XenStore, FakeRingPeer],
) -> None:
    xs, peer = guest
    xs.write("/a", "1")
    peer.stop = True
    peer.thread.join(2)
    # A broken (or hostile) xenstored claims 5000 bytes in a 1 KiB ring, then notifies.
    rsp_prod = peer.get(RSP_PROD)
    peer.put(RSP_PROD, rsp_prod + 5000)
    peer.evtchn.notify()
    with pytest.raises(XenStoreConnectionError, match="corrupt"):
        xs.read("/a")


def test_page_must_be_writable() -> None:
    guest_end, other = event_channel_pair()
    with pytest.raises(ValueError):
        RingConnection(memoryview(bytes(4096)), guest_end)
    guest_end.close()
    other.close()
