"""Differencing VHDs over a raw file (blktap's `vhd-util snapshot -m`): reads fall
through to the raw file, writes stay in the leaf, the raw file is never written but by
coalesce. Judged by blktap's vhd-util (v4.0.8, with BLKTAP_BUILD): it makes such chains,
queries and checks ours, and its coalesce onto a copy of the raw file gives the bytes our
driver reads through the chain. qemu-img's vpc driver has no parents at all: it reads a
leaf's own sectors over zeros, which pins what the leaf file holds."""

from __future__ import annotations

import errno
import random
import shutil
from pathlib import Path

import pytest
from blktap3.tools import vhd_util

from blktap3.datapath import Image
from blktap3.datapath import vhdformat as vhd
from tests.support.tools import blktap_vhd_util, run_tool

MiB = 1 << 20
BLKTAP = blktap_vhd_util()
WRITES = ((0, 8), (100, 300), (4095, 2), (4096 + 17, 64), (12000, 1))   # (sector, count)


def theirs(*args: str | Path) -> tuple[int, str]:
    assert BLKTAP is not None
    res = run_tool(BLKTAP, *args, check=False)
    return res.returncode, res.stdout


def ours(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    rc = vhd_util.main([str(a) for a in args])
    return rc, capsys.readouterr().out


def chain_bytes(leaf: Path) -> bytes:
    img = Image.open("vhd", str(leaf), readonly=True)
    try:
        return img.read(0, img.info.sectors)
    finally:
        img.close()


@pytest.mark.parametrize("maker", ["ours", "blktap"])
def test_reads_fall_through_to_the_raw_file_and_writes_stay_in_the_leaf(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, maker: str) -> None:
    if maker == "blktap" and BLKTAP is None:
        pytest.skip("set BLKTAP_BUILD to a blktap install prefix")
    rng = random.Random(5)
    raw, leaf = tmp_path / "base.raw", tmp_path / "leaf.vhd"
    base = rng.randbytes(8 * MiB)
    raw.write_bytes(base)
    make = ours if maker == "ours" else (lambda _c, *a: theirs(*a))
    assert make(capsys, "snapshot", "-n", leaf, "-p", raw, "-m")[0] == 0
    chain = vhd.open_chain(leaf)
    assert [layer.raw for layer in chain] == [False, True] and chain[0].parent_is_raw
    assert chain_bytes(leaf) == base                      # all from the raw file
    want = bytearray(base)
    img = Image.open("vhd", str(leaf))
    try:
        for sector, count in WRITES:
            data = rng.randbytes(count * 512)
            img.write(sector, data)
            want[sector * 512 : (sector + count) * 512] = data
    finally:
        img.close()
    assert chain_bytes(leaf) == bytes(want)
    assert raw.read_bytes() == base                       # the parent is never written
    # query -p names the raw file, -d counts it (vhd_chain_depth); check passes.
    q = ("query", "-n", leaf, "-v", "-p", "-d")
    assert ours(capsys, *q) == (0, f"8\n{raw}\nchain depth: 2\n")
    assert ours(capsys, "check", "-n", leaf, "-p") == (0, f"{leaf} is valid\n")
    # qemu-img reads the leaf alone: what was written, zeros elsewhere.
    if shutil.which("qemu-img"):
        out = tmp_path / "qemu.raw"
        run_tool("qemu-img", "convert", "-f", "vpc", "-O", "raw", leaf, out)
        alone = bytearray(8 * MiB)
        for sector, count in WRITES:
            alone[sector * 512 : (sector + count) * 512] = \
                want[sector * 512 : (sector + count) * 512]
        assert out.read_bytes() == bytes(alone)
    if BLKTAP is None:
        return
    assert theirs(*q) == ours(capsys, *q)
    assert theirs("check", "-n", leaf, "-p") == (0, f"{leaf} is valid\n")
    # Coalesce writes the leaf into the raw file: blktap's and ours give the same bytes,
    # the bytes our driver read through the chain.
    results = []
    for who in ("blktap", "ours"):
        d = tmp_path / who
        d.mkdir()
        shutil.copy(raw, d / raw.name)
        shutil.copy(leaf, d / leaf.name)
        run = theirs if who == "blktap" else (lambda *a: ours(capsys, *a))
        assert run("coalesce", "-n", d / leaf.name)[0] == 0
        results.append((d / raw.name).read_bytes())
    assert results[0] == results[1] == bytes(want)


def test_a_snapshot_of_an_empty_leaf_over_a_raw_file_is_of_the_raw_file(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    raw, a, b = tmp_path / "base.raw", tmp_path / "a.vhd", tmp_path / "b.vhd"
    raw.write_bytes(bytes(4 * MiB))
    assert ours(capsys, "snapshot", "-n", a, "-p", raw, "-m")[0] == 0
    # vhd_util_find_snapshot_target: a is empty, so b's parent is the raw file.
    assert ours(capsys, "snapshot", "-n", b, "-p", a)[0] == 0
    assert ours(capsys, "query", "-n", b, "-p") == (0, f"{raw}\n")
    assert vhd.Layer.open(b).parent_is_raw
    if BLKTAP is not None:
        c = tmp_path / "c.vhd"
        assert theirs("snapshot", "-n", c, "-p", a)[0] == 0
        assert ours(capsys, "query", "-n", c, "-p") == (0, f"{raw}\n")


def test_raw_parents_that_cannot_serve_are_refused(tmp_path: Path) -> None:
    raw, leaf = tmp_path / "base.raw", tmp_path / "leaf.vhd"
    raw.write_bytes(bytes(4 * MiB))
    vhd.create(leaf, 0, parent=raw, parent_raw=True)
    with open(raw, "ab") as f:
        f.write(b"x")                                     # no longer whole sectors
    with pytest.raises(vhd.VhdError, match="not a whole number of sectors"):
        Image.open("vhd", str(leaf))
    raw.unlink()
    with pytest.raises(vhd.VhdError) as missing:
        Image.open("vhd", str(leaf))
    assert missing.value.errno == errno.ENOENT
    # A raw file larger than the leaf would be cut short: refused as a VHD parent is.
    raw.write_bytes(bytes(8 * MiB))
    with pytest.raises(vhd.VhdError, match="is larger"):
        vhd.open_chain(leaf)


def test_modify_m_reparents_onto_a_raw_copy_of_the_parent(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base, leaf, raw = tmp_path / "base.vhd", tmp_path / "leaf.vhd", tmp_path / "base.raw"
    vhd.create(base, 4 * MiB)
    img = Image.open("vhd", str(base))
    try:
        img.write(10, b"\x42" * 4096)
    finally:
        img.close()
    vhd.create(leaf, 0, parent=base)
    want = chain_bytes(leaf)
    raw.write_bytes(want)                       # the parent's disk as a raw file
    assert ours(capsys, "modify", "-n", leaf, "-p", raw, "-m") == (0, "")
    assert vhd.Layer.open(leaf).parent_is_raw and chain_bytes(leaf) == want
    assert ours(capsys, "query", "-n", leaf, "-p") == (0, f"{raw}\n")
    if BLKTAP is not None:
        assert theirs("query", "-n", leaf, "-p", "-d") == (0, f"{raw}\nchain depth: 2\n")
