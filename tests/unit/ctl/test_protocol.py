"""The control message codec: blktap's C layout, round trips, and what it rejects."""

from __future__ import annotations

import struct

import pytest
from cffi import FFI
from hypothesis import given
from hypothesis import strategies as st

from blktap3.abi import VbdStateBits
from blktap3.ctl import protocol as p

# blktap's include/tapdisk-message.h, as C (the facts of reference/blktap.md). cffi lays
# it out with the platform's C rules, so the codec is checked against a compiler's view.
TAPDISK_MESSAGE_H = """
struct tapdisk_message_image { uint64_t sectors; uint32_t sector_size; uint32_t info; };
struct tapdisk_message_params {
    uint32_t flags; uint32_t devnum; uint32_t domid; char path[256];
    uint32_t prt_devnum; uint16_t req_timeout; char secondary[256];
};
struct tapdisk_message_string { char text[256]; };
struct tapdisk_message_response { int error; char message[256]; };
struct tapdisk_message_minors { int count; int list[63]; };
struct tapdisk_message_list { int count; int minor; int state; char path[256]; };
struct tapdisk_message_stat { uint16_t type; uint16_t cookie; size_t length; };
struct tapdisk_message_blkif {
    uint32_t domid; uint32_t devid; uint32_t gref[8]; uint32_t order; uint32_t proto;
    char pool[256]; uint32_t port; uint32_t poll_duration; uint32_t poll_idle_threshold;
};
struct tapdisk_message_resume { uint32_t flags; char new_params[256]; char secondary[256]; };
struct tapdisk_message {
    uint16_t type;
    uint16_t cookie;
    union {
        int tapdisk_pid;
        struct tapdisk_message_image image;
        struct tapdisk_message_params params;
        struct tapdisk_message_string string;
        struct tapdisk_message_response response;
        struct tapdisk_message_minors minors;
        struct tapdisk_message_list list;
        struct tapdisk_message_stat info;
        struct tapdisk_message_blkif blkif;
        struct tapdisk_message_resume resume;
    } u;
};
/* Our extension of u.image (blktap3.ctl.protocol): blktap's three fields, then ours. */
struct tapdisk_message_image_ext {
    uint64_t sectors; uint32_t sector_size; uint32_t info;
    uint32_t physical_sector_size; uint32_t flags;
};
/* Our extension of u.blkif: blktap's fields, then ours. */
struct tapdisk_message_blkif_ext {
    uint32_t domid; uint32_t devid; uint32_t gref[8]; uint32_t order; uint32_t proto;
    char pool[256]; uint32_t port; uint32_t poll_duration; uint32_t poll_idle_threshold;
    uint32_t max_indirect_segments; uint32_t gref_hi[8]; uint32_t flags;
    uint32_t queue; uint32_t nr_queues;
};
"""
EXTENSION_FIELDS = {"image.physical_sector_size", "image.flags", "blkif.max_indirect_segments",
                    "blkif.gref_hi", "blkif.flags", "blkif.queue", "blkif.nr_queues"}

MEMBER_STRUCT = {
    "image": "image", "params": "params", "string": "string", "response": "response",
    "minors": "minors", "list": "list", "info": "stat", "blkif": "blkif", "resume": "resume",
}


@pytest.fixture(scope="module")
def ffi() -> FFI:
    ffi = FFI()
    ffi.cdef(TAPDISK_MESSAGE_H)
    return ffi


# RESUME's fields travel at u.params' offsets (see test_resume_lands_in_params).
RESUME_IN_PARAMS = {"flags": "flags", "new_params": "path", "secondary": "secondary"}


def c_offset(ffi: FFI, name: str) -> int:
    if "." not in name:
        if name == "tapdisk_pid":
            return int(ffi.offsetof("struct tapdisk_message", "u"))
        return int(ffi.offsetof("struct tapdisk_message", name))
    member, fieldname = name.split(".")
    union = ffi.offsetof("struct tapdisk_message", "u")
    if member == "resume":
        member, fieldname = "params", RESUME_IN_PARAMS[fieldname]
    struct = MEMBER_STRUCT[member] + ("_ext" if name in EXTENSION_FIELDS else "")
    inner = ffi.offsetof(f"struct tapdisk_message_{struct}", fieldname)
    return int(union + inner)


def test_message_size_and_union_offset_match_the_c_struct(ffi: FFI) -> None:
    assert ffi.sizeof("struct tapdisk_message") == p.MESSAGE_SIZE == 544
    assert ffi.offsetof("struct tapdisk_message", "u") == p.UNION_OFFSET
    assert ffi.alignof("struct tapdisk_message") == 8


@pytest.mark.parametrize("name", sorted(p.OFFSETS))
def test_field_offset_matches_the_c_struct(ffi: FFI, name: str) -> None:
    assert p.OFFSETS[name] == c_offset(ffi, name)


@pytest.mark.parametrize("member", ["image", "blkif"])
def test_extensions_leave_blktaps_layout_alone(ffi: FFI, member: str) -> None:
    union = p.UNION_OFFSET
    blktap, ours = f"struct tapdisk_message_{member}", f"struct tapdisk_message_{member}_ext"
    blktap_end = union + ffi.sizeof(blktap)
    for name in EXTENSION_FIELDS:
        if name.startswith(f"{member}."):
            assert p.OFFSETS[name] >= blktap_end  # past every byte blktap's struct uses
    for name, _ in ffi.typeof(blktap).fields:
        assert ffi.offsetof(ours, name) == ffi.offsetof(blktap, name)
    assert ffi.sizeof(ours) <= p.UNION_SIZE


def test_image_extension_lands_where_c_reads_it(ffi: FFI) -> None:
    msg = p.Message(p.MessageType.DISK_INFO_RSP, 2,
                    p.ImageInfo(8192, 512, 4, 4096, p.ImageFlags.DISCARD))
    raw = bytearray(msg.encode())
    c = ffi.cast("struct tapdisk_message *", ffi.from_buffer(raw))
    assert (c.u.image.sectors, c.u.image.sector_size, c.u.image.info) == (8192, 512, 4)
    ext = ffi.cast("struct tapdisk_message_image_ext *", ffi.from_buffer(raw[p.UNION_OFFSET:]))
    assert (ext.physical_sector_size, ext.flags) == (4096, 1)


def test_reply_of_a_blktap_tapdisk_reads_as_not_reported() -> None:
    # blktap's tapdisk clears the message and fills only its three fields.
    raw = bytearray(p.MESSAGE_SIZE)
    struct.pack_into("<HH", raw, 0, p.MessageType.OPEN_RSP, 1)
    struct.pack_into("<QII", raw, p.UNION_OFFSET, 4096, 4096, 0)
    image = p.decode(bytes(raw)).payload
    assert isinstance(image, p.ImageInfo)
    assert (image.physical, image.discard) == (4096, False)


def test_params_encoding_lands_where_c_reads_it(ffi: FFI) -> None:
    msg = p.Message(
        p.MessageType.OPEN, 7,
        p.Params(flags=0x202, devnum=7, domid=3, path="aio:/img", prt_devnum=9,
                 req_timeout=30, secondary="aio:/mirror"),
    )
    raw = bytearray(msg.encode())  # kept alive: cffi only borrows the buffer
    c = ffi.cast("struct tapdisk_message *", ffi.from_buffer(raw))
    assert (c.type, c.cookie) == (7, 7)
    params = c.u.params
    assert (params.flags, params.devnum, params.domid) == (0x202, 7, 3)
    assert ffi.string(params.path) == b"aio:/img"
    assert (params.prt_devnum, params.req_timeout) == (9, 30)
    assert ffi.string(params.secondary) == b"aio:/mirror"


def test_no_parent_is_minus_one_where_c_reads_the_parent_minor(ffi: FFI) -> None:
    # blktap's tap-ctl sends prt_devnum = -1 unless -e is given (control/tap-ctl.c:725,
    # tap-ctl-open.c:56); its tapdisk stacks on the parent's NBD socket for any value
    # >= 0 (drivers/tapdisk-image.c:363): 0 would stack every image on minor 0's.
    assert p.Params().prt_devnum == p.NO_PARENT == -1
    raw = bytearray(p.Message(p.MessageType.OPEN, 3, p.Params(devnum=3)).encode())
    c = ffi.cast("struct tapdisk_message *", ffi.from_buffer(raw))
    assert c.u.params.prt_devnum == 0xFFFFFFFF
    assert ffi.cast("int", c.u.params.prt_devnum) == -1
    decoded = p.decode(bytes(raw)).payload
    assert isinstance(decoded, p.Params) and decoded.prt_devnum == -1


def test_resume_lands_in_params(ffi: FFI) -> None:
    # blktap's tap-ctl puts RESUME's path in u.params.path (control/tap-ctl-unpause.c:58)
    # and its tapdisk reads it there (drivers/tapdisk-control.c:1054), not in u.resume.
    resume = p.Resume(flags=0x80, new_params="aio:/new", secondary="aio:/mirror")
    raw = bytearray(p.Message(p.MessageType.RESUME, 2, resume).encode())
    c = ffi.cast("struct tapdisk_message *", ffi.from_buffer(raw))
    assert c.u.params.flags == 0x80
    assert ffi.string(c.u.params.path) == b"aio:/new"
    assert ffi.string(c.u.params.secondary) == b"aio:/mirror"
    assert p.decode(bytes(raw)).payload == resume


def test_trailers_follow_open_and_resume_as_blktaps_tap_ctl_sends_them() -> None:
    # control/tap-ctl-ipc.c:191-219: with ADD_LOG a char[256] log path, then with
    # OPEN_ENCRYPTED a u8 key size and the key; the tapdisk reads only the log path
    # after RESUME (drivers/tapdisk-control.c:1037).
    flags = p.OpenFlags.ADD_LOG | p.OpenFlags.OPEN_ENCRYPTED
    opening = p.Message(p.MessageType.OPEN, 0, p.Params(flags=flags))
    trailer = p.Trailer("/log", b"k" * 32).encode(opening)
    assert trailer == b"/log".ljust(256, b"\0") + b"\x20" + b"k" * 32
    resuming = p.Message(p.MessageType.RESUME, 0, p.Resume(flags=flags))
    assert p.Trailer("/log", b"k" * 32).encode(resuming) == b"/log".ljust(256, b"\0")
    assert p.Trailer("/log").encode(p.Message(p.MessageType.OPEN, 0, p.Params())) == b""
    assert p.Trailer.expected(opening) == (True, True)
    assert p.Trailer.expected(p.Message(p.MessageType.PID)) == (False, False)
    with pytest.raises(p.ProtocolError, match="key"):
        p.Trailer(key=b"k" * 129).encode(opening)


def test_message_names_are_blktaps() -> None:
    # include/tapdisk-message.h, tapdisk_message_name().
    assert p.message_name(p.MessageType.ERROR) == "error"
    assert p.message_name(p.MessageType.STATS_RSP) == "stats response"
    assert p.message_name(p.MessageType.XENBLKIF_CONNECT) == "sring connect"
    assert p.message_name(99) == "unknown"


def test_blkif_and_stat_encoding_land_where_c_reads_them(ffi: FFI) -> None:
    blkif = p.Blkif(domid=5, devid=51712, grefs=(11, 12), order=1, proto=3, pool="p",
                    port=42, poll_duration=1, poll_idle_threshold=2)
    raw = bytearray(p.Message(p.MessageType.XENBLKIF_CONNECT, 1, blkif).encode())
    c = ffi.cast("struct tapdisk_message *", ffi.from_buffer(raw))
    assert (c.u.blkif.domid, c.u.blkif.devid, c.u.blkif.order) == (5, 51712, 1)
    assert list(c.u.blkif.gref)[:2] == [11, 12]
    assert (c.u.blkif.port, c.u.blkif.poll_idle_threshold) == (42, 2)
    stat = p.StatInfo(22, 4, 1 << 40)
    raw = bytearray(p.Message(p.MessageType.STATS_RSP, 4, stat).encode())
    c = ffi.cast("struct tapdisk_message *", ffi.from_buffer(raw))
    assert (c.u.info.type, c.u.info.cookie, c.u.info.length) == (22, 4, 1 << 40)


def test_message_ids_follow_blktaps_order() -> None:
    assert [t.value for t in p.MessageType] == list(range(1, 31))
    assert (int(p.MessageType.XENBLKIF_CONNECT), int(p.MessageType.EXIT)) == (24, 30)
    assert p.reply_type(p.MessageType.ATTACH) is p.MessageType.ATTACH_RSP
    assert p.reply_type(p.MessageType.DISK_INFO) is p.MessageType.DISK_INFO_RSP
    assert p.reply_type(p.MessageType.FORCE_SHUTDOWN) is p.MessageType.CLOSE_RSP
    with pytest.raises(p.ProtocolError):
        p.reply_type(p.MessageType.EXIT)


def test_open_flag_and_state_bit_values_are_blktaps() -> None:
    assert (int(p.OpenFlags.NO_O_DIRECT), int(p.OpenFlags.OPEN_ENCRYPTED)) == (0x200, 0x400)
    assert VbdStateBits.PAUSED | VbdStateBits.QUIESCED | VbdStateBits.CLOSED == 0x2A
    assert p.ResumeFlags.RESIZE & 0xFFFF == 0  # never collides with an open flag


SAMPLES = [
    p.Message(p.MessageType.PID, 0),
    p.Message(p.MessageType.PID_RSP, 0, p.Pid(18672)),
    p.Message(p.MessageType.OPEN_RSP, 3, p.ImageInfo(131072, 512, 4)),
    p.Message(p.MessageType.DISK_INFO_RSP, 3, p.ImageInfo(131072, 512, 0, 4096, 1)),
    p.Message(p.MessageType.ERROR, 3, p.Response(114, "minor 3 is open")),
    p.Message(p.MessageType.LIST_MINORS_RSP, 0, p.Minors((0, 5, 16383))),
    p.Message(p.MessageType.LIST_RSP, 0xFFFF, p.ListEntry(2, 0, 0x2A, "aio:/p")),
    p.Message(p.MessageType.RESUME, 1, p.Resume(0x10000, "aio:/new", "")),
    p.Message(p.MessageType.ATTACH, 9, p.Params(devnum=9)),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.type.name)
def test_round_trip(message: p.Message) -> None:
    data = message.encode()
    assert len(data) == p.MESSAGE_SIZE
    assert p.decode(data) == message


@given(
    flags=st.integers(0, 2**32 - 1), devnum=st.integers(0, 2**32 - 1),
    path=st.text(st.characters(min_codepoint=1, max_codepoint=0x7F), max_size=255),
    timeout=st.integers(0, 0xFFFF),
)
def test_params_round_trip(flags: int, devnum: int, path: str, timeout: int) -> None:
    message = p.Message(p.MessageType.OPEN, 1, p.Params(flags, devnum, 0, path, -1, timeout))
    assert p.decode(message.encode()) == message


def test_blkif_extension_lands_where_c_reads_it_and_blktaps_reads_as_not_offered(
        ffi: FFI) -> None:
    blkif = p.Blkif(domid=5, devid=51712, grefs=(11,), port=42, max_indirect_segments=256)
    raw = bytearray(p.Message(p.MessageType.XENBLKIF_CONNECT, 1, blkif).encode())
    ext = ffi.cast("struct tapdisk_message_blkif_ext *", ffi.from_buffer(raw[p.UNION_OFFSET:]))
    assert (ext.port, ext.max_indirect_segments) == (42, 256)
    assert p.decode(bytes(raw)).payload == blkif
    # blktap's libblktapctl clears the message and fills only its own fields.
    off = p.OFFSETS["blkif.max_indirect_segments"]
    raw[off : off + 4] = bytes(4)
    decoded = p.decode(bytes(raw)).payload
    assert isinstance(decoded, p.Blkif) and decoded.max_indirect_segments == 0


def test_order_4_ring_carries_its_last_eight_grants_in_gref_hi(ffi: FFI) -> None:
    refs = tuple(range(100, 116))
    raw = bytearray(p.Message(p.MessageType.XENBLKIF_CONNECT, 1, p.Blkif(5, 7, refs, 4)).encode())
    union = raw[p.UNION_OFFSET:]  # kept alive while the C view reads it
    ext = ffi.cast("struct tapdisk_message_blkif_ext *", ffi.from_buffer(union))
    assert (list(ext.gref), list(ext.gref_hi), ext.order) == (list(refs[:8]), list(refs[8:]), 4)
    decoded = p.decode(bytes(raw)).payload
    assert isinstance(decoded, p.Blkif) and decoded.grefs == refs


@pytest.mark.parametrize("order", [5, 31, 2**32 - 1])
def test_ring_order_past_sixteen_grants_is_refused(order: int) -> None:
    raw = bytearray(p.Message(p.MessageType.XENBLKIF_CONNECT, 1, p.Blkif(5, 7, (1,))).encode())
    raw[p.OFFSETS["blkif.order"] : p.OFFSETS["blkif.order"] + 4] = order.to_bytes(4, "little")
    with pytest.raises(p.ProtocolError, match="grant refs"):
        p.decode(bytes(raw))


def test_discard_withheld_travels_in_blkif_flags_and_blktaps_zero_serves_it(ffi: FFI) -> None:
    blkif = p.Blkif(5, 7, (1,), flags=p.BlkifFlags.NO_DISCARD)
    raw = bytearray(p.Message(p.MessageType.XENBLKIF_CONNECT, 1, blkif).encode())
    union = raw[p.UNION_OFFSET:]
    ext = ffi.cast("struct tapdisk_message_blkif_ext *", ffi.from_buffer(union))
    assert ext.flags == p.BlkifFlags.NO_DISCARD
    assert p.decode(bytes(raw)).payload == blkif
    off = p.OFFSETS["blkif.flags"]
    raw[off : off + 4] = bytes(4)  # what blktap's libblktapctl leaves there
    decoded = p.decode(bytes(raw)).payload
    assert isinstance(decoded, p.Blkif) and decoded.flags == p.BlkifFlags.NONE


def test_each_queue_connects_with_its_index_and_blktaps_zeroes_are_one_queue(
        ffi: FFI) -> None:
    blkif = p.Blkif(5, 7, (1,), port=9, queue=2, nr_queues=4)
    raw = bytearray(p.Message(p.MessageType.XENBLKIF_CONNECT, 1, blkif).encode())
    union = raw[p.UNION_OFFSET:]
    ext = ffi.cast("struct tapdisk_message_blkif_ext *", ffi.from_buffer(union))
    assert (ext.queue, ext.nr_queues, ext.port, ext.gref[0]) == (2, 4, 9, 1)
    assert p.decode(bytes(raw)).payload == blkif
    for name in ("blkif.queue", "blkif.nr_queues"):  # what blktap's libblktapctl leaves
        raw[p.OFFSETS[name] : p.OFFSETS[name] + 4] = bytes(4)
    decoded = p.decode(bytes(raw)).payload
    assert isinstance(decoded, p.Blkif) and (decoded.queue, decoded.queues) == (0, 1)


@pytest.mark.parametrize(("queue", "nr_queues"), [(1, 1), (4, 4), (0, p.MAX_QUEUES + 1),
                                                  (2**32 - 1, 2), (1, 0)])
def test_a_queue_outside_its_count_is_refused(queue: int, nr_queues: int) -> None:
    raw = bytearray(p.Message(p.MessageType.XENBLKIF_CONNECT, 1, p.Blkif(5, 7, (1,))).encode())
    for name, value in (("blkif.queue", queue), ("blkif.nr_queues", nr_queues)):
        raw[p.OFFSETS[name] : p.OFFSETS[name] + 4] = value.to_bytes(4, "little")
    with pytest.raises(p.ProtocolError, match="queue"):
        p.decode(bytes(raw))
    with pytest.raises(p.ProtocolError, match="queue"):
        p.Blkif(5, 7, (1,), queue=queue, nr_queues=nr_queues).pack()


def test_blkif_keeps_only_the_grants_its_order_uses() -> None:
    message = p.Message(p.MessageType.XENBLKIF_CONNECT, 0, p.Blkif(1, 2, (7, 8, 9, 10), 2))
    decoded = p.decode(message.encode()).payload
    assert isinstance(decoded, p.Blkif) and decoded.grefs == (7, 8, 9, 10)


@pytest.mark.parametrize("size", [0, 1, 543])
def test_short_message_is_rejected(size: int) -> None:
    with pytest.raises(p.ProtocolError, match="short"):
        p.decode(bytes(size))


def test_oversized_message_is_rejected() -> None:
    with pytest.raises(p.ProtocolError, match="oversized"):
        p.decode(p.Message(p.MessageType.PID).encode() + b"\0")


@pytest.mark.parametrize("mtype", [0, 31, 0xFFFF])
def test_unknown_type_is_rejected(mtype: int) -> None:
    with pytest.raises(p.ProtocolError, match="unknown message type"):
        p.decode(struct.pack("<HH", mtype, 0).ljust(p.MESSAGE_SIZE, b"\0"))


def test_out_of_range_counts_are_rejected() -> None:
    raw = struct.pack("<HH4xi", p.MessageType.LIST_MINORS_RSP, 0, 64).ljust(544, b"\0")
    with pytest.raises(p.ProtocolError, match="count"):
        p.decode(raw)
    raw = struct.pack("<HH4x10Ii", p.MessageType.XENBLKIF_CONNECT, 0, *[0] * 10, 5)
    with pytest.raises(p.ProtocolError, match="order"):
        p.decode(raw.ljust(544, b"\0"))


def test_encoding_refuses_what_does_not_fit() -> None:
    with pytest.raises(p.ProtocolError, match="at most 255"):
        p.Message(p.MessageType.OPEN, 0, p.Params(path="a" * 256)).encode()
    with pytest.raises(p.ProtocolError, match="carries Params"):
        p.Message(p.MessageType.OPEN, 0, p.Resume()).encode()
    with pytest.raises(p.ProtocolError, match="cookie"):
        p.Message(p.MessageType.PID, 0x10000).encode()
    with pytest.raises(p.ProtocolError):
        p.Message(p.MessageType.OPEN, 0, p.Params(flags=-1)).encode()


def test_server_messages_are_truncated_not_refused() -> None:
    reply = p.Message(p.MessageType.ERROR, 0, p.Response(5, "x" * 400))
    decoded = p.decode(reply.encode()).payload
    assert isinstance(decoded, p.Response) and decoded.message == "x" * 255


def test_strings_that_are_not_utf8_round_trip_as_their_bytes() -> None:
    """A path decoded from the wire (surrogate-escaped) encodes back to the same bytes,
    also inside an error message, instead of raising UnicodeEncodeError."""
    from blktap3.ctl import protocol as proto

    raw = b"aio:/tmp/\xff\xfe.img"
    text = raw.decode(errors="surrogateescape")
    msg = proto.Message(proto.MessageType.OPEN, 1, proto.Params(path=text))
    decoded = proto.decode(msg.encode())
    assert isinstance(decoded.payload, proto.Params) and decoded.payload.path == text
    error = proto.Message(proto.MessageType.ERROR, 1, proto.Response(22, f"{text}: bad"))
    payload = proto.decode(error.encode()).payload
    assert isinstance(payload, proto.Response) and payload.message == f"{text}: bad"


def test_persistent_grants_travel_as_a_blkif_flag_bit_beside_no_discard() -> None:
    flags = p.BlkifFlags.NO_DISCARD | p.BlkifFlags.PERSISTENT
    raw = p.Message(p.MessageType.XENBLKIF_CONNECT, 1, p.Blkif(5, 7, (1,), flags=flags)).encode()
    off = p.OFFSETS["blkif.flags"]
    assert int.from_bytes(raw[off : off + 4], "little") == 0x3
    decoded = p.decode(raw).payload
    assert isinstance(decoded, p.Blkif) and decoded.flags == flags
