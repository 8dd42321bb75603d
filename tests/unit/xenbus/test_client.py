"""XenStore client against a fake xenstored: str API, typed errors, timeouts, threads."""

from __future__ import annotations

import gc
import threading
import time
import warnings
from collections.abc import Callable

import pytest
from pytest_mock import MockerFixture

from blktap3.xenbus import (
    Access,
    Permission,
    XenStore,
    XenStoreConnectionError,
    XenStoreInvalid,
    XenStoreNotFound,
    XenStorePermissionError,
    XenStoreTimeout,
)
from tests.support import wait_until

from .fakexs import INTRODUCE, RELEASE, FakeXenstored


def test_values_round_trip_as_str(client: XenStore) -> None:
    client.write("/a/b", "hello")
    assert client.read("/a/b") == "hello"
    assert client.read_optional("/a/missing") is None
    assert sorted(client.ls("/a")) == ["b"]
    assert client.exists("/a/b")
    assert not client.exists("/a/nope")


def test_bytes_a_guest_wrote_come_back_unchanged(
    client: XenStore, fake_xenstored: FakeXenstored
) -> None:
    fake_xenstored.store.nodes["/g"] = b"\xff\xfe garbage"
    value = client.read("/g")
    client.write("/copy", value)
    assert fake_xenstored.store.nodes["/copy"] == b"\xff\xfe garbage"


def test_missing_node_raises_not_found_with_errno(client: XenStore) -> None:
    with pytest.raises(XenStoreNotFound) as info:
        client.read("/nope")
    assert info.value.errno == 2
    assert "/nope" in str(info.value)


def test_refused_read_raises_permission_error(client: XenStore) -> None:
    with pytest.raises(XenStorePermissionError) as info:
        client.read("/forbidden/x")
    assert info.value.errno == 13


@pytest.mark.parametrize("path", ["/a//b", "/a/", "/a b", "/é", "/a\0b", "x" * 3100])
def test_bad_paths_are_refused_before_sending(
    client: XenStore, fake_xenstored: FakeXenstored, path: str
) -> None:
    with pytest.raises(XenStoreInvalid):
        client.read(path)
    assert fake_xenstored.store.requests == []


def test_oversized_request_is_refused_before_sending(
    client: XenStore, fake_xenstored: FakeXenstored
) -> None:
    with pytest.raises(XenStoreInvalid):
        client.write("/big", "x" * 5000)
    assert fake_xenstored.store.requests == []


def test_write_with_perms_sets_them(client: XenStore) -> None:
    client.write("/p", "v", perms=[Permission(5, Access.NONE), Permission(0, Access.READ)])
    assert client.get_perms("/p") == [Permission(5, Access.NONE), Permission(0, Access.READ)]


def test_rm_of_missing_node_is_not_an_error(client: XenStore) -> None:
    client.rm("/never/there")


def test_introduce_is_sent_although_pyxs_thinks_we_are_not_dom0(
    client: XenStore, fake_xenstored: FakeXenstored
) -> None:
    import pyxs

    assert pyxs.Client.SU is False  # what pyxs guessed on this machine
    client.introduce(7, 1234, 3)
    client.release(7)
    ops = [(op, payload) for op, _tx, payload in fake_xenstored.store.requests]
    assert (INTRODUCE, b"7\x001234\x003\x00") in ops
    assert (RELEASE, b"7\x00") in ops
    assert client.is_domain_introduced(7) is True
    assert client.get_domain_path(7) == "/local/domain/7"


def test_silent_xenstored_gives_a_timeout_not_a_hang(
    client: XenStore, fake_xenstored: FakeXenstored
) -> None:
    fake_xenstored.store.silent = True
    with pytest.raises(XenStoreTimeout) as err:
        client.call(2, b"/x\0", timeout=0.3)
    assert "within 0.3s" in str(err.value)  # the call's timeout, not the client's 2 s


def test_lost_connection_fails_pending_call_at_once(
    client: XenStore, fake_xenstored: FakeXenstored
) -> None:
    fake_xenstored.store.silent = True

    def drop_once_pending() -> None:
        wait_until(lambda: fake_xenstored.store.requests, 5, "the call to reach xenstored")
        fake_xenstored.drop_connections()

    threading.Thread(target=drop_once_pending, daemon=True).start()
    # A ConnectionError, not the XenStoreTimeout of the call's 30 s: failed when dropped.
    with pytest.raises(XenStoreConnectionError):
        client.call(2, b"/x\0", timeout=30)
    assert not client.alive
    with pytest.raises(XenStoreConnectionError):
        client.read("/x")


def test_dead_router_thread_fails_callers_instead_of_blocking(
    client: XenStore, mocker: MockerFixture
) -> None:
    # The router thread dies inside recv() with a bug of its own (not a socket error).
    mocker.patch.object(client.connection, "recv", side_effect=RuntimeError("router bug"))
    # A ConnectionError naming the bug, not the XenStoreTimeout of the 2 s call timeout.
    with pytest.raises(XenStoreConnectionError, match="router bug"):
        client.read("/")


def test_connect_to_missing_socket_raises_connection_error(tmp_path: object) -> None:
    with pytest.raises(XenStoreConnectionError):
        XenStore.open(f"{tmp_path}/nothing-here", timeout=1)


def _unclosed_sockets(action: Callable[[], object]) -> list[str]:
    """The ResourceWarnings (sockets left for the collector to close) `action` causes."""
    gc.collect()  # earlier tests' garbage is not ours to count
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        action()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_a_failed_connect_leaves_no_socket_open(tmp_path: object) -> None:
    def fail() -> None:
        with pytest.raises(XenStoreConnectionError):
            XenStore.open(f"{tmp_path}/nothing-here", timeout=1)

    assert _unclosed_sockets(fail) == []


def test_close_after_the_peer_left_closes_the_socket(
    fake_xenstored: FakeXenstored,
) -> None:
    def lose_and_close() -> None:
        xs = XenStore.open(fake_xenstored.path, timeout=1)
        fake_xenstored.close()
        wait_until(lambda: not xs.alive, 5, "the client to see the peer gone")
        xs.close()

    assert _unclosed_sockets(lose_and_close) == []


def test_concurrent_callers_each_get_their_own_reply(client: XenStore) -> None:
    for i in range(8):
        client.write(f"/t/{i}", f"value-{i}")
    errors: list[str] = []

    def reader(i: int) -> None:
        for _ in range(100):
            got = client.read(f"/t/{i}")
            if got != f"value-{i}":
                errors.append(got)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_close_returns_promptly_with_a_silent_server(
    client: XenStore, fake_xenstored: FakeXenstored
) -> None:
    fake_xenstored.store.silent = True
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 3.0
    assert not client.alive


def test_default_socket_path_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from blktap3.xenbus import default_socket_path

    monkeypatch.setenv("XENSTORED_PATH", "/x/y")
    assert default_socket_path() == "/x/y"
    monkeypatch.delenv("XENSTORED_PATH")
    monkeypatch.setenv("XENSTORED_RUNDIR", "/r")
    assert default_socket_path() == "/r/socket"
