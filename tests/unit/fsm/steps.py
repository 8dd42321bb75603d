"""Steps the back-end machine's unit tests share: a front-end state, hotplug with the
tapdisk's DISK_INFO answer, the front-end's keys and the ring, a Connected VBD.

Each module keeps its own disk and transport (what it tests differs); the steps take them.
"""

from __future__ import annotations

from blktap3.fsm import (
    BackendFound,
    BackendVbd,
    DiskInfo,
    DiskInfoQuery,
    DiskInfoRead,
    FrontendStateChanged,
    HotplugConnected,
    PublishState,
    RingConnected,
    SendControl,
    TapdiskRef,
    Toolstack,
    TransportRead,
    WatchTapdisk,
    XenbusState,
)

S = XenbusState
TAPDISK = TapdiskRef(pid=77, minor=3)


def fe(state: XenbusState) -> FrontendStateChanged:
    return FrontendStateChanged(state)


def published(effects: tuple[object, ...]) -> list[int]:
    """The states an event's effects publish, in order."""
    return [e.state.value for e in effects if isinstance(e, PublishState)]


def hotplug(vbd: BackendVbd, disk: DiskInfo,
            via: str | None = "querying_disk") -> tuple[object, ...]:
    """hotplug-status=connected, then the tapdisk's answer to DISK_INFO: its effects.
    `via` is the state that waits for the answer (None: not checked, as for a VBD whose
    front-end has gone)."""
    assert vbd.handle(HotplugConnected(TAPDISK)) == (
        WatchTapdisk(TAPDISK), SendControl(DiskInfoQuery(TAPDISK.pid, TAPDISK.minor)))
    assert via is None or vbd.state == via
    return vbd.handle(DiskInfoRead(disk))


def connect(vbd: BackendVbd, transport: TransportRead) -> None:
    """From InitWait: the front-end's keys, the ring, Connected."""
    vbd.handle(fe(S.INITIALISED))
    vbd.handle(transport)
    vbd.handle(RingConnected())
    assert vbd.state == "connected" and vbd.published == S.CONNECTED


def connected(disk: DiskInfo, transport: TransportRead,
              toolstack: Toolstack = Toolstack.XAPI) -> BackendVbd:
    """A VBD found at Initialising, hotplugged and connected."""
    vbd = BackendVbd(domid=5, devid=768, toolstack=toolstack)
    vbd.handle(BackendFound(S.INITIALISING))
    vbd.handle(fe(S.INITIALISING))
    hotplug(vbd, disk)
    connect(vbd, transport)
    return vbd
