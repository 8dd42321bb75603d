"""The tapdisk machines: VBD control sequences and state bits, process lifecycle."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from blktap3.fsm import (
    AcceptImage,
    Attach,
    BlkifRing,
    CleanupRuntime,
    Close,
    CloseImage,
    ConnectRing,
    ControlSocketReady,
    Detach,
    DiscardImage,
    DisconnectRing,
    DiskInfo,
    Drained,
    DrainFailed,
    Event,
    ExitProcess,
    ExitRequested,
    GetDiskInfo,
    ImageError,
    ImageOpened,
    ImageOpenFailed,
    Open,
    OpenImage,
    OurBug,
    Pause,
    ProcessExited,
    QuiesceRing,
    ReleaseMinor,
    Reply,
    Resume,
    RingStarted,
    RingStartFailed,
    SpawnFailed,
    StartRing,
    StopRing,
    TapdiskProcess,
    TapdiskVbd,
    ToolstackError,
    UnquiesceRing,
    VbdAdded,
    VbdRemoved,
    VbdState,
)

DISK = DiskInfo(sectors=1 << 20)
RING = BlkifRing(1, 51712, grefs=(8,), port=3)


def open_vbd(ring: bool = True) -> TapdiskVbd:
    vbd = TapdiskVbd(minor=0)
    assert vbd.handle(Attach()) == (Reply(),)
    assert vbd.handle(Open("aio:/img", flags=0x2)) == (OpenImage("aio:/img", 0x2),)
    assert vbd.handle(ImageOpened(DISK)) == (AcceptImage(), Reply(disk=DISK))
    if ring:
        assert vbd.handle(ConnectRing(RING)) == (StartRing(RING),)
        assert vbd.handle(RingStarted()) == (Reply(),)
    return vbd


def pause(vbd: TapdiskVbd) -> None:
    assert vbd.handle(Pause()) == (QuiesceRing(),)
    assert vbd.state_bits == 0x14  # QUIESCE_REQUESTED | PAUSE_REQUESTED
    assert vbd.handle(Drained()) == (CloseImage(), Reply())


def errno_of(effects: tuple[object, ...]) -> int:
    """The errno of a step that is exactly one refusal."""
    assert len(effects) == 1 and isinstance(effects[0], Reply), effects
    return effects[0].error


def test_state_bits_follow_tap_ctl_list() -> None:
    vbd = TapdiskVbd(minor=0)
    vbd.handle(Attach())
    assert vbd.state_bits == 0  # attached: state=0
    vbd = open_vbd()
    assert vbd.state_bits == 0
    pause(vbd)
    assert vbd.state == VbdState.OPEN_PAUSED
    assert vbd.state_bits == 0x2A  # as blktap's `tap-ctl list` shows a paused VBD
    vbd.handle(Resume())
    vbd.handle(ImageOpened(DISK))
    vbd.handle(Close())
    assert vbd.state_bits == 0x2


def test_resume_with_a_new_path_reopens_and_unquiesces_the_ring() -> None:
    vbd = open_vbd()
    pause(vbd)
    assert vbd.handle(Resume("aio:/new")) == (OpenImage("aio:/new", 0x2),)
    assert vbd.handle(ImageOpened(DISK)) == (AcceptImage(), UnquiesceRing(), Reply())
    assert vbd.state == VbdState.OPEN_CONNECTED
    assert vbd.params == "aio:/new"


def test_a_resume_keeps_the_mirror_not_the_log_unless_told_and_a_swap_drops_the_mirror(
) -> None:
    vbd = TapdiskVbd(minor=0)
    vbd.handle(Attach())
    assert vbd.handle(Open("aio:/img", 0x90, logpath="/l", secondary="nbd:/t")) == (
        OpenImage("aio:/img", 0x90, "/l", "nbd:/t"),)
    vbd.handle(ImageOpened(DISK))
    pause(vbd)
    # As blktap's resume_vbd: no ADD_LOG, no log any more; the secondary stays.
    assert vbd.handle(Resume()) == (OpenImage("aio:/img", 0x90, "", "nbd:/t"),)
    vbd.handle(ImageOpened(DISK))
    pause(vbd)
    # unpause -c / -2: a new log, a new secondary.
    assert vbd.handle(Resume(logpath="/l2", secondary="aio:/s")) == (
        OpenImage("aio:/img", 0x90, "/l2", "aio:/s"),)
    vbd.handle(ImageOpened(DISK))
    pause(vbd)
    # unpause -2 null: the secondary goes (blktap's tapdisk_vbd_add_secondary).
    assert vbd.handle(Resume(logpath="/l2", secondary="null")) == (
        OpenImage("aio:/img", 0x90, "/l2", ""),)
    vbd.handle(ImageOpened(DISK))
    pause(vbd)
    vbd.handle(Resume(secondary="aio:/s"))
    vbd.handle(ImageOpened(DISK))
    pause(vbd)
    # unpause -a: the target of a migration becomes the primary, the mirror ends.
    assert vbd.handle(Resume("aio:/target", logpath="/l2")) == (
        OpenImage("aio:/target", 0x90, "/l2", ""),)


def test_resume_without_a_ring_goes_back_to_ready() -> None:
    vbd = open_vbd(ring=False)
    pause(vbd)
    vbd.handle(Resume())
    assert vbd.handle(ImageOpened(DISK)) == (AcceptImage(), Reply())
    assert vbd.state == VbdState.OPEN_READY


def test_resume_refuses_a_changed_geometry() -> None:
    vbd = open_vbd()
    pause(vbd)
    vbd.handle(Resume("aio:/other"))
    discard, reply = vbd.handle(ImageOpened(DiskInfo(sectors=5)))
    assert discard == DiscardImage() and isinstance(reply, Reply)
    assert reply.error == errno.EMEDIUMTYPE and "resize not requested" in reply.message
    assert vbd.state == VbdState.OPEN_PAUSED
    assert vbd.state_bits == 0x2A | 0x200  # RESUME_FAILED
    assert vbd.params == "aio:/img"  # still the image it served


@pytest.mark.parametrize(
    ("disk", "accepted"),
    [(DiskInfo(sectors=2 << 20), True),
     (DiskInfo(sectors=1 << 19), False),  # a resize only grows
     (DiskInfo(sectors=2 << 20, sector_size=4096), False),
     (DiskInfo(sectors=2 << 20, info=4), False),
     (DiskInfo(sectors=1 << 20, physical_sector_size=4096), False)],
)
def test_a_requested_resize_accepts_a_larger_disk_only(disk: DiskInfo, accepted: bool) -> None:
    vbd = open_vbd()
    pause(vbd)
    vbd.handle(Resume(resize=True))
    effects = vbd.handle(ImageOpened(disk))
    if accepted:
        assert effects == (AcceptImage(), UnquiesceRing(), Reply())
        assert vbd.handle(GetDiskInfo()) == (Reply(disk=disk),)
    else:
        assert effects[0] == DiscardImage() and errno_of(effects[1:]) == errno.EMEDIUMTYPE
        assert vbd.handle(GetDiskInfo()) == (Reply(disk=DISK),)


def test_a_resize_is_asked_for_by_each_resume() -> None:
    vbd = open_vbd()
    pause(vbd)
    vbd.handle(Resume(resize=True))
    vbd.handle(ImageOpened(DiskInfo(sectors=2 << 20)))
    pause(vbd)
    vbd.handle(Resume())
    assert errno_of(vbd.handle(ImageOpened(DiskInfo(sectors=4 << 20)))[1:]) == (
        errno.EMEDIUMTYPE
    )


def test_open_failure_returns_to_attached_with_the_errno() -> None:
    vbd = TapdiskVbd(minor=0)
    vbd.handle(Attach())
    vbd.handle(Open("aio:/missing"))
    assert vbd.handle(ImageOpenFailed(errno.EINVAL, "no such file")) == (
        Reply(error=errno.EINVAL, message="no such file"),
    )
    assert vbd.state == VbdState.ATTACHED


def test_a_ring_that_fails_to_start_leaves_the_vbd_ready() -> None:
    vbd = open_vbd(ring=False)
    vbd.handle(ConnectRing(RING))
    assert vbd.handle(RingStartFailed(errno.EINVAL, "bad port")) == (
        Reply(error=errno.EINVAL, message="bad port"),
    )
    assert vbd.state == VbdState.OPEN_READY and vbd.ring is None


def _queue(queue: int, nr_queues: int = 3) -> BlkifRing:
    return BlkifRing(1, 51712, grefs=(8 + queue,), port=3 + queue, queue=queue,
                     nr_queues=nr_queues)


def test_multi_queue_connects_queue_0_then_each_next_queue_in_order() -> None:
    vbd = open_vbd(ring=False)
    assert errno_of(vbd.handle(ConnectRing(_queue(1)))) == errno.EINVAL  # not queue 0 first
    for queue in range(3):
        assert vbd.handle(ConnectRing(_queue(queue))) == (StartRing(_queue(queue)),)
        assert vbd.handle(RingStarted()) == (Reply(),)
        assert vbd.queues == queue + 1 and vbd.ring == _queue(0)
    # served: EALREADY (tapback replays); past the count, or another count: EINVAL
    assert errno_of(vbd.handle(ConnectRing(_queue(0)))) == errno.EALREADY
    assert errno_of(vbd.handle(ConnectRing(_queue(2)))) == errno.EALREADY
    assert errno_of(vbd.handle(ConnectRing(_queue(3, nr_queues=4)))) == errno.EINVAL
    assert vbd.handle(DisconnectRing(1, 51712)) == (StopRing(), Reply())
    assert vbd.queues == 0 and vbd.state == VbdState.OPEN_READY


def test_a_queue_out_of_order_or_count_is_refused() -> None:
    vbd = open_vbd(ring=False)
    vbd.handle(ConnectRing(_queue(0)))
    vbd.handle(RingStarted())
    assert errno_of(vbd.handle(ConnectRing(_queue(2)))) == errno.EINVAL  # skips queue 1
    assert errno_of(vbd.handle(ConnectRing(_queue(1, nr_queues=2)))) == errno.EINVAL
    assert vbd.queues == 1 and vbd.state == VbdState.OPEN_CONNECTED


def test_a_later_queue_that_fails_to_start_stops_them_all() -> None:
    vbd = open_vbd(ring=False)
    vbd.handle(ConnectRing(_queue(0)))
    vbd.handle(RingStarted())
    vbd.handle(ConnectRing(_queue(1)))
    assert vbd.handle(RingStartFailed(errno.EINVAL, "bad port")) == (
        StopRing(), Reply(error=errno.EINVAL, message="bad port"),
    )
    assert vbd.state == VbdState.OPEN_READY and vbd.ring is None and vbd.queues == 0


def test_disconnect_stops_the_named_ring_only() -> None:
    vbd = open_vbd()
    assert errno_of(vbd.handle(DisconnectRing(1, 51728))) == errno.ENODEV
    assert vbd.handle(DisconnectRing(1, 51712)) == (StopRing(), Reply())
    assert vbd.state == VbdState.OPEN_READY
    assert errno_of(vbd.handle(DisconnectRing(1, 51712))) == errno.ENODEV


def test_close_stops_the_ring_and_closes_the_image_then_detach() -> None:
    vbd = open_vbd()
    assert vbd.handle(Close()) == (StopRing(), CloseImage(), Reply())
    assert vbd.params is None
    assert vbd.handle(Detach()) == (ReleaseMinor(), Reply())
    assert vbd.is_final


def test_close_while_draining_needs_force() -> None:
    vbd = open_vbd()
    vbd.handle(Pause())
    assert vbd.handle(DrainFailed(errno.ETIMEDOUT, "stuck")) == (
        Reply(error=errno.ETIMEDOUT, message="stuck"),
    )
    assert errno_of(vbd.handle(Close())) == errno.EBUSY
    assert vbd.state == VbdState.OPEN_QUIESCING
    assert vbd.handle(Close(force=True)) == (StopRing(), CloseImage(), Reply())


def _attached() -> TapdiskVbd:
    vbd = TapdiskVbd(minor=0)
    vbd.handle(Attach())
    return vbd


def _paused(ring: bool = True) -> TapdiskVbd:
    vbd = open_vbd(ring)
    pause(vbd)
    return vbd


def _closed() -> TapdiskVbd:
    vbd = open_vbd()
    vbd.handle(Close())
    return vbd


OTHER_RING = BlkifRing(1, 51728)


@pytest.mark.parametrize(
    ("make", "event", "code"),
    [
        (_attached, Attach(), errno.EEXIST),
        (open_vbd, Open("aio:/x"), errno.EALREADY),
        (_paused, Open("aio:/x"), errno.EALREADY),
        (_attached, ConnectRing(RING), errno.EINVAL),
        (_closed, ConnectRing(RING), errno.EINVAL),
        (lambda: _paused(ring=False), ConnectRing(RING), errno.EINVAL),
        (open_vbd, ConnectRing(RING), errno.EALREADY),
        (_paused, ConnectRing(RING), errno.EALREADY),
        (open_vbd, ConnectRing(OTHER_RING), errno.EBUSY),
        (_paused, ConnectRing(OTHER_RING), errno.EBUSY),
        (_attached, DisconnectRing(1, 51712), errno.ENODEV),
        (_paused, DisconnectRing(1, 51712), errno.EINVAL),
        (_closed, Pause(), errno.EINVAL),
        (open_vbd, Resume(), errno.EINVAL),
        (open_vbd, Detach(), errno.EBUSY),
        (_paused, Detach(), errno.EBUSY),
        (_attached, GetDiskInfo(), errno.EINVAL),
        (_closed, GetDiskInfo(), errno.EINVAL),
    ],
)
def test_refused_requests_are_answered_with_the_spec_errno_and_change_nothing(
    make: Callable[[], TapdiskVbd], event: Event, code: int
) -> None:
    vbd = make()
    before = (vbd.state, vbd.state_bits, vbd.ring, vbd.disk, vbd.params)
    assert errno_of(vbd.handle(event)) == code
    assert (vbd.state, vbd.state_bits, vbd.ring, vbd.disk, vbd.params) == before


def test_pause_of_an_attached_vbd_without_image_is_accepted_as_blktaps() -> None:
    # blktap v4.0.8 drivers/tapdisk-vbd.c, tapdisk_vbd_pause: an empty queue quiesces at
    # once and close_vdi of no image is a no-op, so PAUSE succeeds; LIST shows 0x2a.
    vbd = _attached()
    assert vbd.handle(Pause()) == (Reply(),)
    assert vbd.state == VbdState.EMPTY_PAUSED
    assert vbd.state_bits == 0x2A
    assert vbd.params is None
    assert vbd.handle(Pause()) == (Reply(),)
    # tapdisk_vbd_open_vdi: no path to reopen (EINVAL); the VBD stays paused.
    assert errno_of(vbd.handle(Resume())) == errno.EINVAL
    assert vbd.state == VbdState.EMPTY_PAUSED
    # blktap's close of it clears no pause flag: it succeeds and the VBD stays 0x2a.
    assert vbd.handle(Close()) == (Reply(),)
    assert vbd.state == VbdState.EMPTY_PAUSED


def test_an_imageless_paused_vbd_detaches() -> None:
    vbd = _attached()
    vbd.handle(Pause())
    vbd.handle(Detach())
    assert vbd.state == VbdState.DETACHED


@pytest.mark.parametrize(
    ("make", "event"),
    [(_paused, Pause()), (_attached, Close()), (_closed, Close()),
     (_attached, Close(force=True))],
)
def test_a_repeated_pause_or_close_succeeds_and_stays(
    make: Callable[[], TapdiskVbd], event: Event
) -> None:
    vbd = make()
    state = vbd.state
    assert vbd.handle(event) == (Reply(),)
    assert vbd.state == state


@pytest.mark.parametrize(
    ("event", "error"),
    [(Drained(), OurBug), (RingStarted(), OurBug), (DrainFailed(errno.EIO), OurBug),
     (ImageOpened(DISK), ImageError)],
)
def test_out_of_order_completions_raise_with_the_culprit(event: Event, error: type) -> None:
    vbd = open_vbd(ring=False)
    with pytest.raises(error):
        vbd.handle(event)
    assert vbd.state == VbdState.OPEN_READY


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
