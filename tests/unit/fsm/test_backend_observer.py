"""The back-end observer: snapshots of what tapback watches in, changes out as events."""

from __future__ import annotations

import pytest

from blktap3.fsm import (
    UNREADABLE,
    BackendDirectory,
    BackendFound,
    BackendObserver,
    BackendRemoved,
    BackendSnapshot,
    FrontendStateChanged,
    FrontendStateInvalid,
    FrontendStateUnreadable,
    FrontendVanished,
    HotplugConnected,
    HotplugFailed,
    OnlineChanged,
    TapdiskRef,
    XenbusState,
)


def parse(value: str) -> TapdiskRef:
    pid, _, minor = value.rpartition("/nbd")[2].partition(".")
    if not pid.isdigit() or not minor.isdigit():
        raise ValueError(f"not a device: {value}")
    return TapdiskRef(int(pid), int(minor))


def snap(**nodes: str | None) -> BackendSnapshot:
    values: dict[str, str | None] = {"frontend_state": "1", "online": "1"}
    values.update(nodes)
    return BackendSnapshot(backend_exists=True, **values)


HOTPLUG = {"hotplug_status": "connected", "physical_device_path": "/run/b/nbd77.3"}


def test_the_directory_becomes_backend_found_with_the_toolstacks_disk_kind() -> None:
    directory = BackendDirectory((("frontend", "/local/domain/5/device/vbd/768"),
                                  ("mode", "r"), ("device-type", "cdrom"), ("state", "4"),
                                  ("sectors", "2048")))
    assert BackendObserver(parse).found(directory) == [BackendFound(
        XenbusState.CONNECTED,
        (("frontend", "/local/domain/5/device/vbd/768"), ("mode", "r"),
         ("device-type", "cdrom"), ("sectors", "2048")),
        readonly=True, cdrom=True, removable=False)]


@pytest.mark.parametrize(("raw", "enabled"), [(None, True), ("1", True), ("0", False),
                                              ("", True)])
def test_discard_enable_0_is_the_toolstack_withholding_discard(raw: str | None,
                                                               enabled: bool) -> None:
    keys = (("discard-enable", raw),) if raw is not None else ()
    (found,) = BackendObserver(parse).found(BackendDirectory(keys))
    assert isinstance(found, BackendFound) and found.discard_enabled is enabled


@pytest.mark.parametrize(("duration", "threshold", "want"), [
    (None, None, (0, 0)),
    ("200", "50", (200, 50)),
    ("1000000", "100", (1_000_000, 100)),
    ("1000001", "101", (0, 0)),        # out of range: off, not clamped
    ("-5", "+50", (0, 0)),
    ("2e2", "\u0665\u0660", (0, 0)),  # not plain ASCII decimals (Arabic-Indic 50)
    ("99999999999", "", (0, 0)),
])
def test_polling_keys_are_the_toolstacks_bounded_or_off(
        duration: str | None, threshold: str | None, want: tuple[int, int]) -> None:
    keys = tuple((k, v) for k, v in (("polling-duration", duration),
                                     ("polling-idle-threshold", threshold)) if v is not None)
    (found,) = BackendObserver(parse).found(BackendDirectory(keys))
    assert isinstance(found, BackendFound)
    assert (found.polling_duration, found.polling_idle_threshold) == want


@pytest.mark.parametrize("state", [None, "+4", "9"])
def test_a_directory_without_a_usable_state_is_found_with_none(state: str | None) -> None:
    keys = (("state", state),) if state is not None else ()
    (found,) = BackendObserver(parse).found(BackendDirectory(keys))
    assert isinstance(found, BackendFound) and found.state is None and found.keys == ()


def test_the_first_snapshot_says_everything_even_online_1() -> None:
    observer = BackendObserver(parse)
    assert observer.observe(snap(**HOTPLUG)) == [
        FrontendStateChanged(XenbusState.INITIALISING),
        HotplugConnected(TapdiskRef(77, 3)),
        OnlineChanged(True),  # the default: the spec makes it a no-op
    ]


def test_only_changes_are_reported() -> None:
    observer = BackendObserver(parse)
    observer.observe(snap(**HOTPLUG))
    assert observer.observe(snap(**HOTPLUG)) == []
    assert observer.observe(snap(**HOTPLUG, frontend_state="3", online="0")) == [
        FrontendStateChanged(XenbusState.INITIALISED), OnlineChanged(False)]
    assert observer.observe_frontend("3") == []
    assert observer.observe_frontend("5") == [FrontendStateChanged(XenbusState.CLOSING)]


def test_hotplug_is_reported_each_time_what_it_says_changes() -> None:
    observer = BackendObserver(parse)
    assert observer.observe(snap()) == [FrontendStateChanged(XenbusState.INITIALISING),
                                        OnlineChanged(True)]
    assert observer.observe(snap(**HOTPLUG)) == [HotplugConnected(TapdiskRef(77, 3))]
    # an error node beside a connected status says nothing new
    assert observer.observe(snap(**HOTPLUG, hotplug_error="late")) == []
    moved = {**HOTPLUG, "physical_device_path": "/run/b/nbd78.0"}
    assert observer.observe(snap(**moved)) == [HotplugConnected(TapdiskRef(78, 0))]
    assert observer.observe(snap(hotplug_status="error", hotplug_error="tap-ctl create: x")) == [
        HotplugFailed("tap-ctl create: x")]
    assert observer.observe(snap()) == []  # status gone: nothing to say
    assert observer.observe(snap(**moved)) == [HotplugConnected(TapdiskRef(78, 0))]


@pytest.mark.parametrize(("nodes", "reason"), [
    ({"hotplug_status": "error"}, "hotplug-status is 'error'"),
    ({"hotplug_status": "connected"}, "physical-device-path missing"),
    ({"hotplug_status": "connected", "physical_device_path": "/dev/sda"},
     "not a device: /dev/sda"),
])
def test_an_unusable_hotplug_is_a_failure(nodes: dict[str, str], reason: str) -> None:
    events = BackendObserver(parse).observe(snap(**nodes))
    assert HotplugFailed(reason) in events


@pytest.mark.parametrize(("value", "event"), [
    (None, FrontendVanished()),
    (UNREADABLE, FrontendStateUnreadable()),
    ("04", FrontendStateInvalid("04")),
    ("x" * 100, FrontendStateInvalid("x" * 64)),
    ("6", FrontendStateChanged(XenbusState.CLOSED)),
])
def test_the_frontend_state_node(value: str | None, event: object) -> None:
    assert BackendObserver(parse).observe_frontend(value) == [event]


def test_the_directory_gone_is_said_once_and_nothing_else() -> None:
    observer = BackendObserver(parse)
    observer.observe(snap(**HOTPLUG))
    assert observer.observe(BackendSnapshot(backend_exists=False)) == [BackendRemoved()]
    assert observer.observe(BackendSnapshot(backend_exists=False)) == []
