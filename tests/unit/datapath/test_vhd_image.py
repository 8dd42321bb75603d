"""The C VHD driver on real files, judged by oracles not written here: qemu-img/qemu-io
for fixed and dynamic images, and (given BLKTAP_BUILD, a blktap build) blktap's
vhd-util for chains: its `check` on what we wrote, its `coalesce` flattening our chains
into a dynamic image qemu-img then converts."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from blktap3.datapath import Image
from blktap3.datapath import vhdformat as vhd
from tests.support.tools import blktap_vhd_util, run_tool

MiB = 1 << 20
SIZE = 8 * MiB
needs_qemu = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-utils missing")
VHD_UTIL = blktap_vhd_util()
needs_blktap = pytest.mark.skipif(VHD_UTIL is None,
                                  reason="set BLKTAP_BUILD to a blktap install prefix")


def run(*cmd: str | Path) -> str:
    return run_tool(*cmd).stdout


def to_raw(path: Path) -> bytes:
    out = path.with_suffix(".raw")
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", path, out)
    return out.read_bytes()


def random_writes(img: Image, model: bytearray, rng: random.Random, n: int) -> None:
    """Writes of 1..96 sectors anywhere, block boundaries included."""
    sectors = len(model) // 512
    for _ in range(n):
        count = rng.randint(1, 96)
        sector = rng.randrange(0, sectors - count)
        data = rng.randbytes(count * 512)
        img.write(sector, data)
        model[sector * 512 : (sector + count) * 512] = data


@needs_qemu
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_images_qemu_io_wrote_read_identically(tmp_path: Path, subformat: str) -> None:
    p = tmp_path / "q.vhd"
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", f"subformat={subformat},force_size=on",
        p, str(SIZE))
    run("qemu-io", "-f", "vpc", "-c", "write -P 0xab 0 64k", "-c", "write -P 0xcd 2044k 8k",
        "-c", "write -P 0x5a 7m 512", p)
    img = Image.open("vhd", str(p), readonly=True)
    try:
        assert img.info.sectors == SIZE // 512
        assert img.read(0, SIZE // 512) == to_raw(p)
    finally:
        img.close()


@needs_qemu
@pytest.mark.parametrize("fixed", [False, True])
def test_what_we_write_converts_to_the_same_raw_bytes(tmp_path: Path, fixed: bool) -> None:
    p = tmp_path / "ours.vhd"
    vhd.create(p, SIZE, fixed=fixed)
    model = bytearray(SIZE)
    img = Image.open("vhd", str(p))
    try:
        random_writes(img, model, random.Random(1), 60)
        assert img.read(0, SIZE // 512) == model
    finally:
        img.close()
    assert to_raw(p) == model
    vhd.Layer.open(p)  # still a valid image, grown as it allocated


def test_a_read_only_vhd_refuses_writes(tmp_path: Path) -> None:
    vhd.create(tmp_path / "r.vhd", SIZE)
    img = Image.open("vhd", str(tmp_path / "r.vhd"), readonly=True)
    try:
        with pytest.raises(OSError) as exc:
            img.write(0, b"x" * 512)
        assert exc.value.errno == 30
    finally:
        img.close()


def test_a_damaged_vhd_is_refused_at_open_with_the_reason(tmp_path: Path) -> None:
    p = tmp_path / "bad.vhd"
    vhd.create(p, SIZE)
    with p.open("r+b") as f:
        f.seek(512 + 40)
        f.write(b"\1")      # the header's parent UUID: its checksum no longer matches
    with pytest.raises(OSError, match="header checksum") as exc:
        Image.open("vhd", str(p))
    assert exc.value.errno == 22


def make_chain(tmp_path: Path, depth: int) -> tuple[list[Path], bytearray]:
    """base.vhd <- s1.vhd <- ...: each layer written through our driver while it was the
    leaf; returns the files (leaf last) and what the leaf must read."""
    rng = random.Random(depth)
    files = [tmp_path / "base.vhd"]
    vhd.create(files[0], SIZE)
    model = bytearray(SIZE)
    for i in range(depth):
        img = Image.open("vhd", str(files[-1]))
        try:
            random_writes(img, model, rng, 25)
        finally:
            img.close()
        if i + 1 < depth:
            files.append(tmp_path / f"s{i + 1}.vhd")
            vhd.create(files[-1], 0, parent=files[-2])
    return files, model


def test_reads_fall_through_a_chain_of_three(tmp_path: Path) -> None:
    files, model = make_chain(tmp_path, 3)
    img = Image.open("vhd", str(files[-1]), readonly=True)
    try:
        assert img.read(0, SIZE // 512) == model
    finally:
        img.close()
    # The format module's own reader (Python, bit by bit) agrees.
    assert vhd.read_chain(vhd.open_chain(files[-1]), 0, SIZE // 512) == model


@needs_blktap
@needs_qemu
def test_blktap_checks_and_coalesces_our_chain_to_the_same_bytes(tmp_path: Path) -> None:
    files, model = make_chain(tmp_path, 3)
    for f in files:
        assert "is valid" in run(VHD_UTIL, "check", "-n", f)
    assert run(VHD_UTIL, "query", "-n", files[-1], "-p").strip() == str(files[-2])
    # vhd-util coalesce merges a child into its parent: leaf into s1, then s1 into base.
    run(VHD_UTIL, "coalesce", "-n", files[2])
    run(VHD_UTIL, "coalesce", "-n", files[1])
    assert to_raw(files[0]) == model


@needs_blktap
def test_chains_blktap_made_read_through_ours(tmp_path: Path) -> None:
    base, mid, leaf = (tmp_path / n for n in ("base.vhd", "mid.vhd", "leaf.vhd"))
    run(VHD_UTIL, "create", "-n", base, "-s", "8")
    model = bytearray(SIZE)
    rng = random.Random(7)
    for parent, child in ((base, mid), (mid, leaf)):
        img = Image.open("vhd", str(parent))
        try:
            random_writes(img, model, rng, 20)
        finally:
            img.close()
        run(VHD_UTIL, "snapshot", "-n", child, "-p", parent)
    img = Image.open("vhd", str(leaf))
    try:
        random_writes(img, model, rng, 20)
        assert img.read(0, SIZE // 512) == model
    finally:
        img.close()
    for f in (base, mid, leaf):
        assert "is valid" in run(VHD_UTIL, "check", "-n", f)


def test_a_parent_shared_by_two_open_leaves_is_never_written(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    vhd.create(base, SIZE)
    img = Image.open("vhd", str(base))
    try:
        img.write(0, b"\x01" * SIZE)
    finally:
        img.close()
    before = base.read_bytes()
    leaves = []
    for i in (1, 2):
        vhd.create(tmp_path / f"leaf{i}.vhd", 0, parent=base)
        leaves.append(Image.open("vhd", str(tmp_path / f"leaf{i}.vhd")))
    try:
        leaves[0].write(8, b"\x0a" * 4096)
        leaves[1].write(8, b"\x0b" * 1024)
        assert leaves[0].read(8, 8) == b"\x0a" * 4096
        assert leaves[1].read(8, 8) == b"\x0b" * 1024 + b"\x01" * 3072
    finally:
        for leaf in leaves:
            leaf.close()
    assert base.read_bytes() == before


def test_blocks_made_to_overlap_after_validation_are_refused_by_the_driver(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the vhd fuzz target (corpus/vhd/regression-overlapping-blocks): the
    file changes between the format module's checks and the C open, two BAT entries now
    sharing sectors; a write to one block showed through the other."""
    p = tmp_path / "d.vhd"
    vhd.create(p, 256 << 10, block_size=4096)
    img = Image.open("vhd", str(p))
    img.write(0, b"\x11" * 512)
    img.write(8, b"\x22" * 512)
    img.close()
    layer = vhd.Layer.open(p)
    real_open_chain = vhd.open_chain

    def then_overlap(path: str) -> list[vhd.Layer]:
        chain = real_open_chain(path)
        with open(p, "r+b") as f:   # block 1 now starts one sector before block 0 ends
            f.seek(layer.header.table_offset + 4)   # type: ignore[union-attr]
            f.write((layer.bat[0] + 8).to_bytes(4, "big"))
        return chain

    monkeypatch.setattr(vhd, "open_chain", then_overlap)
    with pytest.raises(OSError, match="Invalid argument"):
        Image.open("vhd", str(p))
