"""Declarative state machines: specs loader, machines, events, effects.  No I/O.

The machines are data (`specs/*.toml`, see `blktap3.fsm.spec` for the format) loaded into
`transitions` (no auto transitions, invalid triggers raise, queued).  A machine never
touches XenStore, a socket or a file: you feed it an *event*, it returns the *effects*
you must execute, in order, and you feed the results back as events.

    from blktap3.fsm import BackendVbd, FrontendStateChanged, XenbusState, FsmError

    vbd = BackendVbd(domid=1, devid=51712)            # backend/vbd3/1/51712
    vbd.handle(HotplugConnected(TapdiskRef(pid, minor)))  # -> SendControl(DiskInfoQuery)
    for effect in vbd.handle(DiskInfoRead(DiskInfo(sectors))):
        execute(effect)                                # WriteKeys, PublishState, ...
    vbd.handle(FrontendStateChanged(XenbusState.INITIALISED))  # -> ReadFrontendTransport
    vbd.handle(TransportRead(RingTransport((ref,), port, BlkifProtocol.X86_64)))
                                                       # -> SendControl(XenblkifConnect)
    vbd.handle(RingConnected())      # -> WriteKeys(features+sectors+info+...), PublishState(4)
    vbd.state, vbd.published, vbd.is_final             # "connected", XenbusState.CONNECTED

tapback feeds `BackendFound(state, keys, ...)` first (what the directory holds): a
Connected VBD left by a previous tapback is adopted without a write the front-end would
see.  What tapback observes in XenStore becomes events in ONE place,
`BackendObserver` (backend_observer.py: snapshots in, events out, no I/O).

Machines (each `.handle(event) -> tuple[Effect, ...]`, `.state: str`, `.is_final`):
  `BackendVbd(domid, devid, backend_domid=0, features=BackendFeatures(),
             toolstack=Toolstack.XAPI)`  tapback, per VBD (libxl: InitWait before hotplug)
  `FrontendVbd(domid, backend_domid=0, options=FrontendOptions())`  a blkfront; its
                                     observer `observe_backend(read)` makes its events
  `TapdiskProcess()`                 spawning, running{idle, serving}, exiting, dead
  `TapdiskVbd(minor)`                one VBD inside a tapdisk; `.state_bits` for tap-ctl list

Contract for owners: execute the effects of one `handle` call in order; answer an effect
that asks a question (`ReadFrontendTransport`, `ReadBackendInfo`, `SendControl`,
`OpenImage`, `StartRing`, `QuiesceRing`) with its result event before feeding the next
event (a state that `awaits` an answer refuses anything else as `OurBug`); once a
machine `is_final`, forget it and drop late replies.  `WriteKeys` is ONE transaction.
An effect the owner does not know is our bug: it raises.

Errors: an event the spec does not allow raises an `FsmError` subclass naming who is to
blame - `OurBug`, `FrontendError`, `BackendError`, `TapdiskError`, `ImageError`,
`ToolstackError` - with `.machine`, `.state`, `.event`; the machine is left unchanged.
A request (a trigger with `errno` in its spec, the tapdisk's control messages) is never
refused that way: the machine answers `Reply(error=...)`, as the spec says.
Front-end misbehaviour never raises in `BackendVbd`: every front-end state is handled or
explicitly ignored in every state that awaits no answer (`blktap3-fsm check` prints the
table), and bad values lead to `SetError` + Closed.  Likewise back-end misbehaviour never
raises in `FrontendVbd` (an out-of-protocol state is a `ReportFault`, and the machine
stays).  `SpecError` means a malformed spec.

Tools: `blktap3-fsm check` (spec checks, dead rows included), `blktap3-diagram`
(DOT/SVG/PNG/Mermaid), and `blktap3.sim.memory.VbdPair` (both ends wired through an
in-memory store, the back-end through this observer and tapback's own readers).
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import BackendFeatures, BackendState, BackendVbd, Toolstack
    from .backend_observer import (
        UNREADABLE,
        BackendDirectory,
        BackendObserver,
        BackendSnapshot,
        FrontendValue,
        Unreadable,
    )
    from .effects import (
        AcceptImage,
        CleanupRuntime,
        CloseImage,
        ControlMessage,
        DiscardImage,
        DiskInfoQuery,
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
        Reply,
        ReportFault,
        SendControl,
        SetError,
        StartRing,
        StopRing,
        UnquiesceRing,
        Unregister,
        WatchTapdisk,
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
        DiskInfoFailed,
        DiskInfoRead,
        Drained,
        DrainFailed,
        EffectFailed,
        Event,
        ExitRequested,
        FrontendStateChanged,
        FrontendStateInvalid,
        FrontendStateUnreadable,
        FrontendVanished,
        GetDiskInfo,
        HotplugConnected,
        HotplugFailed,
        ImageChanged,
        ImageOpened,
        ImageOpenFailed,
        OnlineChanged,
        Open,
        Pause,
        ProcessExited,
        QueueRing,
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

# The names below are imported on first use (PEP 562), each from the first of these
# modules that has it: a tapdisk, which needs the tapdisk's machines only, does not load
# the back-end's and front-end's (their events, effects and tables) at every start-up.
_MODULES = ("xenbus_state", "errors", "events", "effects", "spec", "machine", "tapdisk",
            "backend", "backend_observer", "frontend")


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in __all__:
        for module_name in _MODULES:
            module = importlib.import_module(f"{__name__}.{module_name}")
            if name in vars(module):
                value = vars(module)[name]
                globals()[name] = value
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "UNREADABLE",
    "AcceptImage",
    "Attach",
    "BackendDirectory",
    "BackendError",
    "BackendFeatures",
    "BackendFound",
    "BackendInfoInvalid",
    "BackendInfoRead",
    "BackendObserver",
    "BackendRemoved",
    "BackendSnapshot",
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
    "DiskInfoFailed",
    "DiskInfoQuery",
    "DiskInfoRead",
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
    "FrontendStateUnreadable",
    "FrontendTransportConfig",
    "FrontendValue",
    "FrontendVanished",
    "FrontendVbd",
    "FsmError",
    "GetDiskInfo",
    "HotplugConnected",
    "HotplugFailed",
    "ImageChanged",
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
    "QueueRing",
    "QuiesceRing",
    "ReadBackendInfo",
    "ReadFrontendTransport",
    "ReleaseMinor",
    "ReleaseRing",
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
    "Toolstack",
    "ToolstackError",
    "TransportInvalid",
    "TransportRead",
    "UnquiesceRing",
    "Unreadable",
    "Unregister",
    "VbdAdded",
    "VbdRemoved",
    "VbdState",
    "WatchTapdisk",
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
