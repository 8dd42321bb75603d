"""A VBD worker over an in-memory XenStore and a mocked tapdisk client.

The real daemons are exercised in tests/integration/tapback; here the worker's own
decisions are pinned, including error branches that are hard to reach for real.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pytest_mock import MockerFixture

from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.ctl.protocol import ImageInfo
from blktap3.tapback.executor import VbdConfig
from blktap3.tapback.store import SharedStore
from blktap3.tapback.worker import Died, Prompt, VbdWorker
from blktap3.xenbus import (
    Permission,
    VbdPaths,
    XenStoreNotFound,
    XenStorePermissionError,
    owned_by,
)
from tests.support import wait_until as wait_for

T = TypeVar("T")
PATHS = VbdPaths(5, 51712)


class FakeXenStore:
    """Just enough of `XenStore`/`Transaction` for a worker: a flat dict of nodes."""

    alive = True

    def __init__(self) -> None:
        self.nodes: dict[str, str] = {}
        self.writes: list[str] = []

    def read_optional(self, path: str) -> str | None:
        return self.nodes.get(path)

    def exists(self, path: str) -> bool:
        return any(p == path or p.startswith(path + "/") for p in self.nodes)

    def write(self, path: str, value: str, perms: Any = None) -> None:
        self.nodes[path] = value
        self.writes.append(path.rsplit("/", 1)[-1])

    def get_perms(self, path: str) -> list[Permission]:
        return owned_by(0, readers=[PATHS.domid])

    def ls(self, path: str) -> list[str]:
        if not self.exists(path):
            raise XenStoreNotFound(errno.ENOENT, path=path)
        return sorted({p[len(path) + 1:].split("/")[0] for p in self.nodes
                       if p.startswith(path + "/")})

    def rm(self, path: str) -> None:
        for p in [p for p in self.nodes if p == path or p.startswith(path + "/")]:
            del self.nodes[p]

    def transact(self, body: Callable[[FakeXenStore], T]) -> T:
        return body(self)

    def close(self) -> None:
        pass


@pytest.fixture
def xs() -> FakeXenStore:
    store = FakeXenStore()
    b, f = PATHS.backend_key, PATHS.frontend_key
    store.nodes.update({
        b("frontend"): PATHS.frontend, b("mode"): "w", b("device-type"): "disk",
        b("online"): "1", b("state"): "1", b("params"): "aio:/nonexistent.img",
        b("hotplug-status"): "connected",
        b("physical-device-path"): "/run/blktap-control/nbd123.0",
        f("state"): "1",
    })
    return store


@pytest.fixture
def worker(xs: FakeXenStore, mocker: MockerFixture) -> Iterator[VbdWorker]:
    mocker.patch.object(TapdiskClient, "disk_info", return_value=ImageInfo(2048, 512, 0))
    finals: list[VbdWorker] = []
    w = VbdWorker(PATHS, PATHS.frontend, SharedStore(lambda: xs),  # type: ignore[arg-type,return-value]
                  VbdConfig(Path("/nonexistent")), on_final=finals.append,
                  on_tapdisk=lambda worker, pid: None)
    w.start()
    yield w
    w.post(Prompt.STOP)
    w.join(5)


def _publish_transport(xs: FakeXenStore) -> None:
    f = PATHS.frontend_key
    xs.nodes.update({f("ring-ref"): "8", f("event-channel"): "3", f("state"): "3"})


def test_handshake_writes_connect_keys_and_kthread_pid(
        worker: VbdWorker, xs: FakeXenStore, mocker: MockerFixture) -> None:
    connect = mocker.patch.object(TapdiskClient, "connect_xenblkif")
    worker.post(Prompt.REFRESH)
    b = PATHS.backend_key
    wait_for(lambda: xs.nodes.get(b("state")) == "2")
    _publish_transport(xs)
    worker.post(Prompt.REFRESH)
    wait_for(lambda: xs.nodes.get(b("state")) == "4")
    assert xs.nodes[b("sectors")] == "2048"
    assert xs.nodes[b("kthread-pid")] == "123"
    assert connect.call_args.kwargs["grefs"] == (8,)
    assert connect.call_args.kwargs["proto"] == 1  # protocol missing: native
    assert xs.writes.count("state") == 2  # 2 then 4: nothing redundant


def test_connect_refused_gives_error_and_closed(
        worker: VbdWorker, xs: FakeXenStore, mocker: MockerFixture) -> None:
    mocker.patch.object(TapdiskClient, "connect_xenblkif",
                        side_effect=CtlError(errno.EBUSY, "minor 0 serves another ring"))
    mocker.patch.object(TapdiskClient, "disconnect_xenblkif")
    _publish_transport(xs)
    worker.post(Prompt.REFRESH)
    b = PATHS.backend_key
    wait_for(lambda: xs.nodes.get(b("state")) == "6")
    assert "refused XENBLKIF_CONNECT" in xs.nodes[b("error")]


def test_unreachable_tapdisk_is_a_hotplug_failure(
        worker: VbdWorker, xs: FakeXenStore, mocker: MockerFixture) -> None:
    mocker.patch.object(TapdiskClient, "disk_info",
                        side_effect=CtlError(errno.ECONNREFUSED, "no tapdisk"))
    worker.post(Prompt.REFRESH)
    b = PATHS.backend_key
    wait_for(lambda: xs.nodes.get(b("state")) == "6")
    assert xs.nodes[b("error")].startswith("hotplug:")


def test_writes_never_recreate_a_removed_directory(
        worker: VbdWorker, xs: FakeXenStore, mocker: MockerFixture) -> None:
    # The toolstack removes the device while the tapdisk connects the ring.
    mocker.patch.object(TapdiskClient, "connect_xenblkif",
                        side_effect=lambda *a, **k: xs.rm(PATHS.backend))
    disconnect = mocker.patch.object(TapdiskClient, "disconnect_xenblkif")
    worker.post(Prompt.REFRESH)
    wait_for(lambda: xs.nodes.get(PATHS.backend_key("state")) == "2")
    _publish_transport(xs)
    worker.post(Prompt.REFRESH)
    wait_for(lambda: worker.finished)
    assert not xs.exists(PATHS.backend)  # the connect keys and state 4 were dropped
    assert worker.machine.state == "removed"
    assert disconnect.called  # the ring it had connected is taken down


def _worker(xs: FakeXenStore) -> VbdWorker:
    w = VbdWorker(PATHS, PATHS.frontend, SharedStore(lambda: xs),  # type: ignore[arg-type,return-value]
                  VbdConfig(Path("/nonexistent")), on_final=lambda worker: None,
                  on_tapdisk=lambda worker, pid: None)
    w.start()
    return w


def _connected_by_a_previous_tapback(xs: FakeXenStore, mocker: MockerFixture) -> VbdWorker:
    """Run a whole handshake with one worker, stop it, and return a second one."""
    first = _worker(xs)
    mocker.patch.object(TapdiskClient, "connect_xenblkif")
    _publish_transport(xs)
    xs.nodes[PATHS.frontend_key("state")] = "4"
    first.post(Prompt.REFRESH)
    wait_for(lambda: xs.nodes.get(PATHS.backend_key("state")) == "4")
    first.post(Prompt.STOP)
    first.join(5)
    xs.writes.clear()
    mocker.patch.object(TapdiskClient, "connect_xenblkif",
                        side_effect=CtlError(errno.EALREADY, "minor 0 is connected"))
    return _worker(xs)


def test_restarted_tapback_adopts_a_connected_vbd_without_writing(
        xs: FakeXenStore, mocker: MockerFixture) -> None:
    mocker.patch.object(TapdiskClient, "disk_info", return_value=ImageInfo(2048, 512, 0))
    second = _connected_by_a_previous_tapback(xs, mocker)
    try:
        second.post(Prompt.REFRESH)
        wait_for(lambda: second.machine.state == "connected")
        assert TapdiskClient.connect_xenblkif.called  # type: ignore[attr-defined]
        assert xs.writes == []  # no InitWait, no key written again
    finally:
        second.post(Prompt.STOP)
        second.join(5)


def test_adoption_writes_what_changed_while_no_tapback_ran(
        xs: FakeXenStore, mocker: MockerFixture) -> None:
    mocker.patch.object(TapdiskClient, "disk_info", return_value=ImageInfo(2048, 512, 0))
    second = _connected_by_a_previous_tapback(xs, mocker)
    try:
        # The image grew meanwhile: only `sectors` changes, and Connected is said again
        # (as after a resize) so that blkfront reads it.
        mocker.patch.object(TapdiskClient, "disk_info", return_value=ImageInfo(4096, 512, 0))
        second.post(Prompt.REFRESH)
        wait_for(lambda: second.machine.state == "connected")
        assert xs.writes == ["sectors", "state"]
        assert xs.nodes[PATHS.backend_key("sectors")] == "4096"
    finally:
        second.post(Prompt.STOP)
        second.join(5)


@pytest.mark.parametrize(("mode", "reply", "discard", "physical"), [
    ("w", ImageInfo(2048, 512, 0, 4096, 1), "1", "4096"),
    ("r", ImageInfo(2048, 512, 4, 4096, 1), "0", "4096"),  # read-only: no discard
    ("w", ImageInfo(2048, 512, 0, 512, 0), "0", "512"),    # cannot punch holes
    ("w", ImageInfo(2048, 4096, 0), "0", "4096"),          # a blktap tapdisk: not reported
])
def test_physical_sector_size_and_discard_come_from_the_tapdisk(
        xs: FakeXenStore, mocker: MockerFixture, mode: str, reply: ImageInfo,
        discard: str, physical: str) -> None:
    mocker.patch.object(TapdiskClient, "disk_info", return_value=reply)
    mocker.patch.object(TapdiskClient, "connect_xenblkif")
    xs.nodes[PATHS.backend_key("mode")] = mode
    w = _worker(xs)
    try:
        _publish_transport(xs)
        w.post(Prompt.REFRESH)
        b = PATHS.backend_key
        wait_for(lambda: xs.nodes.get(b("state")) == "4")
        assert xs.nodes[b("feature-discard")] == discard
        assert (b("discard-granularity") in xs.nodes) is (discard == "1")
        assert xs.nodes[b("physical-sector-size")] == physical
    finally:
        w.post(Prompt.STOP)
        w.join(5)


# -- a guest that locks us out of its own nodes, or floods them ------------------------


class LockedOut(FakeXenStore):
    """A store in which some front-end nodes refuse us (the guest changed their
    permissions: it owns them, and a driver domain is not privileged)."""

    def __init__(self) -> None:
        super().__init__()
        self.denied: set[str] = set()

    def read_optional(self, path: str) -> str | None:
        if path in self.denied:
            raise XenStorePermissionError(errno.EACCES, path=path)
        return super().read_optional(path)


@pytest.fixture
def locked(xs: FakeXenStore) -> LockedOut:
    store = LockedOut()
    store.nodes.update(xs.nodes)
    return store


def test_an_unreadable_transport_key_gives_error_and_closed(
        locked: LockedOut, mocker: MockerFixture) -> None:
    mocker.patch.object(TapdiskClient, "disk_info", return_value=ImageInfo(2048, 512, 0))
    connect = mocker.patch.object(TapdiskClient, "connect_xenblkif")
    w = _worker(locked)
    try:
        w.post(Prompt.REFRESH)
        b = PATHS.backend_key
        wait_for(lambda: locked.nodes.get(b("state")) == "2")
        _publish_transport(locked)
        locked.denied.add(PATHS.frontend_key("ring-ref"))
        w.post(Prompt.REFRESH)
        wait_for(lambda: locked.nodes.get(b("state")) == "6")
        assert "ring-ref" in locked.nodes[b("error")]
        assert not connect.called
    finally:
        w.post(Prompt.STOP)
        w.join(5)


def test_an_unreadable_frontend_state_gives_error_and_closed(
        locked: LockedOut, mocker: MockerFixture) -> None:
    mocker.patch.object(TapdiskClient, "disk_info", return_value=ImageInfo(2048, 512, 0))
    w = _worker(locked)
    try:
        w.post(Prompt.REFRESH)
        b = PATHS.backend_key
        wait_for(lambda: locked.nodes.get(b("state")) == "2")
        locked.denied.add(PATHS.frontend_key("state"))
        w.post(Prompt.FRONTEND)
        wait_for(lambda: locked.nodes.get(b("state")) == "6")
        assert "state" in locked.nodes[b("error")]
        # and the toolstack can still take the device away
        locked.nodes[b("online")] = "0"
        w.post(Prompt.REFRESH)
        wait_for(lambda: w.finished)
        assert w.machine.state == "unregistered"
    finally:
        w.post(Prompt.STOP)
        w.join(5)


def test_a_watch_storm_queues_a_bounded_number_of_prompts(xs: FakeXenStore) -> None:
    """The main thread posts one prompt per watch event; a worker stuck in a slow step
    must not let a guest flooding its state node grow that queue without bound."""
    w = VbdWorker(PATHS, PATHS.frontend, SharedStore(lambda: xs),  # type: ignore[arg-type,return-value]
                  VbdConfig(Path("/nonexistent")), on_final=lambda worker: None,
                  on_tapdisk=lambda worker, pid: None)  # never started: a stuck worker
    for _ in range(10_000):
        w.post(Prompt.FRONTEND)
        w.post(Prompt.REFRESH)
    assert w.pending <= len(Prompt)


# -- what the spec decides, seen through the worker ------------------------------------


def _connected(xs: FakeXenStore, mocker: MockerFixture,
               states: list[tuple[str, int | None]] | None = None) -> VbdWorker:
    mocker.patch.object(TapdiskClient, "connect_xenblkif")
    mocker.patch.object(TapdiskClient, "disk_info", return_value=ImageInfo(2048, 512, 0))
    w = VbdWorker(PATHS, PATHS.frontend, SharedStore(lambda: xs),  # type: ignore[arg-type,return-value]
                  VbdConfig(Path("/nonexistent")), on_final=lambda worker: None,
                  on_tapdisk=lambda worker, pid: None,
                  on_state=lambda worker: (states if states is not None else []).append(
                      (worker.machine.state, worker.machine.published)))
    _publish_transport(xs)
    w.step([Prompt.REFRESH])  # no thread: each step is run here
    assert w.machine.state == "connected"
    return w


def test_an_image_reopened_bigger_is_announced(
        xs: FakeXenStore, mocker: MockerFixture) -> None:
    w = _connected(xs, mocker)
    xs.writes.clear()
    mocker.patch.object(TapdiskClient, "disk_info", return_value=ImageInfo(4096, 512, 0))
    w.step([Prompt.RESIZE, Prompt.RESIZE])  # coalesced: asked once
    assert TapdiskClient.disk_info.call_count == 1  # type: ignore[attr-defined]
    assert xs.writes == ["sectors", "state"]
    assert xs.nodes[PATHS.backend_key("sectors")] == "4096"


def test_only_the_death_of_its_own_tapdisk_fails_the_vbd(
        xs: FakeXenStore, mocker: MockerFixture) -> None:
    mocker.patch.object(TapdiskClient, "disconnect_xenblkif")
    w = _connected(xs, mocker)
    w.step([Died(999)])
    assert w.machine.state == "connected"
    w.step([Died(123)])  # physical-device-path names nbd123.0
    assert w.machine.state == "failed"
    assert xs.nodes[PATHS.backend_key("error")] == "tapdisk 123 died"


def test_each_step_that_moved_the_machine_is_reported_once(
        xs: FakeXenStore, mocker: MockerFixture) -> None:
    states: list[tuple[str, int | None]] = []
    w = _connected(xs, mocker, states)
    assert states[-1] == ("connected", 4)
    count = len(states)
    w.step([Prompt.REFRESH])  # nothing changed: nothing to report
    assert len(states) == count


def test_a_directory_that_cannot_be_read_is_found_at_the_next_prompt(
        xs: FakeXenStore, mocker: MockerFixture) -> None:
    w = VbdWorker(PATHS, PATHS.frontend, SharedStore(lambda: xs),  # type: ignore[arg-type,return-value]
                  VbdConfig(Path("/nonexistent")), on_final=lambda worker: None,
                  on_tapdisk=lambda worker, pid: None)
    mocker.patch.object(xs, "ls", side_effect=XenStoreNotFound(errno.ENOENT))
    with pytest.raises(XenStoreNotFound):
        w.step([Prompt.REFRESH])
    assert xs.writes == []  # nothing fed before the machine knew its directory
    mocker.stopall()
    mocker.patch.object(TapdiskClient, "disk_info", return_value=ImageInfo(2048, 512, 0))
    w.step([Prompt.REFRESH])
    assert xs.nodes[PATHS.backend_key("state")] == "2"
