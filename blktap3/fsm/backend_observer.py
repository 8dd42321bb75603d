"""What tapback sees of one VBD in XenStore, turned into back-end machine events.  No I/O.

`BackendObserver` is the one place where store contents become `BackendVbd` events: the
tapback daemon (`blktap3.tapback.worker`) and the in-memory pair of the tests
(`blktap3.sim.memory.VbdPair`) both read what they watch into a snapshot and hand it
here, so they cannot disagree.  It reports CHANGES and decides nothing the protocol
decides: whether an event matters in the machine's current state (a hotplug reported
again, `online=1` at start, a tapdisk death that is not this VBD's, ...) is a row or
an `[[ignore]]` of specs/backend_vbd.toml.  It never looks at the machine.

Inputs (raw node values as read; None: the node does not exist):

- `BackendDirectory(keys)`, once, first: every node of our back-end directory
  (`state` included) when tapback found the VBD.
- `BackendSnapshot`, each time tapback re-reads what it watches:
    backend_exists        whether our directory still exists (the rest is then ignored);
    frontend_state        the front-end's `state` node, or `UNREADABLE` when it refuses us;
    hotplug_status        `hotplug-status`;
    hotplug_error         `hotplug-error` (why, when hotplug failed);
    physical_device_path  `physical-device-path` (`.../nbd<pid>.<minor>`);
    online                `online`.
- `observe_frontend(value)`: only the front-end's `state` node was read again.

Events out, in this order within one snapshot:

- `BackendFound(state, keys, readonly, cdrom, removable)` from the directory: `state`
  parsed strictly (None when absent or not a xenbus state), `keys` every other node;
  `readonly` when `mode` starts with "r", `cdrom` when `device-type` is "cdrom",
  `removable` when `removable` is "1"; `discard_enabled` unless `discard-enable` is "0";
  `polling_duration`/`polling_idle_threshold` from blktap's polling keys (0: off);
- `BackendRemoved()` once, when the directory is gone;
- the front-end's state when its value changed (the first snapshot always reports
  it): `FrontendStateChanged(state)`, `FrontendStateInvalid(raw)`,
  `FrontendStateUnreadable()` or `FrontendVanished()`;
- hotplug, when what the hotplug nodes say changed: nothing while `hotplug-status` is
  absent; for "connected", `HotplugConnected(tapdisk)` with the pid and minor of
  `physical-device-path`, or `HotplugFailed` when that path is missing or names no
  tapdisk; for any other status `HotplugFailed(hotplug-error, or the status)`;
- `OnlineChanged(online)` when it changed, and in the first snapshot: `online` is False
  only for "0" (an absent node is the default, online).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from .events import (
    BackendFound,
    BackendRemoved,
    Event,
    FrontendStateChanged,
    FrontendStateInvalid,
    FrontendStateUnreadable,
    FrontendVanished,
    HotplugConnected,
    HotplugFailed,
    OnlineChanged,
    TapdiskRef,
)
from .xenbus_state import parse_xenbus_state

STATE_KEY: Final = "state"
REASON_MAX = 200  # characters of a guest's or a script's text passed to the error node
RAW_MAX = 64


class Unreadable(enum.Enum):
    """A node that exists but that we may not read (EACCES)."""

    UNREADABLE = "unreadable"


UNREADABLE: Final = Unreadable.UNREADABLE
FrontendValue = str | None | Literal[Unreadable.UNREADABLE]
DeviceParser = Callable[[str], TapdiskRef]  # raises ValueError saying what is wrong


@dataclass(frozen=True)
class BackendDirectory:
    """Every node of the back-end directory when tapback found the VBD."""

    keys: tuple[tuple[str, str], ...] = ()

    def get(self, key: str) -> str | None:
        return dict(self.keys).get(key)


@dataclass(frozen=True)
class BackendSnapshot:
    """What tapback watches of one VBD, as read (None: node absent)."""

    backend_exists: bool
    frontend_state: FrontendValue = None
    hotplug_status: str | None = None
    hotplug_error: str | None = None
    physical_device_path: str | None = None
    online: str | None = None


_NOT_SEEN: Final = object()  # nothing reported yet
POLL_US_MAX: Final = 1_000_000  # the longest spin the data path takes (a second)


def _bounded(raw: str | None, hi: int) -> int:
    """A toolstack's decimal 0..hi; anything else (absent, junk, too large) is 0: off."""
    if raw is None or not raw.isascii() or not raw.isdecimal() or len(raw) > 7:
        return 0
    value = int(raw)
    return value if value <= hi else 0


class BackendObserver:
    """Snapshots in, `BackendVbd` events out (see the module docstring)."""

    def __init__(self, parse_device: DeviceParser) -> None:
        self._parse_device = parse_device
        self._frontend: object = _NOT_SEEN
        self._hotplug: object = None  # the last hotplug event reported (None: none)
        self._online: bool | None = None
        self._removed = False

    def found(self, directory: BackendDirectory) -> list[Event]:
        """The first events of a VBD: what its directory holds."""
        raw_state = directory.get(STATE_KEY)
        mode = directory.get("mode") or ""
        return [BackendFound(
            parse_xenbus_state(raw_state) if raw_state is not None else None,
            tuple((k, v) for k, v in directory.keys if k != STATE_KEY),
            readonly=mode.startswith("r"),
            cdrom=directory.get("device-type") == "cdrom",
            removable=directory.get("removable") == "1",
            discard_enabled=directory.get("discard-enable") != "0",
            polling_duration=_bounded(directory.get("polling-duration"), POLL_US_MAX),
            polling_idle_threshold=_bounded(directory.get("polling-idle-threshold"), 100),
        )]

    def observe(self, snapshot: BackendSnapshot) -> list[Event]:
        """The events that what changed since the last snapshot makes."""
        if not snapshot.backend_exists:
            if self._removed:
                return []
            self._removed = True
            return [BackendRemoved()]
        events = self.observe_frontend(snapshot.frontend_state)
        hotplug = self._hotplug_event(snapshot)
        if hotplug != self._hotplug:
            self._hotplug = hotplug
            if hotplug is not None:
                events.append(hotplug)
        online = snapshot.online != "0"
        if online != self._online:
            self._online = online
            events.append(OnlineChanged(online))
        return events

    def observe_frontend(self, value: FrontendValue) -> list[Event]:
        """The event for the front-end's `state` node, if its value changed."""
        if value == self._frontend:
            return []
        self._frontend = value
        if value is None:
            return [FrontendVanished()]
        if value is UNREADABLE:
            return [FrontendStateUnreadable()]
        state = parse_xenbus_state(value)
        if state is None:
            return [FrontendStateInvalid(value[:RAW_MAX])]
        return [FrontendStateChanged(state)]

    def _hotplug_event(self, snapshot: BackendSnapshot) -> Event | None:
        status = snapshot.hotplug_status
        if status is None:
            return None
        if status != "connected":
            # Xen's hotplug scripts say why in `hotplug-error`: pass it on.
            why = snapshot.hotplug_error
            return HotplugFailed(why[:REASON_MAX] if why
                                 else f"hotplug-status is {status[:RAW_MAX]!r}")
        if snapshot.physical_device_path is None:
            return HotplugFailed("physical-device-path missing")
        try:
            return HotplugConnected(self._parse_device(snapshot.physical_device_path))
        except ValueError as exc:
            return HotplugFailed(str(exc)[:REASON_MAX])
