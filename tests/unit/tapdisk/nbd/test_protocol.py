"""The NBD codec (no I/O): greetings, option haggling, requests and replies, hostile bytes."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blktap3.tapdisk.nbd import protocol as nbd

MiB = 1 << 20
SIZE = 64 * MiB
EXPORT = nbd.ExportInfo(size=SIZE, readonly=False, can_trim=True)
READ_ONLY = nbd.ExportInfo(size=SIZE, readonly=True, can_trim=False)
T = nbd.TransmissionFlags


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split a stream of option replies: [(option, reply type, data)]; all of it parses."""
    out = []
    while data:
        magic, opt, rtype, length = struct.unpack(">QIII", data[:20])
        assert magic == 0x3E889045565A9
        assert len(data) >= 20 + length
        out.append((opt, rtype, data[20:20 + length]))
        data = data[20 + length:]
    return out


def negotiation(export: nbd.ExportInfo = EXPORT, flags: int = 3) -> nbd.Negotiation:
    return nbd.Negotiation(export, nbd.parse_client_flags(struct.pack(">I", flags)))


def info_data(name: bytes = b"", infos: tuple[int, ...] = (3,)) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def meta_data(*queries: bytes, name: bytes = b"") -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


# -- greetings and flags ----------------------------------------------------------------


def test_newstyle_greeting_is_nbdmagic_ihaveopt_fixed_newstyle_no_zeroes() -> None:
    assert nbd.newstyle_greeting() == b"NBDMAGICIHAVEOPT\x00\x03"


def test_oldstyle_greeting_is_blktaps_152_bytes_with_size_and_flags() -> None:
    greeting = nbd.oldstyle_greeting(EXPORT)
    assert len(greeting) == 152
    assert greeting[:8] == b"NBDMAGIC"
    assert struct.unpack(">QQI", greeting[8:28]) == (0x00420281861253, SIZE, int(EXPORT.flags))
    assert greeting[28:] == bytes(124)


def test_flags_of_a_writable_image_with_discard() -> None:
    assert EXPORT.flags == (T.HAS_FLAGS | T.SEND_FLUSH | T.SEND_FUA | T.SEND_TRIM
                            | T.SEND_WRITE_ZEROES | T.CAN_MULTI_CONN)


def test_flags_without_discard_do_not_offer_trim() -> None:
    flags = nbd.ExportInfo(SIZE, readonly=False, can_trim=False).flags
    assert not flags & T.SEND_TRIM and flags & T.SEND_WRITE_ZEROES


def test_flags_of_a_read_only_image_offer_no_write() -> None:
    flags = READ_ONLY.flags
    assert flags & T.READ_ONLY
    assert not flags & (T.SEND_FUA | T.SEND_TRIM | T.SEND_WRITE_ZEROES)


@pytest.mark.parametrize("flags", [4, 0x80000000, 0xFFFFFFFF])
def test_unknown_client_flags_end_the_session(flags: int) -> None:
    with pytest.raises(nbd.ProtocolError):
        nbd.parse_client_flags(struct.pack(">I", flags))


def test_option_header_with_bad_magic_or_oversized_data_is_fatal() -> None:
    with pytest.raises(nbd.ProtocolError):
        nbd.parse_option_header(b"IHAVEOPX" + struct.pack(">II", 7, 0))
    with pytest.raises(nbd.ProtocolError):
        nbd.parse_option_header(b"IHAVEOPT" + struct.pack(">II", 7, nbd.MAX_OPTION_DATA + 1))
    assert nbd.parse_option_header(b"IHAVEOPT" + struct.pack(">II", 7, 10)) == (7, 10)


# -- options ----------------------------------------------------------------------------


def test_export_name_enters_transmission_with_size_flags_and_zeroes() -> None:
    n = negotiation(flags=1)  # no NO_ZEROES
    reply = n.handle(nbd.Opt.EXPORT_NAME, b"any name")
    assert n.phase is nbd.Phase.TRANSMISSION
    assert reply == struct.pack(">QH", SIZE, int(EXPORT.flags)) + bytes(124)


def test_export_name_without_zeroes_when_the_client_asked() -> None:
    n = negotiation(flags=3)
    assert n.handle(nbd.Opt.EXPORT_NAME, b"") == struct.pack(">QH", SIZE, int(EXPORT.flags))


def test_abort_is_acked_and_ends_the_session() -> None:
    n = negotiation()
    assert replies(n.handle(nbd.Opt.ABORT, b"ignored")) == [(2, nbd.Rep.ACK, b"")]
    assert n.phase is nbd.Phase.CLOSED


def test_list_names_blktaps_single_export() -> None:
    n = negotiation()
    assert replies(n.handle(nbd.Opt.LIST, b"")) == [
        (3, nbd.Rep.SERVER, struct.pack(">I", 14) + b"tapdisk_client"),
        (3, nbd.Rep.ACK, b""),
    ]
    assert replies(n.handle(nbd.Opt.LIST, b"x"))[0][1] == nbd.Rep.ERR_INVALID
    assert n.phase is nbd.Phase.OPTIONS


@pytest.mark.parametrize("opt", [nbd.Opt.INFO, nbd.Opt.GO])
def test_info_and_go_give_size_flags_and_block_sizes(opt: nbd.Opt) -> None:
    n = negotiation()
    got = replies(n.handle(opt, info_data(b"whatever", (3, 1, 2, 0, 77))))
    assert got == [
        (opt, nbd.Rep.INFO, struct.pack(">HQH", 0, SIZE, int(EXPORT.flags))),
        (opt, nbd.Rep.INFO, struct.pack(">HIII", 3, 512, 4096, 32 * MiB)),
        (opt, nbd.Rep.ACK, b""),
    ]
    expected = nbd.Phase.TRANSMISSION if opt == nbd.Opt.GO else nbd.Phase.OPTIONS
    assert n.phase is expected


def test_block_size_minimum_follows_the_image_sector() -> None:
    n = negotiation(nbd.ExportInfo(SIZE, readonly=False, can_trim=False, min_block=4096))
    sizes = replies(n.handle(nbd.Opt.GO, info_data()))[1][2]
    assert struct.unpack(">HIII", sizes) == (3, 4096, 4096, 32 * MiB)


@pytest.mark.parametrize("data", [
    b"",                                              # too short for a name length
    struct.pack(">I", 100) + b"abc" + b"\0\0",        # name longer than the option
    info_data(b"x", (3,)) + b"\0",                    # trailing byte
    struct.pack(">I", 0) + struct.pack(">H", 2) + b"\0\3",  # fewer infos than counted
])
def test_malformed_info_is_invalid_and_the_handshake_goes_on(data: bytes) -> None:
    n = negotiation()
    assert [r[1] for r in replies(n.handle(nbd.Opt.GO, data))] == [nbd.Rep.ERR_INVALID]
    assert n.phase is nbd.Phase.OPTIONS


def test_structured_reply_takes_no_data() -> None:
    n = negotiation()
    assert replies(n.handle(nbd.Opt.STRUCTURED_REPLY, b"x"))[0][1] == nbd.Rep.ERR_INVALID
    assert not n.structured
    assert replies(n.handle(nbd.Opt.STRUCTURED_REPLY, b"")) == [(8, nbd.Rep.ACK, b"")]
    assert n.session.structured


def test_set_meta_context_needs_structured_replies_first() -> None:
    n = negotiation()
    got = replies(n.handle(nbd.Opt.SET_META_CONTEXT, meta_data(b"base:allocation")))
    assert [r[1] for r in got] == [nbd.Rep.ERR_INVALID]
    assert not n.session.base_allocation


def test_set_meta_context_selects_base_allocation_only() -> None:
    n = negotiation()
    n.handle(nbd.Opt.STRUCTURED_REPLY, b"")
    got = replies(n.handle(nbd.Opt.SET_META_CONTEXT,
                           meta_data(b"qemu:dirty-bitmap:x", b"base:allocation", b"base:")))
    assert got == [(10, nbd.Rep.META_CONTEXT, struct.pack(">I", 1) + b"base:allocation"),
                   (10, nbd.Rep.ACK, b"")]
    assert n.session.base_allocation
    # A later SET replaces the selection: none now.
    assert replies(n.handle(nbd.Opt.SET_META_CONTEXT, meta_data())) == [(10, nbd.Rep.ACK, b"")]
    assert not n.session.base_allocation


@pytest.mark.parametrize("queries", [(), (b"base:",), (b"base:allocation", b"x-y:z")])
def test_list_meta_context_lists_base_allocation(queries: tuple[bytes, ...]) -> None:
    n = negotiation()
    n.handle(nbd.Opt.STRUCTURED_REPLY, b"")
    got = replies(n.handle(nbd.Opt.LIST_META_CONTEXT, meta_data(*queries)))
    assert got == [(9, nbd.Rep.META_CONTEXT, struct.pack(">I", 0) + b"base:allocation"),
                   (9, nbd.Rep.ACK, b"")]
    assert not n.session.base_allocation  # listing selects nothing


def test_meta_context_with_a_query_running_past_the_data_is_invalid() -> None:
    n = negotiation()
    n.handle(nbd.Opt.STRUCTURED_REPLY, b"")
    data = struct.pack(">II", 0, 1) + struct.pack(">I", 50) + b"base:allocation"
    assert [r[1] for r in replies(n.handle(nbd.Opt.SET_META_CONTEXT, data))] == [
        nbd.Rep.ERR_INVALID]


@pytest.mark.parametrize("opt", [nbd.Opt.STARTTLS, nbd.Opt.PEEK_EXPORT,
                                 nbd.Opt.EXTENDED_HEADERS, 12, 999, 0, 0xFFFFFFFF])
def test_unsupported_options_are_answered_not_fatal(opt: int) -> None:
    n = negotiation()
    assert [r[:2] for r in replies(n.handle(opt, b"data"))] == [(opt, nbd.Rep.ERR_UNSUP)]
    assert n.phase is nbd.Phase.OPTIONS


def test_too_many_options_end_the_session() -> None:
    n = negotiation()
    for _ in range(nbd.MAX_OPTIONS):
        n.handle(nbd.Opt.LIST, b"")
    with pytest.raises(nbd.ProtocolError):
        n.handle(nbd.Opt.LIST, b"")


def test_no_option_after_go() -> None:
    n = negotiation()
    n.handle(nbd.Opt.GO, info_data())
    with pytest.raises(nbd.ProtocolError):
        n.handle(nbd.Opt.LIST, b"")


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=300)), max_size=20))
def test_any_option_sequence_gets_well_formed_replies(
    options: list[tuple[int, bytes]],
) -> None:
    n = negotiation()
    for opt, data in options:
        if n.phase is not nbd.Phase.OPTIONS:
            break
        reply = n.handle(opt, data)
        if opt == nbd.Opt.EXPORT_NAME:
            assert len(reply) == 10 and n.phase is nbd.Phase.TRANSMISSION
            continue
        parsed = replies(reply)
        assert parsed and all(r[0] == opt for r in parsed)
        final = parsed[-1][1]
        assert final == nbd.Rep.ACK or final & (1 << 31)
        assert all(r[1] in (nbd.Rep.SERVER, nbd.Rep.INFO, nbd.Rep.META_CONTEXT)
                   for r in parsed[:-1])


@given(st.binary(min_size=0, max_size=64))
def test_structured_then_any_meta_context_data_never_raises(data: bytes) -> None:
    n = negotiation()
    n.handle(nbd.Opt.STRUCTURED_REPLY, b"")
    for opt in (nbd.Opt.SET_META_CONTEXT, nbd.Opt.LIST_META_CONTEXT):
        assert replies(n.handle(opt, data))[-1][1] in (nbd.Rep.ACK, nbd.Rep.ERR_INVALID)


# -- requests -------------------------------------------------------------------------


def header(cmd: int, offset: int = 0, length: int = 512, flags: int = 0,
           cookie: int = 7, magic: int = nbd.REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)


SESSION = nbd.Session(EXPORT, structured=True, base_allocation=True)


def refusal(data: bytes, session: nbd.Session = SESSION) -> int | None:
    result = nbd.check_request(nbd.parse_request(data), session, SIZE)
    return None if result is None else int(result.error)


def test_request_with_bad_magic_is_fatal() -> None:
    with pytest.raises(nbd.ProtocolError):
        nbd.parse_request(header(nbd.Cmd.READ, magic=0x25609514))


def test_request_fields_round_trip() -> None:
    request = nbd.parse_request(header(nbd.Cmd.WRITE, 4096, 8192, flags=1, cookie=2**64 - 1))
    assert request == nbd.Request(1, nbd.Cmd.WRITE, 2**64 - 1, 4096, 8192)
    assert nbd.write_payload(request) == 8192


def test_a_write_larger_than_the_maximum_payload_is_fatal() -> None:
    with pytest.raises(nbd.ProtocolError):
        nbd.write_payload(nbd.parse_request(header(nbd.Cmd.WRITE, 0, 32 * MiB + 512)))
    assert nbd.write_payload(nbd.parse_request(header(nbd.Cmd.READ, 0, 2**32 - 1))) == 0


@pytest.mark.parametrize(("data", "error"), [
    (header(nbd.Cmd.READ), None),
    (header(nbd.Cmd.READ, 1, 3), None),                      # unaligned reads are served
    (header(nbd.Cmd.READ, SIZE - 512, 512), None),
    (header(nbd.Cmd.READ, SIZE - 512, 1024), errno.EINVAL),  # past the end
    (header(nbd.Cmd.READ, 2**64 - 512, 1024), errno.EINVAL),  # wraps in C, not here
    (header(nbd.Cmd.READ, 0, 32 * MiB + 512), errno.EINVAL),  # larger than the maximum
    (header(nbd.Cmd.READ, 0, 0), errno.EINVAL),
    (header(nbd.Cmd.READ, flags=nbd.CmdFlags.DF), errno.EINVAL),  # DF not offered
    (header(nbd.Cmd.WRITE, flags=nbd.CmdFlags.FUA), None),
    (header(nbd.Cmd.WRITE, flags=nbd.CmdFlags.NO_HOLE), errno.EINVAL),
    (header(nbd.Cmd.WRITE, SIZE, 512), errno.ENOSPC),
    (header(nbd.Cmd.WRITE, 100, 512), errno.EINVAL),        # unaligned write
    (header(nbd.Cmd.WRITE, 0, 100), errno.EINVAL),
    (header(nbd.Cmd.WRITE_ZEROES, flags=nbd.CmdFlags.NO_HOLE | nbd.CmdFlags.FUA), None),
    (header(nbd.Cmd.WRITE_ZEROES, flags=nbd.CmdFlags.FAST_ZERO), errno.EINVAL),
    (header(nbd.Cmd.WRITE_ZEROES, SIZE - 512, 1024), errno.ENOSPC),
    (header(nbd.Cmd.TRIM, 1, 3), None),                      # rounded inward, not refused
    (header(nbd.Cmd.TRIM, SIZE, 512), errno.EINVAL),
    (header(nbd.Cmd.FLUSH, 0, 0), None),
    (header(nbd.Cmd.BLOCK_STATUS, 0, SIZE, flags=nbd.CmdFlags.REQ_ONE), None),
    (header(nbd.Cmd.BLOCK_STATUS, 0, SIZE + 1), errno.EINVAL),
    (header(nbd.Cmd.CACHE), errno.EINVAL),                   # not offered
    (header(nbd.Cmd.RESIZE), errno.EINVAL),
    (header(9), errno.EINVAL),
    (header(0xFFFF), errno.EINVAL),
    (header(nbd.Cmd.FLUSH, flags=0x8000), errno.EINVAL),
])
def test_request_checks(data: bytes, error: int | None) -> None:
    assert refusal(data) == error


@pytest.mark.parametrize("cmd", [nbd.Cmd.WRITE, nbd.Cmd.TRIM, nbd.Cmd.WRITE_ZEROES])
def test_a_read_only_export_refuses_changes_with_eperm(cmd: nbd.Cmd) -> None:
    session = nbd.Session(READ_ONLY, structured=True)
    assert refusal(header(cmd), session) == errno.EPERM
    assert refusal(header(nbd.Cmd.READ), session) is None
    assert refusal(header(nbd.Cmd.FLUSH, 0, 0), session) is None


def test_trim_is_refused_when_the_image_cannot_punch() -> None:
    session = nbd.Session(nbd.ExportInfo(SIZE, readonly=False, can_trim=False))
    assert refusal(header(nbd.Cmd.TRIM), session) == errno.EINVAL


def test_block_status_needs_a_negotiated_context() -> None:
    session = nbd.Session(EXPORT, structured=True, base_allocation=False)
    assert refusal(header(nbd.Cmd.BLOCK_STATUS), session) == errno.EINVAL


@given(st.binary(min_size=28, max_size=28), st.integers(0, 2**40))
def test_any_header_parses_or_is_fatal_and_checks_never_raise(data: bytes, size: int) -> None:
    try:
        request = nbd.parse_request(data)
    except nbd.ProtocolError:
        assert data[:4] != struct.pack(">I", nbd.REQUEST_MAGIC)
        return
    result = nbd.check_request(request, SESSION, size)
    if result is None and request.type not in (nbd.Cmd.DISC, nbd.Cmd.FLUSH):
        # Anything let through touches only the export, with a non-empty length.
        assert request.length > 0 and request.end <= size
        assert request.type in (nbd.Cmd.READ, nbd.Cmd.WRITE, nbd.Cmd.TRIM,
                                nbd.Cmd.WRITE_ZEROES, nbd.Cmd.BLOCK_STATUS)
    elif result is not None:
        assert result.error in nbd.Errno


# -- replies --------------------------------------------------------------------------


def test_simple_reply_layout() -> None:
    assert nbd.simple_reply(5, 22) == struct.pack(">IIQ", 0x67446698, 22, 5)


def test_structured_read_header_is_one_final_offset_data_chunk() -> None:
    got = nbd.read_reply_header(9, 4096, 1000, SESSION)
    assert got == struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 9, 1008, 4096)
    plain = nbd.Session(EXPORT)
    assert nbd.read_reply_header(9, 4096, 1000, plain) == nbd.simple_reply(9)


def test_errors_carry_their_reason_under_structured_replies() -> None:
    why = nbd.Refusal(nbd.Errno.ENOSPC, "full")
    got = nbd.error_reply(3, why, SESSION)
    assert got == struct.pack(">IHHQI", 0x668E33EF, 1, 0x8001, 3, 10) + struct.pack(
        ">IH", 28, 4) + b"full"
    assert nbd.error_reply(3, why, nbd.Session(EXPORT)) == nbd.simple_reply(3, 28)


def test_block_status_reply_layout() -> None:
    got = nbd.block_status_reply(4, [(4096, nbd.State.DATA), (8192, nbd.State.HOLE
                                                               | nbd.State.ZERO)])
    assert got == struct.pack(">IHHQI", 0x668E33EF, 1, 5, 4, 20) + struct.pack(
        ">IIIII", 1, 4096, 0, 8192, 3)


@pytest.mark.parametrize(("os_errno", "wire"), [
    (errno.EROFS, 1), (errno.EACCES, 1), (errno.EDQUOT, 28), (errno.EFBIG, 28),
    (errno.ENOSPC, 28), (errno.EINVAL, 22), (errno.EOVERFLOW, 75), (errno.EBADF, 5),
    (None, 5),
])
def test_os_errors_map_to_nbd_errors(os_errno: int | None, wire: int) -> None:
    assert nbd.nbd_errno(os_errno) == wire
