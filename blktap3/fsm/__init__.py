"""Declarative state machines: specs loader, machines, events, effects.  No I/O.

The machines are data (`specs/*.toml`, see `blktap3.fsm.spec` for the format) loaded into
`transitions` (no auto transitions, invalid triggers raise, queued).  A machine never
touches XenStore, a socket or a file: you feed it an *event*, it returns the *effects*
you must execute, in order, and you feed the results back as events.

    from blktap3.fsm import BackendVbd, FrontendStateChanged, XenbusState, FsmError

    vbd = BackendVbd(domid=1, devid=51712)            # backend/vbd3/1/51712
    for effect in vbd.handle(HotplugConnected(TapdiskRef(pid, minor), DiskInfo(sectors))):
        execute(effect)                                # WriteKeys, PublishState, ...
    vbd.handle(FrontendStateChanged(XenbusState.INITIALISED))  # -> ReadFrontendTransport
    vbd.handle(TransportRead(RingTransport((ref,), port, "x86_64-abi")))
                                                       # -> SendControl(XenblkifConnect)
    vbd.handle(RingConnected())      # -> WriteKeys(features+sectors+info+...), PublishState(4)
    vbd.state, vbd.published, vbd.is_final             # "connected", XenbusState.CONNECTED

A tapback that starts on an existing directory feeds `BackendFound(state, keys)` first
(before hotplug): a Connected VBD is adopted without a write the front-end would see.

Machines (each `.handle(event) -> tuple[Effect, ...]`, `.state: str`, `.is_final`):
  `BackendVbd(domid, devid, backend_domid=0, features=BackendFeatures())`  tapback, per VBD
  `FrontendVbd(domid, backend_domid=0, options=FrontendOptions())`  a blkfront; its
                                     observer `observe_backend(read)` makes its events
  `TapdiskProcess()`                 spawning, running{idle, serving}, exiting, dead
  `TapdiskVbd(minor)`                one VBD inside a tapdisk; `.state_bits` for tap-ctl list

Contract for owners: execute the effects of one `handle` call in order; answer an effect
that asks a question (`ReadFrontendTransport`, `ReadBackendInfo`, `SendControl`,
`OpenImage`, `StartRing`, `QuiesceRing`) with its result event before feeding the next
event; once a machine `is_final`, forget it and drop late replies.  `WriteKeys` is ONE
transaction.

Errors: an event the spec does not allow raises an `FsmError` subclass naming who is to
blame - `OurBug`, `FrontendError`, `BackendError`, `TapdiskError`, `ImageError`,
`ToolstackError` - with `.machine`, `.state`, `.event`; the machine is left unchanged.
A request (a trigger with `errno` in its spec, the tapdisk's control messages) is never
refused that way: the machine answers `Reply(error=...)`, as the spec says.
Front-end misbehaviour never raises in `BackendVbd`: every front-end state is handled or
explicitly ignored in every state (`blktap3-fsm check` prints the table), and bad values
lead to `SetError` + Closed.  Likewise back-end misbehaviour never raises in `FrontendVbd`
(an out-of-protocol state is a `ReportFault`, and the machine stays).  `SpecError` means a
malformed spec.

Tools: `blktap3-fsm check` (spec checks), `blktap3-diagram` (DOT/SVG/PNG/Mermaid), and
`blktap3.fsm.testing.VbdPair` (both ends wired through an in-memory store, for tests).
"""

from .backend import BackendFeatures, BackendState, BackendVbd
from .effects import (
    AcceptImage,
    CleanupRuntime,
    CloseImage,
    ControlMessage,
    DiscardImage,
    Effect,
    ExitProcess,
    OfferRing,
    OpenImage,
    Perms,
    PublishState,
    QuiesceRing,
    ReadBackendInfo,
    ReadFrontendTransport,
    ReleaseMinor,
    ReleaseRing,
    RemoveDirectory,
    Reply,
    ReportFault,
    SendControl,
    SetError,
    StartRing,
    StopRing,
    UnquiesceRing,
    Unregister,
    WriteKeys,
    XenblkifConnect,
    XenblkifDisconnect,
)
from .errors import (
    BackendError,
    Blame,
    FrontendError,
    FsmError,
    ImageError,
    OurBug,
    SpecError,
    TapdiskError,
    ToolstackError,
)
from .events import (
    Attach,
    BackendFound,
    BackendInfoInvalid,
    BackendInfoRead,
    BackendRemoved,
    BackendStateChanged,
    BackendStateInvalid,
    BackendVanished,
    BlkifRing,
    Close,
    ConnectRing,
    ControlSocketReady,
    Detach,
    DeviceClose,
    DeviceFound,
    DeviceReconnect,
    DisconnectRing,
    DiskInfo,
    DiskResized,
    Drained,
    DrainFailed,
    EffectFailed,
    Event,
    ExitRequested,
    FrontendStateChanged,
    FrontendStateInvalid,
    FrontendVanished,
    GetDiskInfo,
    HotplugConnected,
    HotplugFailed,
    ImageOpened,
    ImageOpenFailed,
    OnlineChanged,
    Open,
    Pause,
    ProcessExited,
    Resume,
    RingConnected,
    RingConnectFailed,
    RingDisconnected,
    RingDisconnectFailed,
    RingOffered,
    RingOfferFailed,
    RingStarted,
    RingStartFailed,
    RingTransport,
    SpawnFailed,
    TapdiskDied,
    TapdiskRef,
    TransportInvalid,
    TransportRead,
    VbdAdded,
    VbdRemoved,
)
from .frontend import (
    FrontendOptions,
    FrontendState,
    FrontendTransportConfig,
    FrontendVbd,
    backend_event,
    observe_backend,
)
from .machine import SpecMachine
from .spec import MachineSpec, load_spec, spec_names
from .tapdisk import ProcessState, TapdiskProcess, TapdiskVbd, VbdState
from .xenbus_state import XenbusState, parse_xenbus_state

__all__ = [
    "AcceptImage",
    "Attach",
    "BackendError",
    "BackendFeatures",
    "BackendFound",
    "BackendInfoInvalid",
    "BackendInfoRead",
    "BackendRemoved",
    "BackendState",
    "BackendStateChanged",
    "BackendStateInvalid",
    "BackendVanished",
    "BackendVbd",
    "Blame",
    "BlkifRing",
    "CleanupRuntime",
    "Close",
    "CloseImage",
    "ConnectRing",
    "ControlMessage",
    "ControlSocketReady",
    "Detach",
    "DeviceClose",
    "DeviceFound",
    "DeviceReconnect",
    "DiscardImage",
    "DisconnectRing",
    "DiskInfo",
    "DiskResized",
    "DrainFailed",
    "Drained",
    "Effect",
    "EffectFailed",
    "Event",
    "ExitProcess",
    "ExitRequested",
    "FrontendError",
    "FrontendOptions",
    "FrontendState",
    "FrontendStateChanged",
    "FrontendStateInvalid",
    "FrontendTransportConfig",
    "FrontendVanished",
    "FrontendVbd",
    "FsmError",
    "GetDiskInfo",
    "HotplugConnected",
    "HotplugFailed",
    "ImageError",
    "ImageOpenFailed",
    "ImageOpened",
    "MachineSpec",
    "OfferRing",
    "OnlineChanged",
    "Open",
    "OpenImage",
    "OurBug",
    "Pause",
    "Perms",
    "ProcessExited",
    "ProcessState",
    "PublishState",
    "QuiesceRing",
    "ReadBackendInfo",
    "ReadFrontendTransport",
    "ReleaseMinor",
    "ReleaseRing",
    "RemoveDirectory",
    "Reply",
    "ReportFault",
    "Resume",
    "RingConnectFailed",
    "RingConnected",
    "RingDisconnectFailed",
    "RingDisconnected",
    "RingOfferFailed",
    "RingOffered",
    "RingStartFailed",
    "RingStarted",
    "RingTransport",
    "SendControl",
    "SetError",
    "SpawnFailed",
    "SpecError",
    "SpecMachine",
    "StartRing",
    "StopRing",
    "TapdiskDied",
    "TapdiskError",
    "TapdiskProcess",
    "TapdiskRef",
    "TapdiskVbd",
    "ToolstackError",
    "TransportInvalid",
    "TransportRead",
    "UnquiesceRing",
    "Unregister",
    "VbdAdded",
    "VbdRemoved",
    "VbdState",
    "WriteKeys",
    "XenblkifConnect",
    "XenblkifDisconnect",
    "XenbusState",
    "backend_event",
    "load_spec",
    "observe_backend",
    "parse_xenbus_state",
    "spec_names",
]
