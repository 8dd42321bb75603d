"""The tapdisk's control logic (`Tapdisk.handle`) on real images, without a socket.

Rings are stand-ins (`FakeRing`, passed as the tapdisk's `connect_ring`): mapping a real
one needs a simulated front-end (tests/integration/tapdisk/test_ring.py does that).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from blktap3.abi import VbdStateBits
from blktap3.ctl import protocol as p
from blktap3.ctl import runtime
from blktap3.fsm.tapdisk import VbdState
from blktap3.tapdisk import images
from blktap3.tapdisk import metrics as metrics_mod
from blktap3.tapdisk.control import Reply, Tapdisk
from blktap3.tapdisk.metrics import Metrics

pytest.importorskip("blktap3.datapath", reason="the data path (Image.open) is not built")

T = p.MessageType
MiB = 1 << 20


@pytest.fixture
def root(tmp_path: Path) -> Path:
    runtime.ensure_dirs(tmp_path)
    return tmp_path


class FakeRing:
    """A ring that serves nothing; `drains=False`: its drain never completes."""

    def __init__(self, ids: tuple[int, int], drains: bool = True) -> None:
        self.ids = ids
        self.drains = drains
        self.paused = False
        self.disconnected = False
        self.req_timeout: int | None = None

    def set_req_timeout(self, seconds: int) -> None:
        self.req_timeout = seconds

    def io_stats(self) -> dict[str, object]:
        return {"read": {"submitted": 3, "completed": 2, "usecs": 70, "max_usecs": 40},
                "write": {"submitted": 1, "completed": 1, "usecs": 9, "max_usecs": 9},
                "retried": 0, "timed_out": 0,
                "ring": {"nr_ents": 32, "req_prod": 4, "req_cons": 4, "req_event": 5,
                         "rsp_prod": 3, "rsp_prod_pvt": 3, "rsp_event": 4}}

    def pause(self, timeout: float = 30.0) -> None:
        if not self.drains:
            raise OSError(errno.ETIMEDOUT, "in-flight requests did not complete")
        self.paused = True

    def resume(self, image: object = None) -> None:
        assert self.paused and image is not None
        self.paused = False

    def disconnect(self, timeout: float = 30.0) -> None:
        self.disconnected = True

    def stats(self) -> dict[str, object]:
        return {"reqs": {"read": 3, "write": 1}, "in_flight": 2, "slots": 32,
                "kicks": {"in": 4, "out": 4}, "sectors": {"read": 24, "written": 8},
                "errors": {"io": 0}, "responses": 2, "halted": None}


class Rings:
    """The tapdisk's `connect_ring`: FakeRings, or the errno the next connect fails with."""

    def __init__(self) -> None:
        self.made: list[FakeRing] = []
        self.drains = True
        self.fail_with = 0

    def __call__(self, image: images.Image, *, domid: int, devid: int,
                 **_: object) -> FakeRing:
        if self.fail_with:
            raise OSError(self.fail_with, f"ring {domid}/{devid}: refused by the test")
        ring = FakeRing((domid, devid), drains=self.drains)
        self.made.append(ring)
        return ring


@pytest.fixture
def rings() -> Rings:
    return Rings()


@pytest.fixture
def tapdisk(root: Path, rings: Rings) -> Iterator[Tapdisk]:
    td = Tapdisk(root, drain_timeout=2.0, connect_ring=rings)
    yield td
    td.shutdown()


def image(root: Path, name: str = "disk.img", size: int = 4 * MiB) -> str:
    path = root / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def default_payload(mtype: T) -> p.Payload:
    cls = p.PAYLOAD_OF[mtype]
    return cls() if cls in (p.Empty, p.Params, p.Resume) else p.Empty()


def send(td: Tapdisk, mtype: T, minor: int = 0, payload: p.Payload | None = None) -> Reply:
    message = p.Message(mtype, minor, payload if payload is not None else default_payload(mtype))
    reply = td.handle(p.decode(message.encode()))  # through the codec, as on the socket
    for m in reply.messages:
        p.decode(m.encode())
    return reply


def error_of(reply: Reply) -> int:
    first = reply.messages[0]
    assert first.type is T.ERROR, first
    assert isinstance(first.payload, p.Response)
    return first.payload.error


def attached(td: Tapdisk, root: Path) -> int:
    minor = runtime.allocate_minor(root)
    assert send(td, T.ATTACH, minor, p.Params(devnum=minor)).messages[0].type is T.ATTACH_RSP
    return minor


def opened(td: Tapdisk, root: Path, params: str | None = None) -> int:
    minor = attached(td, root)
    reply = send(td, T.OPEN, minor, p.Params(path=params or f"aio:{image(root)}"))
    assert reply.messages[0].type is T.OPEN_RSP, reply
    return minor


def geometry(payload: p.Payload) -> tuple[int, int, int]:
    """blktap's three fields of `u.image` (ours follow them)."""
    assert isinstance(payload, p.ImageInfo)
    return (payload.sectors, payload.sector_size, payload.info)


def blkif(domid: int = 1, devid: int = 51712) -> p.Blkif:
    return p.Blkif(domid=domid, devid=devid, grefs=(8,), order=0, port=3)


def connected(td: Tapdisk, root: Path, domid: int = 1, devid: int = 51712) -> int:
    minor = opened(td, root)
    reply = send(td, T.XENBLKIF_CONNECT, minor, blkif(domid, devid))
    assert reply.messages[0].type is T.XENBLKIF_CONNECT_RSP, reply
    return minor


def list_entries(td: Tapdisk) -> list[p.ListEntry]:
    entries = [m.payload for m in send(td, T.LIST, p.LIST_COOKIE).messages]
    assert all(isinstance(e, p.ListEntry) for e in entries)
    return entries  # type: ignore[return-value]


def test_pid_is_this_process(tapdisk: Tapdisk) -> None:
    assert send(tapdisk, T.PID).messages[0].payload == p.Pid(os.getpid())


def test_attach_needs_an_allocated_minor(tapdisk: Tapdisk) -> None:
    assert error_of(send(tapdisk, T.ATTACH, 3)) == errno.EINVAL


def test_attach_twice_is_eexist(tapdisk: Tapdisk, root: Path) -> None:
    minor = attached(tapdisk, root)
    assert error_of(send(tapdisk, T.ATTACH, minor)) == errno.EEXIST


def test_attach_holds_the_minor_against_free_and_other_tapdisks(
    tapdisk: Tapdisk, root: Path
) -> None:
    minor = attached(tapdisk, root)
    with pytest.raises(OSError) as err:
        runtime.free_minor(root, minor)
    assert err.value.errno == errno.EAGAIN
    other = Tapdisk(root)
    assert error_of(send(other, T.ATTACH, minor)) == errno.EBUSY


def test_open_replies_with_the_image_geometry(tapdisk: Tapdisk, root: Path) -> None:
    minor = attached(tapdisk, root)
    reply = send(tapdisk, T.OPEN, minor, p.Params(path=f"aio:{image(root, size=8 * MiB)}"))
    assert geometry(reply.messages[0].payload) == (8 * MiB // 512, 512, 0)
    assert geometry(send(tapdisk, T.DISK_INFO, minor).messages[0].payload) == (16384, 512, 0)


@pytest.mark.parametrize("flags", [0, p.OpenFlags.RDONLY])
def test_disk_info_carries_physical_sector_size_and_discard_from_the_image(
    tapdisk: Tapdisk, root: Path, flags: int
) -> None:
    from blktap3.datapath import Image

    path = image(root)
    minor = attached(tapdisk, root)
    opened_info = send(tapdisk, T.OPEN, minor, p.Params(flags=flags, path=f"aio:{path}"))
    reply = send(tapdisk, T.DISK_INFO, minor).messages[0].payload
    assert reply == opened_info.messages[0].payload
    assert isinstance(reply, p.ImageInfo)
    # What the data path itself reports for this file, opened the same way.
    direct = Image.open("aio", path, readonly=bool(flags))
    try:
        assert reply.physical_sector_size == direct.info.physical_sector_size > 0
        assert reply.discard is direct.info.discard
    finally:
        direct.close()


def test_open_read_only_reports_vdisk_readonly(tapdisk: Tapdisk, root: Path) -> None:
    minor = attached(tapdisk, root)
    params = p.Params(flags=p.OpenFlags.RDONLY, path=f"aio:{image(root)}")
    info = send(tapdisk, T.OPEN, minor, params).messages[0].payload
    assert isinstance(info, p.ImageInfo) and info.info & 4


@pytest.mark.parametrize(
    ("params", "code"),
    # blktap's errnos: an unknown type is ENOENT and no colon EINVAL
    # (drivers/tapdisk-disktype.c:222, 234); a missing file (or an empty path) is the
    # open's ENOENT.
    [("aio:/does/not/exist", errno.ENOENT), ("vhd:/x", errno.ENOENT),
     ("no-colon", errno.EINVAL), ("aio:", errno.ENOENT)],
)
def test_bad_images_are_refused_and_the_vbd_stays_attached(
    tapdisk: Tapdisk, root: Path, params: str, code: int
) -> None:
    minor = attached(tapdisk, root)
    with capture_logs() as logs:
        reply = send(tapdisk, T.OPEN, minor, p.Params(path=params))
    assert error_of(reply) == code
    assert tapdisk.vbds[minor].state is VbdState.ATTACHED
    # The tapdisk's log says why (tap-ctl prints only strerror, as blktap's).
    failed = [e for e in logs if e["event"] == "image open failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "warning"
    assert (failed[0]["image"], failed[0]["errno"]) == (params, code) and failed[0]["reason"]


def test_unsupported_open_flags_are_eopnotsupp(tapdisk: Tapdisk, root: Path) -> None:
    minor = attached(tapdisk, root)
    params = p.Params(flags=p.OpenFlags.ADD_LCACHE, path=f"aio:{image(root)}")
    assert error_of(send(tapdisk, T.OPEN, minor, params)) == errno.EOPNOTSUPP


def test_opening_twice_is_ealready(tapdisk: Tapdisk, root: Path) -> None:
    minor = opened(tapdisk, root)
    params = p.Params(path=f"aio:{image(root)}")
    assert error_of(send(tapdisk, T.OPEN, minor, params)) == errno.EALREADY


def test_detach_while_open_is_ebusy(tapdisk: Tapdisk, root: Path) -> None:
    minor = opened(tapdisk, root)
    assert error_of(send(tapdisk, T.DETACH, minor)) == errno.EBUSY


@pytest.mark.parametrize("mtype", [T.CLOSE, T.PAUSE, T.RESUME, T.DETACH, T.STATS,
                                   T.DISK_INFO])
def test_unknown_minor_is_enodev(tapdisk: Tapdisk, mtype: T) -> None:
    assert error_of(send(tapdisk, mtype, 9)) == errno.ENODEV


def test_open_of_an_unknown_minor_is_einval(tapdisk: Tapdisk) -> None:
    # drivers/tapdisk-control.c:710: open_image answers EINVAL, not ENODEV.
    assert error_of(send(tapdisk, T.OPEN, 9, p.Params(path="aio:/x"))) == errno.EINVAL


def test_list_reports_blktap_state_words(tapdisk: Tapdisk, root: Path) -> None:
    assert list_entries(tapdisk) == [p.ListEntry(0, -1, 0, "")]
    first = attached(tapdisk, root)
    second = opened(tapdisk, root, f"aio:{image(root, 'b.img')}")
    entries = list_entries(tapdisk)
    assert [(e.count, e.minor, e.state) for e in entries] == [
        (2, first, 0), (1, second, 0), (0, -1, 0)
    ]
    assert entries[1].path == f"aio:{root / 'b.img'}"
    send(tapdisk, T.PAUSE, second)
    assert list_entries(tapdisk)[1].state == 0x2A
    send(tapdisk, T.CLOSE, second)
    assert list_entries(tapdisk)[1] == p.ListEntry(1, second, 0x2, "")
    assert send(tapdisk, T.LIST_MINORS).messages[0].payload == p.Minors((first, second))


def test_pause_and_resume_with_an_image_swap(tapdisk: Tapdisk, root: Path) -> None:
    minor = opened(tapdisk, root)
    assert send(tapdisk, T.PAUSE, minor).messages[0].type is T.PAUSE_RSP
    assert send(tapdisk, T.PAUSE, minor).messages[0].type is T.PAUSE_RSP  # idempotent
    assert tapdisk.vbds[minor].image is None  # PAUSE closes the image
    swapped = f"aio:{image(root, 'swap.img')}"
    reply = send(tapdisk, T.RESUME, minor, p.Resume(new_params=swapped))
    assert reply.messages[0].type is T.RESUME_RSP
    assert list_entries(tapdisk)[0] == p.ListEntry(1, minor, 0, swapped)


def test_resume_of_a_running_vbd_is_einval(tapdisk: Tapdisk, root: Path) -> None:
    minor = opened(tapdisk, root)
    assert error_of(send(tapdisk, T.RESUME, minor, p.Resume())) == errno.EINVAL


def test_resume_refuses_a_changed_size_unless_resizing(tapdisk: Tapdisk, root: Path) -> None:
    minor = opened(tapdisk, root)
    send(tapdisk, T.PAUSE, minor)
    bigger = f"aio:{image(root, 'big.img', size=8 * MiB)}"
    assert error_of(send(tapdisk, T.RESUME, minor, p.Resume(new_params=bigger))) == (
        errno.EMEDIUMTYPE
    )
    assert list_entries(tapdisk)[0].state == 0x2A | VbdStateBits.RESUME_FAILED
    smaller = f"aio:{image(root, 'small.img', size=2 * MiB)}"
    resize = p.Resume(flags=p.ResumeFlags.RESIZE, new_params=smaller)
    assert error_of(send(tapdisk, T.RESUME, minor, resize)) == errno.EMEDIUMTYPE
    resize = p.Resume(flags=p.ResumeFlags.RESIZE, new_params=bigger)
    assert send(tapdisk, T.RESUME, minor, resize).messages[0].type is T.RESUME_RSP
    info = send(tapdisk, T.DISK_INFO, minor).messages[0].payload
    assert geometry(info) == (8 * MiB // 512, 512, 0)
    assert list_entries(tapdisk)[0].state == 0


def test_close_then_detach_then_the_tapdisk_wants_to_exit(tapdisk: Tapdisk, root: Path) -> None:
    minor = opened(tapdisk, root)
    assert send(tapdisk, T.CLOSE, minor).messages[0].type is T.CLOSE_RSP
    assert send(tapdisk, T.CLOSE, minor).messages[0].type is T.CLOSE_RSP  # nothing open
    assert not tapdisk.exiting
    assert send(tapdisk, T.DETACH, minor).messages[0].type is T.DETACH_RSP
    assert tapdisk.exiting
    runtime.free_minor(root, minor)  # DETACH dropped the flock
    assert error_of(send(tapdisk, T.ATTACH, 0)) == errno.ESHUTDOWN


def test_force_shutdown_is_answered_as_close(tapdisk: Tapdisk, root: Path) -> None:
    minor = opened(tapdisk, root)
    assert send(tapdisk, T.FORCE_SHUTDOWN, minor).messages[0].type is T.CLOSE_RSP
    assert tapdisk.vbds[minor].state is VbdState.CLOSED


def test_exit_only_when_idle(tapdisk: Tapdisk, root: Path) -> None:
    minor = attached(tapdisk, root)
    assert error_of(send(tapdisk, T.EXIT)) == errno.EBUSY
    send(tapdisk, T.DETACH, minor)
    fresh = Tapdisk(root)
    assert send(fresh, T.EXIT).messages[0].type is T.EXIT and fresh.exiting


def test_stats_follow_blktaps_shape(tapdisk: Tapdisk, root: Path) -> None:
    minor = opened(tapdisk, root)
    reply = send(tapdisk, T.STATS, minor)
    header = reply.messages[0].payload
    assert isinstance(header, p.StatInfo) and header.length == len(reply.data)
    stats = json.loads(reply.data)
    assert stats["name"] == f"aio:{root / 'disk.img'}"
    assert stats["images"][0]["driver"]["name"] == "aio"
    assert "xenbus" not in stats  # no ring connected
    send(tapdisk, T.PAUSE, minor)
    assert b'"images": [  ]' in send(tapdisk, T.STATS, minor).data


def test_ring_messages_need_a_ring(tapdisk: Tapdisk, root: Path) -> None:
    minor = attached(tapdisk, root)
    assert error_of(send(tapdisk, T.XENBLKIF_CONNECT, minor, blkif())) == errno.EINVAL
    assert error_of(send(tapdisk, T.XENBLKIF_DISCONNECT, minor, blkif())) == errno.ENODEV


def test_replies_are_not_requests(tapdisk: Tapdisk) -> None:
    assert error_of(send(tapdisk, T.OPEN_RSP, 0, p.ImageInfo(1, 512, 0))) == errno.EINVAL


def test_a_pause_that_cannot_drain_fails_and_force_shutdown_still_closes(
    tapdisk: Tapdisk, root: Path, rings: Rings
) -> None:
    rings.drains = False
    minor = connected(tapdisk, root, domid=1, devid=2)
    assert tapdisk.vbds[minor].state is VbdState.OPEN_CONNECTED
    stats = json.loads(send(tapdisk, T.STATS, minor).data)
    assert stats["xenbus"]["domid"] == 1 and stats["reqs_outstanding"] == 2
    assert error_of(send(tapdisk, T.PAUSE, minor)) == errno.ETIMEDOUT
    assert tapdisk.vbds[minor].state is VbdState.OPEN_QUIESCING
    assert list_entries(tapdisk)[0].state == 0x14
    assert error_of(send(tapdisk, T.CLOSE, minor)) == errno.EBUSY
    assert send(tapdisk, T.FORCE_SHUTDOWN, minor).messages[0].type is T.CLOSE_RSP
    assert rings.made[0].disconnected and tapdisk.vbds[minor].state is VbdState.CLOSED


# -- each rule of specs/tapdisk_vbd.toml that answers a request, on the wire ------------


def test_connecting_the_connected_ring_again_is_ealready(
    tapdisk: Tapdisk, root: Path, rings: Rings
) -> None:
    minor = connected(tapdisk, root)
    assert error_of(send(tapdisk, T.XENBLKIF_CONNECT, minor, blkif())) == errno.EALREADY
    assert len(rings.made) == 1  # refused before anything was mapped
    send(tapdisk, T.PAUSE, minor)  # the ring stays mapped while paused
    assert error_of(send(tapdisk, T.XENBLKIF_CONNECT, minor, blkif())) == errno.EALREADY


def test_connecting_another_ring_is_ebusy(tapdisk: Tapdisk, root: Path, rings: Rings) -> None:
    minor = connected(tapdisk, root)
    other = blkif(devid=51728)
    assert error_of(send(tapdisk, T.XENBLKIF_CONNECT, minor, other)) == errno.EBUSY
    send(tapdisk, T.PAUSE, minor)
    assert error_of(send(tapdisk, T.XENBLKIF_CONNECT, minor, other)) == errno.EBUSY
    assert len(rings.made) == 1 and not rings.made[0].disconnected


def test_connecting_without_an_open_image_is_einval(tapdisk: Tapdisk, root: Path) -> None:
    minor = opened(tapdisk, root)
    send(tapdisk, T.PAUSE, minor)  # paused: the image is closed and no ring is mapped
    assert error_of(send(tapdisk, T.XENBLKIF_CONNECT, minor, blkif())) == errno.EINVAL
    send(tapdisk, T.CLOSE, minor)
    assert error_of(send(tapdisk, T.XENBLKIF_CONNECT, minor, blkif())) == errno.EINVAL


def test_a_ring_that_cannot_be_mapped_leaves_the_vbd_ready(
    tapdisk: Tapdisk, root: Path, rings: Rings
) -> None:
    minor = opened(tapdisk, root)
    rings.fail_with = errno.EINVAL
    assert error_of(send(tapdisk, T.XENBLKIF_CONNECT, minor, blkif())) == errno.EINVAL
    assert tapdisk.vbds[minor].state is VbdState.OPEN_READY
    rings.fail_with = 0
    assert send(tapdisk, T.XENBLKIF_CONNECT, minor, blkif()).messages[0].type is (
        T.XENBLKIF_CONNECT_RSP
    )


def test_disconnecting_is_for_the_connected_ring_only(
    tapdisk: Tapdisk, root: Path, rings: Rings
) -> None:
    minor = connected(tapdisk, root)
    assert error_of(send(tapdisk, T.XENBLKIF_DISCONNECT, minor, blkif(devid=7))) == (
        errno.ENODEV
    )
    send(tapdisk, T.PAUSE, minor)
    # The ring stays while paused: RESUME (or CLOSE) first.
    assert error_of(send(tapdisk, T.XENBLKIF_DISCONNECT, minor, blkif())) == errno.EINVAL
    send(tapdisk, T.RESUME, minor, p.Resume())
    assert send(tapdisk, T.XENBLKIF_DISCONNECT, minor, blkif()).messages[0].type is (
        T.XENBLKIF_DISCONNECT_RSP
    )
    assert rings.made[0].disconnected
    assert error_of(send(tapdisk, T.XENBLKIF_DISCONNECT, minor, blkif())) == errno.ENODEV


def test_resume_gives_the_ring_the_new_image(tapdisk: Tapdisk, root: Path, rings: Rings) -> None:
    minor = connected(tapdisk, root)
    send(tapdisk, T.PAUSE, minor)
    assert rings.made[0].paused
    swapped = f"aio:{image(root, 'swap.img')}"
    assert send(tapdisk, T.RESUME, minor, p.Resume(new_params=swapped)).messages[0].type is (
        T.RESUME_RSP
    )
    assert not rings.made[0].paused
    assert tapdisk.vbds[minor].state is VbdState.OPEN_CONNECTED


def test_close_with_nothing_open_succeeds(tapdisk: Tapdisk, root: Path) -> None:
    minor = attached(tapdisk, root)
    assert send(tapdisk, T.CLOSE, minor).messages[0].type is T.CLOSE_RSP
    assert send(tapdisk, T.FORCE_SHUTDOWN, minor).messages[0].type is T.CLOSE_RSP
    assert tapdisk.vbds[minor].state is VbdState.ATTACHED


def test_pause_of_an_imageless_vbd_is_accepted_but_not_of_a_closed_one(
    tapdisk: Tapdisk, root: Path
) -> None:
    # blktap v4.0.8 pauses an attached VBD with no image (state 0x2a, no args in LIST).
    minor = attached(tapdisk, root)
    assert send(tapdisk, T.PAUSE, minor).messages[0].type is T.PAUSE_RSP
    entry = send(tapdisk, T.LIST, 0xFFFF).messages[0].payload
    assert (entry.minor, entry.state, entry.path) == (minor, 0x2A, "")
    minor = opened(tapdisk, root, f"aio:{image(root, 'b.img')}")
    send(tapdisk, T.CLOSE, minor)
    assert error_of(send(tapdisk, T.PAUSE, minor)) == errno.EINVAL


def test_disk_info_needs_an_image_and_survives_a_pause(tapdisk: Tapdisk, root: Path) -> None:
    minor = attached(tapdisk, root)
    assert error_of(send(tapdisk, T.DISK_INFO, minor)) == errno.EINVAL
    params = p.Params(path=f"aio:{image(root, size=2 * MiB)}")
    send(tapdisk, T.OPEN, minor, params)
    send(tapdisk, T.PAUSE, minor)
    info = send(tapdisk, T.DISK_INFO, minor).messages[0].payload
    assert geometry(info) == (2 * MiB // 512, 512, 0)
    send(tapdisk, T.CLOSE, minor)
    assert error_of(send(tapdisk, T.DISK_INFO, minor)) == errno.EINVAL


def test_open_or_detach_of_a_paused_vbd_is_refused(tapdisk: Tapdisk, root: Path) -> None:
    minor = opened(tapdisk, root)
    send(tapdisk, T.PAUSE, minor)
    params = p.Params(path=f"aio:{image(root)}")
    assert error_of(send(tapdisk, T.OPEN, minor, params)) == errno.EALREADY
    assert error_of(send(tapdisk, T.DETACH, minor)) == errno.EBUSY
    assert tapdisk.vbds[minor].state is VbdState.OPEN_PAUSED


def test_a_refused_resize_says_why(tapdisk: Tapdisk, root: Path) -> None:
    minor = opened(tapdisk, root)
    send(tapdisk, T.PAUSE, minor)
    bigger = f"aio:{image(root, 'big.img', size=8 * MiB)}"
    reply = send(tapdisk, T.RESUME, minor, p.Resume(new_params=bigger)).messages[0].payload
    assert isinstance(reply, p.Response) and reply.error == errno.EMEDIUMTYPE
    assert "resize not requested" in reply.message
    assert list_entries(tapdisk)[0].state == 0x2A | VbdStateBits.RESUME_FAILED
    # LIST still names the image the VBD served.
    assert list_entries(tapdisk)[0].path == f"aio:{root / 'disk.img'}"


def test_shutdown_releases_every_minor(root: Path) -> None:
    td = Tapdisk(root)
    minor = opened(td, root)
    td.shutdown()
    fd = os.open(runtime.marker_path(root, minor), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise if still held
    finally:
        os.close(fd)


def test_open_t_is_the_rings_req_timeout(tapdisk: Tapdisk, root: Path, rings: Rings) -> None:
    # blktap drivers/tapdisk-control.c (open_image): `req_timeout > 0` sets the VBD's.
    minor = attached(tapdisk, root)
    send(tapdisk, T.OPEN, minor, p.Params(path=f"aio:{image(root)}", req_timeout=5))
    send(tapdisk, T.XENBLKIF_CONNECT, minor, blkif())
    plain = connected(tapdisk, root, devid=51728)
    assert rings.made[0].req_timeout == 5
    assert rings.made[1].req_timeout is None  # the data path's default: blktap's 120 s
    assert tapdisk.vbds[plain].req_timeout == 0


def test_stats_files_follow_the_ring_and_the_image(root: Path, rings: Rings,
                                                   tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    metrics = Metrics(shm, pid=4242, interval=3600)  # refreshed by the events alone here
    metrics.start()
    td = Tapdisk(root, drain_timeout=2.0, connect_ring=rings, metrics=metrics)
    top = shm / "td3-4242"
    assert top.is_dir() and (top.stat().st_mode & 0o777) == 0o700
    minor = connected(td, root, domid=3, devid=51712)
    vbd, vdi = top / "vbd-3-51712", top / f"vdi-{minor}"
    ring_dir = shm / "vbd3-3-51712"
    assert vbd.stat().st_size == vdi.stat().st_size == 4096  # one page each, as blktap's
    version, _, *values = metrics_mod.STATS.unpack(vbd.read_bytes()[:96])
    assert version == 1
    assert dict(zip(metrics_mod.STATS_FIELDS, values, strict=True)) == {
        "oo_reqs": 0, "read_reqs_submitted": 3, "read_reqs_completed": 2, "read_sectors": 24,
        "read_total_ticks": 70, "write_reqs_submitted": 1, "write_reqs_completed": 1,
        "write_sectors": 8, "write_total_ticks": 9, "io_errors": 0, "flags": 0}
    assert vdi.read_bytes() == vbd.read_bytes()
    blk = metrics_mod.BLKBACK.unpack((ring_dir / "statistics").read_bytes()[:112])
    assert blk == (0, 0, 0, 3, 2, 24, 70, 40, 1, 1, 8, 9, 9, 0)
    io_ring = (ring_dir / "io_ring").read_bytes()
    text = b"nr_ents 32\nreq prod 4 cons 4 event 5\nrsp prod 3 pvt 3 event 4\n"
    assert io_ring == zlib.crc32(text).to_bytes(8, "little") + text
    assert not (ring_dir / "io_ring~").exists()

    send(td, T.XENBLKIF_DISCONNECT, minor, p.Blkif(domid=3, devid=51712))
    assert not ring_dir.exists() and not vbd.exists()
    assert vdi.exists()  # the image is still open
    send(td, T.CLOSE, minor)
    assert not vdi.exists()
    td.shutdown()
    metrics.stop()
    assert not top.exists()


def test_a_stale_stats_directory_of_our_pid_is_emptied(tmp_path: Path) -> None:
    stale = tmp_path / "td3-4242"
    stale.mkdir()
    (stale / "vbd-1-51712").write_bytes(b"x")
    metrics = Metrics(tmp_path, pid=4242, interval=3600)
    metrics.start()
    assert list(stale.iterdir()) == []
    metrics.stop()


def test_an_unwritable_shm_root_costs_the_files_not_the_tapdisk(
        root: Path, rings: Rings, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    metrics = Metrics(blocker / "shm", pid=4242, interval=3600)
    with capture_logs() as logs:
        metrics.start()
    assert [e["event"] for e in logs] == ["no stats files"]
    td = Tapdisk(root, drain_timeout=2.0, connect_ring=rings, metrics=metrics)
    minor = connected(td, root)
    send(td, T.CLOSE, minor)
    td.shutdown()
    metrics.stop()
