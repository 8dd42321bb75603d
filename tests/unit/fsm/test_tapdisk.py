"""The tapdisk machines: VBD control sequences and state bits, process lifecycle."""

from __future__ import annotations

import errno

import pytest

from blktap3.fsm import (
    Attach,
    CleanupRuntime,
    Close,
    CloseImage,
    ConnectRing,
    ControlSocketReady,
    Detach,
    DisconnectRing,
    DiskInfo,
    Drained,
    ExitProcess,
    ExitRequested,
    ImageError,
    ImageOpened,
    ImageOpenFailed,
    Open,
    OpenImage,
    OurBug,
    Pause,
    ProcessExited,
    QuiesceRing,
    Reply,
    Resume,
    SpawnFailed,
    StartRing,
    StopRing,
    TapdiskProcess,
    TapdiskVbd,
    ToolstackError,
    UnquiesceRing,
    VbdAdded,
    VbdRemoved,
)

DISK = DiskInfo(sectors=1 << 20)


def open_vbd(ring: bool = True) -> TapdiskVbd:
    vbd = TapdiskVbd(minor=0)
    assert vbd.handle(Attach()) == (Reply(),)
    assert vbd.handle(Open("/img", flags=0x2)) == (OpenImage("/img", 0x2),)
    assert vbd.handle(ImageOpened(DISK)) == (Reply(disk=DISK),)
    if ring:
        assert vbd.handle(ConnectRing(1, 51712)) == (StartRing(1, 51712), Reply())
    return vbd


def pause(vbd: TapdiskVbd) -> None:
    assert vbd.handle(Pause()) == (QuiesceRing(),)
    assert vbd.state_bits == 0x14  # QUIESCE_REQUESTED | PAUSE_REQUESTED
    assert vbd.handle(Drained()) == (CloseImage(), Reply())


def test_state_bits_follow_tap_ctl_list() -> None:
    vbd = TapdiskVbd(minor=0)
    vbd.handle(Attach())
    assert vbd.state_bits == 0  # attached: state=0
    vbd = open_vbd()
    assert vbd.state_bits == 0
    pause(vbd)
    assert vbd.state == "open_paused"
    assert vbd.state_bits == 0x2A  # as blktap's `tap-ctl list` shows a paused VBD
    vbd.handle(Resume())
    vbd.handle(ImageOpened(DISK))
    vbd.handle(Close())
    assert vbd.state_bits == 0x2


def test_resume_with_a_new_path_reopens_and_unquiesces_the_ring() -> None:
    vbd = open_vbd()
    pause(vbd)
    assert vbd.handle(Resume("/new")) == (OpenImage("/new", 0x2),)
    assert vbd.handle(ImageOpened(DISK)) == (UnquiesceRing(), Reply())
    assert vbd.state == "open_connected"
    assert vbd.path == "/new"


def test_resume_without_a_ring_goes_back_to_ready() -> None:
    vbd = open_vbd(ring=False)
    pause(vbd)
    vbd.handle(Resume())
    assert vbd.handle(ImageOpened(DISK)) == (Reply(),)
    assert vbd.state == "open_ready"


def test_resume_refuses_a_changed_geometry() -> None:
    vbd = open_vbd()
    pause(vbd)
    vbd.handle(Resume("/other"))
    effects = vbd.handle(ImageOpened(DiskInfo(sectors=5)))
    assert effects == (CloseImage(), Reply(error=errno.EMEDIUMTYPE))
    assert vbd.state == "open_paused"
    assert vbd.state_bits == 0x2A | 0x200  # RESUME_FAILED


def test_open_failure_returns_to_attached_with_the_errno() -> None:
    vbd = TapdiskVbd(minor=0)
    vbd.handle(Attach())
    vbd.handle(Open("/missing"))
    assert vbd.handle(ImageOpenFailed(errno.ENOENT)) == (Reply(error=errno.ENOENT),)
    assert vbd.state == "attached"


def test_close_stops_the_ring_and_closes_the_image_then_detach() -> None:
    vbd = open_vbd()
    assert vbd.handle(Close()) == (StopRing(), CloseImage(), Reply())
    assert vbd.handle(Detach()) == (Reply(),)
    assert vbd.is_final


def test_close_while_draining_needs_force() -> None:
    vbd = open_vbd()
    vbd.handle(Pause())
    with pytest.raises(ToolstackError, match="conditions held"):
        vbd.handle(Close())
    assert vbd.state == "open_quiescing"
    assert vbd.handle(Close(force=True)) == (StopRing(), CloseImage(), Reply())


@pytest.mark.parametrize(
    ("event", "error"),
    [(Attach(), ToolstackError), (Detach(), ToolstackError), (DisconnectRing(), ToolstackError),
     (Drained(), OurBug), (ImageOpened(DISK), ImageError)],
)
def test_out_of_order_messages_raise_with_the_culprit(event: object, error: type) -> None:
    vbd = open_vbd(ring=False)
    with pytest.raises(error):
        vbd.handle(event)  # type: ignore[arg-type]
    assert vbd.state == "open_ready"


def test_process_lifecycle() -> None:
    p = TapdiskProcess()
    assert p.handle(ControlSocketReady(99)) == ()
    assert p.state == "running_idle"
    p.handle(VbdAdded(0))
    p.handle(VbdAdded(1))
    with pytest.raises(ToolstackError):
        p.handle(ExitRequested())  # VBDs attached
    p.handle(VbdRemoved(1))
    assert p.state == "running_serving"
    with pytest.raises(ToolstackError):
        p.handle(VbdRemoved(7))
    p.handle(VbdRemoved(0))
    assert p.state == "running_idle"
    assert p.handle(ExitRequested()) == (ExitProcess(),)
    assert p.handle(ProcessExited(0)) == (CleanupRuntime(99),)
    assert p.is_final


def test_a_crashed_tapdisk_is_cleaned_up() -> None:
    p = TapdiskProcess()
    p.handle(ControlSocketReady(42))
    p.handle(VbdAdded(0))
    assert p.handle(ProcessExited(-9)) == (CleanupRuntime(42),)


def test_a_tapdisk_dying_at_start_is_reported() -> None:
    p = TapdiskProcess()
    assert p.handle(SpawnFailed("no /dev/shm")) == ()
    assert p.state == "dead"
