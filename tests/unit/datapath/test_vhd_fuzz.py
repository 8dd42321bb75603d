"""Mutated VHD images (hypothesis): whatever the bytes, the format module either accepts
the image or raises VhdError, and an accepted image is served by the C driver over its
whole size without a crash or a read outside the file (ASan watches in the sanitizer
run). Not a coverage-guided fuzzer (libFuzzer/AFL++ on the parser is still to do)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blktap3.datapath import Image
from blktap3.datapath import vhdformat as vhd

MiB = 1 << 20


def _seed_image() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "seed.vhd"
        vhd.create(p, 4 * MiB)
        img = Image.open("vhd", str(p))
        img.write(0, b"\x5a" * 4096)
        img.write(4096 + 8, b"\xa5" * 512)
        img.close()
        return p.read_bytes()


SEED = _seed_image()
# Where the metadata lives: footer copy, header, BAT, batmap, the end footer.
HOT = [*range(0, 512 * 5), *range(len(SEED) - 512, len(SEED))]


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(HOT), st.integers(0, 255)), min_size=1,
                      max_size=8),
       cut=st.one_of(st.none(), st.integers(0, len(SEED))))
def test_mutated_images_are_refused_or_served_safely(
        edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(SEED)
    for off, value in edits:
        data[off] = value
    if cut is not None:
        del data[cut:]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.vhd"
        p.write_bytes(bytes(data))
        try:
            vhd.open_chain(p)
        except vhd.VhdError:
            return
        try:
            img = Image.open("vhd", str(p), readonly=True)
        except OSError:
            return      # the C checks may refuse what Python took (a parent, a bitmap)
        try:
            for sector in range(0, img.info.sectors, 2048):
                # EIO for a block the file does not hold is an answer.
                with contextlib.suppress(OSError):
                    img.read(sector, min(2048, img.info.sectors - sector))
        finally:
            img.close()
