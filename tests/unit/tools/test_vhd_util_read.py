"""`vhd-util read`: blktap's output for the same images (where BLKTAP_BUILD names a
blktap build), and what it prints checked against the image itself."""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

import pytest

from blktap3.datapath import Image
from blktap3.datapath import vhdformat as vhd
from tests.support.tools import run_tool

from .test_vhd_util import fill, needs_blktap, ours, theirs

MiB = 1 << 20
OPTION_SETS = (["-p"], ["-p", "-x"], ["-b", "0", "-c", "4"], ["-b", "1", "-x"],
               ["-t", "4100", "-c", "3"], ["-t", "1", "-x"], ["-b", "99999"],
               ["-t", "999999999"], ["-z"], [])


def _chain(capsys: pytest.CaptureFixture[str], d: Path) -> tuple[Path, Path]:
    base, leaf = d / "base.vhd", d / "leaf.vhd"
    assert ours(capsys, "create", "-n", base, "-s", "8")[0] == 0
    fill(base, 3)
    assert ours(capsys, "snapshot", "-n", leaf, "-p", base)[0] == 0
    fill(leaf, 4)
    return base, leaf


@needs_blktap
def test_read_prints_what_blktaps_prints(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    base, leaf = _chain(capsys, tmp_path)
    theirs_base, theirs_leaf = tmp_path / "tb.vhd", tmp_path / "tl.vhd"
    theirs("create", "-n", theirs_base, "-s", "6")
    fill(theirs_base, 5)
    theirs("snapshot", "-n", theirs_leaf, "-p", theirs_base)
    images = [base, leaf, theirs_base, theirs_leaf]
    if shutil.which("qemu-img"):
        q = tmp_path / "q.vhd"
        run_tool("qemu-img", "create", "-q", "-f", "vpc", q, "4M")
        run_tool("qemu-io", "-f", "vpc", "-c", "write -P 0x5a 512 3k", q)
        images.append(q)
    for image in images:
        for opts in OPTION_SETS:
            args = ["read", "-n", str(image), *opts]
            assert ours(capsys, *args) == theirs(*args), args


def test_read_p_prints_the_images_own_fields(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    base, leaf = _chain(capsys, tmp_path)
    layer = vhd.Layer.open(leaf)
    assert layer.header is not None
    rc, out = ours(capsys, "read", "-n", leaf, "-p")
    assert rc == 0
    fields = dict(re.findall(r"^([A-Z][^:\n]*?)\s+: (.*)$", out, re.M))
    assert fields["Current disk size"] == f"8 MB ({8 * MiB} Bytes)"
    assert fields["Disk type"] == "Differencing hard disk"
    assert fields["UUID"] == str(uuid.UUID(bytes=layer.footer.uuid))
    assert fields["Parent UUID"] == str(uuid.UUID(bytes=vhd.Layer.open(base).footer.uuid))
    assert fields["Parent name"] == "base.vhd"
    assert fields["Max BAT size"] == str(layer.header.max_table_entries)
    assert out.count("(Good!)") == 3    # footer, header, batmap
    assert "decoded name : ./base.vhd" in out
    assert ours(capsys, "read", "-n", leaf, "-p", "-x")[1].count("Table offset        : 0x600") == 1


def test_read_b_and_t_point_at_the_data(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    _, leaf = _chain(capsys, tmp_path)
    layer = vhd.Layer.open(leaf)
    rc, out = ours(capsys, "read", "-n", leaf, "-b", "0", "-c", "4")
    assert rc == 0
    want = [f"block: {i}: offset: " + ("not allocated" if e == vhd.BAT_UNUSED else
                                       str(e * 512)) for i, e in enumerate(layer.bat)]
    assert out.splitlines() == want
    spb = layer.block_size // 512
    blk = next(i for i, e in enumerate(layer.bat) if e != vhd.BAT_UNUSED)
    with open(leaf, "rb") as f:
        bitmap = layer.bitmap(f, blk)
    idx = next(i for i in range(spb) if vhd.bit(bitmap, i))
    rc, out = ours(capsys, "read", "-n", leaf, "-t", str(blk * spb + idx))
    offset = int(out.rsplit(": ", 1)[1])
    img = Image.open("vhd", str(leaf), readonly=True)
    try:
        assert leaf.read_bytes()[offset : offset + 512] == img.read(blk * spb + idx, 1)
    finally:
        img.close()


def test_read_refuses_what_blktap_refuses(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    fixed = tmp_path / "f.vhd"
    vhd.create(fixed, MiB, fixed=True)
    assert ours(capsys, "read", "-n", fixed, "-p") == (22, f"Failed to get bat for {fixed}: -22\n")
    missing = tmp_path / "none.vhd"
    assert ours(capsys, "read", "-n", missing, "-p") == (2, f"Failed to open {missing}: -2\n")
    rc, out = ours(capsys, "read", "-p")
    assert rc == 22 and out.startswith("options:\n-h          help\n")
    rc, out = ours(capsys, "read", "-n", fixed, "-B")
    assert rc == 95
