"""WatchStream against a fake xenstored: typed events, filtering, reconnection."""

from __future__ import annotations

import threading

import pytest

from blktap3.xenbus import (
    Reconnected,
    WatchEvent,
    WatchStream,
    XenStore,
    XenStoreConnectionError,
)
from blktap3.xenbus import watch as watch_module

from .fakexs import WATCH, FakeXenstored


def _stream(fake: FakeXenstored, attempts: int = 10) -> WatchStream:
    return WatchStream(lambda: XenStore.open(fake.path, timeout=1.0),
                       reconnect_attempts=attempts, backoff=0.01)


def test_events_are_typed_and_fire_on_register_and_change(
    fake_xenstored: FakeXenstored, client: XenStore
) -> None:
    with _stream(fake_xenstored) as stream:
        stream.watch("/fe", "tok")
        assert stream.wait(2) == WatchEvent("/fe", "tok")
        client.write("/fe/state", "3")
        assert stream.wait(2) == WatchEvent("/fe/state", "tok")
        assert stream.wait(0.05) is None


def test_events_of_removed_watches_are_dropped(
    fake_xenstored: FakeXenstored, client: XenStore
) -> None:
    with _stream(fake_xenstored) as stream:
        stream.watch("/a", "ta")
        stream.watch("/b", "tb")
        assert stream.wait(2) == WatchEvent("/a", "ta")
        assert stream.wait(2) == WatchEvent("/b", "tb")
        stream.unwatch("/a", "ta")
        # An event for the removed watch arriving late (the server still sends it).
        fake_xenstored.store.watches.append((b"/a", b"ta"))
        client.write("/a/x", "1")
        client.write("/b/x", "1")
        assert stream.wait(2) == WatchEvent("/b/x", "tb")


def test_connection_loss_reconnects_and_reregisters(
    fake_xenstored: FakeXenstored, client: XenStore
) -> None:
    with _stream(fake_xenstored) as stream:
        stream.watch("/fe", "t1")
        stream.watch("/be", "t2")
        assert stream.wait(2) == WatchEvent("/fe", "t1")
        assert stream.wait(2) == WatchEvent("/be", "t2")
        accepted = fake_xenstored.accepted
        fake_xenstored.drop_connections()
        event = stream.wait(5)
        assert isinstance(event, Reconnected)
        assert fake_xenstored.accepted > accepted
        watches = [p for op, _tx, p in fake_xenstored.store.requests if op == WATCH]
        assert watches[-2:] == [b"/fe\0t1\0", b"/be\0t2\0"]
        # Registration fires each again, then changes fire as before.
        assert {stream.wait(2), stream.wait(2)} == {WatchEvent("/fe", "t1"),
                                                   WatchEvent("/be", "t2")}
        with XenStore.open(fake_xenstored.path, timeout=1.0) as other:
            other.write("/fe/state", "4")
        assert stream.wait(2) == WatchEvent("/fe/state", "t1")


def test_reconnection_gives_up_after_its_bound(fake_xenstored: FakeXenstored) -> None:
    stream = _stream(fake_xenstored, attempts=3)
    stream.watch("/fe", "t")
    assert stream.wait(2) == WatchEvent("/fe", "t")
    fake_xenstored.close()  # no listener any more
    with pytest.raises(XenStoreConnectionError, match="3 tries"):
        stream.wait(5)
    stream.close()


def test_watch_from_another_thread_while_wait_matches_an_event(
    fake_xenstored: FakeXenstored, client: XenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wait() matches an event against the watches while watch() adds one elsewhere."""
    with _stream(fake_xenstored) as stream:
        # One token for both (as tapback's one token for its root): the event is
        # compared with every watch's path in turn.
        stream.watch("/first", "t")
        stream.watch("/last", "t")
        assert stream.wait(2) == WatchEvent("/first", "t")
        assert stream.wait(2) == WatchEvent("/last", "t")
        covers = watch_module._covers
        added: list[threading.Thread] = []

        def covers_while_another_thread_watches(watched: str, path: str) -> bool:
            # The moment wait() looks at its watches, a tapback thread adds some.
            if not added:
                def add() -> None:
                    for i in range(3):
                        stream.watch(f"/new{i}", "tn")

                adder = threading.Thread(target=add)
                added.append(adder)
                adder.start()
                adder.join(2)
            return covers(watched, path)

        monkeypatch.setattr(watch_module, "_covers", covers_while_another_thread_watches)
        client.write("/last/x", "1")  # matches the last watch: every watch is looked at
        assert stream.wait(2) == WatchEvent("/last/x", "t")
        added[0].join(2)
        monkeypatch.setattr(watch_module, "_covers", covers)
        assert ("/new2", "tn") in stream.watches
        client.write("/new2/x", "1")
        events = {stream.wait(2) for _ in range(4)}  # the registration fires, then the write
        assert WatchEvent("/new2/x", "tn") in events
