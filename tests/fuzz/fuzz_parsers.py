"""atheris targets of the Python parsers of untrusted input: ``python fuzz_parsers.py
TARGET [libFuzzer args] [corpus dirs]``; run by ``run_fuzzers.py``.

- ``ctl``: a control message off the socket (``blktap3.ctl.protocol.decode``): a
  Message or ProtocolError, and what decodes encodes back to itself;
- ``xenbus``: a front-end's transport keys, protocol and feature flags as tapback reads
  them (``blktap3.xenbus.schema``): a value or XenbusValueError;
- ``nbd``: an NBD client's option haggling and transmission requests
  (``blktap3.tapdisk.nbd.protocol``): bytes to send, a refusal, or ProtocolError;
- ``vhdformat``: a VHD file (``blktap3.datapath.vhdformat.Layer.open``, the seeds of
  ``corpus/vhd/`` decoded by ``vhd_seeds.decode``): a Layer or VhdError; what it takes
  has every block inside the data area and apart from the others, and a dynamic or fixed
  image it takes the C driver opens too and reads through, its answers those of the
  format module's own reader.

Anything else raised is a finding (libFuzzer saves the input as a crash).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from blktap3.ctl import protocol as ctl
    from blktap3.datapath import Image
    from blktap3.datapath import vhdformat as vhd
    from blktap3.tapdisk.nbd import protocol as nbd
    from blktap3.xenbus import schema
    from blktap3.xenbus.errors import XenbusValueError
    from tests.fuzz.vhd_seeds import decode as decode_vhd


def fuzz_ctl(data: bytes) -> None:
    raw = data[:ctl.MESSAGE_SIZE].ljust(ctl.MESSAGE_SIZE, b"\0") if data[:1] != b"\xff" \
        else data[1:]   # a first byte 0xff: the length as given (short, oversized)
    try:
        msg = ctl.decode(raw)
    except ctl.ProtocolError:
        return
    again = ctl.decode(msg.encode())   # a ProtocolError here is a finding too
    if again != msg:
        raise AssertionError(f"{msg!r} re-encodes as {again!r}")


XENBUS_KEYS = ("ring-ref", "ring-ref0", "ring-ref1", "ring-ref2", "ring-ref3",
               "event-channel", "ring-page-order", "multi-queue-num-queues",
               "queue-0/ring-ref", "queue-0/event-channel", "queue-1/ring-ref",
               "queue-1/event-channel", "queue-0/ring-ref0", "queue-0/ring-ref1",
               "protocol")


def fuzz_xenbus(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    values: dict[str, str] = {}
    for key in XENBUS_KEYS:
        if fdp.ConsumeBool():
            values[key] = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 24))
    with contextlib.suppress(XenbusValueError):
        schema.parse_frontend_transport(values.get, max_ring_page_order=3, max_queues=4)
    with contextlib.suppress(XenbusValueError):
        schema.parse_protocol(values.get("protocol"))
    with contextlib.suppress(XenbusValueError):
        schema.parse_bool(values.get("protocol"), "feature-persistent")
    path = fdp.ConsumeUnicodeNoSurrogates(64)
    schema.parse_backend_path(path, "/local/domain/0/backend/vbd3")


def fuzz_nbd(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    export = nbd.ExportInfo(size=fdp.ConsumeIntInRange(0, 1 << 40),
                            readonly=fdp.ConsumeBool(), can_trim=fdp.ConsumeBool(),
                            min_block=fdp.PickValueInList([512, 4096]))
    try:
        flags = nbd.parse_client_flags(fdp.ConsumeBytes(4).ljust(4, b"\0"))
    except nbd.ProtocolError:
        return
    haggle = nbd.Negotiation(export, flags)
    try:
        for _ in range(fdp.ConsumeIntInRange(0, 6)):
            header = fdp.ConsumeBytes(16).ljust(16, b"\0")
            if fdp.ConsumeBool():   # mostly a well-formed header around fuzzed data
                header = struct.pack(">QII", 0x49484156454F5054, fdp.ConsumeInt(4) & 0xFF,
                                     fdp.ConsumeIntInRange(0, 64))
            option, length = nbd.parse_option_header(header)
            reply = haggle.handle(option, fdp.ConsumeBytes(length))
            if not isinstance(reply, bytes):
                raise AssertionError(f"option {option} answered {reply!r}")
            if haggle.phase != nbd.Phase.OPTIONS:
                break
        session = haggle.session
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            header = fdp.ConsumeBytes(28).ljust(28, b"\0")
            if fdp.ConsumeBool():
                header = struct.pack(">IHHQQI", 0x25609513, fdp.ConsumeInt(2) & 0xFFFF,
                                     fdp.ConsumeIntInRange(0, 10), 1, fdp.ConsumeInt(8) &
                                     (2**64 - 1), fdp.ConsumeInt(4) & 0xFFFFFFFF)
            request = nbd.parse_request(header)
            nbd.write_payload(request)
            refusal = nbd.check_request(request, session, export.size)
            if refusal is None and request.type in (nbd.Cmd.READ, nbd.Cmd.WRITE) and \
                    request.end > export.size:
                raise AssertionError(f"{request} past {export.size} accepted")
    except nbd.ProtocolError:
        pass


# The image lives in memory (libFuzzer ends the process with exit(): nothing to clean).
MEMFD = os.memfd_create("fuzz-vhdformat")


def fuzz_vhdformat(data: bytes) -> None:
    images = decode_vhd(data)
    if not images:
        return
    os.ftruncate(MEMFD, 0)
    os.pwrite(MEMFD, images[0], 0)
    path = Path(f"/proc/self/fd/{MEMFD}")
    try:
        layer = vhd.Layer.open(path)
    except vhd.VhdError:
        return
    meta_end = layer.footer_offset
    if layer.header is not None:
        span = layer.bitmap_size + layer.block_size
        blocks = sorted(e * vhd.SECTOR_SIZE for e in layer.bat if e != vhd.BAT_UNUSED)
        for a, b in itertools.pairwise(blocks):
            if a + span > b:
                raise AssertionError(f"blocks at {a} and {b} overlap")
        if blocks and (blocks[0] < layer.bat_bytes or blocks[-1] + span > meta_end):
            raise AssertionError(f"blocks {blocks[0]}..{blocks[-1]} outside the data")
        layer.parent_names()
    if layer.is_diff:
        return
    chain = vhd.open_chain(path)
    img = Image.open("vhd", str(path), readonly=True)   # an OSError here is a finding
    try:
        sectors = img.info.sectors
        for sector in {0, sectors // 2, max(0, sectors - 8)}:
            n = min(8, sectors - sector)
            if n <= 0:
                continue
            try:
                got = img.read(sector, n)
            except OSError:
                if layer.header is None:
                    raise
                continue    # EIO: a block whose bitmap the file lacks
            if got != vhd.read_chain(chain, sector, n):
                raise AssertionError(f"sector {sector}: the C driver and the format "
                                     "module read different bytes")
    finally:
        img.close()


TARGETS: dict[str, Callable[[bytes], None]] = {
    "ctl": fuzz_ctl, "xenbus": fuzz_xenbus, "nbd": fuzz_nbd, "vhdformat": fuzz_vhdformat,
}


def main() -> None:
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
